"""Torch dataset over image records and the P×K identity sampler."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Callable, Iterator, Sequence

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from common.data.records import ImageRecord


class UnreadableImageError(RuntimeError):
    """An image file that cannot be opened or decoded (the message names the file)."""


def read_image(path: str) -> Image.Image:
    """Open ``path`` as RGB; a missing or corrupt file is an ``UnreadableImageError`` naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise UnreadableImageError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise UnreadableImageError(f"corrupt or unreadable image: {path} ({err})") from None


def relabel(records: Sequence[ImageRecord]) -> dict[int, int]:
    """Map each pid to a contiguous label 0..C-1 (sorted by pid)."""
    return {pid: label for label, pid in enumerate(sorted({r.pid for r in records}))}


class ImageDataset(Dataset):
    """Items ``(image (3,H,W) float, label or pid int, camid int, index int)``.

    With ``labels`` (pid → label) the second field is the training label, otherwise the raw pid.
    """

    def __init__(self, records: Sequence[ImageRecord], transform: Callable,
                 labels: dict[int, int] | None = None):
        self.records = list(records)
        self.transform = transform
        self.labels = labels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[index]
        target = self.labels[record.pid] if self.labels is not None else record.pid
        return self.transform(read_image(record.path)), target, record.camid, index


class PKSampler(Sampler[int]):
    """Batches of P identities × K images; ids with fewer than K images are sampled with replacement.

    Each epoch splits every identity's shuffled images into chunks of K and draws P distinct
    identities per batch until fewer than P identities have chunks left, so an epoch covers about
    every image once.  With fewer than P identities in total, each batch holds all of them.
    """

    def __init__(self, pids: Sequence[int], batch_size: int, num_instances: int, seed: int = 0):
        if batch_size % num_instances:
            raise ValueError(f"batch_size {batch_size} is not a multiple of num_instances {num_instances}")
        self.num_instances = num_instances
        self.by_pid: dict[int, list[int]] = defaultdict(list)
        for index, pid in enumerate(pids):
            self.by_pid[pid].append(index)
        if not self.by_pid:
            raise ValueError("PKSampler got no images")
        self.ids_per_batch = min(batch_size // num_instances, len(self.by_pid))
        self.seed = seed
        self.epoch = 0
        self._length = len(self._epoch_order(random.Random(seed)))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _epoch_order(self, rng: random.Random) -> list[int]:
        chunks: dict[int, list[list[int]]] = {}
        for pid, indices in self.by_pid.items():
            pool = list(indices)
            if len(pool) < self.num_instances:
                pool += rng.choices(pool, k=self.num_instances - len(pool))
            rng.shuffle(pool)
            usable = len(pool) // self.num_instances * self.num_instances
            chunks[pid] = [pool[i:i + self.num_instances] for i in range(0, usable, self.num_instances)]
        order: list[int] = []
        while len(chunks) >= self.ids_per_batch:
            for pid in rng.sample(sorted(chunks), self.ids_per_batch):
                order += chunks[pid].pop()
                if not chunks[pid]:
                    del chunks[pid]
        return order

    def __iter__(self) -> Iterator[int]:
        order = self._epoch_order(random.Random(self.seed * 100_003 + self.epoch))
        self.epoch += 1
        return iter(order)

    def __len__(self) -> int:
        return self._length
