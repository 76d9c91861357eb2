"""The main job's path: ``federate`` = local simulation SuperLink + ``flwr run`` + cleanup (Ray; 1-3 min)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from common.federated.launch import federate
from conftest import write_run_config

ROOT = Path(__file__).resolve().parents[1]


def processes_with_env(name: str, value: str) -> list[str]:
    """Command lines of live processes whose environment has ``name=value``."""
    needle = f"{name}={value}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in environ.read_bytes().split(b"\0"):
                state = (environ.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append((environ.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_federate_runs_a_simulation_and_cleans_up(tiny_run_config, tmp_path, monkeypatch):
    marker = uuid.uuid4().hex
    monkeypatch.setenv("CAMFED_TEST_MARKER", marker)  # inherited by every process federate starts
    monkeypatch.chdir(tmp_path)
    values = {**tiny_run_config, "method": "fedprox", "output-dir": "out"}  # relative: resolved in the cwd
    run_config = write_run_config(tmp_path / "run.toml", values)
    assert federate(str(run_config), ROOT, cpus_per_client=1, timeout=600) == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2] and all(r["clients"] == 3 for r in records)
    assert (tmp_path / "out" / "superlink.log").is_file()
    deadline = time.monotonic() + 30  # Ray's workers exit on their own shortly after its raylet stops
    while processes_with_env("CAMFED_TEST_MARKER", marker) and time.monotonic() < deadline:
        time.sleep(1)
    assert processes_with_env("CAMFED_TEST_MARKER", marker) == []
