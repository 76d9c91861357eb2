"""Shared training / evaluation machinery: devices, seeds, optimisers, lr schedule, one epoch, evaluation."""

from __future__ import annotations

import json
import random
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from common.config import Config, ConfigError
from common.data.loading import test_loader
from common.data.records import ReIDDataset
from common.evaluation import evaluate_features, extract_features
from common.losses import batch_hard_triplet, cross_entropy_smooth
from common.models.reid import ReIDModel, ReIDOutput

# extra loss term a method adds to CE + triplet: (model, outputs, labels, dataset indices) -> scalar tensor
ExtraLoss = Callable[[ReIDModel, ReIDOutput, torch.Tensor, torch.Tensor], torch.Tensor]


def resolve_device(setting: str = "auto") -> torch.device:
    """``auto`` = first CUDA device when present, else CPU; ``cuda:N`` must exist."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key 'device' = {setting!r} but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(params, config: Config) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def learning_rate(step: int, config: Config) -> float:
    """Lr at epoch (centralized) or round (federated) ``step`` (0-based): linear warm-up from 1 % to
    ``lr`` over ``warmup-epochs`` steps, then ×``lr-gamma`` at each of ``lr-steps``."""
    if step < config.warmup_epochs:
        factor = 0.01 + 0.99 * step / config.warmup_epochs
    else:
        factor = config.lr_gamma ** sum(step >= s for s in config.lr_step_list)
    return config.lr * factor


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def reid_loss(model: ReIDModel, outputs: ReIDOutput, labels: torch.Tensor, config: Config) -> dict[str, torch.Tensor]:
    """CE (label smoothing, on BNNeck logits) + batch-hard triplet (on f)."""
    ce = cross_entropy_smooth(outputs.logits, labels, config.label_smoothing)
    tri = batch_hard_triplet(outputs.features, labels, config.triplet_margin, config.triplet_soft_margin)
    return {"ce": ce, "triplet": tri}


def train_epoch(model: ReIDModel, loader, optimizer: torch.optim.Optimizer, config: Config, device: torch.device,
                scaler: torch.amp.GradScaler | None = None, extra_loss: ExtraLoss | None = None,
                desc: str = "train") -> dict[str, float]:
    """One pass over ``loader`` with CE + triplet (+ ``extra_loss``); returns mean losses and accuracy."""
    model.train()
    totals: dict[str, float] = {}
    correct = seen = 0
    use_amp = scaler is not None and device.type == "cuda"
    for images, labels, _camids, indices in tqdm(loader, desc=desc, leave=False, disable=None):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast("cuda") if use_amp else nullcontext():
            outputs = model(images)
            terms = reid_loss(model, outputs, labels, config)
            if extra_loss is not None:
                terms["extra"] = extra_loss(model, outputs, labels, indices)
            loss = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        if use_amp:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        for name, value in terms.items():
            totals[name] = totals.get(name, 0.0) + float(value.detach()) * len(labels)
        correct += int((outputs.logits.argmax(1) == labels).sum())
        seen += len(labels)
    if seen == 0:
        raise RuntimeError("the training loader produced no batch (too few images for one P×K batch?)")
    return {**{k: v / seen for k, v in totals.items()}, "accuracy": correct / seen, "num_examples": seen}


def evaluate_model(model: ReIDModel, dataset: ReIDDataset, config: Config, device: torch.device) -> dict[str, float]:
    """mAP, rank-1/5/10 and mINP of ``model`` on the query / gallery split (fractions in [0, 1])."""
    qf, q_pids, q_cams = extract_features(model, test_loader(dataset.query, config), device, flip=config.flip_test)
    gf, g_pids, g_cams = extract_features(model, test_loader(dataset.gallery, config), device, flip=config.flip_test)
    result = evaluate_features(qf.to(device), gf.to(device), q_pids, g_pids, q_cams, g_cams, metric=config.distance)
    return summarize(result)


def summarize(result: dict) -> dict[str, float]:
    """The scalar metrics of an ``evaluate_rank`` result."""
    cmc = result["cmc"]
    return {"mAP": float(result["mAP"]), "rank1": float(cmc[0]), "rank5": float(cmc[min(4, len(cmc) - 1)]),
            "rank10": float(cmc[min(9, len(cmc) - 1)]), "mINP": float(result["mINP"])}


def append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def write_config_snapshot(config: Config, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.json").write_text(json.dumps(config.to_run_config(), indent=2))


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename (a crash never leaves a torn checkpoint)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)
