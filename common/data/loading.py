"""From a config to datasets and data loaders."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import DataLoader

from common.config import Config, ConfigError
from common.data.dataset import ImageDataset, PKSampler
from common.data.readers import read_dataset
from common.data.records import ImageRecord, ReIDDataset, clothes_ids
from common.data.transforms import build_transforms
from common.evaluation import MATCH_RULES, count_valid_queries


DATASET_FIELDS = ("dataset", "data_dir", "cache_dir", "synth_ids", "synth_cameras", "synth_seed", "synth_pose_band",
                  "synth_clothes")
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
                            seed=config.synth_seed, pose_band=config.synth_pose_band, clothes=config.synth_clothes)


def load_dataset(config: Config) -> ReIDDataset:
    """Records of the configured dataset (``common.data.readers.READERS``; synthetic data is in Market layout,
    or in LTCC layout with clothes ids when generated with ``synth-clothes`` >= 2)."""
    return read_dataset(config.dataset, dataset_root(config))


def check_dataset(dataset: ReIDDataset, training: bool = True, protocol: str = "standard") -> None:
    """Fail before any training or feature extraction when ``dataset`` cannot give a result: no training images
    (``training``), an empty query or gallery, no clothes ids for a cloth-changing ``protocol``, or no query with
    a true match under ``protocol`` (standard: same id, other camera)."""
    where = f"dataset '{dataset.name}' at {dataset.root}"
    if training and not dataset.train:
        raise ValueError(f"{where} has no training images (is its training folder empty?)")
    for split in ("query", "gallery"):
        if not getattr(dataset, split):
            raise ValueError(f"{where} has no {split} images")
    q_clothes, g_clothes = clothes_ids(dataset.query), clothes_ids(dataset.gallery)
    if protocol != "standard" and (q_clothes is None or g_clothes is None):
        raise ConfigError(f"config key 'eval-protocol' = '{protocol}' needs clothes ids, and {where} has none "
                          "(datasets with clothes ids: ltcc, prcc, synthetic with synth-clothes >= 2)")
    ids = [[getattr(r, key) for r in records] for key in ("pid", "camid")
           for records in (dataset.query, dataset.gallery)]  # q_pids, g_pids, q_camids, g_camids
    if not count_valid_queries(*ids, q_clothes=q_clothes, g_clothes=g_clothes, protocol=protocol):
        raise ValueError(f"{where}: no query has a true match ({MATCH_RULES[protocol]}) in the gallery, so nothing "
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
