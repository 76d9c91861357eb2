"""MOON: model-contrastive federated learning (Li, He, Song, "Model-Contrastive Federated Learning",
CVPR 2021, https://arxiv.org/abs/2103.16257), on FedAvg's FedPav-style ReID client.

Local objective: CE + triplet + μ · ℓ_con with, per image,
    ℓ_con = −log( exp(sim(z, z_glob)/τ) / (exp(sim(z, z_glob)/τ) + exp(sim(z, z_prev)/τ)) ),
where z is the local model's pooled feature f (B, D), z_glob that of the round's global model and z_prev
that of this camera's local model from its previous round (private state), sim the cosine similarity.
μ = ``moon-mu`` (1, the paper's value for CIFAR-100 and Tiny-ImageNet; 5 for CIFAR-10), τ = ``moon-temperature``
(0.5, the paper's value throughout).  The representation is the pooled backbone feature f: camfed's ReID model
has no projection head, and adding one would change what the server averages.  On a camera's first round z_prev
comes from the global model, so ℓ_con = log 2 with zero gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common.config import Config
from common.engine import Batch, reid_loss
from common.methods import register
from common.methods.base import LocalJob, LocalResult, StateDict
from common.methods.fedavg import FedAvg, Preparation
from common.models.reid import ReIDModel, ReIDOutput, build_model

PREVIOUS = "moon-previous"


def model_contrastive_loss(local: torch.Tensor, global_: torch.Tensor, previous: torch.Tensor,
                           temperature: float) -> torch.Tensor:
    """Mean ℓ_con over the batch; ``local``, ``global_``, ``previous``: (B, D) representations of one batch."""
    positive = F.cosine_similarity(local, global_, dim=1) / temperature
    negative = F.cosine_similarity(local, previous, dim=1) / temperature
    return (torch.logsumexp(torch.stack([positive, negative], dim=1), dim=1) - positive).mean()


@register("moon")
class MOON(FedAvg):
    """FedAvg's local round with MOON's model-contrastive term (reported as ``moon``)."""

    def prepare(self, job: LocalJob, model: ReIDModel) -> Preparation:
        config = job.config
        global_net = frozen_network(config, job.shared, job.device)
        previous_net = frozen_network(config, job.private.get(PREVIOUS, job.shared), job.device)

        def objective(m: ReIDModel, outputs: ReIDOutput, batch: Batch) -> dict[str, torch.Tensor]:
            with torch.no_grad():
                z_glob = global_net.pool(global_net.feature_map(batch.images))
                z_prev = previous_net.pool(previous_net.feature_map(batch.images))
            con = model_contrastive_loss(outputs.features.float(), z_glob.float(), z_prev.float(),
                                         config.moon_temperature)
            return {**reid_loss(m, outputs, batch.labels, config), "moon": config.moon_mu * con}

        return Preparation(objective=objective)

    def local_round(self, job: LocalJob) -> LocalResult:
        result = super().local_round(job)
        result.private[PREVIOUS] = result.shared  # this round's local model is next round's z_prev
        return result


def frozen_network(config: Config, shared: StateDict, device: torch.device) -> ReIDModel:
    """A backbone + BNNeck with ``shared`` weights in eval mode, without gradients, on ``device``."""
    net = build_model(config)
    net.load_shared_state(shared)
    return net.to(device).eval().requires_grad_(False)
