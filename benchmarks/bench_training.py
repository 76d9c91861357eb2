"""Training throughput (images/s) of the BNNeck model: forward + CE + triplet + backward + Adam step.

Usage: python benchmarks/bench_training.py [--steps 5] [--batch 32] [--device cuda --amp]
Prints one JSON object per (backbone, input size).  Random images and random initial weights (nothing is
downloaded; the speed does not depend on the weights); data loading excluded.  On CUDA the timing is
synchronised and ``peak_gpu_gib`` is the allocator's peak over the timed steps.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext

import torch

from common.config import Config
from common.engine import make_optimizer, reid_loss
from common.models.reid import build_model


def measure(backbone: str, height: int, width: int, batch: int, steps: int, device: str = "cpu",
            amp: bool = False) -> dict:
    """Images per second of ``steps`` training steps on ``batch`` random images (B, 3, height, width).

    ``amp``: float16 autocast with a gradient scaler (CUDA only), as ``common.engine.train_epoch`` trains.
    """
    target = torch.device(device)
    config = Config(backbone=backbone, height=height, width=width, pretrained="none")
    model = build_model(config, num_classes=100).train().to(target)
    optimizer = make_optimizer(model.parameters(), config)
    images = torch.randn(batch, 3, height, width, device=target)
    labels = (torch.arange(batch) // 4).to(target)
    scaler = torch.amp.GradScaler("cuda") if amp else None
    cuda = target.type == "cuda"

    def step() -> None:
        with torch.autocast("cuda") if amp else nullcontext():
            terms = reid_loss(model, model(images), labels, config)
        loss = sum(terms.values())
        optimizer.zero_grad()
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    step()  # warm-up
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {"case": "train_step", "backbone": backbone, "input": f"{height}x{width}", "batch": batch,
              "device": str(target), "amp": amp, "threads": torch.get_num_threads(),
              "images_per_s": round(batch * steps / seconds, 2), "s_per_batch": round(seconds / steps, 3)}
    if cuda:
        result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--backbones", default="efficientnet_lite0,resnet18,resnet50")
    parser.add_argument("--sizes", default="128x64,256x128", help="comma-separated HEIGHTxWIDTH")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="float16 autocast + gradient scaler (CUDA)")
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
    for backbone in args.backbones.split(","):
        for height, width in sizes:
            print(json.dumps(measure(backbone, height, width, args.batch, args.steps, args.device, args.amp)),
                  flush=True)


if __name__ == "__main__":
    main()
