"""PEM: pose-enriched federated-by-camera training (METHODS.md §2).

Per round on camera c:
  1. the local expert φᵉ_c (kept on the client across rounds) trains on D_c with CE + triplet;
  2. the PEM π_c trains on feature maps of the frozen expert — and, with CR, of the frozen
     local-global model (= the global ψ at the start of the round) — with L_pose (PKD) + L_cyc (SCM);
  3. the local-global model φᵍ_c (ψ + the camera's private classifier) trains with CE + triplet on
     real features plus pose-swapped positives F⁻_i + F⁺_δ(i) made by the (now frozen) PEM.
Backbone + BNNeck + PEM are shared (the server averages them); classifiers and the expert stay private.

Variants (config ``pem-variant``): ``baseline`` (stage 3 without swapped features: FedAvg),
``pkd`` / ``scm`` (PEM trained with one loss, expert features only), ``pkd+scm`` (both, no CR),
``full`` (both + CR).  ``pem-mask=false`` drops PKD's same-identity mask; ``pem-partner='hard'``
swaps with the most dissimilar pose instead of a random other identity.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from common.config import Config, ConfigError
from common.data.pose import dataset_pose_vectors, load_pose_file, read_image_sizes
from common.data.dataset import PKSampler
from common.data.loading import test_loader, train_loader
from common.engine import make_optimizer, set_lr, train_epoch
from common.losses import batch_hard_triplet, cross_entropy_smooth, cycle_consistency_loss, pose_distillation_loss
from common.methods import register
from common.methods.base import LocalJob
from common.methods.fedavg import FedAvg, Preparation
from common.models.pem import PoseExtractionModule, swap_partners
from common.models.reid import ReIDModel, ReIDOutput, build_model

USES_PKD = {"pkd", "pkd+scm", "full"}
USES_SCM = {"scm", "pkd+scm", "full"}


class PoseVectors:
    """Pose vectors of one camera's records: ``vectors`` (N, 34) float32, ``valid`` (N,) bool."""

    _cache: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def for_job(cls, job: LocalJob) -> tuple[torch.Tensor, torch.Tensor]:
        path = pose_file(job.config, job.data_root)
        key = (str(path), job.partition.camid)
        if key not in cls._cache:
            cls._cache[key] = record_pose_vectors(job.config, path, job.partition.records, job.data_root)
        return cls._cache[key]


def record_pose_vectors(config: Config, path: Path, records: list,
                        root: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pose vectors (N, 34) float32 and validity (N,) bool of ``records`` from the pose file ``path``; files are
    matched by their path relative to ``root`` (by base name without a root)."""
    relative = [Path(r.path).relative_to(root).as_posix() if root else Path(r.path).name for r in records]
    vectors, valid = dataset_pose_vectors(load_pose_file(path), relative, read_image_sizes([r.path for r in records]),
                                          source=str(path), min_score=config.pem_min_keypoint_score)
    return torch.from_numpy(vectors), torch.from_numpy(valid)


def pose_file(config: Config, data_root: Path | None) -> Path:
    """The configured pose file, else ``<data root>/poses.npz``; missing is an error naming 'pose-file'."""
    path = Path(config.pose_file) if config.pose_file else (data_root / "poses.npz" if data_root else None)
    if path is None or not path.is_file():
        raise ConfigError(
            f"config key 'pose-file': no pose file at {path} (method 'pem' with variant "
            f"'{config.pem_variant}' needs pose vectors; make one with `camfed pose`)"
        )
    return path


def needs_poses(config: Config) -> bool:
    return config.pem_variant in USES_PKD or config.pem_partner == "hard"


@register("pem")
class PEM(FedAvg):
    """FedAvg's local round (stage 3) preceded by the expert (stage 1) and PEM (stage 2) stages."""

    def shared_model(self, config: Config) -> nn.Module:
        model = build_model(config)
        if config.pem_variant != "baseline":
            model.pem = PoseExtractionModule(model.feat_dim, config.pem_reduction)
        return model

    def prepare(self, job: LocalJob, model: ReIDModel) -> Preparation:
        """Stages 1 and 2; the expert is returned as private state, and stage 3's extra loss
        (pose-swapped positives from the then frozen PEM) shares the round's poses and generator."""
        if job.config.pem_variant == "baseline":
            return Preparation()
        poses = PoseVectors.for_job(job) if needs_poses(job.config) else None
        generator = torch.Generator(device=job.device).manual_seed(job.seed)
        expert = self._train_expert(job)
        metrics = self._train_pem(job, model, expert, poses, generator)
        model.pem.requires_grad_(False)  # stage 3 trains the local-global model only
        return Preparation(
            private={"expert": {k: v.detach().cpu().clone() for k, v in expert.state_dict().items()}},
            metrics=metrics,
            extra_loss=SwapPositives(model.pem, job.config, poses, generator),
        )

    def _train_expert(self, job: LocalJob) -> ReIDModel:
        """Stage 1: the camera's expert, restored from private state (or ψ on its first round), trained on D_c."""
        config = job.config
        expert = build_model(config, num_classes=job.partition.num_ids)
        if "expert" in job.private:
            expert.load_state_dict(job.private["expert"])
        else:
            expert.load_state_dict({k: v for k, v in job.shared.items() if not k.startswith("pem.")}, strict=False)
        expert.to(job.device)
        optimizer = make_optimizer(expert.parameters(), config)
        set_lr(optimizer, job.lr)
        loader = train_loader(job.partition.records, job.partition.labels, config, seed=job.seed + 1)
        for epoch in range(config.pem_expert_epochs):
            loader.sampler.set_epoch(epoch)
            train_epoch(expert, loader, optimizer, config, job.device, desc=f"camera {job.partition.camid} expert")
        return expert.eval()

    def _train_pem(self, job: LocalJob, model: ReIDModel, expert: ReIDModel, poses,
                   generator: torch.Generator) -> dict[str, float]:
        """Stage 2: PEM on frozen, un-augmented feature maps of the expert (+ the local-global model with CR).

        The maps are computed once per round (``frozen_maps``) and every PEM epoch iterates P×K batches
        over them, so ``pem-epochs`` costs almost nothing beyond the first.  ``poses``: ``PoseVectors.for_job``
        output or ``None`` when the variant needs none.  Metrics: mean losses of the last PEM epoch and
        ``pem_attention_std``, the spread of the attention A over channels (0 when PEM routes every
        channel alike, e.g. A ≡ 0.5 at initialisation)."""
        config, device = job.config, job.device
        pem = model.pem.train()
        optimizer = torch.optim.SGD(pem.parameters(), lr=config.pem_lr, momentum=config.momentum)
        networks = [expert] + ([model] if config.pem_variant == "full" else [])
        maps = frozen_maps(networks, job)
        labels = torch.as_tensor([job.partition.labels[r.pid] for r in job.partition.records])
        sampler = PKSampler([r.pid for r in job.partition.records], config.batch_size, config.num_instances,
                            seed=job.seed + 2)
        totals, steps = {}, 0
        for epoch in range(config.pem_epochs):
            sampler.set_epoch(epoch)
            totals, steps = {"pem_pose": 0.0, "pem_cycle": 0.0}, 0
            for indices in pk_batches(sampler, config.batch_size):
                batch_labels = labels[indices].to(device)
                z, valid = batch_poses(poses, indices, device)
                terms = [pem_losses(pem, m[indices].to(device, torch.float32), batch_labels, z, valid, config,
                                    generator) for m in maps]
                loss = sum(t["pose"] + t["cycle"] for t in terms)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                totals["pem_pose"] += sum(t["pose"].item() for t in terms)
                totals["pem_cycle"] += sum(t["cycle"].item() for t in terms)
                steps += 1
        with torch.no_grad():
            attention = pem(maps[0].mean(dim=(2, 3)).to(device, torch.float32))
        metrics = {k: v / max(steps, 1) for k, v in totals.items()}
        return {**metrics, "pem_attention_std": float(attention.std(dim=1).mean())}


def frozen_maps(networks: list[ReIDModel], job: LocalJob) -> list[torch.Tensor]:
    """Backbone feature maps (N, d, h, w) of every training image of the camera, one per network, in
    record order, without augmentation; kept on the CPU in float16 (e.g. 2 × 1.6 GB for 3,000 images
    of ResNet-50 at 256×128)."""
    loader = test_loader(job.partition.records, job.config)
    maps: list[list[torch.Tensor]] = [[] for _ in networks]
    was_training = [net.training for net in networks]
    with torch.no_grad():
        for net in networks:
            net.eval()
        for images, *_ in loader:
            images = images.to(job.device)
            for out, net in zip(maps, networks):
                out.append(net.backbone(images).to("cpu", torch.float16))
    for net, mode in zip(networks, was_training):
        net.train(mode)
    return [torch.cat(out) for out in maps]


def pk_batches(sampler: PKSampler, batch_size: int) -> list[torch.Tensor]:
    """One epoch of ``sampler`` as full batches of dataset indices (int64), like ``drop_last=True``."""
    order = torch.as_tensor(list(sampler), dtype=torch.int64)
    size = min(batch_size, len(order))
    return [order[i:i + size] for i in range(0, len(order) - size + 1, size)]


def batch_poses(poses, indices: torch.Tensor, device: torch.device):
    """Pose vectors (B, 34) and validity (B,) of a batch's dataset ``indices`` (``None, None`` without poses)."""
    if poses is None:
        return None, None
    return poses[0][indices].to(device), poses[1][indices].to(device)


def pem_losses(pem: PoseExtractionModule, features: torch.Tensor, labels: torch.Tensor, z, valid,
               config: Config, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Weighted L_pose and L_cyc of the configured variant on feature maps (B, d, h, w).

    L_cyc is the paper's per-sample L1 summed over all d·h·w elements, not a mean: its gradient is
    what moves PEM away from A ≡ 0.5 at the paper's SGD lr 1e-3.  (Dividing it by d·h·w left A at
    0.5 ± 0.04 after 15 rounds, so every swapped "positive" was half another identity;
    benchmarks/RESULTS.md, PEM experiments.)
    """
    zero = features.sum() * 0.0
    pose = cycle = zero
    if config.pem_variant in USES_PKD:
        plus, _ = pem.decouple(features)
        pose = config.pem_pose_weight * pose_distillation_loss(z, plus, labels, valid, use_mask=config.pem_mask)
    if config.pem_variant in USES_SCM:
        delta = swap_partners(labels, z, config.pem_partner == "hard", generator, valid)
        cycle = config.pem_cycle_weight * cycle_consistency_loss(pem, features, delta)
    return {"pose": pose, "cycle": cycle}


class SwapPositives:
    """Extra stage-3 loss: CE and triplet with pose-swapped positives F⁻_i + F⁺_δ(i) (PEM frozen)."""

    def __init__(self, pem: PoseExtractionModule, config: Config, poses, generator: torch.Generator):
        self.pem, self.config, self.poses, self.generator = pem, config, poses, generator

    def __call__(self, model: ReIDModel, outputs: ReIDOutput, labels: torch.Tensor,
                 indices: torch.Tensor) -> torch.Tensor:
        config = self.config
        z, valid = batch_poses(self.poses, indices, labels.device)
        swap = self.pem.swap(outputs.feature_map, labels, z, config.pem_partner == "hard", self.generator, valid)
        swapped = model.pool(swap.features)
        if not swap.paired.any():
            return swapped.sum() * 0.0
        ce = cross_entropy_smooth(model.classify(swapped[swap.paired]), labels[swap.paired], config.label_smoothing)
        tri = batch_hard_triplet(outputs.features, labels, config.triplet_margin, config.triplet_soft_margin,
                                 positives=swapped)
        return config.pem_synth_weight * (ce + tri)
