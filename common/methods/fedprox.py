"""FedProx (Li et al., *Federated Optimization in Heterogeneous Networks*, MLSys 2020,
https://arxiv.org/abs/1812.06127): FedAvg's local loss + μ/2 ‖w − w_global‖² over the shared parameters."""

from __future__ import annotations

import torch

from common.engine import reid_loss
from common.methods import register
from common.methods.base import LocalJob
from common.methods.fedavg import FedAvg, Preparation
from common.models.reid import ReIDModel


def proximal_term(model: torch.nn.Module, anchors: dict[str, torch.Tensor], mu: float) -> torch.Tensor:
    """μ/2 · Σ_k ‖θ_k − anchor_k‖² over the trainable parameters named in ``anchors`` (scalar tensor)."""
    params = dict(model.named_parameters())
    total = sum(((params[name] - anchor) ** 2).sum() for name, anchor in anchors.items())
    return 0.5 * mu * total


@register("fedprox")
class FedProx(FedAvg):
    """FedPav-style FedAvg with the proximal term (config key 'prox-mu'); the term is reported as ``prox``."""

    def prepare(self, job: LocalJob, model: ReIDModel) -> Preparation:
        anchors = {name: job.shared[name].to(job.device) for name, p in model.named_parameters()
                   if p.requires_grad and name in job.shared}
        config = job.config

        def objective(m: ReIDModel, outputs, batch) -> dict[str, torch.Tensor]:
            return {**reid_loss(m, outputs, batch.labels, config), "prox": proximal_term(m, anchors, config.prox_mu)}

        return Preparation(objective=objective)
