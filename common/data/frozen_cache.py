"""Cached outputs of a model's frozen stages (``cache-frozen = true``): the frozen stages run once per image.

With ``freeze-stages = k`` the first k backbone stages never change (pretrained weights, BatchNorm in eval
mode), so their output for an image is a constant.  When the only augmentation is a horizontal flip
(``pad = 0``, ``random-erasing = 0``), every training input is one of two constants per image: the stage-k
outputs of the image and of its mirror image.  They are computed once per process and kept in memory
(float16, e.g. 80 × 4 × 2 values per view for EfficientNet-Lite0 at 64×32 with k = 5), and the loaders
yield them in place of images; models built from the same config (``input_stage = k``) start at stage k.
This turns a training step into the trainable stages' work only.  In deployment each ClientApp process
computes its camera's cache once per round.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.utils.data import DataLoader, Dataset

from common.config import Config
from common.data.dataset import PKSampler
from common.data.loading import test_loader
from common.data.records import ImageRecord

_CACHE: dict[tuple, torch.Tensor] = {}
MODEL_FIELDS = ("backbone", "pretrained", "last_stride", "freeze_stages", "height", "width")


def frozen_outputs(records: list[ImageRecord], config: Config, mirrored: bool) -> torch.Tensor:
    """Outputs of the frozen stages for ``records``: (N, V, C, h, w) float16 on the CPU, V = 2 views
    (image, mirror image) when ``mirrored`` else 1; computed once per process for equal inputs."""
    key = (tuple(getattr(config, f) for f in MODEL_FIELDS), mirrored, tuple(r.path for r in records))
    if key not in _CACHE:
        _CACHE[key] = _compute(records, config, mirrored)
    return _CACHE[key]


def _compute(records: list[ImageRecord], config: Config, mirrored: bool) -> torch.Tensor:
    from common.engine import resolve_device
    from common.models.backbones import run_stages
    from common.models.reid import build_model

    device = resolve_device(config.device)
    backbone = build_model(config).backbone.to(device).eval()
    loader = test_loader(records, dataclasses.replace(config, cache_frozen=False))  # the images themselves
    views = []
    with torch.inference_mode():
        for images, *_ in loader:
            images = images.to(device)
            batch = [images, torch.flip(images, dims=[3])] if mirrored else [images]
            views.append(torch.stack([run_stages(backbone, x, 0, config.freeze_stages) for x in batch], dim=1)
                         .to("cpu", torch.float16))
    return torch.cat(views)


class CachedDataset(Dataset):
    """Items ``(frozen-stage output (C, h, w) float32, target, camid, index)``; a random view per item
    (the mirror with probability ``flip_prob``) when ``outputs`` holds two views."""

    def __init__(self, outputs: torch.Tensor, records: list[ImageRecord], labels: dict[int, int] | None,
                 flip_prob: float = 0.0):
        self.outputs, self.records, self.labels, self.flip_prob = outputs, records, labels, flip_prob

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[index]
        view = int(self.outputs.shape[1] > 1 and torch.rand(()).item() < self.flip_prob)
        target = self.labels[record.pid] if self.labels is not None else record.pid
        return self.outputs[index, view].float(), target, record.camid, index


def cached_train_loader(records: list[ImageRecord], labels: dict[int, int], config: Config, seed: int,
                        augment: bool = True) -> DataLoader:
    """``common.data.loading.train_loader`` on cached frozen-stage outputs (flip as the only augmentation)."""
    outputs = frozen_outputs(records, config, mirrored=True)
    sampler = PKSampler([r.pid for r in records], config.batch_size, config.num_instances, seed=seed)
    dataset = CachedDataset(outputs, records, labels, config.flip_prob if augment else 0.0)
    return DataLoader(dataset, batch_size=min(config.batch_size, len(sampler)), sampler=sampler, drop_last=True)


def cached_test_loader(records: list[ImageRecord], config: Config, batch_size: int = 128) -> DataLoader:
    """``common.data.loading.test_loader`` on cached frozen-stage outputs (record order, no augmentation)."""
    return DataLoader(CachedDataset(frozen_outputs(records, config, mirrored=False), records, None),
                      batch_size=batch_size, shuffle=False)
