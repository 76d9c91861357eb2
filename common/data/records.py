"""The record every dataset reader returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class ImageRecord:
    """One image: absolute ``path``, person id ``pid`` (0 = distractor), camera ``camid`` (1-based) and
    ``clothes``: the person's outfit number (compared only between images of one pid; None = unknown,
    as in datasets without clothes labels)."""

    path: str
    pid: int
    camid: int
    clothes: int | None = None


@dataclass
class ReIDDataset:
    """Train / query / gallery record lists of one dataset rooted at ``root``."""

    name: str
    root: Path
    train: list[ImageRecord] = field(default_factory=list)
    query: list[ImageRecord] = field(default_factory=list)
    gallery: list[ImageRecord] = field(default_factory=list)

    def relative(self, record: ImageRecord) -> str:
        """Path of ``record`` relative to the dataset root (the pose file key)."""
        return Path(record.path).relative_to(self.root).as_posix()


def clothes_ids(records: Sequence[ImageRecord]) -> np.ndarray | None:
    """(N,) int64 clothes ids of ``records``, or None when any of them is unknown."""
    if any(r.clothes is None for r in records):
        return None
    return np.array([r.clothes for r in records], dtype=np.int64)
