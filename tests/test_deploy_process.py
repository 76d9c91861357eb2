"""Deployment with real processes: the compose services' command lines, taken from
deploy/make_compose.py, run on 127.0.0.1 with free ports, TLS and SuperNode authentication on.

Two registered cameras train a round on their own folders (``split_by_camera``); a third
SuperNode whose key was never registered is refused by the SuperLink.  Every process runs in
its own session and is stopped (process group and descendants) in ``finally``.
"""

from __future__ import annotations

import importlib.util
import re
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.data.synthetic import ensure_synthetic
from common.deploy import flwr_connection_toml, split_by_camera
from common.federated import launch
from common.federated.history import read_jsonl

REPO = Path(__file__).resolve().parents[1]
REGISTERED, INTRUDER = ("camera-1", "camera-2"), "camera-3"
RUN_TIMEOUT = 300.0


def _make_compose():
    spec = importlib.util.spec_from_file_location("make_compose", REPO / "deploy" / "make_compose.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def image_flwr_env() -> dict[str, str]:
    """The FLWR_* settings the image's ENV sets (runtime installs, telemetry, update check off), but FLWR_HOME."""
    text = (REPO / "deploy" / "Dockerfile").read_text().replace("\\\n", " ")
    pairs = re.findall(r"\b(FLWR_\w+)=(\S+)", " ".join(line for line in text.splitlines() if line.startswith("ENV ")))
    return {k: v for k, v in pairs if k != "FLWR_HOME"}


def _run_config(settings: dict) -> str:
    """``flwr run --run-config`` text: strings quoted, booleans in TOML spelling."""
    def value(v):
        return ("true" if v else "false") if isinstance(v, bool) else (f"'{v}'" if isinstance(v, str) else str(v))
    return " ".join(f"{k}={value(v)}" for k, v in settings.items())


class Processes:
    """Started processes, each in its own session, logging to ``<logs>/<name>.log``."""

    def __init__(self, logs: Path):
        self.logs, self.started = logs, {}
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, command: list[str], home: Path, cwd: Path) -> subprocess.Popen:
        command = [sys.executable if command[0] == "python" else command[0], *command[1:]]
        env = {**launch.tool_env(home), "PYTHONPATH": str(REPO)}
        home.mkdir(parents=True, exist_ok=True)
        cwd.mkdir(parents=True, exist_ok=True)
        with (self.logs / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.started[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for process in self.started.values():
            launch.stop_process_tree(process, grace=10.0)


def wait_for_tls(port: int, ca: Path, process: subprocess.Popen, timeout: float = 60.0) -> str:
    """Block until 127.0.0.1:``port`` completes a TLS handshake verified against ``ca``; the TLS version."""
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"flower-superlink exited with code {process.returncode}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
                with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    return tls.version()
        except (ConnectionRefusedError, ssl.SSLEOFError, socket.timeout):
            time.sleep(0.3)
    raise TimeoutError(f"no TLS on 127.0.0.1:{port} within {timeout:.0f} s")


def make_secrets(root: Path) -> Path:
    """TLS certificates and camera keys made by the deploy scripts, as a user would."""
    secrets = root / "secrets"
    subprocess.run(["bash", str(REPO / "deploy" / "certs.sh"), str(secrets / "certs")], check=True,
                   capture_output=True, timeout=60)
    subprocess.run(["bash", str(REPO / "deploy" / "node-keys.sh"), str(secrets), *REGISTERED, INTRUDER],
                   check=True, capture_output=True, timeout=60)
    return secrets


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_registered_cameras_train_over_tls_and_an_unregistered_supernode_is_refused(tiny_cache, tmp_path,
                                                                                     monkeypatch):
    for key, value in image_flwr_env().items():  # every process (and flwr) runs with the image's settings
        monkeypatch.setenv(key, value)
    mc = _make_compose()
    dataset = ensure_synthetic(tiny_cache, progress=False, num_ids=12, num_cameras=3, seed=0)
    folders = split_by_camera(dataset, tmp_path / "data", dataset="synthetic")
    assert sorted(folders) == ["camera-1", "camera-2", "camera-3", "server"]
    secrets = make_secrets(tmp_path)
    certs, ca = secrets / "certs", secrets / "certs" / "ca.crt"
    state, out = tmp_path / "state", tmp_path / "outputs"
    link_port = launch.free_port()
    link = f"127.0.0.1:{link_port}"
    procs = Processes(tmp_path / "logs")
    try:
        superlink = procs.start("superlink", mc.superlink_command(
            "127.0.0.1", link_port, str(certs), str(secrets / "superexec" / "superlink.secret"),
            str(state / "superlink" / "superlink.db")), state / "superlink" / "flwr", state / "superlink")
        assert wait_for_tls(link_port, ca, superlink) in ("TLSv1.2", "TLSv1.3")
        procs.start("serverapp", mc.serverapp_command(link, str(ca), str(secrets / "superexec" / "superlink.secret")),
                    state / "serverapp" / "flwr", tmp_path / "work-server")

        register = subprocess.run(
            [sys.executable if a == "python" else a
             for a in mc.register_command(link, str(ca), [str(secrets / "keys" / f"{c}.pub") for c in REGISTERED])],
            env={**launch.tool_env(tmp_path / "register-home"), "PYTHONPATH": str(REPO)},
            capture_output=True, text=True, timeout=180)
        assert register.returncode == 0, register.stderr
        assert register.stdout.count(": registered ") == len(REGISTERED), register.stdout

        for camera in (*REGISTERED, INTRUDER):
            runtime = f"127.0.0.1:{launch.free_port()}"
            host, port = runtime.split(":")
            config = mc.node_config(str(folders[camera]), str(state / camera), "cpu")
            secret = str(secrets / "superexec" / f"{camera}.secret")
            procs.start(f"supernode-{camera}", mc.supernode_command(
                link, str(ca), str(secrets / "keys" / camera), config, host, int(port), secret),
                tmp_path / f"home-supernode-{camera}", tmp_path / f"work-supernode-{camera}")
            procs.start(f"clientapp-{camera}", mc.clientapp_command(runtime, secret),
                        state / camera / "flwr", tmp_path / f"work-{camera}")

        intruder = procs.started[f"supernode-{INTRUDER}"]
        intruder.wait(timeout=120)
        assert intruder.returncode != 0
        assert "Failed to activate SuperNode" in procs.log(f"supernode-{INTRUDER}")

        operator = tmp_path / "operator-home"
        operator.mkdir()
        (operator / "config.toml").write_text(flwr_connection_toml(link, ca, name=launch.CONNECTION))
        settings = {
            "dataset": "synthetic", "data-dir": str(folders["server"]), "backbone": "resnet18",
            "pretrained": "none", "height": 32, "width": 16, "pad": 2, "batch-size": 8, "num-instances": 4,
            "device": "cpu", "amp": False, "warmup-epochs": 0, "lr-steps": "", "num-server-rounds": 1,
            "eval-every": 1, "min-train-clients": 2, "min-available-clients": 2, "output-dir": str(out),
        }
        run_id, output = launch.flwr_run(REPO, operator, _run_config(settings), timeout=RUN_TIMEOUT, echo=False)
        assert run_id is not None, output
        assert launch.run_status(operator, run_id) == "finished:completed", output
    finally:
        procs.stop_all()

    evaluations = read_jsonl(out / "metrics.jsonl")
    assert [e["round"] for e in evaluations] == [1]
    assert evaluations[0]["clients"] == len(REGISTERED)
    assert 0.0 <= evaluations[0]["mAP"] <= 1.0
    for camera in REGISTERED:  # each camera kept its private state in its own state directory
        assert list((state / camera / camera).glob("*-round-00001.pt")), camera
    assert not (state / INTRUDER / INTRUDER).exists()
