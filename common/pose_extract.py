"""COCO-17 keypoints of every person crop of a dataset with rtmlib's RTMPose (onnxruntime).

Each crop is one person, so the whole image is the box (rtmlib ``bboxes=[]``).  Keypoints are
pixels (x, y) of the image as stored; scores are RTMPose's SimCC maxima (the mean of the x and
y peak values), stored as given: they are not probabilities and can exceed 1 or be ≤ 0 (rtmlib
then sets that keypoint's location to a meaningless -1 bin).  Output: camfed's pose interchange
file (``common.data.pose.save_pose_file``).

Usage: ``camfed pose --data DATA_DIR --out OUT.npz [--pose-model URL_OR_ONNX] [--device cuda]``
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from common.data.pose import NUM_KEYPOINTS, PoseTable, save_pose_file

# rtmlib's RTMPose-m (body7, 256×192) body model
DEFAULT_POSE_MODEL = (
    "https://download.openmmlab.com/mmpose/v1/projects/rtmposev1/onnx_sdk/"
    "rtmpose-m_simcc-body7_pt-body7_420e-256x192-e48f03d0_20230504.zip"
)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}


def resolve_pose_model(pose_model: str) -> str:
    """Local ONNX path of ``pose_model`` (a URL is downloaded once to ``$TORCH_HOME/hub/checkpoints``)."""
    if urlparse(pose_model).scheme in ("http", "https", "ftp"):
        from rtmlib.tools.file import download_checkpoint

        try:
            return download_checkpoint(pose_model)
        except Exception as err:  # offline, proxy, bad URL: all need the same advice
            raise RuntimeError(
                f"could not download pose model {pose_model} ({type(err).__name__}: {err}); "
                "without internet, fetch the ONNX file elsewhere and pass its local path as pose_model"
            ) from err
    path = Path(pose_model).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"pose model not found: {pose_model}; pass a local RTMPose .onnx path or a URL")
    return str(path)


class CropPoseEstimator:
    """RTMPose on whole crops.  device: 'cpu', 'cuda' or 'cuda:N' (onnxruntime providers)."""

    def __init__(self, pose_model: str = DEFAULT_POSE_MODEL, device: str = "cpu", input_size=(192, 256)):
        import onnxruntime
        from rtmlib import RTMPose

        if device.startswith("cuda") and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise RuntimeError(f"device={device!r} but onnxruntime has no CUDAExecutionProvider; use device='cpu'")
        if device != "cpu" and not device.startswith("cuda"):
            raise ValueError(f"pose extraction device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        path = resolve_pose_model(pose_model)
        try:
            self.model = RTMPose(path, model_input_size=tuple(input_size), backend="onnxruntime", device=device)
        except Exception as err:  # onnxruntime raises its own pybind exception types for unreadable models
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RuntimeError(f"pose model {path} cannot be loaded as an ONNX model ({reason})") from None

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """image: (H, W, 3) uint8 BGR (as cv2.imread gives, rtmlib's convention).
        Returns keypoints (17, 2) float32 pixels and scores (17,) float32."""
        keypoints, scores = self.model(image, bboxes=[])
        if keypoints.shape != (1, NUM_KEYPOINTS, 2):
            raise ValueError(f"pose model {self.model.onnx_model} gave keypoints {keypoints.shape}, "
                             f"expected (1, {NUM_KEYPOINTS}, 2) (a COCO-17 body model)")
        return keypoints[0].astype(np.float32), scores[0].astype(np.float32)


def list_images(data_dir: str | Path) -> list[str]:
    """Sorted paths (POSIX, relative to ``data_dir``) of every image file under it."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset directory not found: {root}")
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    return files


def partial_path(out_file: str | Path) -> Path:
    """Where ``extract_poses`` keeps unfinished work: ``<out>.partial.npz``."""
    out_file = Path(out_file)
    return out_file.with_name(out_file.name + ".partial.npz")


def _load_partial(path: Path, pose_model: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["pose_model"]) != pose_model:
                warnings.warn(f"{path} was made with pose model {data['pose_model']}, resuming with {pose_model}",
                              stacklevel=2)
            return {str(f): (k, s) for f, k, s in zip(data["files"], data["keypoints"], data["scores"])}
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"cannot resume from {path} ({err}); delete it to start over") from None


def _save_partial(path: Path, done: dict[str, tuple[np.ndarray, np.ndarray]], pose_model: str) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    files = list(done)
    np.savez(tmp, files=np.asarray(files, dtype=str), pose_model=np.asarray(pose_model),
             keypoints=np.asarray([done[f][0] for f in files], dtype=np.float32).reshape(-1, NUM_KEYPOINTS, 2),
             scores=np.asarray([done[f][1] for f in files], dtype=np.float32).reshape(-1, NUM_KEYPOINTS))
    os.replace(tmp, path)


def extract_poses(
    data_dir: str | Path,
    out_file: str | Path,
    pose_model: str = DEFAULT_POSE_MODEL,
    device: str = "cpu",
    input_size: tuple[int, int] = (192, 256),
    save_every: int = 500,
    progress: bool = True,
) -> PoseTable:
    """Run RTMPose on every image under ``data_dir`` and write the interchange file ``out_file``.

    input_size: model input (width, height).  Resumable: finished images are saved to
    ``<out>.partial.npz`` every ``save_every`` images and on any exit (Ctrl-C included); a
    restart skips them.  rtmlib runs one crop per onnxruntime call, so there is no batching.
    """
    import cv2
    from tqdm import tqdm

    root, out_file = Path(data_dir), Path(out_file)
    files = list_images(root)
    partial = partial_path(out_file)
    partial.parent.mkdir(parents=True, exist_ok=True)
    done = _load_partial(partial, pose_model)
    todo = [f for f in files if f not in done]
    estimator = CropPoseEstimator(pose_model, device, input_size) if todo else None
    try:
        for count, rel in enumerate(tqdm(todo, total=len(files), initial=len(files) - len(todo),
                                         desc="poses", unit="img", disable=not progress), 1):
            image = cv2.imread(str(root / rel), cv2.IMREAD_COLOR)
            if image is None:
                raise ValueError(f"cannot read image {root / rel}")
            done[rel] = estimator(image)
            if count % save_every == 0:
                _save_partial(partial, done, pose_model)
    finally:
        if todo:
            _save_partial(partial, done, pose_model)
    table = PoseTable(np.asarray(files, dtype=str),
                      np.stack([done[f][0] for f in files]).astype(np.float32),
                      np.stack([done[f][1] for f in files]).astype(np.float32))
    save_pose_file(out_file, table)
    partial.unlink(missing_ok=True)
    return table

