"""Centralized training on the whole training set: the federated methods' upper bound."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from common.config import Config
from common.data.dataset import relabel
from common.data.loading import load_dataset, train_loader
from common.engine import (append_jsonl, atomic_save, evaluate_model, learning_rate, make_optimizer,
                           resolve_device, seed_everything, set_lr, train_epoch, write_config_snapshot)
from common.models.reid import build_model

CHECKPOINT = "checkpoint.pt"


def train_centralized(config: Config) -> list[dict]:
    """Train for ``epochs``, checkpoint every epoch, evaluate every ``eval-every`` epochs and at the end.

    Writes ``output_dir/metrics.jsonl`` (one object per evaluation), ``config.json`` and ``checkpoint.pt``.
    With ``resume`` it continues from the checkpoint.  Returns the evaluation records of this call.
    """
    output_dir = Path(config.output_dir)
    seed_everything(config.seed)
    device = resolve_device(config.device)
    dataset = load_dataset(config)
    labels = relabel(dataset.train)
    model = build_model(config, num_classes=len(labels)).to(device)
    optimizer = make_optimizer(model.parameters(), config)
    scaler = torch.amp.GradScaler("cuda") if config.amp and device.type == "cuda" else None
    start_epoch = _restore(output_dir / CHECKPOINT, model, optimizer, config) if config.resume else 0
    write_config_snapshot(config, output_dir)
    loader = train_loader(dataset.train, labels, config, seed=config.seed)
    records = []
    for epoch in range(start_epoch, config.epochs):
        loader.sampler.set_epoch(epoch)
        set_lr(optimizer, learning_rate(epoch, config))
        stats = train_epoch(model, loader, optimizer, config, device, scaler, desc=f"epoch {epoch + 1}/{config.epochs}")
        atomic_save({"epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "config": config.to_run_config(), "rng": torch.get_rng_state()}, output_dir / CHECKPOINT)
        if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
            record = {"epoch": epoch + 1, **evaluate_model(model, dataset, config, device),
                      "train_loss": stats.get("ce", 0.0) + stats.get("triplet", 0.0)}
            append_jsonl(output_dir / "metrics.jsonl", record)
            records.append(record)
            print(json.dumps(record))
    return records


def _restore(path: Path, model, optimizer, config: Config) -> int:
    if not path.is_file():
        raise FileNotFoundError(f"resume = true but no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return int(state["epoch"])
