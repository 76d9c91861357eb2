"""Readers for Market-1501, MSMT17 (V1 / V2 layouts) and the cloth-changing sets LTCC and PRCC.

Market-1501: Zheng et al., *Scalable Person Re-identification: A Benchmark*, ICCV 2015 (``<pid>_c<camera>s...``
file names).  MSMT17: Wei et al., *Person Transfer GAN to Bridge Domain Gap for Person Re-Identification*,
CVPR 2018 (``list_*.txt`` lines ``path pid``; camera = third ``_`` field of the name).

Market-1501 / MSMT17: junk images (pid −1) are skipped everywhere; distractors (pid 0) are kept in the
gallery only.  LTCC and PRCC records carry clothes ids (``ImageRecord.clothes``); their layouts and
evaluation protocols: docs/cloth-changing.md.
"""

from __future__ import annotations

import re
from pathlib import Path

from common.data.records import ImageRecord, ReIDDataset

MARKET_PATTERN = re.compile(r"^(-?\d+)_c(\d+)s\d+_")  # <pid>_c<camera>s<sequence>_..., pid -1 = junk
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LTCC_PATTERN = re.compile(r"^(\d+)_(\d+)_c(\d+)_")  # <pid>_<clothes>_c<camera>_<frame>...
LTCC_FOLDERS = ("train", "query", "test")  # test = gallery
PRCC_CAMERAS = ("A", "B", "C")  # camids 1, 2, 3; A and B see a person in one outfit, C in another


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


# --------------------------------------------------------------------------- cloth-changing sets


def parse_ltcc_name(name: str) -> tuple[int, int, int]:
    """``094_1_c9_015923.png`` → (pid 94, camera 9, clothes 1); any other name is a ValueError naming it."""
    match = LTCC_PATTERN.match(name)
    if match is None:
        raise ValueError(f"not an LTCC file name (<pid>_<clothes>_c<camera>_<frame>...): {name}")
    pid, clothes, camid = (int(group) for group in match.groups())
    return pid, camid, clothes


def read_ltcc_folder(folder: Path) -> list[ImageRecord]:
    """Records of one LTCC folder with their clothes ids, sorted by file name (every pid is a person)."""
    records = []
    for path in sorted(_require_dir(folder).iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        try:
            pid, camid, clothes = parse_ltcc_name(path.name)
        except ValueError as err:
            raise ValueError(f"{folder}: {err}") from None
        records.append(ImageRecord(str(path), pid, camid, clothes))
    return records


def read_ltcc(root: str | Path, name: str = "ltcc") -> ReIDDataset:
    """LTCC layout (Qian et al., *Long-Term Cloth-Changing Person Re-identification*, ACCV 2020,
    https://arxiv.org/abs/2005.12633): ``train/ query/ test/`` (test = gallery) under ``root`` or
    ``root/LTCC_ReID``, every image named ``<pid>_<clothes>_c<camera>_<frame>.png``, the clothes number
    being the person's outfit."""
    root = Path(root)
    if not (root / "train").is_dir() and (root / "LTCC_ReID").is_dir():
        root = root / "LTCC_ReID"
    train, query, gallery = (read_ltcc_folder(root / folder) for folder in LTCC_FOLDERS)
    return ReIDDataset(name=name, root=root, train=train, query=query, gallery=gallery)


def _prcc_record(path: Path, pid_dir: Path, camera: str) -> ImageRecord:
    """The record of one PRCC image: camid 1/2/3 for A/B/C, clothes 1 in A and B, 2 in C."""
    if camera not in PRCC_CAMERAS:
        raise ValueError(f"PRCC image {path}: camera {camera!r} is not one of {PRCC_CAMERAS}")
    try:
        pid = int(pid_dir.name)
    except ValueError:
        raise ValueError(f"PRCC identity folder {pid_dir} is not named by a number") from None
    return ImageRecord(str(path), pid, PRCC_CAMERAS.index(camera) + 1, 2 if camera == "C" else 1)


def _prcc_folder(folder: Path, camera: str | None = None) -> list[ImageRecord]:
    """Records under ``folder/<pid>/``; the camera is ``camera`` or, when None, each file name's first letter."""
    return [_prcc_record(path, pid_dir, camera or path.name[:1])
            for pid_dir in sorted(_require_dir(folder).iterdir()) if pid_dir.is_dir()
            for path in sorted(pid_dir.iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES]


def read_prcc(root: str | Path, name: str = "prcc") -> ReIDDataset:
    """PRCC layout (Yang, Wu, Zheng, *Person Re-identification by Contour Sketch under Moderate Clothing
    Change*, TPAMI 2021, https://arxiv.org/abs/2002.02295) under ``root`` or ``root/prcc``:
    ``rgb/train/<pid>/`` with images named after their camera (``A_cropped_rgb001.jpg``) and
    ``rgb/test/<A|B|C>/<pid>/``.

    Train = ``rgb/train`` (``rgb/val`` is not read).  Gallery = test camera A; query = test cameras B (same
    clothes as A) and C (other clothes) together: the ``same-clothes`` protocol then scores exactly the B
    queries and ``cloth-changing`` exactly the C queries, each against all of A (docs/cloth-changing.md)."""
    root = Path(root)
    if not (root / "rgb").is_dir() and (root / "prcc" / "rgb").is_dir():
        root = root / "prcc"
    test = root / "rgb" / "test"
    return ReIDDataset(name=name, root=root, train=_prcc_folder(root / "rgb" / "train"),
                       query=_prcc_folder(test / "B", "B") + _prcc_folder(test / "C", "C"),
                       gallery=_prcc_folder(test / "A", "A"))


def read_synthetic(root: str | Path) -> ReIDDataset:
    """A dataset of ``camfed synth``: LTCC layout (with clothes ids) when it was generated with several
    outfits per identity, Market layout otherwise."""
    root = Path(root)
    if (root / LTCC_FOLDERS[0]).is_dir() and not (root / "bounding_box_train").is_dir():
        return read_ltcc(root, name="synthetic")
    return read_market1501(root, name="synthetic")


READERS = {"market1501": read_market1501, "msmt17": read_msmt17, "ltcc": read_ltcc, "prcc": read_prcc,
           "synthetic": read_synthetic}
"""Dataset name (config key ``dataset``) → reader of its root folder."""


def read_dataset(name: str, root: str | Path) -> ReIDDataset:
    """Records of dataset ``name`` (a key of ``READERS``) at ``root``."""
    if name not in READERS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {tuple(READERS)}")
    return READERS[name](root)
