"""Pose interchange files (``.npz``): ``files`` (N,) paths relative to the dataset root, ``keypoints`` (N,17,2)
float32 COCO-17 pixel (x, y) in the image as stored, ``scores`` (N,17) float32 detector confidence (0 = not detected)."""

from __future__ import annotations

import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NUM_KEYPOINTS = 17  # COCO-17


@dataclass
class PoseTable:
    """Keypoints of N images: ``files`` relative paths, ``keypoints`` (N,17,2) float32 pixels (x, y),
    ``scores`` (N,17) float32 detector confidence (0 = not detected)."""

    files: np.ndarray
    keypoints: np.ndarray
    scores: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.files)
        if self.keypoints.shape != (n, NUM_KEYPOINTS, 2) or self.scores.shape != (n, NUM_KEYPOINTS):
            raise ValueError(
                f"pose table shapes do not match: files {self.files.shape}, keypoints {self.keypoints.shape}, "
                f"scores {self.scores.shape}; expected (N,), (N,17,2), (N,17)"
            )

    def __len__(self) -> int:
        return len(self.files)


def save_pose_file(path: str | Path, table: PoseTable) -> None:
    """Write ``table`` as an interchange ``.npz`` (atomically: written beside, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(
        tmp,
        files=np.asarray(table.files, dtype=str),
        keypoints=np.asarray(table.keypoints, dtype=np.float32),
        scores=np.asarray(table.scores, dtype=np.float32),
    )
    tmp.replace(path)


def load_pose_file(path: str | Path) -> PoseTable:
    """Read an interchange ``.npz``; a missing file or key is a ``ValueError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pose file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"pose file {path} is not an .npz interchange file (not a zip archive)")
    with np.load(path, allow_pickle=False) as data:
        missing = {"files", "keypoints", "scores"} - set(data.files)
        if missing:
            raise ValueError(f"pose file {path} lacks arrays {sorted(missing)}")
        try:
            return PoseTable(data["files"].astype(str), data["keypoints"].astype(np.float32),
                             data["scores"].astype(np.float32))
        except ValueError as err:
            raise ValueError(f"pose file {path}: {err}") from None


# ---------------------------------------------------------------- pose vectors for PKD

MIN_SCORE = 0.3  # rtmlib / BlazePose confidence below this counts as "not detected"
MIN_KEYPOINTS = 6  # fewer usable keypoints -> no usable pose (valid=False)
BOX_MARGIN = 0.1  # keypoints further than this fraction of the box outside the image are dropped


def pose_vectors(
    table: PoseTable,
    image_sizes: tuple[int, int] | np.ndarray,
    min_score: float = MIN_SCORE,
    min_keypoints: int = MIN_KEYPOINTS,
) -> tuple[np.ndarray, np.ndarray]:
    """PKD pose vectors z of every row of ``table``.

    image_sizes: one ``(height, width)`` for all images, or (N, 2) per image, in pixels.
    Returns ``vectors`` (N, 34) float32 laid out (x0, y0, x1, y1, ...) and ``valid`` (N,) bool.

    A keypoint is usable when its score >= ``min_score`` and it lies inside the image box
    (± ``BOX_MARGIN``).  Usable keypoints are scaled per axis to the box, ``2x/W - 1`` and
    ``2y/H - 1`` (x and y on the same [-1, 1] range, so the left/right layout that tells front
    from back or side views is not swamped by the head-to-feet extent every upright person
    shares), then the centroid of the usable keypoints is subtracted (translation invariance:
    crop jitter is not pose; cosine is already scale invariant).  Unusable keypoints are 0, so
    they add nothing to a dot product.  Rows with fewer than ``min_keypoints`` usable keypoints
    are ``valid=False`` and all-zero.
    """
    x, y = box_coordinates(table, image_sizes)
    usable = (table.scores >= min_score) & inside_box(x, y)
    valid = usable.sum(axis=1) >= min_keypoints
    usable &= valid[:, None]
    coords = np.stack([x, y], axis=-1) * usable[..., None]
    count = np.maximum(usable.sum(axis=1), 1)[:, None, None]
    centred = (coords - coords.sum(axis=1, keepdims=True) / count) * usable[..., None]
    return centred.reshape(len(table), 2 * NUM_KEYPOINTS).astype(np.float32), valid


def box_coordinates(table: PoseTable, image_sizes: tuple[int, int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints scaled per axis to their image box, ``2x/W - 1`` and ``2y/H - 1``: two (N, 17) float32 arrays.

    image_sizes: one ``(height, width)`` for all images, or (N, 2) per image, in pixels."""
    sizes = np.broadcast_to(np.asarray(image_sizes, dtype=np.float32), (len(table), 2))
    if (sizes <= 0).any():
        raise ValueError(f"image_sizes must be positive (height, width) pairs, got {image_sizes!r}")
    height, width = sizes[:, None, 0], sizes[:, None, 1]
    return 2.0 * table.keypoints[..., 0] / width - 1.0, 2.0 * table.keypoints[..., 1] / height - 1.0


def inside_box(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether box coordinates (``box_coordinates``) lie inside the image, ± ``BOX_MARGIN`` of its size."""
    limit = 1.0 + 2.0 * BOX_MARGIN
    return (np.abs(x) <= limit) & (np.abs(y) <= limit)


def check_usable_share(table: PoseTable, image_sizes: tuple[int, int] | np.ndarray, valid: np.ndarray,
                       source: str, min_score: float, min_share: float) -> str:
    """One line on how many of ``table``'s images (rows) have a usable pose (``valid``, (N,) bool), naming
    ``source``; a ``ValueError`` with that line when the share is below ``min_share``.

    The line also says when many confident keypoints fall outside their image (a pose file made for another
    image size) or when no keypoint reaches ``min_score`` (e.g. all scores 0)."""
    confident = table.scores >= min_score
    outside = confident & ~inside_box(*box_coordinates(table, image_sizes))
    share = float(valid.mean()) if len(valid) else 0.0
    line = f"{source}: {int(valid.sum())} of {len(valid)} images ({share:.0%}) have a usable pose"
    if not confident.any():
        line += f"; no keypoint has a score >= {min_score:g}"
    elif outside.sum() > 0.05 * confident.sum():
        line += (f"; {outside.sum() / confident.sum():.0%} of the confident keypoints lie outside their image "
                 "(a pose file made for another image size?)")
    if share < min_share:
        raise ValueError(f"{line}, below the minimum {min_share:g} (config key 'pem-min-usable-poses')")
    return line


def match_poses(table: PoseTable, relative_files: list[str] | np.ndarray, source: str = "pose file") -> np.ndarray:
    """Row of ``table`` for each dataset image: (M,) int64.

    Matches by relative path, falling back to the base name when that name is unique in the
    table (Market-style names are).  Extra table rows are fine; any image without a row is a
    ``ValueError`` naming ``source`` (the pose file), how many are missing and a few examples.
    """
    by_path = {str(f): i for i, f in enumerate(table.files)}
    names = [Path(str(f)).name for f in table.files]
    counts = Counter(names)
    by_name = {n: i for i, n in enumerate(names) if counts[n] == 1}
    rows, missing = [], []
    for rel in relative_files:
        row = by_path.get(str(rel), by_name.get(Path(str(rel)).name, -1))
        rows.append(row)
        if row < 0:
            missing.append(str(rel))
    if missing:
        raise ValueError(
            f"{source} does not cover the dataset: {len(missing)} of {len(rows)} images have no pose "
            f"entry (e.g. {', '.join(missing[:3])}); regenerate it with common.pose_extract for this dataset"
        )
    return np.asarray(rows, dtype=np.int64)


def dataset_pose_vectors(
    table: PoseTable,
    relative_files: list[str],
    image_sizes: tuple[int, int] | np.ndarray,
    source: str = "pose file",
    min_score: float = MIN_SCORE,
    min_usable_share: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``pose_vectors`` aligned with ``relative_files``: ((M, 34) float32, (M,) bool).

    With ``min_usable_share`` it prints the share of images with a usable pose (``check_usable_share``) and
    raises when the share is lower."""
    rows = match_poses(table, relative_files, source)
    sub = PoseTable(table.files[rows], table.keypoints[rows], table.scores[rows])
    vectors, valid = pose_vectors(sub, image_sizes, min_score)
    if min_usable_share is not None:
        print(check_usable_share(sub, image_sizes, valid, source, min_score, min_usable_share), flush=True)
    return vectors, valid


def read_image_sizes(paths: list[str]) -> np.ndarray:
    """(N, 2) int64 (height, width) of image files, read from their headers."""
    from PIL import Image

    sizes = np.empty((len(paths), 2), dtype=np.int64)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                sizes[i] = image.height, image.width
        except OSError as err:
            raise ValueError(f"cannot read image size of {path}: {err}") from None
    return sizes
