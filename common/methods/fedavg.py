"""FedAvg, FedPav-style (Zhuang et al., *Performance Optimization of Federated Person Re-identification via
Benchmark Analysis*, ACM MM 2020, https://arxiv.org/abs/2008.11560): clients share backbone + BNNeck and keep their classifiers."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from common.data.loading import train_loader
from common.engine import Objective, make_optimizer, seed_everything, set_lr, train_epoch
from common.methods import register
from common.methods.base import LocalJob, LocalResult, Method
from common.models.reid import ReIDModel


@dataclass
class Preparation:
    """What a method's stages before local training hand over: extra ``private`` state kept on the
    client, scalar ``metrics``, and the local ``objective`` (``None``: CE + triplet, FedAvg's)."""

    private: dict = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    objective: Objective | None = None


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
        began = time.perf_counter()
        for epoch in range(job.config.local_epochs):
            loader.sampler.set_epoch(epoch)
            stats = train_epoch(model, loader, optimizer, job.config, job.device, scaler, objective=prepared.objective,
                                desc=f"camera {job.partition.camid} round {job.server_round}")
        return LocalResult(
            shared={k: v.detach().cpu().clone() for k, v in model.shared_state().items()},
            private={**prepared.private,
                     "classifier": {k: v.detach().cpu().clone() for k, v in model.classifier.state_dict().items()}},
            metrics={**prepared.metrics, **self.round_metrics(stats), "seconds_local": time.perf_counter() - began},
            num_examples=len(job.partition.records),
        )

    def local_model(self, job: LocalJob) -> ReIDModel:
        """Global shared weights + this camera's classifier (a fresh one on its first round), on ``job.device``."""
        model = self.shared_model(job.config)
        model.set_num_classes(job.partition.num_ids)
        model.load_shared_state(job.shared)
        if "classifier" in job.private:
            model.classifier.load_state_dict(job.private["classifier"])
        return model.to(job.device)

    def prepare(self, job: LocalJob, model: ReIDModel) -> Preparation:
        """Work before local training on ``model`` (none for FedAvg)."""
        return Preparation()

    def round_metrics(self, stats: dict[str, float]) -> dict[str, float]:
        """Scalars reported to the server: mean losses of the last local epoch and accuracy."""
        metrics = {k: float(v) for k, v in stats.items() if k != "num_examples"}
        metrics["loss"] = sum(v for k, v in metrics.items() if k != "accuracy")
        return metrics
