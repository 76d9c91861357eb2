"""Real processes: ``flower-superlink`` + one ``flower-supernode`` per camera on 127.0.0.1, ``flwr run``.

Each test uses its own FLWR_HOME and free ports and stops every process it started (process group
and descendants) in a ``finally``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import torch

from common.data.loading import load_dataset
from common.data.records import ReIDDataset
from common.federated.launch import (
    descendants,
    flwr_run,
    free_port,
    local_superlink,
    run_status,
    stop_process_tree,
    tool_env,
)
from conftest import load_config, write_run_config

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


# name → (run-config settings, the private state each camera keeps between rounds)
REAL_PROCESS_RUNS = {
    "fedavg": ({"method": "fedavg"}, {"classifier"}),
    "pem": ({"method": "pem"}, {"classifier", "expert", "expert-optimizer"}),
    "calr": ({"method": "calr"}, set()),
    # every kNN edge of similarity >= 0 is kept so that the tiny cameras' centroids merge across cameras
    "calr-share-centroids": ({"method": "calr", "calr-share-centroids": True, "calr-max-distance": 1.0}, {"labels"}),
    "fire2": ({"method": "fire2", "fire2-start-epoch": 1}, {"classifier", "far-head"}),  # round 2 trains FIRe²
}
SLOW_RUNS = ("calr", "calr-share-centroids", "fire2")


@pytest.mark.parametrize("name", [
    *(name for name in REAL_PROCESS_RUNS if name not in SLOW_RUNS),
    *(pytest.param(name, marks=[pytest.mark.slow, pytest.mark.timeout(1500)]) for name in SLOW_RUNS)])
def test_two_rounds_with_superlink_and_one_supernode_per_camera(tiny_run_config, tmp_path, name):
    """Two rounds through real processes.  CALR trains on a copy of the data whose training identities are
    shuffled and must give bit-identical weights and clusters to an in-process run on the true identities."""
    settings, private_keys = REAL_PROCESS_RUNS[name]
    method = settings["method"]
    values = {**tiny_run_config, **settings, "min-available-clients": CAMERAS, "min-train-clients": CAMERAS}
    if method == "calr":
        values, reference = label_free_runs(values, tmp_path)
    run_config = write_run_config(tmp_path / "run.toml", values)
    with deployment(tmp_path) as (flwr_home, _, _, _):
        run_id, output = flwr_run(ROOT, flwr_home, str(run_config), timeout=600 if name in SLOW_RUNS else 240,
                                  echo=False)
        assert run_id is not None, output
        assert run_status(flwr_home, run_id) == "finished:completed", output[-3000:]
    out = Path(values["output-dir"])
    metrics, rounds = _records(out / "metrics.jsonl"), _records(out / "rounds.jsonl")
    assert [r["round"] for r in metrics] == [1, 2]
    assert all({"mAP", "rank1", "rank5", "rank10", "mINP"} <= set(r) and math.isfinite(r["mAP"]) for r in metrics)
    assert [(r["clients"], r["failed"]) for r in rounds] == [(CAMERAS, 0), (CAMERAS, 0)]
    for camera in range(1, CAMERAS + 1):  # private state of every camera, saved by a separate ClientApp process
        [state] = (out / "client-state" / f"camera-{camera}").glob("*-round-00002.pt")
        assert set(torch.load(state, weights_only=False)["state"]) == private_keys
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    assert checkpoint["method"] == method
    assert any(k.startswith("pem.") for k in checkpoint["model"]) == (method == "pem")  # PEM is averaged too
    if method == "calr":  # clustering statistics of every camera, averaged, in both rounds
        assert all(r["calr_clusters"] >= 1 and 0 <= r["calr_outlier_fraction"] <= 1 for r in rounds)
        if values.get("calr-share-centroids"):  # centroids went up, cross-camera clusters came down and were used
            first, second = rounds
            assert first["calr_shared_centroids"] >= 3 and first["calr_cross_camera_clusters"] >= 1
            assert first["calr_cross_camera"] == 0 and second["calr_cross_camera"] > 0
            assert second["bytes_down_per_client"] > first["bytes_down_per_client"]
        expected = torch.load(reference / "checkpoint.pt", weights_only=False)["model"]
        assert checkpoint["model"].keys() == expected.keys()
        assert all(torch.equal(checkpoint["model"][k], expected[k]) for k in expected)  # no identity label read
        calr_keys = [k for k in rounds[0] if k.startswith("calr_")]
        assert ([[r[k] for k in calr_keys] for r in rounds]
                == [[r[k] for k in calr_keys] for r in _records(reference / "rounds.jsonl")])
    if method == "fire2":  # round 2 re-clustered every identity into fine-grained ids
        assert rounds[1]["fire2_fine_ids"] >= 4 and "ce" in rounds[0]


def msmt17_view(dataset: ReIDDataset, folder: Path) -> Path:
    """``dataset`` as an MSMT17 folder: list files (``<entry> <pid>``) of links to its images, in its record order
    and with its identities (Market file names would carry the identity and sort by it)."""
    for split, kind, records in (("train", "train", dataset.train), ("test", "query", dataset.query),
                                 ("test", "gallery", dataset.gallery)):
        (folder / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for index, record in enumerate(records):  # MSMT17 names: the camera is the third "_" field
            entry = f"{kind}{index:05d}_0_{record.camid:02d}_0{Path(record.path).suffix}"
            (folder / split / entry).symlink_to(record.path)
            lines.append(f"{entry} {record.pid}\n")
        (folder / f"list_{kind}.txt").write_text("".join(lines))
    return folder


def label_free_runs(values: dict, tmp_path: Path) -> tuple[dict, Path]:
    """For a method that must not read identity labels: the run config ``values`` moved to a copy of the data
    whose training identities are shuffled (records in the same order), and the output folder of an in-process
    federation of ``values`` on the true identities, run now with one torch thread as the ClientApps have."""
    from test_calr import shuffled_identities

    from camfed.inprocess import InProcessGrid
    from client.app import app as client_app
    from common.federated.server import run_federation

    dataset = load_dataset(load_config(values))
    true, shuffled = ({**values, "dataset": "msmt17", "data-dir": str(msmt17_view(data, tmp_path / name))}
                      for name, data in (("true-ids", dataset), ("shuffled-ids", shuffled_identities(dataset))))
    true["output-dir"] = str(tmp_path / "reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_federation(InProcessGrid(client_app, CAMERAS, true), load_config(true))
    finally:
        torch.set_num_threads(threads)
    return shuffled, Path(true["output-dir"])


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
