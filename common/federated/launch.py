"""``camfed federate``: run the Flower app in a local simulation with one command, then clean up.

Plain ``flwr run .`` starts a detached simulation SuperLink that installs the app's dependencies
with uv on every run (fails offline; online it downloads torch each time) and keeps running
afterwards, and Flower's default of 2 CPUs per simulated client serialises clients on 2 cores.
This launcher instead starts ``flower-superlink --simulation --disable-runtime-dependency-installation``
on a free port in a private ``FLWR_HOME`` (the current folder as its working directory, so relative
paths in the run config resolve there), runs ``flwr run <app> <connection> --stream`` with one
virtual SuperNode per camera and ``cpus-per-client`` CPUs each, reports the run's final status and
stops every process it started.  ``flwr run`` exits with 0 even when the ServerApp raised; ``federate``
returns 1 unless the run's status is ``finished:completed`` and the ServerApp wrote no ``failure.json``.
SIGTERM or SIGINT (Ctrl-C) stops the processes it started as well, and ``federate`` then returns 128 + the
signal number (143 for SIGTERM, 130 for SIGINT).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from common.config import Config, ConfigError, parse_run_config, tomllib
from common.data.loading import check_dataset
from common.data.partition import partition_by_camera
from common.federated.data import load_node_dataset
from common.federated.server import FAILURE_FILE
from common.pipeline import check_post_inputs
from common.rundir import CHECKPOINT, check_run_folder

CONNECTION = "camfed-local"
STARTUP_TIMEOUT = 60.0


def app_config(app_dir: Path, run_config: str = "") -> Config:
    """The app's ``[tool.flwr.app.config]`` with ``run_config`` (a TOML file or "k=v ...") applied."""
    pyproject = app_dir / "pyproject.toml"
    if not pyproject.is_file():
        raise ConfigError(f"no pyproject.toml in the app folder {app_dir}: run this in the camfed repository "
                          "or pass --app <camfed repository>")
    defaults = tomllib.loads(pyproject.read_text()).get("tool", {}).get("flwr", {}).get("app", {}).get("config")
    if defaults is None:
        raise ConfigError(f"{pyproject} has no [tool.flwr.app.config]: is {app_dir} the camfed app? "
                          "Pass --app <camfed repository>")
    overrides = parse_run_config(run_config)
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ConfigError(f"run config keys {unknown} are not in [tool.flwr.app.config] of {pyproject}")
    return Config.from_mapping({**defaults, **overrides})


def count_cameras(config: Config) -> int:
    """Number of training cameras (clients); generates the synthetic data once if needed.  A dataset that
    cannot train or be evaluated is an error here, before anything starts."""
    dataset = load_node_dataset(config)
    check_dataset(dataset, protocol=config.eval_protocol)
    return len(partition_by_camera(dataset.train))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tool_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower's commands: this interpreter's bin folder first on PATH, own FLWR_HOME."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    return env


def write_connection(flwr_home: Path, name: str, address: str) -> None:
    """A Flower config file whose default SuperLink connection is ``name`` at ``address`` (insecure)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\ninsecure = true\n')


def wait_healthy(port: int, process: subprocess.Popen, log: Path, timeout: float = STARTUP_TIMEOUT) -> None:
    """Block until the SuperLink on ``port`` answers ``/health``; raise if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {process.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"flower-superlink did not become healthy within {timeout:.0f} s; see {log}")


def descendants(pid: int) -> list[int]:
    """PIDs of all descendants of ``pid`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived while ``federate`` ran.  A KeyboardInterrupt, so that no ``except Exception``
    on the way up swallows it and every ``finally`` (the processes' cleanup) runs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopOnSignals:
    """While active, SIGTERM and SIGINT raise :class:`Stopped` in the main thread.

    The processes ``federate`` starts live in their own sessions (so that a terminal's Ctrl-C reaches only
    camfed, which then stops them in order), and Python's default SIGTERM ends the interpreter without running
    any ``finally``: without this, SIGTERM left the SuperLink, its SuperExec and ``flwr run`` running.  The
    first signal counts; later ones are ignored while the processes stop, and one that arrives while a
    process tree is being stopped is only noted in ``received``, so that no cleanup is cut short.  Signals the
    caller ignores (SIG_IGN, e.g. SIGINT of a background job) stay ignored; off the main thread this does
    nothing, as Python allows signal handlers only there.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopOnSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                previous = signal.getsignal(signum)
                if previous is not signal.SIG_IGN:
                    self._previous[signum] = previous
                    signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            return
        self.received = signum
        if not _stopping:
            raise Stopped(signum)


_stopping = 0  # stop_process_tree calls under way (StopOnSignals does not interrupt them)


def stop_process_tree(process: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM ``process`` (started with ``start_new_session=True``), its group and its descendants; SIGKILL
    whatever is left after ``grace`` seconds."""
    global _stopping
    if process.poll() is not None:
        return
    _stopping += 1
    try:
        _stop_tree(process, grace)
    finally:
        _stopping -= 1


def _stop_tree(process: subprocess.Popen, grace: float) -> None:
    tree = descendants(process.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        _signal_all(process, tree, sig)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in tree):
            time.sleep(0.2)
        if not any(_alive(p) for p in tree):
            return


def _signal_all(process: subprocess.Popen, tree: list[int], sig: int) -> None:
    for target in (lambda: os.killpg(process.pid, sig), *(lambda p=p: os.kill(p, sig) for p in tree)):
        try:
            target()
        except (ProcessLookupError, PermissionError):
            pass


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@contextmanager
def local_superlink(flwr_home: Path, log: Path, simulation: bool = True, port: int | None = None,
                    cwd: Path | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """A running ``flower-superlink`` (insecure, 127.0.0.1, no runtime dependency installation) as the
    default connection ``camfed-local`` of ``flwr_home``; yields (address, process) and stops it on exit."""
    port = port or free_port()
    command = ["flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
               "--host", "127.0.0.1", "--port", str(port)] + (["--simulation"] if simulation else [])
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as log_handle:
        process = subprocess.Popen(command, env=tool_env(flwr_home), cwd=cwd, stdout=log_handle,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(port, process, log)
        write_connection(flwr_home, CONNECTION, f"127.0.0.1:{port}")
        yield f"127.0.0.1:{port}", process
    finally:
        stop_process_tree(process)


def flwr_run(app_dir: Path, flwr_home: Path, run_config: str = "", federation_config: str = "",
             timeout: float | None = None, echo: bool = True) -> tuple[int | None, str]:
    """``flwr run <app> camfed-local [--run-config] [--federation-config] --stream``; (run id, output)."""
    command = ["flwr", "run", str(app_dir), CONNECTION, "--stream"]
    command += ["--run-config", run_config] if run_config else []
    command += ["--federation-config", federation_config] if federation_config else []
    process = subprocess.Popen(command, env=tool_env(flwr_home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    fired = threading.Event()

    def expire() -> None:
        fired.set()
        stop_process_tree(process, grace=5.0)

    watchdog = threading.Timer(timeout, expire) if timeout else None
    if watchdog:
        watchdog.start()
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if echo:
                print(line, end="", flush=True)
        process.wait()
    finally:
        if watchdog:
            watchdog.cancel()
        stop_process_tree(process, grace=5.0)
    if fired.is_set():
        raise TimeoutError(f"flwr run did not finish within {timeout:.0f} s")
    output = "".join(lines)
    match = re.search(r"Successfully started run (\d+)", output)
    return (int(match.group(1)) if match else None), output


def run_status(flwr_home: Path, run_id: int) -> str:
    """The run's status as ``flwr ls`` reports it, e.g. ``finished:completed``."""
    result = subprocess.run(["flwr", "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"],
                            env=tool_env(flwr_home), capture_output=True, text=True, timeout=60)
    try:
        return json.loads(result.stdout)["runs"][0]["status"]
    except (json.JSONDecodeError, KeyError, IndexError):
        return f"unknown ({result.stdout.strip() or result.stderr.strip()})"


def run_failure(output_dir: Path, since: float) -> str:
    """The error the ServerApp recorded in ``<output-dir>/failure.json`` after ``since`` (a Unix time), or "".

    ``flwr run`` exits with 0 whatever the run's outcome; this file and the run's status tell.
    """
    path = output_dir / FAILURE_FILE
    if not path.is_file() or path.stat().st_mtime < since:
        return ""
    try:
        return str(json.loads(path.read_text())["error"])
    except (json.JSONDecodeError, KeyError):
        return f"the run failed (unreadable {path})"


def federate(run_config: str = "", app_dir: str | Path = ".", cpus_per_client: int = 1, gpus_per_client: float = 0.0,
             num_supernodes: int | None = None, timeout: float | None = None) -> int:
    """Run the camfed app in a local simulation, one virtual SuperNode per camera; 0 when the run completed.

    ``run_config``: as ``flwr run --run-config`` (TOML file or "k=v ..."); relative paths in it resolve
    against the current folder.  The SuperLink log goes to ``<output-dir>/superlink.log``.
    """
    app_dir = Path(app_dir).expanduser().resolve()
    config = app_config(app_dir, run_config)
    check_run_folder(config)  # the ServerApp checks again; failing here saves starting Flower
    check_post_inputs(config)
    clients = num_supernodes or count_cameras(config)
    output_dir = Path(config.output_dir).expanduser().absolute()
    federation = (f"num-supernodes={clients} client-resources-num-cpus={cpus_per_client} "
                  f"client-resources-num-gpus={gpus_per_client}")
    print(f"camfed federate: {clients} cameras, {config.num_server_rounds} rounds of '{config.method}', "
          f"output in {output_dir}", flush=True)
    started = time.time()
    with StopOnSignals() as signals:
        try:
            with tempfile.TemporaryDirectory(prefix="camfed-flwr-home-") as home:
                flwr_home = Path(home)
                with local_superlink(flwr_home, output_dir / "superlink.log", cwd=Path.cwd()):
                    run_id, _ = flwr_run(app_dir, flwr_home, run_config, federation, timeout=timeout)
                    status = run_status(flwr_home, run_id) if run_id is not None else "not started"
        except Stopped:
            pass  # the with blocks above have stopped every process on the way out
    if signals.received is not None:
        checkpoint = output_dir / CHECKPOINT
        hint = f"; checkpoint at {checkpoint} - resume with resume=true" if checkpoint.is_file() else ""
        print(f"camfed federate: stopped by {signal.Signals(signals.received).name}; the SuperLink and flwr run "
              f"it started are stopped{hint}", file=sys.stderr, flush=True)
        return 128 + signals.received
    failure = run_failure(output_dir, since=started)
    if status != "finished:completed" or failure:
        print(f"camfed federate: run {run_id} {status}{': ' + failure if failure else ''}; see the messages above "
              f"and {output_dir / 'superlink.log'}", flush=True)
        return 1
    print(f"camfed federate: run {run_id} {status}; metrics in {output_dir / 'metrics.jsonl'}", flush=True)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``federate`` options (shared by ``camfed federate`` and ``python -m common.federated.launch``)."""
    parser.add_argument("--run-config", default="", help="a TOML file or \"key=value ...\" (as flwr run --run-config)")
    parser.add_argument("--app", default=".", help="the Flower app folder (with pyproject.toml)")
    parser.add_argument("--cpus-per-client", type=int, default=1, help="CPUs per simulated client (default 1)")
    parser.add_argument("--gpus-per-client", type=float, default=0.0,
                        help="GPU share per simulated client, e.g. 1 (one GPU each) or 0.5 (two per GPU)")
    parser.add_argument("--num-supernodes", type=int, default=None, help="default: one per training camera")
    parser.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")


def run_from_args(args: argparse.Namespace) -> int:
    return federate(args.run_config, args.app, args.cpus_per_client, args.gpus_per_client, args.num_supernodes,
                    args.timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.federated.launch", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except (ConfigError, OSError, ValueError, RuntimeError, TimeoutError) as err:
        print(f"camfed federate: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("camfed federate: interrupted (resume with resume=true)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
