"""What the federation costs: wall time per round and bytes per client per round, in Flower's
simulation runtime and with real SuperLink / SuperNode processes, plus Flower's own overhead.

Cases (each in a fresh subprocess; one JSON object per case on stdout):

- ``shared-parameters``: shared parameter count and bytes of one ArrayRecord, ResNet-18 / ResNet-50.
- ``{simulation,deployment,inprocess}-resnet50``: 3 rounds of FedAvg, ResNet-50 at 128×64, the
  4-camera synthetic set (48 ids), 1 local epoch; in-process = the same app code through an
  in-process Grid (no Flower runtime; clients run one after the other).
- ``{inprocess,simulation,deployment}-tiny``: near-zero local work (ResNet-18, 32×16 images,
  12 ids / 3 cameras, 1 local epoch ≈ 3 batches per client): the difference to in-process is the
  Flower runtime's own overhead per round.

Per round the server logs ``seconds`` (send → all replies → averaged; evaluation and checkpoint
excluded) and the bytes of the ArrayRecords; clients report ``local-seconds`` (their local round).
``round1_s`` includes start-up (Ray actors, first ClientApp processes), ``round_s`` is the mean of
later rounds.  Simulation gives each client 1 CPU (1 torch thread); the deployment SuperNodes run
with OMP_NUM_THREADS=1 since they share this machine.  ``peak_rss_gib``: the peak of the summed RSS
of the case's process tree, sampled every 0.5 s.  ``wall_s``: the whole case (start-up, 3 rounds, evaluations,
shutdown).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.config import write_run_config  # noqa: E402  (after the path set-up)

RESNET50 = {"backbone": "resnet50", "height": 128, "width": 64, "batch-size": 32, "num-instances": 4,
            "synth-ids": 48, "synth-cameras": 4}
TINY = {"backbone": "resnet18", "height": 32, "width": 16, "pad": 2, "batch-size": 8, "num-instances": 4,
        "synth-ids": 12, "synth-cameras": 3}
COMMON = {"dataset": "synthetic", "pretrained": "none", "warmup-epochs": 0, "lr-steps": "", "num-server-rounds": 3,
          "local-epochs": 1, "eval-every": 3, "device": "cpu", "num-workers": 0, "min-train-clients": 2,
          "min-available-clients": 2}
CASES = ("shared-parameters", "inprocess-tiny", "simulation-tiny", "deployment-tiny", "simulation-resnet50",
         "deployment-resnet50", "inprocess-resnet50")


class TreeMemory:
    """Samples the summed RSS (GiB) of this process and its descendants in a background thread."""

    def __init__(self, interval: float = 0.5):
        self.peak, self.interval, self._stop = 0.0, interval, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from common.federated.launch import descendants

        while not self._stop.is_set():
            total = 0
            for pid in [os.getpid(), *descendants(os.getpid())]:
                try:
                    total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
                except (OSError, IndexError, ValueError):
                    pass
            self.peak = max(self.peak, total / 2**30)
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def shared_parameters() -> list[dict]:
    from common.config import Config
    from common.federated.arrays import state_to_arrays
    from common.methods import get_method

    rows = []
    for backbone in ("resnet18", "resnet50"):
        state = get_method("fedavg").initial_shared_state(Config(backbone=backbone))
        params = sum(v.numel() for k, v in state.items() if not k.endswith(("running_mean", "running_var",
                                                                             "num_batches_tracked")))
        rows.append({"case": "shared-parameters", "backbone": backbone, "shared_parameters": params,
                     "shared_tensors_incl_bn_buffers": sum(v.numel() for v in state.values()),
                     "arrayrecord_bytes": state_to_arrays(state).count_bytes()})
    return rows


def summarize(case: str, out: Path, wall: float, peak: float, extra: dict | None = None) -> dict:
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    later = rounds[1:] or rounds
    clients = rounds[-1]["clients"]
    return {"case": case, "rounds": len(rounds), "clients": clients,
            "round1_s": rounds[0]["seconds"], "round_s": round(sum(r["seconds"] for r in later) / len(later), 2),
            "client_local_s": round(sum(r["local-seconds"] for r in later) / len(later), 2),
            "bytes_down_per_client": rounds[-1]["bytes_down_per_client"],
            "bytes_up_per_client": rounds[-1]["bytes_up"] // clients,
            "wall_s": round(wall, 1), "peak_rss_gib": round(peak, 2), **(extra or {})}


def run_inprocess(values: dict, out: Path) -> dict:
    from camfed.inprocess import InProcessGrid
    from client.app import app
    from common.config import load_config
    from common.federated.data import load_node_dataset
    from common.federated.server import run_federation

    config = load_config(values)
    cameras = len({r.camid for r in load_node_dataset(config).train})
    run_federation(InProcessGrid(app, cameras, values), config)
    return {}


def run_simulation(values: dict, out: Path) -> dict:
    from common.federated.launch import flwr_run, local_superlink, run_status

    cameras = count_cameras_of(values)
    run_config = write_run_config(out.parent / "run.toml", values)
    with tempfile.TemporaryDirectory() as home, local_superlink(Path(home), out.parent / "superlink.log",
                                                                 cwd=out.parent):
        run_id, output = flwr_run(ROOT, Path(home), str(run_config), f"num-supernodes={cameras} "
                                  "client-resources-num-cpus=1", timeout=3600, echo=False)
        status = run_status(Path(home), run_id)
    assert status == "finished:completed", output[-2000:]
    return {}


def run_deployment(values: dict, out: Path) -> dict:
    from common.federated.launch import flwr_run, free_port, local_superlink, run_status, stop_process_tree, tool_env

    cameras = count_cameras_of(values)
    run_config = write_run_config(out.parent / "run.toml", {**values, "min-available-clients": cameras})
    with tempfile.TemporaryDirectory() as home, ExitStack() as stack:
        flwr_home = Path(home)
        address, _ = stack.enter_context(local_superlink(flwr_home, out.parent / "superlink.log", simulation=False,
                                                         cwd=out.parent))
        for i in range(cameras):
            log = (out.parent / f"supernode-{i}.log").open("ab")
            stack.callback(log.close)
            node = subprocess.Popen(["flower-supernode", "--insecure", "--superlink", address, "--port",
                                     str(free_port()), "--node-config", f"partition-id={i} num-partitions={cameras}"],
                                    env={**tool_env(flwr_home), "OMP_NUM_THREADS": "1"}, cwd=out.parent,
                                    stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            stack.callback(stop_process_tree, node)
        run_id, output = flwr_run(ROOT, flwr_home, str(run_config), timeout=3600, echo=False)
        status = run_status(flwr_home, run_id)
        listed = subprocess.run(["flwr", "ls", "camfed-local", "--run-id", str(run_id), "--format", "json"],
                                env=tool_env(flwr_home), capture_output=True, text=True).stdout
    assert status == "finished:completed", output[-2000:]
    traffic = json.loads(listed)["runs"][0].get("network-traffic", {})
    return {"superlink_traffic_bytes": traffic}


def load_values(values: dict):
    from common.config import load_config

    return load_config(values)


def count_cameras_of(values: dict) -> int:
    from common.federated.launch import count_cameras

    return count_cameras(load_values(values))


def run_case(case: str, cache: Path) -> list[dict]:
    if case == "shared-parameters":
        return shared_parameters()
    mode, size = case.split("-")
    with tempfile.TemporaryDirectory(prefix=f"bench-{case}-") as tmp:
        out = Path(tmp) / "out"
        values = {**COMMON, **(TINY if size == "tiny" else RESNET50), "cache-dir": str(cache),
                  "output-dir": str(out)}
        count_cameras_of(values)  # generate the data outside the timed part
        runner = {"inprocess": run_inprocess, "simulation": run_simulation, "deployment": run_deployment}[mode]
        began = time.monotonic()
        with TreeMemory() as memory:
            extra = runner(values, out)
        return [summarize(case, out, time.monotonic() - began, memory.peak, extra)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=CASES, help="run one case in this process")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated cases (each in a subprocess)")
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache" / "camfed"))
    args = parser.parse_args()
    if args.case:
        for row in run_case(args.case, Path(args.cache_dir).absolute()):
            print(json.dumps(row), flush=True)
        return
    for case in args.cases.split(","):
        subprocess.run([sys.executable, __file__, "--case", case, "--cache-dir", args.cache_dir], check=True)


if __name__ == "__main__":
    main()
