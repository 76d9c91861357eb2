"""From a config to datasets and data loaders."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import DataLoader

from common.config import Config, ConfigError
from common.data.dataset import ImageDataset, PKSampler
from common.data.readers import read_market1501, read_msmt17
from common.data.records import ImageRecord, ReIDDataset
from common.data.transforms import build_transforms


DATASET_FIELDS = ("dataset", "data_dir", "cache_dir", "synth_ids", "synth_cameras", "synth_seed", "synth_pose_band")
"""The Config fields ``load_dataset`` reads: configs equal on these load the same dataset (a cache key)."""


def dataset_root(config: Config) -> Path:
    """The dataset folder; for ``synthetic`` without ``data-dir`` it is generated (once) in the cache."""
    if config.data_dir:
        root = Path(config.data_dir).expanduser()
        if not root.exists():
            raise ConfigError(f"config key 'data-dir': folder not found: {root}")
        return root
    if config.dataset != "synthetic":
        raise ConfigError(f"config key 'data-dir' is required for dataset '{config.dataset}'")
    from common.data.synthetic import ensure_synthetic

    return ensure_synthetic(Path(config.cache_dir), num_ids=config.synth_ids, num_cameras=config.synth_cameras,
                            seed=config.synth_seed, pose_band=config.synth_pose_band)


def load_dataset(config: Config) -> ReIDDataset:
    """Records of the configured dataset (synthetic data is in Market layout)."""
    root = dataset_root(config)
    if config.dataset == "msmt17":
        return read_msmt17(root)
    return read_market1501(root, name=config.dataset)


def check_dataset(dataset: ReIDDataset, training: bool = True) -> None:
    """Fail before any training or feature extraction when ``dataset`` cannot give a result: no training images
    (``training``), an empty query or gallery, or no query with a true match (same id, other camera)."""
    where = f"dataset '{dataset.name}' at {dataset.root}"
    if training and not dataset.train:
        raise ValueError(f"{where} has no training images (is its training folder empty?)")
    for split in ("query", "gallery"):
        if not getattr(dataset, split):
            raise ValueError(f"{where} has no {split} images")
    gallery_cameras: dict[int, set[int]] = {}
    for record in dataset.gallery:
        gallery_cameras.setdefault(record.pid, set()).add(record.camid)
    if not any(gallery_cameras.get(record.pid, set()) - {record.camid} for record in dataset.query):
        raise ValueError(f"{where}: no query has a true match (same id, other camera) in the gallery, so nothing "
                         "can be evaluated")


def train_loader(records: list[ImageRecord], labels: dict[int, int], config: Config, seed: int,
                 augment: bool = True) -> DataLoader:
    """P×K batches of ``(images, labels, camids, indices)``, with training augmentation unless ``augment=False``
    (with ``cache-frozen``: the frozen stages' cached outputs in place of images, ``common.data.frozen_cache``)."""
    if config.cache_frozen:
        from common.data.frozen_cache import cached_train_loader

        return cached_train_loader(records, labels, config, seed, augment)
    transform = build_transforms(config.height, config.width, train=augment, flip_prob=config.flip_prob,
                                 pad=config.pad, random_erasing=config.random_erasing)
    sampler = PKSampler([r.pid for r in records], config.batch_size, config.num_instances, seed=seed)
    return DataLoader(ImageDataset(records, transform, labels), batch_size=min(config.batch_size, len(sampler)),
                      sampler=sampler, num_workers=config.num_workers, drop_last=True,
                      persistent_workers=config.num_workers > 0)


def test_loader(records: list[ImageRecord], config: Config, batch_size: int = 128) -> DataLoader:
    """Batches of ``(images, pids, camids, indices)`` in record order, no augmentation (with ``cache-frozen``:
    the frozen stages' cached outputs in place of images)."""
    if config.cache_frozen:
        from common.data.frozen_cache import cached_test_loader

        return cached_test_loader(records, config, batch_size)
    transform = build_transforms(config.height, config.width, train=False)
    return DataLoader(ImageDataset(records, transform), batch_size=batch_size, shuffle=False,
                      num_workers=config.num_workers)
