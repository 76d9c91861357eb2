"""Shared training / evaluation machinery: devices, seeds, optimisers, lr schedule, one epoch, evaluation."""

from __future__ import annotations

import json
import random
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from common.config import Config, ConfigError
from common.data.loading import test_loader
from common.data.records import ReIDDataset, clothes_ids
from common.evaluation import evaluate_features, extract_features, reported_protocols
from common.losses import batch_hard_triplet, cross_entropy_smooth
from common.models.reid import ReIDModel, ReIDOutput


@dataclass
class Batch:
    """One training batch: ``images`` (B, 3, H, W) normalised and ``labels`` (B,) int64 (the camera's or the
    dataset's label space) on the training device; ``indices`` (B,) int64 positions in the training records,
    on the CPU."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor


# a local training objective: (model, its training outputs on the batch, the batch) -> named loss terms
# (scalar tensors) whose sum is minimised; the default is ``reid_loss`` (CE + triplet)
Objective = Callable[[ReIDModel, ReIDOutput, Batch], dict[str, torch.Tensor]]


@dataclass
class EpochPlan:
    """What one epoch trains with when a method rebuilds part of its loss every epoch (e.g. after
    re-clustering): the ``objective`` (``None``: CE + triplet), ``optimizers`` that step besides the model's
    (for heads built for this epoch only) and scalar ``metrics`` of the preparation."""

    objective: Objective | None = None
    optimizers: list[torch.optim.Optimizer] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


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


def derived_seed(*parts: int) -> int:
    """A 31-bit seed that depends only on ``parts`` (e.g. the run's seed and an epoch or round number)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0]) & 0x7FFFFFFF


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


def lr_schedule_lines(config: Config, steps: int, unit: str) -> list[str]:
    """What ``learning_rate`` does over ``steps`` epochs or rounds (``unit``), printed when a run starts; a
    second line warns when the warm-up is not shorter than the run (the lr would never reach ``lr``)."""
    line = f"lr schedule over {steps} {unit}s: {config.lr:g}"
    if config.warmup_epochs:
        line += f" after a linear warm-up from {learning_rate(0, config):g} over {config.warmup_epochs} {unit}s"
    decays = [step for step in config.lr_step_list if step < steps]
    if decays:
        line += f", x{config.lr_gamma:g} from {unit} " + ", ".join(str(step + 1) for step in decays)
    if config.warmup_epochs < steps:
        return [line]
    return [line, f"warning: 'warmup-epochs' ({config.warmup_epochs}) is not shorter than the run ({steps} {unit}s): "
                  f"the lr never reaches {config.lr:g}; lower 'warmup-epochs'"]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def reid_loss(model: ReIDModel, outputs: ReIDOutput, labels: torch.Tensor, config: Config) -> dict[str, torch.Tensor]:
    """CE (label smoothing, on BNNeck logits) + batch-hard triplet (on f)."""
    ce = cross_entropy_smooth(outputs.logits, labels, config.label_smoothing)
    tri = batch_hard_triplet(outputs.features, labels, config.triplet_margin, config.triplet_soft_margin)
    return {"ce": ce, "triplet": tri}


def reid_objective(config: Config) -> Objective:
    """``reid_loss`` as an ``Objective`` (FedAvg's and centralized training's loss)."""
    return lambda model, outputs, batch: reid_loss(model, outputs, batch.labels, config)


def train_epoch(model: ReIDModel, loader, optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer],
                config: Config, device: torch.device, scaler: torch.amp.GradScaler | None = None,
                objective: Objective | None = None, desc: str = "train") -> dict[str, float]:
    """One pass over ``loader`` minimising ``objective`` (default CE + triplet); returns the mean of each loss
    term per image and the classifier's accuracy on the real images.  ``optimizer``: one, or several that all
    step on every batch (e.g. the model's and one for a head the objective rebuilds every epoch)."""
    objective = objective or reid_objective(config)
    optimizers = optimizer if isinstance(optimizer, list) else [optimizer]
    model.train()
    totals: dict[str, float] = {}
    correct = seen = 0
    use_amp = scaler is not None and device.type == "cuda"
    for images, labels, _camids, indices in tqdm(loader, desc=desc, leave=False, disable=None):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast("cuda") if use_amp else nullcontext():
            outputs = model(images)
            terms = objective(model, outputs, Batch(images, labels, indices))
            loss = sum(terms.values())
        for each in optimizers:
            each.zero_grad(set_to_none=True)
        if use_amp:
            scaler.scale(loss).backward()
            for each in optimizers:
                scaler.step(each)
            scaler.update()
        else:
            loss.backward()
            for each in optimizers:
                each.step()
        for name, value in terms.items():
            totals[name] = totals.get(name, 0.0) + float(value.detach()) * len(labels)
        correct += int((outputs.logits.argmax(1) == labels).sum())
        seen += len(labels)
    if seen == 0:
        raise RuntimeError("the training loader produced no batch (too few images for one P×K batch?)")
    return {**{k: v / seen for k, v in totals.items()}, "accuracy": correct / seen, "num_examples": seen}


def evaluate_model(model: ReIDModel, dataset: ReIDDataset, config: Config, device: torch.device) -> dict[str, float]:
    """mAP, rank-1/5/10 and mINP of ``model`` on the query / gallery split (fractions in [0, 1]) under
    ``eval-protocol``, and each protocol's mAP and rank-1 when the dataset has clothes ids (``protocol_metrics``)."""
    qf, q_pids, q_cams = extract_features(model, test_loader(dataset.query, config), device, flip=config.flip_test)
    gf, g_pids, g_cams = extract_features(model, test_loader(dataset.gallery, config), device, flip=config.flip_test)
    clothes = {"q_clothes": clothes_ids(dataset.query), "g_clothes": clothes_ids(dataset.gallery)}

    def evaluate(protocol: str) -> dict:
        return evaluate_features(qf.to(device), gf.to(device), q_pids, g_pids, q_cams, g_cams, metric=config.distance,
                                 protocol=protocol, **clothes)

    return protocol_metrics(evaluate, config.eval_protocol, reported_protocols(q_pids, g_pids, q_cams, g_cams,
                                                                               **clothes))[1]


def protocol_metrics(evaluate: Callable[[str], dict], protocol: str,
                     reported: tuple[str, ...]) -> tuple[dict, dict[str, float]]:
    """(``evaluate(protocol)``, an ``evaluate_rank`` result; its ``summarize`` plus ``<protocol>_mAP`` and
    ``<protocol>_rank1`` of each ``reported`` protocol, dashes as underscores: ``cloth_changing_mAP``)."""
    result = evaluate(protocol)
    metrics = summarize(result)
    for other in reported:
        summary = metrics if other == protocol else summarize(evaluate(other))
        key = other.replace("-", "_")
        metrics[f"{key}_mAP"], metrics[f"{key}_rank1"] = summary["mAP"], summary["rank1"]
    return result, metrics


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
