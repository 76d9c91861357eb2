"""PEM vs FedAvg: local-round wall time as a ratio (same process, same camera, rounds alternating), where PEM's
time goes (expert epoch, frozen maps, PEM training, stage 3), and the parameters / bytes a client sends and
receives per round (also with frozen backbone stages, which are not sent).

Usage: python benchmarks/bench_pem.py [--backbone resnet18] [--height 64 --width 32] [--repeats 2]
                                     [--run-config "local-epochs=2 pretrained='imagenet'"]
Prints one JSON object per case.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from common.config import load_config, parse_run_config
from common.data.loading import load_dataset
from common.data.partition import partition_by_camera
from common.engine import resolve_device
from common.federated.arrays import state_to_arrays
from common.methods import get_method
from common.methods.base import LocalJob

STAGES = ("seconds_expert", "seconds_pem_maps", "seconds_pem", "seconds_local")


def alternating_round_seconds(settings: dict, repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds of one camera's local round for FedAvg and PEM, run alternately (round 1 of each excluded:
    it includes one-off work such as pose vectors and the first expert), and PEM's seconds per stage."""
    runs = {}
    for name in ("fedavg", "pem"):
        config = load_config({**settings, "method": name})
        dataset = load_dataset(config)
        method = get_method(name)
        runs[name] = {"config": config, "method": method, "root": dataset.root, "private": {},
                      "partition": partition_by_camera(dataset.train)[0],
                      "shared": method.initial_shared_state(config), "times": [], "stages": {}}
    for server_round in range(1, repeats + 2):
        for run in runs.values():
            config = run["config"]
            job = LocalJob(config=config, partition=run["partition"], shared=run["shared"], private=run["private"],
                           server_round=server_round, lr=config.lr, seed=server_round,
                           device=resolve_device(config.device), data_root=run["root"])
            began = time.perf_counter()
            result = run["method"].local_round(job)
            run["private"] = result.private
            if server_round > 1:
                run["times"].append(time.perf_counter() - began)
                for stage in STAGES:
                    run["stages"].setdefault(stage, []).append(result.metrics.get(stage, 0.0))
    return {name: run["times"] for name, run in runs.items()}, runs["pem"]["stages"]


def communication(method_name: str, backbone: str, freeze_stages: int = 0) -> dict:
    pretrained = {"efficientnet_lite0": "imagenet"}.get(backbone, "none")
    config = load_config({"backbone": backbone, "method": method_name, "freeze-stages": freeze_stages,
                          "pretrained": pretrained if freeze_stages else "none"})
    shared = get_method(method_name).initial_shared_state(config)
    params = sum(v.numel() for v in shared.values() if v.is_floating_point())
    pem = sum(v.numel() for k, v in shared.items() if k.startswith("pem."))
    return {"case": "communication", "method": method_name, "backbone": backbone, "freeze_stages": freeze_stages,
            "shared_parameters": params, "pem_parameters": pem, "up_plus_down_parameters": 2 * params,
            "bytes_per_direction": state_to_arrays(shared).count_bytes()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--run-config", default="", help="further run-config overrides (key=value pairs)")
    parser.add_argument("--communication-only", action="store_true", help="only the parameter / byte counts")
    args = parser.parse_args()
    for method_name in ("fedavg", "pem"):
        print(json.dumps(communication(method_name, "resnet50")), flush=True)
    if args.communication_only:
        for freeze in (0, 5, 6, 7):
            print(json.dumps(communication("fedavg", "efficientnet_lite0", freeze)), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        settings = {"backbone": args.backbone, "height": args.height, "width": args.width, "pad": 4,
                    "batch-size": 32, "warmup-epochs": 0, "lr-steps": "", "device": "cpu",
                    "cache-dir": f"{tmp}/cache", "output-dir": f"{tmp}/out", **parse_run_config(args.run_config)}
        times, stages = alternating_round_seconds(settings, args.repeats)
        fedavg, pem = times["fedavg"], times["pem"]
    print(json.dumps({"case": "local_round", "backbone": args.backbone, "input": f"{args.height}x{args.width}",
                      "overrides": args.run_config,
                      "threads": torch.get_num_threads(), "fedavg_s": [round(t, 2) for t in fedavg],
                      "pem_s": [round(t, 2) for t in pem],
                      "pem_over_fedavg": round(statistics.median(pem) / statistics.median(fedavg), 2),
                      "pem_stage_s": {k: round(statistics.median(v), 2) for k, v in stages.items()}}), flush=True)


if __name__ == "__main__":
    main()
