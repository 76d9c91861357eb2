"""Data on a federated node: the dataset (generated once per machine when synthetic) and a camera's partition."""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from pathlib import Path

from filelock import FileLock

from common.config import Config, ConfigError
from common.data.loading import DATASET_FIELDS, load_dataset
from common.data.partition import CameraPartition, partition_by_camera
from common.data.records import ReIDDataset


def with_absolute_paths(config: Config) -> Config:
    """``config`` with data-dir, cache-dir, output-dir and state-dir made absolute (against the cwd)."""
    keys = ("data_dir", "cache_dir", "output_dir", "state_dir")
    return dataclasses.replace(config, **{k: str(Path(getattr(config, k)).expanduser().absolute())
                                          for k in keys if getattr(config, k)})


def cache_lock(cache_dir: str) -> FileLock:
    """Exclusive lock on ``<cache-dir>/.lock`` (any OS): processes generating the synthetic data queue up."""
    path = Path(cache_dir).expanduser().absolute() / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path)


def load_node_dataset(config: Config) -> ReIDDataset:
    """``load_dataset`` under the cache lock when the data is generated, so concurrent clients build it once."""
    config = with_absolute_paths(config)
    return _load_cached(tuple(getattr(config, name) for name in DATASET_FIELDS))


@lru_cache(maxsize=4)
def _load_cached(key: tuple) -> ReIDDataset:
    """The dataset of the ``DATASET_FIELDS`` values ``key``."""
    config = Config(**dict(zip(DATASET_FIELDS, key)))
    if config.dataset == "synthetic" and not config.data_dir:
        with cache_lock(config.cache_dir):
            return load_dataset(config)
    return load_dataset(config)


def camera_partition(dataset: ReIDDataset, partition_id: int, num_partitions: int) -> CameraPartition:
    """Client ``partition_id`` (0-based) holds the training images of the ``partition_id``-th camera (sorted)."""
    partitions = partition_by_camera(dataset.train)
    if num_partitions != len(partitions):
        raise ConfigError(
            f"node config 'num-partitions' = {num_partitions}, but dataset '{dataset.name}' at {dataset.root} has "
            f"{len(partitions)} training cameras: run one SuperNode per camera "
            f"(simulation: num-supernodes = {len(partitions)})"
        )
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"node config 'partition-id' = {partition_id} is outside 0..{num_partitions - 1}")
    return partitions[partition_id]
