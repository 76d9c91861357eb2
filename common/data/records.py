"""The record every dataset reader returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ImageRecord:
    """One image: absolute ``path``, person id ``pid`` (0 = distractor), camera ``camid`` (1-based)."""

    path: str
    pid: int
    camid: int


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
