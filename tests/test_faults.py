"""Faults: recurring client errors stop the run loudly; transient ones, hung or killed nodes, a killed
SuperLink and garbage replies are survived.

In-process tests (fast) check the server's rules on ``InProcessGrid``; the real-process tests start a
SuperLink and SuperNodes on 127.0.0.1 (helpers of test_federation_deployment.py), inject the fault with
signals to processes they started or, for a hung ClientApp, the test-only hook ``CAMFED_TEST_HOLD_REPLY``
(``common.federated.client.hold_reply``), and stop everything in a ``finally``.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, Error, Message, MetricRecord, RecordDict
from test_federation_deployment import CAMERAS, deployment, kill_now, supernode, wait_for_nodes

from camfed.inprocess import InProcessGrid, _with_id
from client.app import app as client_app
from common.config import load_config
from common.federated.client import HOLD_ENV, hold_reply
from common.federated.launch import flwr_run, run_failure, run_status, tool_env
from common.federated.server import CHECKPOINT, FAILURE_FILE, FederationFailed, run_federation
from common.federated.strategy import APP_FAILURE_CODES, MESSAGE_EXPIRED_CODE
from conftest import write_run_config

ROOT = Path(__file__).resolve().parents[1]
SLOW_TIMEOUT = 2400  # seconds: the real-process tests wait up to 25 min for rounds on a loaded 2-core machine


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _echo(message: Message, context) -> Message:
    """A client that trains instantly: it returns the global weights, as camera partition-id + 1 with 10 images."""
    camera = int(context.node_config["partition-id"]) + 1
    metrics = MetricRecord({"num-examples": 10, "camera": camera, "loss": 1.0})
    return Message(RecordDict({"arrays": message.content["arrays"], "metrics": metrics}), reply_to=message)


# ------------------------------------------------------------------------------------------- in-process


def test_app_failure_codes_are_flowers():
    from flwr.common.constant import ErrorCode

    assert set(APP_FAILURE_CODES) == {ErrorCode.LOAD_CLIENT_APP_EXCEPTION, ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                      ErrorCode.MOD_FAILED_PRECONDITION, ErrorCode.INVALID_FAB}
    assert MESSAGE_EXPIRED_CODE == ErrorCode.MESSAGE_UNAVAILABLE


def test_recurring_client_errors_stop_the_run_after_the_first_round(tiny_run_config):
    """2 nodes for 3 cameras: every ClientApp raises the same ConfigError; the run stops after round 1."""
    config = load_config(tiny_run_config)
    with pytest.raises(FederationFailed, match="3 training cameras"):
        run_federation(InProcessGrid(client_app, 2, tiny_run_config), config)
    out = Path(config.output_dir)
    failure = json.loads((out / FAILURE_FILE).read_text())
    assert failure["round"] == 1 and failure["clients"] == 0
    assert [f["kind"] for f in failure["failures"]] == ["raised", "raised"]
    assert all("ConfigError" in f["reason"] and "3 training cameras" in f["reason"] for f in failure["failures"])
    assert [r["round"] for r in _records(out / "rounds.jsonl")] == [1] and not (out / "metrics.jsonl").exists()
    assert run_failure(out, since=0).startswith("round 1:")  # what `camfed federate` reports, exiting with 1
    assert run_failure(out, since=time.time() + 60) == ""  # an older run's failure is not this run's


def test_non_finite_or_misshapen_weights_are_ignored_and_the_model_stays_finite(tiny_run_config):
    def faulty(message: Message, context) -> Message:
        reply = _echo(message, context)
        arrays, pid = reply.content["arrays"], int(context.node_config["partition-id"])
        shape = arrays["bottleneck.weight"].shape
        if pid == 0:
            arrays["bottleneck.weight"] = Array(np.full(shape, np.nan, dtype=np.float32))
        elif pid == 1:
            arrays["bottleneck.weight"] = Array(np.zeros((shape[0] + 1,), dtype=np.float32))
        return reply

    config = load_config({**tiny_run_config, "num-server-rounds": 1, "min-train-clients": 1})
    run_federation(InProcessGrid(faulty, 3, tiny_run_config), config)
    out = Path(config.output_dir)
    [record] = _records(out / "rounds.jsonl")
    assert (record["clients"], record["aggregated"]) == (1, True)
    reasons = {f["node_id"]: f["reason"] for f in record["failures"] if f["kind"] == "rejected"}
    assert "non-finite" in reasons[1001] and "bottleneck.weight" in reasons[1002]
    model = torch.load(out / CHECKPOINT, weights_only=False)["model"]
    assert all(bool(torch.isfinite(v).all()) for v in model.values() if v.is_floating_point())


class _SuperLinkGrid(InProcessGrid):
    """Answers for a message whose reply is missing as flwr's SuperLink does: an error with code
    MESSAGE_UNAVAILABLE, for a message whose TTL has passed or whose node was removed (``gone``)."""

    def __init__(self, *args, gone: tuple[int, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.gone = gone

    def _deliver(self, message: Message, message_id: str) -> Message | None:
        reply = None if message.metadata.dst_node_id in self.gone else super()._deliver(message, message_id)
        if reply is None:
            reply = Message(Error(MESSAGE_EXPIRED_CODE, "Message Unavailable"), reply_to=_with_id(message, message_id))
        return reply


@pytest.mark.parametrize("grid", [InProcessGrid, _SuperLinkGrid])
def test_round_timeout_closes_the_round_without_the_late_camera(tiny_run_config, grid):
    """Whether the late reply is simply missing (in-process) or the SuperLink answers the expired message with
    an error (deployment), the late camera is a ``no-reply``."""
    def slow(message: Message, context) -> Message:
        if context.node_config["partition-id"] == 2:
            time.sleep(7)  # longer than round-timeout: the reply comes after the message's TTL
        return _echo(message, context)

    config = load_config({**tiny_run_config, "num-server-rounds": 1, "round-timeout": 4})
    run_federation(grid(slow, 3, tiny_run_config), config)
    [record] = _records(Path(config.output_dir) / "rounds.jsonl")
    assert (record["sampled"], record["clients"], record["aggregated"]) == (3, 2, True)
    [failure] = record["failures"]
    assert failure["node_id"] == 1003 and failure["kind"] == "no-reply" and "round-timeout = 4 s" in failure["reason"]


def test_a_message_unavailable_before_its_ttl_is_not_a_timeout(tiny_run_config):
    """The SuperLink's MESSAGE_UNAVAILABLE before the TTL (the node was removed) is an ``unavailable`` camera, and
    the round does not wait for the timeout."""
    config = load_config({**tiny_run_config, "num-server-rounds": 1, "round-timeout": 600})
    began = time.monotonic()
    run_federation(_SuperLinkGrid(_echo, 3, tiny_run_config, gone=(1003,)), config)
    [record] = _records(Path(config.output_dir) / "rounds.jsonl")
    assert record["clients"] == 2 and record["seconds"] < 60 and time.monotonic() - began < 300
    [failure] = record["failures"]
    assert (failure["node_id"], failure["kind"]) == (1003, "unavailable")


def test_hold_reply_blocks_while_its_file_exists(tmp_path, monkeypatch):
    """The test-only hook of the hanging-ClientApp test: inert without its variable or its file."""
    hold_reply(2, 1)  # no variable
    monkeypatch.setenv(HOLD_ENV, str(tmp_path))
    hold_reply(2, 1)  # no file
    gate = tmp_path / "partition-2-round-1"
    gate.touch()
    hold_reply(2, 2)  # another round
    hold_reply(1, 1)  # another camera
    released = []
    thread = threading.Thread(target=lambda: released.append(hold_reply(2, 1, poll=0.05)))
    thread.start()
    time.sleep(0.5)
    assert thread.is_alive() and not released
    gate.unlink()
    thread.join(timeout=10)
    assert not thread.is_alive() and released == [None]


# ------------------------------------------------------------------------------------- real processes


def _config_file(tmp_path: Path, values: dict) -> str:
    return str(write_run_config(tmp_path / "run.toml", values))


def test_a_federation_that_cannot_train_fails_loudly(tiny_run_config, tmp_path):
    """The reported case: fewer SuperNodes than cameras.  Every ClientApp raises; the ServerApp stops after
    round 1 with the clients' errors in failure.json and the run's status is failed."""
    values = {**tiny_run_config, "min-available-clients": 2, "min-train-clients": 2}
    with deployment(tmp_path, nodes=2) as (flwr_home, _, _, _):
        run_id, output = flwr_run(ROOT, flwr_home, _config_file(tmp_path, values), timeout=300, echo=False)
        assert run_id is not None, output
        assert run_status(flwr_home, run_id) == "finished:failed", output[-3000:]
    out = Path(values["output-dir"])
    failure = json.loads((out / FAILURE_FILE).read_text())
    assert failure["round"] == 1 and len(failure["failures"]) == 2
    assert all(f["kind"] == "raised" and "3 training cameras" in f["reason"] for f in failure["failures"])
    assert "3 training cameras" in output  # the clients' errors are in the server log
    assert len(_records(out / "rounds.jsonl")) == 1 and not (out / "metrics.jsonl").exists()


def _start_run(flwr_home: Path, run_config: str) -> int:
    """``flwr run`` without streaming; the run id."""
    result = subprocess.run(["flwr", "run", str(ROOT), "camfed-local", "--run-config", run_config],
                            env=tool_env(flwr_home), capture_output=True, text=True, timeout=600)  # a loaded CPU
    return int(result.stdout.split("Successfully started run")[1].split()[0])


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _wait_finished(flwr_home: Path, run_id: int, timeout: float) -> str:
    _wait_for(lambda: not run_status(flwr_home, run_id).startswith(("pending", "starting", "running")), timeout,
              f"run {run_id} to finish")
    return run_status(flwr_home, run_id)


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT)
def test_a_killed_supernode_is_left_out_then_rejoins_with_its_private_state(tiny_run_config, tmp_path):
    """Camera 3's SuperNode is SIGKILLed during round 2 and started again: round 2 is averaged over the
    other two, and in round 3 the camera trains again from its round-1 private state."""
    values = {**tiny_run_config, "num-server-rounds": 3, "eval-every": 3, "min-available-clients": CAMERAS - 1,
              "min-train-clients": CAMERAS - 1, "round-timeout": 120}
    out = Path(values["output-dir"])
    with deployment(tmp_path) as (flwr_home, address, _, nodes):
        wait_for_nodes(flwr_home, CAMERAS)
        run_id = _start_run(flwr_home, _config_file(tmp_path, values))
        _wait_for(lambda: len(_records(out / "rounds.jsonl")) >= 1, 600, "round 1")
        kill_now(nodes[2])
        with supernode(flwr_home, address, 2, tmp_path / "supernode-2-again.log", tmp_path):
            assert _wait_finished(flwr_home, run_id, 900) == "finished:completed"
    rounds = _records(out / "rounds.jsonl")
    assert [r["clients"] for r in rounds] == [CAMERAS, CAMERAS - 1, CAMERAS]
    assert [f["kind"] for f in rounds[1]["failures"]] in (["unavailable"], ["no-reply"])
    saved = sorted(p.name.split("-round-")[1] for p in (out / "client-state" / "camera-3").glob("*.pt"))
    assert saved == ["00001.pt", "00003.pt"]  # no round-2 state: round 3 continued from round 1's


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT)
def test_a_hanging_clientapp_is_cut_off_by_the_round_timeout(tiny_run_config, tmp_path, monkeypatch):
    """Camera 3's ClientApp hangs in round 1 with its reply ready (``CAMFED_TEST_HOLD_REPLY``: it blocks until the
    test releases it, its heartbeat running, its SuperNode connected): the round closes at round-timeout with the
    other two; released after that, its late reply is refused by the SuperLink; round 2 has all three.

    Not SIGSTOP: flwr 1.41 watches ClientApp processes by heartbeat.  One stopped before it has pulled its message
    is replaced by a new process after 30 s (which then replied in time: the earlier failure of this test), one
    stopped later is answered for with "ClientApp stopped responding" after 60 s; neither waits for the timeout."""
    timeout = 240  # well above a ClientApp's start-up + round on a loaded 2-core machine (45 s was not)
    values = {**tiny_run_config, "min-available-clients": CAMERAS, "min-train-clients": CAMERAS - 1,
              "round-timeout": timeout}
    out = Path(values["output-dir"])
    gate = tmp_path / "hold" / "partition-2-round-1"  # camera 3 = partition 2
    gate.parent.mkdir()
    gate.touch()
    monkeypatch.setenv(HOLD_ENV, str(gate.parent))  # inherited by the SuperNodes and their ClientApps
    node_log, superlink_log = tmp_path / "supernode-2.log", tmp_path / "superlink.log"
    with deployment(tmp_path) as (flwr_home, _, _, _):
        wait_for_nodes(flwr_home, CAMERAS)
        _wait_for(lambda: re.search(r"SuperNode ID: (\d+)", _text(node_log)), 60, "camera 3's node id")
        node = int(re.search(r"SuperNode ID: (\d+)", _text(node_log)).group(1))
        run_id = _start_run(flwr_home, _config_file(tmp_path, values))
        _wait_for(lambda: "holding the round-1 reply of partition 2" in _text(node_log), 600, "camera 3 to hang")
        _wait_for(lambda: len(_records(out / "rounds.jsonl")) >= 1, 600, "round 1 to close")
        assert "reply of partition 2 released" not in _text(node_log)  # it hung for the whole round
        gate.unlink()  # the late reply goes out now
        assert _wait_finished(flwr_home, run_id, 900) == "finished:completed"
        server_log = subprocess.run(["flwr", "log", str(run_id), "camfed-local", "--show"], env=tool_env(flwr_home),
                                    capture_output=True, text=True, timeout=120).stdout
    rounds = _records(out / "rounds.jsonl")
    assert [r["clients"] for r in rounds] == [CAMERAS - 1, CAMERAS]
    [failure] = rounds[0]["failures"]
    assert (failure["node_id"], failure["kind"]) == (node, "no-reply")
    assert f"round-timeout = {timeout} s; a later reply is discarded" in failure["reason"]
    assert timeout <= rounds[0]["seconds"] < timeout + 110
    assert f"round 1: node {node} (camera ?) no-reply: no reply within round-timeout" in server_log, server_log[-3000:]
    assert "reply of partition 2 released" in _text(node_log)
    assert "Message TTL has expired" in _text(superlink_log)  # the SuperLink refused the late reply


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT)
def test_a_killed_superlink_resumed_equals_an_uninterrupted_run(tiny_run_config, tmp_path):
    """SuperLink, its ServerApp and the SuperNodes are SIGKILLed after round 1's checkpoint; a new deployment
    with resume=true ends with exactly the weights of an uninterrupted run."""
    plain = {**tiny_run_config, "output-dir": str(tmp_path / "plain"), "min-available-clients": CAMERAS}
    with deployment(tmp_path / "a") as (flwr_home, _, _, _):
        run_id, output = flwr_run(ROOT, flwr_home, _config_file(tmp_path / "a", plain), timeout=600, echo=False)
        assert run_status(flwr_home, run_id) == "finished:completed", output[-3000:]

    crashed = {**plain, "output-dir": str(tmp_path / "crashed")}
    out = Path(crashed["output-dir"])
    with deployment(tmp_path / "b") as (flwr_home, _, superlink, nodes):
        wait_for_nodes(flwr_home, CAMERAS)
        _start_run(flwr_home, _config_file(tmp_path / "b", crashed))
        _wait_for(lambda: len(_records(out / "rounds.jsonl")) >= 1 and
                  torch.load(out / CHECKPOINT, weights_only=False)["round"] == 1, 600, "round 1's checkpoint")
        for process in (superlink, *nodes):
            kill_now(process)
    resumed = {**crashed, "resume": True}
    with deployment(tmp_path / "c") as (flwr_home, _, _, _):
        run_id, output = flwr_run(ROOT, flwr_home, _config_file(tmp_path / "c", resumed), timeout=600, echo=False)
        assert run_status(flwr_home, run_id) == "finished:completed", output[-3000:]

    a = torch.load(tmp_path / "plain" / CHECKPOINT, weights_only=False)
    b = torch.load(out / CHECKPOINT, weights_only=False)
    assert a["round"] == b["round"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
