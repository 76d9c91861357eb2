"""Readers for Market-1501 and MSMT17 (V1 / V2 layouts).

Market-1501: Zheng et al., *Scalable Person Re-identification: A Benchmark*, ICCV 2015 (``<pid>_c<camera>s...``
file names).  MSMT17: Wei et al., *Person Transfer GAN to Bridge Domain Gap for Person Re-Identification*,
CVPR 2018 (``list_*.txt`` lines ``path pid``; camera = third ``_`` field of the name).

Junk images (pid −1) are skipped everywhere; distractors (pid 0) are kept in the gallery only.
"""

from __future__ import annotations

import re
from pathlib import Path

from common.data.records import ImageRecord, ReIDDataset

MARKET_PATTERN = re.compile(r"^(-?\d+)_c(\d+)s\d+_")  # <pid>_c<camera>s<sequence>_..., pid -1 = junk
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _require_dir(path: Path) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {path}")
    return path


def parse_market_name(name: str) -> tuple[int, int]:
    """``0002_c1s1_000451_03.jpg`` → (pid 2, camera 1), ``0002_c12s1_...`` → camera 12; a name that does not
    follow the Market naming ``<pid>_c<camera>s<sequence>_...`` is a ValueError naming it."""
    match = MARKET_PATTERN.match(name)
    if match is None:
        raise ValueError(f"not a Market-1501 file name (<pid>_c<camera>s<sequence>_...): {name}")
    return int(match.group(1)), int(match.group(2))


def read_market_folder(folder: Path, keep_distractors: bool) -> list[ImageRecord]:
    """Records of one Market-style folder, sorted by file name."""
    records = []
    for path in sorted(_require_dir(folder).iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        try:
            pid, camid = parse_market_name(path.name)
        except ValueError as err:
            raise ValueError(f"{folder}: {err}") from None
        if pid == -1 or (pid == 0 and not keep_distractors):
            continue
        records.append(ImageRecord(str(path), pid, camid))
    return records


def read_market1501(root: str | Path, name: str = "market1501") -> ReIDDataset:
    """Market-1501 layout: ``bounding_box_train/ query/ bounding_box_test/`` under ``root``.

    ``root`` may also be the parent holding ``Market-1501-v15.09.15/``.
    """
    root = Path(root)
    nested = root / "Market-1501-v15.09.15"
    if not (root / "bounding_box_train").is_dir() and nested.is_dir():
        root = nested
    return ReIDDataset(
        name=name,
        root=root,
        train=read_market_folder(root / "bounding_box_train", keep_distractors=False),
        query=read_market_folder(root / "query", keep_distractors=False),
        gallery=read_market_folder(root / "bounding_box_test", keep_distractors=True),
    )


def _msmt_layout(root: Path) -> tuple[Path, str, str]:
    """(dataset dir, train folder, test folder) for V1 or V2 under ``root``."""
    for candidate in (root, root / "MSMT17_V1", root / "MSMT17_V2", root / "MSMT17"):
        for train, test in (("train", "test"), ("mask_train_v2", "mask_test_v2")):
            if (candidate / train).is_dir() and (candidate / "list_train.txt").is_file():
                return candidate, train, test
    raise FileNotFoundError(
        f"no MSMT17 layout under {root}: expected list_train.txt with train/ (V1) or mask_train_v2/ (V2)"
    )


def _read_msmt_list(list_file: Path, image_dir: Path) -> list[ImageRecord]:
    if not list_file.is_file():
        raise FileNotFoundError(f"MSMT17 list file not found: {list_file}")
    records = []
    for number, line in enumerate(list_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rel, pid = line.split()
            camid = int(Path(rel).name.split("_")[2])
            records.append(ImageRecord(str(image_dir / rel), int(pid), camid))
        except (ValueError, IndexError):
            raise ValueError(f"{list_file}:{number}: cannot parse line {line!r}") from None
    return records


def read_msmt17(root: str | Path, include_val: bool = True) -> ReIDDataset:
    """MSMT17 V1 or V2; the training set is list_train (+ list_val, as is standard)."""
    base, train_dir, test_dir = _msmt_layout(Path(root))
    train = _read_msmt_list(base / "list_train.txt", base / train_dir)
    if include_val and (base / "list_val.txt").is_file():
        train += _read_msmt_list(base / "list_val.txt", base / train_dir)
    return ReIDDataset(
        name=f"msmt17-{'v2' if 'v2' in train_dir else 'v1'}",
        root=base,
        train=train,
        query=_read_msmt_list(base / "list_query.txt", base / test_dir),
        gallery=_read_msmt_list(base / "list_gallery.txt", base / test_dir),
    )
