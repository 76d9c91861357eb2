"""Real processes: ``flower-superlink`` + one ``flower-supernode`` per camera on 127.0.0.1, ``flwr run``.

Each test uses its own FLWR_HOME and free ports and stops every process it started (process group
and descendants) in a ``finally``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import torch

from common.federated.launch import (
    descendants,
    flwr_run,
    free_port,
    local_superlink,
    run_status,
    stop_process_tree,
    tool_env,
)
from conftest import write_run_config

ROOT = Path(__file__).resolve().parents[1]
CAMERAS = 3


@contextmanager
def supernode(flwr_home: Path, superlink: str, partition_id: int, log: Path, cwd: Path,
              num_partitions: int = CAMERAS):
    """A ``flower-supernode`` for camera ``partition_id``; stopped (with its ClientApp processes) on exit."""
    command = ["flower-supernode", "--insecure", "--superlink", superlink, "--port", str(free_port()),
               "--node-config", f"partition-id={partition_id} num-partitions={num_partitions}"]
    env = {**tool_env(flwr_home), "OMP_NUM_THREADS": "1"}  # 3 SuperNodes share this machine's cores
    with log.open("ab") as handle:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=handle,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process
    finally:
        stop_process_tree(process)


@contextmanager
def deployment(tmp_path: Path, nodes: int = CAMERAS):
    """A SuperLink (deployment runtime) and ``nodes`` SuperNodes (partitions 0..nodes-1 of ``nodes``);
    yields (FLWR_HOME, SuperLink address, SuperLink process, SuperNode processes)."""
    flwr_home = tmp_path / "flwr-home"
    with ExitStack() as stack:
        address, superlink = stack.enter_context(local_superlink(flwr_home, tmp_path / "superlink.log",
                                                                 simulation=False, cwd=tmp_path))
        processes = [stack.enter_context(supernode(flwr_home, address, i, tmp_path / f"supernode-{i}.log", tmp_path,
                                                   num_partitions=nodes))
                     for i in range(nodes)]
        yield flwr_home, address, superlink, processes


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.parametrize("method", ["fedavg", "pem"])
def test_two_rounds_with_superlink_and_one_supernode_per_camera(tiny_run_config, tmp_path, method):
    values = {**tiny_run_config, "method": method, "min-available-clients": CAMERAS, "min-train-clients": CAMERAS}
    run_config = write_run_config(tmp_path / "run.toml", values)
    with deployment(tmp_path) as (flwr_home, _, _, _):
        run_id, output = flwr_run(ROOT, flwr_home, str(run_config), timeout=240, echo=False)
        assert run_id is not None, output
        assert run_status(flwr_home, run_id) == "finished:completed", output[-3000:]
    out = Path(values["output-dir"])
    assert [r["round"] for r in _records(out / "metrics.jsonl")] == [1, 2]
    assert all({"mAP", "rank1", "rank5", "rank10", "mINP"} <= set(r) for r in _records(out / "metrics.jsonl"))
    assert [(r["clients"], r["failed"]) for r in _records(out / "rounds.jsonl")] == [(CAMERAS, 0), (CAMERAS, 0)]
    for camera in range(1, CAMERAS + 1):  # private state of every camera, saved by a separate ClientApp process
        [state] = (out / "client-state" / f"camera-{camera}").glob("*-round-00002.pt")
        private = torch.load(state, weights_only=False)["state"]
        assert "classifier" in private and ("expert" in private) == (method == "pem")
    shared = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    assert any(k.startswith("pem.") for k in shared) == (method == "pem")  # PEM is averaged with the backbone


def wait_for_nodes(flwr_home: Path, count: int, timeout: float = 60.0) -> None:
    """Block until the SuperLink lists ``count`` online SuperNodes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = subprocess.run(["flwr", "supernode", "list", "camfed-local", "--format", "json"],
                                env=tool_env(flwr_home), capture_output=True, text=True, timeout=60)
        try:
            nodes = json.loads(result.stdout)["nodes"]
        except (json.JSONDecodeError, KeyError):
            nodes = []
        if sum(node["status"] == "online" for node in nodes) >= count:
            return
        time.sleep(1)
    raise TimeoutError(f"fewer than {count} SuperNodes online after {timeout:.0f} s")


def kill_now(process: subprocess.Popen) -> None:
    """SIGKILL a SuperNode and its ClientApp processes: it vanishes without unregistering."""
    for pid in [process.pid, *descendants(process.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)
