"""The main job's path: ``federate`` = local simulation SuperLink + ``flwr run`` + cleanup (Ray; 1-3 min), and
its cleanup when a signal stops it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from common.federated.launch import StopOnSignals, Stopped, federate, stop_process_tree
from conftest import write_run_config

ROOT = Path(__file__).resolve().parents[1]


def processes_with_env(name: str, value: str) -> list[str]:
    """Command lines of live processes whose environment has ``name=value``."""
    return list(_processes_with_env(name, value).values())


def _processes_with_env(name: str, value: str) -> dict[int, str]:
    needle = f"{name}={value}".encode()
    found = {}
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in environ.read_bytes().split(b"\0"):
                state = (environ.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found[int(environ.parent.name)] = (environ.parent / "cmdline").read_bytes().replace(
                        b"\0", b" ").decode()
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


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_every_process_federate_started(sig, tiny_run_config, tmp_path):
    """SIGTERM / SIGINT to a running ``camfed federate``: it stops its SuperLink, the SuperExec and simulation
    under it and ``flwr run``, then exits with 128 + the signal.  (Before the fix SIGTERM killed only camfed and
    left the other four processes running.)"""
    marker = uuid.uuid4().hex
    run_config = write_run_config(tmp_path / "run.toml", {**tiny_run_config, "num-server-rounds": 20})
    command = [sys.executable, "-m", "common.cli", "federate", "--run-config", str(run_config), "--app", str(ROOT)]
    process = subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "CAMFED_TEST_MARKER": marker},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while not any("Successfully started run" in line for line in lines):
            assert process.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.5)
        time.sleep(3)  # the SuperLink launches the SuperExec and the simulation for the run
        assert len(processes_with_env("CAMFED_TEST_MARKER", marker)) >= 4  # camfed, SuperLink, SuperExec, flwr run
        process.send_signal(sig)
        assert process.wait(timeout=120) == 128 + sig
    finally:
        if process.poll() is None:  # the test failed: kill what this test started (its marker), not more
            for pid in _processes_with_env("CAMFED_TEST_MARKER", marker):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    reader.join(timeout=10)
    assert f"stopped by {sig.name}" in "".join(lines)
    deadline = time.monotonic() + 30  # Ray's workers, if any started, exit shortly after its raylet stops
    while processes_with_env("CAMFED_TEST_MARKER", marker) and time.monotonic() < deadline:
        time.sleep(1)
    assert processes_with_env("CAMFED_TEST_MARKER", marker) == []


def test_stop_on_signals_raises_once_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped) as stopped, StopOnSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler runs at the next bytecode; this line is not reached
    assert stopped.value.signum == signal.SIGTERM and signals.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_signal_does_not_cut_a_process_cleanup_short():
    """A signal that arrives while a process tree is being stopped is noted, not raised in the middle."""
    child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                              "lambda *a: (time.sleep(1), exit(0))); print(flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE, start_new_session=True)
    child.stdout.readline()  # its SIGTERM handler is installed
    with StopOnSignals() as signals:
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        stop_process_tree(child, grace=10)  # the child takes 1 s to exit after SIGTERM; SIGINT comes meanwhile
        timer.join()
    assert child.returncode == 0 and signals.received == signal.SIGINT
