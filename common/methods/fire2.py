"""FIRe² federated by camera (``method = "fire2"``; common/fire2.py, docs/fire2.md).

FedAvg's local round (FedPav-style: backbone + BNNeck averaged) with FIRe²'s objective.  From round
``fire2-start-epoch`` + 1 on (a round counts as FIRe²'s epoch), every local epoch clusters each identity of the
camera within the camera's own images (FFM), builds a new cosine classifier over those fine-grained ids and trains
with the attribute-aware loss, FAR's recomposed positives and the triplet loss besides the identity CE.

What leaves a camera: the shared weights (backbone + pooling's BNNeck) and scalar metrics (losses, the number of
fine ids).  Kept on the camera across rounds: the identity classifier and FAR's head (BNNeck + classifier over the
camera's identities).  Rebuilt every local epoch and never kept or sent: fine-grained ids, their centres and
classifier.
"""

from __future__ import annotations

import torch.nn as nn

from common.config import Config
from common.engine import derived_seed
from common.fire2 import FIRe2Training
from common.methods import register
from common.methods.base import LocalJob
from common.methods.fedavg import FedAvg, Preparation
from common.models.fire2 import FIRe2Model, build_fire2_model


def far_head_module(model: FIRe2Model) -> dict[str, nn.Module]:
    """FAR's head as private state (``far-head``), when the model has one."""
    return {"far-head": model.far_head} if getattr(model, "far_head", None) is not None else {}


@register("fire2")
class FIRe2(FedAvg):
    """FedAvg with FFM + FAR on each camera (switches ``fire2-ffm``, ``fire2-far``)."""

    def shared_model(self, config: Config) -> FIRe2Model:
        return build_fire2_model(config)

    def private_modules(self, model: FIRe2Model) -> dict[str, nn.Module]:
        return {**super().private_modules(model), **far_head_module(model)}

    def prepare(self, job: LocalJob, model: FIRe2Model) -> Preparation:
        """Each local epoch's plan: identity CE alone before the start round, then re-clustering and FIRe²'s losses."""
        training = FIRe2Training(job.config, job.partition.records, job.partition.labels, job.device)
        step = job.server_round - 1
        if job.config.fire2_far and training.active(step):
            training.check_parts(model)
        return Preparation(epoch_plan=lambda epoch: training.epoch_plan(model, step, job.lr,
                                                                        derived_seed(job.seed, epoch, 1)))
