"""FIRe²: fine-grained feature mining (FFM) and fine-grained attribute recomposition (FAR).

Wang, Qian, Li, Xue, Fu, "Exploring Fine-Grained Representation and Recomposition for Cloth-Changing Person
Re-Identification", IEEE TIFS 2024 (https://ieeexplore.ieee.org/document/10557733; authors' code
https://github.com/QizaoWang/FIRe-CCReID).  docs/fire2.md describes the method, its keys and what leaves a camera.

- **FFM** (``mine_fine_ids``): every epoch from ``fire2-start-epoch``, each identity's L2-normalised test features
  are clustered on their own (k-reciprocal Jaccard distance + DBSCAN, ``common.clustering``); DBSCAN outliers
  become clusters of their own.  The clusters are fine-grained ids (clothes, viewpoint, ...), never shared by two
  identities.  A cosine classifier over all fine ids, initialised with the cluster centres, trains with the
  attribute-aware soft target (``attribute_soft_target``) at scale ``fire2-scale``.
- **FAR** (``recompose``): the feature map is cut into ``fire2-parts`` horizontal parts; each part of an image is
  instance-normalised with its own (detached) spatial mean / std and re-styled with the mean / std of the same
  part of another image of the batch with a different fine id (one partner per part and copy,
  ``fire2-recompositions`` copies).  The recomposed map is pooled and classified by a separate BNNeck + identity
  classifier (label-smoothed CE, weight ``fire2-far-weight``): a new positive of the anchor's identity.

Identity CE runs from the first epoch; the triplet loss, FFM and FAR from ``fire2-start-epoch`` on (as the
authors' code).  Everything here is training-only: the test feature is the plain backbone → pooling → BNNeck one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from common.clustering import OUTLIER, centroids, dbscan, jaccard_distance, relabel
from common.config import Config, ConfigError
from common.data.loading import test_loader
from common.data.records import ImageRecord
from common.engine import Batch, EpochPlan, Objective, make_optimizer, reid_objective, set_lr
from common.evaluation import _one_cpu_thread, extract_features
from common.losses import cross_entropy_smooth
from common.models.fire2 import FineGrainedClassifier, FIRe2Model

STD_EPS = 1e-6  # added to a part's variance before the square root


@dataclass
class FineGrainedIds:
    """The fine-grained clusters of one training set.

    ``fine_ids`` (N,) int64: each image's fine id in 0..F−1; ``owner`` (F,) int64: the identity label of each
    fine id (the fine ids of one identity are consecutive); ``centres`` (F, D) float32: L2-normalised mean
    feature of each fine id."""

    fine_ids: torch.Tensor
    owner: torch.Tensor
    centres: torch.Tensor

    @property
    def count(self) -> int:
        return len(self.owner)


def cluster_identity(features: torch.Tensor, k1: int, k2: int, eps: float, min_samples: int) -> np.ndarray:
    """Fine clusters (n,) int64, 0..C−1 numbered by first member, of one identity's normalised features (n, D).

    Jaccard distance with k1 ≤ n − 1 and k2 ≤ n (an identity may have fewer images than k1), DBSCAN on it; each
    DBSCAN outlier becomes a cluster of its own.  One image is one cluster.  An identity of up to
    ``common.clustering.DENSE_MAX`` (64) images takes ``jaccard_distance``'s dense path, and ``dbscan`` runs as
    connected components (~3 ms for 17 images on one thread of the development CPU), with the labels of the
    sparse path and scikit-learn's DBSCAN."""
    n = len(features)
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    labels = dbscan(jaccard_distance(features, min(k1, n - 1), min(k2, n)), eps, min_samples)
    outliers = labels == OUTLIER
    labels[outliers] = labels.max() + 1 + np.arange(outliers.sum())
    return relabel(labels)


def mine_fine_ids(features: torch.Tensor, identities: np.ndarray, config: Config) -> FineGrainedIds:
    """FFM's clustering of features (N, D) (normalised here) by identity labels (N,) int: each identity's images
    are clustered alone (``cluster_identity`` with ``fire2-k1``, ``fire2-k2``, ``fire2-eps``,
    ``fire2-min-samples``), so no fine id holds two identities.

    The per-identity loop runs on one CPU thread: its calls are a few milliseconds of small operations each, and
    with two threads on cores shared with other processes every parallel region stalls (benchmarks/RESULTS.md,
    FIRe²: 7–9× the CPU time)."""
    features = F.normalize(features.float(), dim=1)
    identities = np.asarray(identities, dtype=np.int64)
    fine_ids = np.empty(len(identities), dtype=np.int64)
    owner: list[int] = []
    with _one_cpu_thread(features.device):
        for identity in np.unique(identities):
            rows = np.flatnonzero(identities == identity)
            local = cluster_identity(features[rows], config.fire2_k1, config.fire2_k2, config.fire2_eps,
                                     config.fire2_min_samples)
            fine_ids[rows] = local + len(owner)
            owner.extend([int(identity)] * (int(local.max()) + 1))
    return FineGrainedIds(torch.from_numpy(fine_ids), torch.tensor(owner, dtype=torch.int64),
                          centroids(features, fine_ids))


def attribute_soft_target(fine_ids: torch.Tensor, owner: torch.Tensor, epsilon: float,
                          spread: str = "others") -> torch.Tensor:
    """Attribute-aware target (B, F): (1 − ε) on each image's fine id plus ε spread evenly over fine ids of
    its identity; rows sum to 1.  ``fine_ids`` (B,), ``owner`` (F,): the identity of every fine id.

    ``spread = "others"`` (the default): ε over the identity's *other* fine ids; an identity with a
    single fine id then gets the one-hot target.  ``"all"`` (the authors' released code): ε over all of the
    identity's fine ids, its own included, so the own entry is 1 − ε + ε / n."""
    same_identity = (owner[None, :] == owner[fine_ids][:, None]).float()
    own = F.one_hot(fine_ids, len(owner)).float()
    if spread == "others":
        same_identity = same_identity - own
        alone = same_identity.sum(1, keepdim=True) == 0
        shares = epsilon * same_identity / same_identity.sum(1, keepdim=True).clamp_min(1.0)
        return shares + torch.where(alone, 1.0, 1.0 - epsilon) * own
    return epsilon * same_identity / same_identity.sum(1, keepdim=True) + (1.0 - epsilon) * own


def attribute_aware_loss(cosine: torch.Tensor, fine_ids: torch.Tensor, owner: torch.Tensor, scale: float,
                         epsilon: float, spread: str = "others") -> torch.Tensor:
    """Mean over the batch of −Σ_f target_f · log softmax(scale · cosine)_f; ``cosine`` (B, F) in [−1, 1]."""
    log_probs = F.log_softmax(scale * cosine.float(), dim=1)
    return -(attribute_soft_target(fine_ids, owner, epsilon, spread) * log_probs).sum(1).mean()


def far_partners(fine_ids: torch.Tensor, parts: int, copies: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FAR's partners in a batch of fine ids (B,): for each part and copy, a uniformly drawn image with another fine
    id (distinct partners across the copies of one part).

    Returns ``anchors`` (M,) int64 with M = copies·B (copy-major: image b's copy k is row k·B + b),
    ``partners`` (parts, M) int64 and ``valid`` (M,) bool — False where some part found no partner (fewer than
    ``copies`` images with another fine id in the batch); such rows are left out of FAR's loss."""
    size = len(fine_ids)
    candidate = fine_ids[None, :] != fine_ids[:, None]  # (B, B)
    keys = torch.rand((parts, size, size), generator=generator, device=generator.device).to(fine_ids.device)
    keys = torch.where(candidate, keys, torch.full_like(keys, -1.0))
    picked_keys, picked = keys.topk(copies, dim=2)  # (parts, B, copies)
    partners = picked.transpose(1, 2).reshape(parts, copies * size)
    valid = (picked_keys >= 0).all(dim=0).T.reshape(-1)
    anchors = torch.arange(size, device=fine_ids.device).repeat(copies)
    return anchors, partners, valid


def recompose(feature_map: torch.Tensor, anchors: torch.Tensor, partners: torch.Tensor) -> torch.Tensor:
    """FAR's recomposed maps (M, C, P·h, w) of ``feature_map`` (B, C, H, w), h = H // P (the last H − P·h rows
    are dropped, as in the authors' code): part p of row m is the anchor's part, instance-normalised with its own
    spatial mean / std, times the std plus the mean of partner ``partners[p, m]``'s part p.

    Means and stds are detached (the population std over the part's h·w positions, +1e-6 inside the root), so
    gradients reach the backbone through the anchors' normalised content only.  ``anchors`` (M,), ``partners``
    (P, M) int64 batch positions."""
    parts = len(partners)
    height = feature_map.shape[2] // parts
    pieces = []
    for p in range(parts):
        part = feature_map[:, :, p * height:(p + 1) * height]
        mean = part.mean(dim=(2, 3), keepdim=True).detach()
        std = (part.var(dim=(2, 3), keepdim=True, correction=0) + STD_EPS).sqrt().detach()
        content = (part - mean) / std
        pieces.append(content[anchors] * std[partners[p]] + mean[partners[p]])
    return torch.cat(pieces, dim=2)


def identity_ce(config: Config) -> Objective:
    """Label-smoothed identity CE alone: FIRe²'s objective before ``fire2-start-epoch``."""
    return lambda model, outputs, batch: {"ce": cross_entropy_smooth(outputs.logits, batch.labels,
                                                                     config.label_smoothing)}


class FIRe2Objective:
    """``base``'s terms (CE + triplet, or PEM's stage 3) plus FFM's ``ffm`` (attribute-aware loss of
    ``classifier`` on the outputs' ``embedding``; left out without a classifier) and FAR's ``far`` (weighted CE of
    the model's FAR head on recomposed features; left out when ``far`` is false)."""

    def __init__(self, config: Config, base: Objective, fine: FineGrainedIds,
                 classifier: FineGrainedClassifier | None, far: bool, generator: torch.Generator):
        self.config, self.base, self.classifier, self.far, self.generator = config, base, classifier, far, generator
        self.fine_ids, self.owner = fine.fine_ids, fine.owner

    def __call__(self, model: FIRe2Model, outputs, batch: Batch) -> dict[str, torch.Tensor]:
        config = self.config
        terms = self.base(model, outputs, batch)
        device = batch.labels.device
        fine_ids = self.fine_ids[batch.indices].to(device)
        if self.classifier is not None:
            terms["ffm"] = attribute_aware_loss(self.classifier(outputs.embedding), fine_ids, self.owner.to(device),
                                                config.fire2_scale, config.fire2_epsilon,
                                                config.fire2_epsilon_spread)
        if self.far:
            anchors, partners, valid = far_partners(fine_ids, config.fire2_parts, config.fire2_recompositions,
                                                    self.generator)
            if valid.any():
                recomposed = model.pool(recompose(outputs.feature_map, anchors[valid], partners[:, valid]))
                terms["far"] = config.fire2_far_weight * cross_entropy_smooth(
                    model.far_head(recomposed), batch.labels[anchors[valid]], config.label_smoothing)
            else:
                terms["far"] = outputs.feature_map.sum() * 0.0
        return terms


class FIRe2Training:
    """FIRe² on one training set (all images centralized, or one camera's): each epoch's ``EpochPlan``.

    ``records`` and their identity ``labels`` (pid → label) are the training loader's; batch indices point into
    ``records``."""

    def __init__(self, config: Config, records: list[ImageRecord], labels: dict[int, int], device: torch.device):
        self.config, self.records, self.device = config, records, device
        self.identities = np.array([labels[r.pid] for r in records], dtype=np.int64)

    def active(self, epoch: int) -> bool:
        return epoch >= self.config.fire2_start_epoch

    def check_parts(self, model: FIRe2Model) -> None:
        """For FAR: a clear error before training when the feature map has fewer rows than ``fire2-parts``."""
        images = next(iter(test_loader(self.records[:1], self.config)))[0].to(self.device)
        was_training = model.training
        with torch.no_grad():
            height = model.eval().feature_map(images).shape[2]
        model.train(was_training)
        if height < self.config.fire2_parts:
            raise ConfigError(f"config key 'fire2-parts' = {self.config.fire2_parts}: the feature map has only "
                              f"{height} rows at {self.config.height}x{self.config.width} input; lower 'fire2-parts' "
                              "or raise 'height'")

    def mine(self, model: FIRe2Model) -> FineGrainedIds:
        """FFM's fine ids of ``records`` from ``model``'s test features (eval mode, no augmentation)."""
        features, _, _ = extract_features(model, test_loader(self.records, self.config), self.device)
        return mine_fine_ids(features, self.identities, self.config)

    def epoch_plan(self, model: FIRe2Model, epoch: int, lr: float, seed: int, base: Objective | None = None,
                   ffm: bool | None = None, far: bool | None = None) -> EpochPlan:
        """The objective of ``epoch`` (0-based epoch, or round index in a federation) at learning rate ``lr``;
        ``seed`` seeds FAR's partner draws.

        Before ``fire2-start-epoch``: identity CE alone.  From it: ``base`` (default CE + triplet) plus FFM and
        FAR per ``ffm`` / ``far`` (default ``fire2-ffm`` / ``fire2-far``), after re-clustering; FFM's classifier
        is new every epoch (initialised from the centres), with an optimizer of its own at ``lr``.  Metrics:
        ``fire2_fine_ids`` (number of fine ids) when clustering ran."""
        config = self.config
        ffm = config.fire2_ffm if ffm is None else ffm
        far = config.fire2_far if far is None else far
        if not self.active(epoch):
            return EpochPlan(identity_ce(config))
        base = base or reid_objective(config)
        if not (ffm or far):
            return EpochPlan(base)
        fine = self.mine(model)
        optimizers, classifier = [], None
        if ffm:
            classifier = FineGrainedClassifier(fine.centres).to(self.device)
            optimizer = make_optimizer(classifier.parameters(), config)
            set_lr(optimizer, lr)
            optimizers.append(optimizer)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return EpochPlan(FIRe2Objective(config, base, fine, classifier, far, generator), optimizers,
                         {"fire2_fine_ids": float(fine.count)})
