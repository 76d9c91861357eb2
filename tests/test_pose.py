"""Pose extraction through the real rtmlib path (tiny ONNX models), pose vectors and pose matching."""

import tarfile
from pathlib import Path

import numpy as np
import pytest

from common.data.pose import (
    PoseTable,
    dataset_pose_vectors,
    load_pose_file,
    match_poses,
    pose_vectors,
    read_image_sizes,
    save_pose_file,
)

cv2 = pytest.importorskip("cv2")
onnx = pytest.importorskip("onnx")
pytest.importorskip("rtmlib")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from common import pose_extract  # noqa: E402
from common.pose_extract import extract_poses, list_images, partial_path, resolve_pose_model  # noqa: E402
from conftest import require_shared_data  # noqa: E402

K = 17


def _save_model(path: Path, nodes, initializers) -> str:
    graph = helper.make_graph(
        nodes, "tiny_rtmpose",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 256, 192])],
        [helper.make_tensor_value_info("simcc_x", TensorProto.FLOAT, [1, K, 384]),
         helper.make_tensor_value_info("simcc_y", TensorProto.FLOAT, [1, K, 512])],
        [numpy_helper.from_array(value, name) for name, value in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return str(path)


def constant_model(path: Path, simcc_x: np.ndarray, simcc_y: np.ndarray) -> str:
    """Outputs fixed SimCC vectors (plus 0·mean(input), so the input is consumed)."""
    nodes = [helper.make_node("ReduceMean", ["input"], ["m"], keepdims=0),
             helper.make_node("Mul", ["m", "zero"], ["z"]),
             helper.make_node("Add", ["cx", "z"], ["simcc_x"]),
             helper.make_node("Add", ["cy", "z"], ["simcc_y"])]
    return _save_model(path, nodes, {"zero": np.array(0, np.float32), "cx": simcc_x[None].astype(np.float32),
                                     "cy": simcc_y[None].astype(np.float32)})


def brightest_point_model(path: Path) -> str:
    """Every keypoint is the brightest input pixel: x bins = column maxima upsampled ×2 (simcc split 2)."""
    up_x = np.repeat(np.eye(192, dtype=np.float32), 2, axis=1)  # (192, 384): column j -> bins 2j, 2j+1
    up_y = np.repeat(np.eye(256, dtype=np.float32), 2, axis=1)
    nodes = [helper.make_node("ReduceMax", ["input"], ["colmax"], axes=[1, 2], keepdims=1),  # (1,1,1,192)
             helper.make_node("Reshape", ["colmax", "shape_x"], ["cols"]),
             helper.make_node("MatMul", ["cols", "up_x"], ["bins_x"]),
             helper.make_node("Expand", ["bins_x", "out_x"], ["simcc_x"]),
             helper.make_node("ReduceMax", ["input"], ["rowmax"], axes=[1, 3], keepdims=1),  # (1,1,256,1)
             helper.make_node("Reshape", ["rowmax", "shape_y"], ["rows"]),
             helper.make_node("MatMul", ["rows", "up_y"], ["bins_y"]),
             helper.make_node("Expand", ["bins_y", "out_y"], ["simcc_y"])]
    shapes = {n: np.asarray(v, dtype=np.int64) for n, v in
              {"shape_x": [1, 1, 192], "shape_y": [1, 1, 256], "out_x": [1, K, 384], "out_y": [1, K, 512]}.items()}
    return _save_model(path, nodes, {"up_x": up_x, "up_y": up_y, **shapes})


def dot_image(width: int, height: int, x: int, y: int) -> np.ndarray:
    image = np.zeros((height, width, 3), np.uint8)
    image[y, x] = 255
    return image


def test_rtmpose_decoding_maps_simcc_bins_to_crop_pixels(tmp_path):
    # Hand mapping for a 64×128 crop: box (0,0,64,128) -> centre (32,64), scale ×1.25 = (80,160);
    # aspect fix to 192/256 = 0.75: 80 < 160·0.75 so scale = (120,160).  A SimCC bin b maps to
    # input pixel b/2, then x = (bx/2)·120/192 + 32 − 60 = 0.3125·bx − 28, y = 0.3125·by − 16.
    bx, by = 100 + 10 * np.arange(K), 60 + 20 * np.arange(K)
    simcc_x, simcc_y = np.full((K, 384), -1.0), np.full((K, 512), -1.0)
    simcc_x[np.arange(K), bx] = 0.5 + 0.02 * np.arange(K)
    simcc_y[np.arange(K), by] = 0.7 + 0.02 * np.arange(K)
    # keypoint 16: all responses negative -> score < 0 and rtmlib's location bin -1, stored as given
    simcc_x[16], simcc_y[16] = -2.0, -2.0
    simcc_x[16, 7], simcc_y[16, 9] = -0.5, -0.3
    model = constant_model(tmp_path / "const.onnx", simcc_x, simcc_y)
    keypoints, scores = pose_extract.CropPoseEstimator(model)(dot_image(64, 128, 5, 5))
    expected_xy = np.stack([0.3125 * bx - 28, 0.3125 * by - 16], axis=1)
    expected_xy[16] = [0.3125 * -1 - 28, 0.3125 * -1 - 16]
    expected_scores = 0.6 + 0.02 * np.arange(K)
    expected_scores[16] = -0.4
    assert keypoints.dtype == np.float32 and keypoints.shape == (K, 2)
    np.testing.assert_allclose(keypoints, expected_xy, atol=1e-3)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-6)


@pytest.mark.parametrize("size,dot", [((64, 128), (10, 100)), ((64, 128), (50, 7)), ((100, 60), (80, 20))])
def test_rtmpose_maps_image_content_back_to_its_pixel(tmp_path, size, dot):
    model = brightest_point_model(tmp_path / "bright.onnx")
    keypoints, scores = pose_extract.CropPoseEstimator(model)(dot_image(*size, *dot))
    assert np.abs(keypoints - np.asarray(dot, np.float32)).max() <= 1.0
    assert (scores > 0).all()


def _dataset(root: Path) -> list[tuple[str, tuple[int, int]]]:
    dots = [("bounding_box_train/0002_c1s1_000451_03.png", (3, 120)),
            ("bounding_box_train/0002_c2s1_000452_01.png", (60, 2)),
            ("bounding_box_train/0007_c1s1_000100_01.png", (31, 64)), ("query/0002_c3s1_000001_01.png", (12, 40)),
            ("query/0009_c4s1_000002_01.png", (45, 90)), ("bounding_box_test/0000_c1s1_000003_01.png", (20, 20)),
            ("bounding_box_test/0009_c2s1_000004_01.png", (40, 111))]
    for rel, (x, y) in dots:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / rel), dot_image(64, 128, x, y))
    (root / "readme.txt").write_text("not an image")
    return sorted(dots)


def test_extract_poses_walks_all_images_and_writes_interchange_file(tmp_path):
    dots = _dataset(tmp_path / "market")
    model = brightest_point_model(tmp_path / "bright.onnx")
    table = extract_poses(tmp_path / "market", tmp_path / "out/poses.npz", model, progress=False)
    loaded = load_pose_file(tmp_path / "out/poses.npz")
    assert list(loaded.files) == [rel for rel, _ in dots] == list_images(tmp_path / "market")
    np.testing.assert_array_equal(loaded.keypoints, table.keypoints)
    for row, (_, xy) in enumerate(dots):
        assert np.abs(loaded.keypoints[row] - np.asarray(xy)).max() <= 1.0
    assert not partial_path(tmp_path / "out/poses.npz").exists()


def test_extract_poses_resumes_after_interrupt(tmp_path, monkeypatch):
    _dataset(tmp_path / "market")
    model = brightest_point_model(tmp_path / "bright.onnx")
    reference = extract_poses(tmp_path / "market", tmp_path / "ref.npz", model, progress=False)
    calls = []
    real_call = pose_extract.CropPoseEstimator.__call__

    def interrupt_after_3(self, image):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return real_call(self, image)

    monkeypatch.setattr(pose_extract.CropPoseEstimator, "__call__", interrupt_after_3)
    out = tmp_path / "poses.npz"
    with pytest.raises(KeyboardInterrupt):
        extract_poses(tmp_path / "market", out, model, save_every=2, progress=False)
    assert not out.exists()
    with np.load(partial_path(out)) as partial:
        assert len(partial["files"]) == 3  # the 3rd result came after the last periodic save

    calls.clear()
    monkeypatch.setattr(pose_extract.CropPoseEstimator, "__call__",
                        lambda self, image: (calls.append(1), real_call(self, image))[1])
    resumed = extract_poses(tmp_path / "market", out, model, save_every=2, progress=False)
    assert len(calls) == len(reference) - 3
    np.testing.assert_array_equal(resumed.files, reference.files)
    np.testing.assert_array_equal(resumed.keypoints, reference.keypoints)
    np.testing.assert_array_equal(resumed.scores, reference.scores)
    assert not partial_path(out).exists()


def test_missing_model_or_offline_download_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nope.onnx.*local"):
        resolve_pose_model(str(tmp_path / "nope.onnx"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = "http://127.0.0.1:9/rtmpose-tiny.zip"
    with pytest.raises(RuntimeError, match="rtmpose-tiny.zip.*local path"):
        resolve_pose_model(url)


def test_list_images_errors_name_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        list_images(tmp_path / "missing_dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        list_images(tmp_path / "empty")


# ------------------------------------------------------------------ pose vectors


def _table(keypoints, scores, files=None):
    keypoints = np.asarray(keypoints, np.float32)
    files = files or [f"bounding_box_train/{i:04d}_c1s1_000001_01.jpg" for i in range(len(keypoints))]
    return PoseTable(np.asarray(files), keypoints, np.asarray(scores, np.float32))


def test_pose_vector_by_hand():
    # 64×128 crop; usable keypoints (16,32), (48,96), (32,32) -> box coords 2x/64-1, 2y/128-1 =
    # (-.5,-.5), (.5,.5), (0,-.5); their centroid (0,-1/6) is subtracted; the rest (score .1) are 0.
    keypoints = np.full((1, K, 2), 7.0)
    keypoints[0, :3] = [[16, 32], [48, 96], [32, 32]]
    scores = np.full((1, K), 0.1)
    scores[0, :3] = 0.9
    vectors, valid = pose_vectors(_table(keypoints, scores), (128, 64), min_keypoints=3)
    expected = np.zeros(2 * K, np.float32)
    expected[:6] = [-0.5, -0.5 + 1 / 6, 0.5, 0.5 + 1 / 6, 0.0, -0.5 + 1 / 6]
    assert vectors.shape == (1, 34) and vectors.dtype == np.float32 and valid.tolist() == [True]
    np.testing.assert_allclose(vectors[0], expected, atol=1e-6)


def test_pose_vector_masking_and_validity():
    rng = np.random.default_rng(0)
    keypoints = rng.uniform(0, 60, (3, K, 2))
    scores = np.zeros((3, K))
    scores[0, :6] = 0.9  # exactly 6 usable keypoints: valid
    scores[1, :5] = 0.9  # 5: invalid
    scores[2, :6] = 0.9
    keypoints[2, 5] = [64 * 1.2, 10]  # far outside the 64-wide box: dropped -> 5 usable: invalid
    vectors, valid = pose_vectors(_table(keypoints, scores), (128, 64))
    assert valid.tolist() == [True, False, False]
    assert not vectors[1:].any()
    moved = keypoints.copy()
    moved[0, 6:] += 13.0  # low-score keypoints do not matter
    np.testing.assert_array_equal(pose_vectors(_table(moved, scores), (128, 64))[0], vectors)
    assert not vectors[0, 12:].any()
    shifted = keypoints.copy()
    shifted[0] += [5.0, -3.0]  # translation invariance (centroid subtracted)
    np.testing.assert_allclose(pose_vectors(_table(shifted, scores), (128, 64))[0][0], vectors[0], atol=1e-5)
    per_image = pose_vectors(_table(keypoints, scores), np.tile([[128, 64]], (3, 1)))[0]
    np.testing.assert_array_equal(per_image, vectors)


def test_match_poses_by_path_then_base_name_and_errors():
    table = _table(np.zeros((4, K, 2)), np.zeros((4, K)),
                   ["bounding_box_train/a.jpg", "query/b.jpg", "x/dup.jpg", "y/dup.jpg"])
    assert match_poses(table, ["query/b.jpg", "train/a.jpg", "y/dup.jpg"]).tolist() == [1, 0, 3]
    with pytest.raises(ValueError, match=r"poses\.npz.*2 of 3 images.*z/dup\.jpg"):
        match_poses(table, ["query/b.jpg", "z/dup.jpg", "c.jpg"], source="poses.npz")


def test_read_image_sizes(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((128, 64, 3), np.uint8))
    (tmp_path / "bad.jpg").write_bytes(b"junk")
    assert read_image_sizes([str(tmp_path / "a.png")]).tolist() == [[128, 64]]
    with pytest.raises(ValueError, match="bad.jpg"):
        read_image_sizes([str(tmp_path / "bad.jpg")])


def test_dev_pose_file_matches_the_tar_and_has_mostly_valid_poses():
    pose_file, tar = require_shared_data("market1501-train-dev.pose.npz", "market1501-train-dev.tar")
    table = load_pose_file(pose_file)
    with tarfile.open(tar) as archive:
        names = [m.name for m in archive.getmembers() if m.isfile() and m.name.endswith(".jpg")]
    assert len(names) == 8425
    vectors, valid = dataset_pose_vectors(table, names, (128, 64), source=str(pose_file))
    detected = table.scores.max(axis=1) > 0
    # README: a person was found in 78% of the images, ~45% look like a full body
    assert 0.45 <= valid.mean() <= detected.mean() <= 0.80
    assert np.isfinite(vectors).all() and (np.abs(vectors) <= 2.5).all()
    assert not vectors[~valid].any()


def test_save_load_round_trip_keeps_pose_vectors(tmp_path):
    rng = np.random.default_rng(1)
    table = _table(rng.uniform(0, 64, (5, K, 2)), rng.uniform(0, 1, (5, K)))
    save_pose_file(tmp_path / "p.npz", table)
    again = load_pose_file(tmp_path / "p.npz")
    np.testing.assert_array_equal(pose_vectors(again, (128, 64))[0], pose_vectors(table, (128, 64))[0])
