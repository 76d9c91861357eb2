"""FedAvg, FedPav-style (Zhuang et al., *Performance Optimization for Federated Person Re-identification via
Benchmark Analysis*, ACM MM 2020, https://arxiv.org/abs/2008.11560): clients share backbone + BNNeck and keep
their classifiers."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from common.data.loading import train_loader
from common.engine import EpochPlan, Objective, make_optimizer, seed_everything, set_lr, train_epoch
from common.methods import register
from common.methods.base import LocalJob, LocalResult, Method
from common.models.reid import ReIDModel


@dataclass
class Preparation:
    """What a method's stages before local training hand over: extra ``private`` state kept on the
    client, scalar ``metrics``, and the local ``objective`` (``None``: CE + triplet, FedAvg's) — or
    ``epoch_plan``, called with each local epoch's index (0-based) before it, for methods that rebuild their
    objective every epoch (then ``objective`` is not used)."""

    private: dict = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    objective: Objective | None = None
    epoch_plan: Callable[[int], EpochPlan] | None = None


@register("fedavg")
class FedAvg(Method):
    """Local CE + triplet for ``local-epochs`` epochs from the global weights and the private classifier."""

    def local_round(self, job: LocalJob) -> LocalResult:
        seed_everything(job.seed)
        model = self.local_model(job)
        prepared = self.prepare(job, model)
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], job.config)
        set_lr(optimizer, job.lr)
        scaler = torch.amp.GradScaler("cuda") if job.config.amp and job.device.type == "cuda" else None
        loader = train_loader(job.partition.records, job.partition.labels, job.config, seed=job.seed)
        stats: dict[str, float] = {}
        plan = EpochPlan(prepared.objective)
        began = time.perf_counter()
        for epoch in range(job.config.local_epochs):
            loader.sampler.set_epoch(epoch)
            if prepared.epoch_plan is not None:
                plan = prepared.epoch_plan(epoch)
            stats = train_epoch(model, loader, [optimizer, *plan.optimizers], job.config, job.device, scaler,
                                objective=plan.objective, desc=f"camera {job.partition.camid} round {job.server_round}")
        return LocalResult(
            shared={k: v.detach().cpu().clone() for k, v in model.shared_state().items()},
            private={**prepared.private,
                     **{key: {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
                        for key, module in self.private_modules(model).items()}},
            metrics={**prepared.metrics, **plan.metrics, **self.round_metrics(stats),
                     "seconds_local": time.perf_counter() - began},
            num_examples=len(job.partition.records),
        )

    def local_model(self, job: LocalJob) -> ReIDModel:
        """Global shared weights + this camera's private modules (fresh ones on its first round), on ``job.device``."""
        model = self.shared_model(job.config)
        model.set_num_classes(job.partition.num_ids)
        model.load_shared_state(job.shared)
        for key, module in self.private_modules(model).items():
            if key in job.private:
                module.load_state_dict(job.private[key])
        return model.to(job.device)

    def private_modules(self, model: ReIDModel) -> dict[str, nn.Module]:
        """The modules of ``model`` that stay on the camera across rounds, by private-state key (FedAvg: its
        identity classifier)."""
        return {"classifier": model.classifier}

    def prepare(self, job: LocalJob, model: ReIDModel) -> Preparation:
        """Work before local training on ``model`` (none for FedAvg)."""
        return Preparation()

    def round_metrics(self, stats: dict[str, float]) -> dict[str, float]:
        """Scalars reported to the server: mean losses of the last local epoch and accuracy."""
        metrics = {k: float(v) for k, v in stats.items() if k != "num_examples"}
        metrics["loss"] = sum(v for k, v in metrics.items() if k != "accuracy")
        return metrics
