"""Centralized training on the whole training set: the federated methods' upper bound."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from common.config import Config
from common.data.dataset import relabel
from common.data.loading import check_dataset, load_dataset, train_loader
from common.engine import (
    EpochPlan,
    append_jsonl,
    atomic_save,
    derived_seed,
    evaluate_model,
    learning_rate,
    lr_schedule_lines,
    make_optimizer,
    resolve_device,
    seed_everything,
    set_lr,
    train_epoch,
    write_config_snapshot,
)
from common.fire2 import FIRe2Training
from common.models.fire2 import build_fire2_model
from common.models.reid import build_model
from common.progress import StepProgress
from common.rundir import (
    CHECKPOINT,
    METRICS_FILE,
    check_run_folder,
    evaluation_missing,
    is_evaluation_step,
    keep_records_up_to,
    load_weights,
    replace_old_run,
)


def train_centralized(config: Config) -> list[dict]:
    """Train for ``epochs``, checkpoint every epoch, evaluate every ``eval-every`` epochs and at the end.

    Writes ``output_dir/metrics.jsonl`` (one object per evaluation), ``config.json`` and ``checkpoint.pt``;
    the output folder follows ``common.rundir`` (``resume`` continues the run there, ``overwrite`` replaces
    it).  Every epoch is seeded from (``seed``, epoch), so a resumed run equals an uninterrupted
    one.  Returns the evaluation records of this call.  ``method = "calr"`` trains CALR without identity labels
    (``common.calr``); ``method = "fire2"`` trains FIRe² (``common.fire2``: re-clustering and its losses every
    epoch from ``fire2-start-epoch``); every other method trains supervised here with CE + triplet.
    """
    if config.method == "calr":
        from common.calr import train_calr_centralized

        return train_calr_centralized(config)
    output_dir = Path(config.output_dir)
    checkpoint = check_run_folder(config)
    dataset = load_dataset(config)
    check_dataset(dataset, protocol=config.eval_protocol)
    replace_old_run(config)
    device = resolve_device(config.device)
    seed_everything(config.seed)
    labels = relabel(dataset.train)
    fire2 = FIRe2Training(config, dataset.train, labels, device) if config.method == "fire2" else None
    model = (build_fire2_model if fire2 else build_model)(config, num_classes=len(labels)).to(device)
    if fire2 and config.fire2_far:
        fire2.check_parts(model)
    optimizer = make_optimizer(model.parameters(), config)
    scaler = torch.amp.GradScaler("cuda") if config.amp and device.type == "cuda" else None
    done = _restore(checkpoint, output_dir / CHECKPOINT, model, optimizer, scaler) if checkpoint else 0
    keep_records_up_to(output_dir / METRICS_FILE, "epoch", done)
    write_config_snapshot(config, output_dir)
    for line in lr_schedule_lines(config, config.epochs, "epoch"):
        print(line, flush=True)
    records = []
    if evaluation_missing(output_dir, "epoch", done, config.epochs, config.eval_every):
        records.append(_evaluate(model, dataset, config, device, done, checkpoint.get("train_loss")))
    elif done >= config.epochs:
        print(f"{output_dir}: all {config.epochs} epochs are trained and evaluated; nothing to do "
              "(raise 'epochs' to train on)", flush=True)
    loader = train_loader(dataset.train, labels, config, seed=config.seed)
    progress = StepProgress("epoch", config.epochs, start=done)
    for epoch in range(done, config.epochs):
        seed_everything(derived_seed(config.seed, epoch))
        loader.sampler.set_epoch(epoch)
        set_lr(optimizer, learning_rate(epoch, config))
        began = time.monotonic()
        plan = (fire2.epoch_plan(model, epoch, learning_rate(epoch, config), derived_seed(config.seed, epoch, 1))
                if fire2 else EpochPlan())
        stats = train_epoch(model, loader, [optimizer, *plan.optimizers], config, device, scaler,
                            objective=plan.objective, desc=f"epoch {epoch + 1}/{config.epochs}")
        train_loss = sum(v for k, v in stats.items() if k not in ("accuracy", "num_examples"))
        atomic_save({"epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict() if scaler else None, "train_loss": train_loss,
                     "config": config.to_run_config()}, output_dir / CHECKPOINT)
        print(progress.line(epoch + 1, {"loss": train_loss, "lr": learning_rate(epoch, config),
                                        "img/s": stats["num_examples"] / (time.monotonic() - began),
                                        **plan.metrics}), flush=True)
        if is_evaluation_step(epoch + 1, config.epochs, config.eval_every):
            records.append(_evaluate(model, dataset, config, device, epoch + 1, train_loss))
    return records


def _evaluate(model, dataset, config: Config, device: torch.device, epoch: int, train_loss: float | None) -> dict:
    """Evaluate after ``epoch`` and append the record to ``metrics.jsonl``."""
    record = {"epoch": epoch, **evaluate_model(model, dataset, config, device), "train_loss": train_loss}
    append_jsonl(Path(config.output_dir) / METRICS_FILE, record)
    print(json.dumps(record), flush=True)
    return record


def _restore(state: dict, path: Path, model, optimizer, scaler) -> int:
    """Load the checkpoint ``state`` (read from ``path``) into the training objects; returns its epoch."""
    load_weights(model, state["model"], path)
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return int(state["epoch"])
