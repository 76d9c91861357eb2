"""GPU check: the figures camfed has never measured on CUDA, in one short run (scripts/gpu-check.sh runs it).

Cases, one JSON object each (printed and appended to ``OUT_DIR/gpu-check.jsonl``):

- ``train_step``: centralized ResNet-50 training at 256×128 with AMP (float16 autocast + gradient scaler),
  batch 64 of random images, images/s (``benchmarks/bench_training.py``'s measurement).
- ``federation``: 2 rounds of FedAvg through the real ServerApp / ClientApp code on the in-process grid
  (``camfed/inprocess.py``), 3 synthetic cameras (48 ids), ResNet-50 at 256×128 from random weights, AMP,
  1 local epoch; wall seconds of the whole run and of each round (``rounds.jsonl``), final mAP.
- ``evaluate``, ``nfc``, ``rerank``: at Market-1501 size (3,368 queries, 15,913 gallery images, 2048-d random
  L2-normalised features on the GPU, ids as ``benchmarks/bench_evaluation.py`` draws them): chunked
  ``evaluate_features``, NFC on the gallery, k-reciprocal re-ranking; synchronised wall seconds.

Every case records ``peak_gpu_gib`` (``torch.cuda.max_memory_allocated`` since the case began); the last
line is a summary with the peak over all cases.  Without CUDA it prints one line and exits with status 3.

Usage: PYTHONPATH=. python benchmarks/gpu_check.py [--out OUT_DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_evaluation import SIZES, _ids  # noqa: E402
from bench_postprocess import DIM, _unit_features  # noqa: E402
from bench_training import measure  # noqa: E402

NO_CUDA_EXIT = 3
GIB = 2**30


def _peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / GIB, 3)


def _timed(run) -> tuple[object, float]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = run()
    torch.cuda.synchronize()
    return out, round(time.perf_counter() - start, 3)


def federation_case(work: Path) -> dict:
    """2 in-process rounds of 3 synthetic cameras on the GPU."""
    from camfed.inprocess import InProcessGrid
    from client.app import app as client_app
    from common.config import load_config
    from common.federated.server import run_federation

    config = load_config({
        "dataset": "synthetic", "synth-ids": 48, "synth-cameras": 3, "cache-dir": str(work / "cache"),
        "backbone": "resnet50", "pretrained": "none", "height": 256, "width": 128, "amp": True,
        "device": "cuda", "num-server-rounds": 2, "local-epochs": 1, "min-train-clients": 3,
        "min-available-clients": 3, "output-dir": str(work / "federation")})
    records, seconds = _timed(lambda: run_federation(InProcessGrid(client_app, 3, config.to_run_config()), config))
    rounds = [json.loads(line) for line in (work / "federation" / "rounds.jsonl").read_text().splitlines()]
    return {"case": "federation", "cameras": 3, "rounds": 2, "backbone": "resnet50", "input": "256x128",
            "amp": True, "seconds": seconds, "round_seconds": [r["seconds"] for r in rounds],
            "mAP": round(records[-1]["mAP"], 4), "peak_gpu_gib": _peak_gib()}


def market_cases() -> list[dict]:
    """Evaluation, NFC and re-ranking at Market size on random features on the GPU."""
    from common.evaluation import evaluate_features
    from common.postprocess import k_reciprocal_rerank, nfc

    n_query, n_gallery, *id_spec = SIZES["market"]
    q_pids, g_pids, q_camids, g_camids = _ids(np.random.default_rng(0), n_query, n_gallery, *id_spec)
    query, gallery = _unit_features(n_query, 0).cuda(), _unit_features(n_gallery, 1).cuda()
    runs = {
        "evaluate": lambda: evaluate_features(query, gallery, q_pids, g_pids, q_camids, g_camids),
        "nfc": lambda: nfc(gallery),
        "rerank": lambda: k_reciprocal_rerank(query, gallery),
    }
    results = []
    for name, run in runs.items():
        torch.cuda.reset_peak_memory_stats()
        _, seconds = _timed(run)
        results.append({"case": name, "sizes": [n_query, n_gallery], "dim": DIM, "seconds": seconds,
                        "peak_gpu_gib": _peak_gib()})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/gpu-check", help="folder for gpu-check.jsonl")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device (torch {torch.__version__}: torch.cuda.is_available() is False); "
              "nothing was measured", file=sys.stderr)
        sys.exit(NO_CUDA_EXIT)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "gpu-check.jsonl"
    log.write_text("")
    results = []

    def record(result: dict) -> None:
        results.append(result)
        line = json.dumps(result)
        print(line, flush=True)
        with log.open("a") as handle:
            handle.write(line + "\n")

    record({"case": "device", "name": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / GIB, 1)})
    torch.cuda.reset_peak_memory_stats()
    record(measure("resnet50", 256, 128, batch=64, steps=20, device="cuda", amp=True))
    with tempfile.TemporaryDirectory() as work:
        torch.cuda.reset_peak_memory_stats()
        record(federation_case(Path(work)))
    for result in market_cases():
        record(result)
    record({"case": "summary", "peak_gpu_gib": max(r.get("peak_gpu_gib", 0.0) for r in results)})


if __name__ == "__main__":
    main()
