"""Training throughput (images/s) of the BNNeck model: forward + CE + triplet + backward + Adam step.

Usage: python benchmarks/bench_training.py [--steps 5] [--batch 32]
Prints one JSON object per (backbone, input size).  Random images; data loading excluded.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from common.config import Config
from common.engine import make_optimizer, reid_loss
from common.models.reid import build_model


def measure(backbone: str, height: int, width: int, batch: int, steps: int) -> dict:
    config = Config(backbone=backbone, height=height, width=width)
    model = build_model(config, num_classes=100).train()
    optimizer = make_optimizer(model.parameters(), config)
    images = torch.randn(batch, 3, height, width)
    labels = torch.arange(batch) // 4

    def step() -> None:
        terms = reid_loss(model, model(images), labels, config)
        optimizer.zero_grad()
        sum(terms.values()).backward()
        optimizer.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    return {"case": "train_step", "backbone": backbone, "input": f"{height}x{width}", "batch": batch,
            "threads": torch.get_num_threads(), "images_per_s": round(batch * steps / seconds, 2),
            "s_per_batch": round(seconds / steps, 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--backbones", default="efficientnet_lite0,resnet18,resnet50")
    parser.add_argument("--sizes", default="128x64,256x128", help="comma-separated HEIGHTxWIDTH")
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
    for backbone in args.backbones.split(","):
        for height, width in sizes:
            print(json.dumps(measure(backbone, height, width, args.batch, args.steps)), flush=True)


if __name__ == "__main__":
    main()
