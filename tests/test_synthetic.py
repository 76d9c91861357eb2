"""Synthetic Market-layout generator: determinism, layout, identities per camera, poses, caching."""

from __future__ import annotations

import io
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.data import synthetic
from common.data.pose import load_pose_file
from common.data.readers import read_market1501
from common.data.synthetic import (
    SPLIT_FOLDERS,
    ensure_synthetic,
    generate_synthetic,
    plan,
    render_spec,
    sample_camera,
    sample_person,
    synthetic_dir_name,
    synthetic_matches,
    synthetic_params,
    visible_traits,
)

MARKET = re.compile(r"([-\d]+)_c(\d)")
TINY = dict(num_ids=8, num_cameras=3, seed=0, height=64, width=32, images_per_id_per_camera=(2, 3),
            num_distractors=3)


def _generate(root: Path, **overrides) -> Path:
    return generate_synthetic(root, progress=False, **{**TINY, **overrides})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return _generate(tmp_path_factory.mktemp("synth") / "tiny")


def _images(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


def _parse(relpath: str) -> tuple[int, int]:
    pid, cam = MARKET.search(Path(relpath).name).groups()
    return int(pid), int(cam)


# ----------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_files(tiny, tmp_path):
    again = _generate(tmp_path / "again")
    assert _images(again) == _images(tiny)
    a, b = load_pose_file(tiny / "poses.npz"), load_pose_file(again / "poses.npz")
    assert list(a.files) == list(b.files)
    assert np.array_equal(a.keypoints, b.keypoints) and np.array_equal(a.scores, b.scores)


def test_different_seed_differs(tiny, tmp_path):
    other = _generate(tmp_path / "other", seed=1)
    a, b = load_pose_file(tiny / "poses.npz"), load_pose_file(other / "poses.npz")
    assert list(a.files) != list(b.files)
    spec = plan(TINY["num_ids"], TINY["num_cameras"], 0, (2, 3), 1.0, 3)[0]
    (img0, kp0, _), (img1, kp1, _) = (render_spec(spec, seed, 3, 64, 32) for seed in (0, 1))
    assert not np.array_equal(np.asarray(img0), np.asarray(img1)) and not np.array_equal(kp0, kp1)


def test_image_does_not_depend_on_generation_order(tiny):
    """Rendering one planned image alone reproduces its stored bytes and keypoints."""
    specs = plan(TINY["num_ids"], TINY["num_cameras"], 0, (2, 3), 1.0, 3)
    poses = load_pose_file(tiny / "poses.npz")
    row = {f: i for i, f in enumerate(poses.files)}
    for spec in specs[::-1][:5]:
        image, keypoints, scores = render_spec(spec, 0, TINY["num_cameras"], TINY["height"], TINY["width"])
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=sample_camera(0, spec.cam, TINY["num_cameras"]).jpeg_quality)
        assert (tiny / spec.relpath).read_bytes() == buffer.getvalue()
        assert np.array_equal(poses.keypoints[row[spec.relpath]], keypoints)
        assert np.array_equal(poses.scores[row[spec.relpath]], scores)


# ----------------------------------------------------------------------------- layout


def test_layout_and_market_names(tiny):
    images = _images(tiny)
    assert {Path(k).parts[0] for k in images} == set(SPLIT_FOLDERS)
    names = [Path(k).name for k in images]
    assert len(set(names)) == len(names), "base names must be unique across folders"
    for relpath in images:
        assert re.fullmatch(r"\d{4}_c\d+s\d+_\d{6}_\d{2}\.jpg", Path(relpath).name), relpath
        pid, cam = _parse(relpath)
        assert 1 <= cam <= TINY["num_cameras"]
        assert pid > 0 or relpath.startswith("bounding_box_test/"), "distractors only in the gallery"
    with Image.open(tiny / next(iter(images))) as img:
        assert img.size == (TINY["width"], TINY["height"]) and img.mode == "RGB"
    meta = json.loads((tiny / "synthetic.json").read_text())
    dataset = read_market1501(tiny)
    assert meta["counts"] == {"bounding_box_train": len(dataset.train), "query": len(dataset.query),
                              "bounding_box_test": len(dataset.gallery)}


def test_identity_split_and_cross_camera_matches(tiny):
    by_folder: dict[str, dict[int, set[int]]] = {f: defaultdict(set) for f in SPLIT_FOLDERS}
    for relpath in _images(tiny):
        pid, cam = _parse(relpath)
        by_folder[Path(relpath).parts[0]][pid].add(cam)
    train, query, gallery = (by_folder[f] for f in SPLIT_FOLDERS)
    assert sorted(train) == list(range(1, TINY["num_ids"] // 2 + 1))
    assert sorted(query) == list(range(TINY["num_ids"] // 2 + 1, TINY["num_ids"] + 1))
    assert 0 in gallery and set(gallery) - {0} == set(query)
    assert all(len(cams) >= 2 for cams in train.values())
    for pid, cams in query.items():
        assert len(cams | gallery[pid]) >= 2
        for cam in cams:  # every query has a gallery match from another camera
            assert gallery[pid] - {cam}, (pid, cam)


def test_default_cameras_are_sensible_clients():
    """Default parameters: every camera's training set has many ids with several images each."""
    specs = [s for s in plan(48, 4, 0, (4, 8), 1.0, 12) if s.folder == "bounding_box_train"]
    counts: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for s in specs:
        counts[s.cam][s.pid] += 1
    assert sorted(counts) == [1, 2, 3, 4]
    for cam, per_id in counts.items():
        assert len(per_id) >= 8 and min(per_id.values()) >= 4, cam


def test_too_many_cameras_and_bad_settings_raise(tmp_path):
    with pytest.raises(ValueError, match="num_cameras"):
        _generate(tmp_path / "a", num_cameras=10)
    with pytest.raises(ValueError, match="num_cameras"):
        _generate(tmp_path / "b", num_cameras=1)
    with pytest.raises(ValueError, match="images_per_id_per_camera"):
        _generate(tmp_path / "c", images_per_id_per_camera=(1, 3))
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- poses


def test_pose_file_matches_images(tiny):
    poses = load_pose_file(tiny / "poses.npz")
    assert sorted(poses.files) == sorted(_images(tiny))
    visible = poses.scores > 0
    assert set(np.unique(poses.scores)) <= {0.0, 1.0}
    x, y = poses.keypoints[..., 0], poses.keypoints[..., 1]
    assert np.all((x[visible] >= 0) & (x[visible] <= TINY["width"] - 1))
    assert np.all((y[visible] >= 0) & (y[visible] <= TINY["height"] - 1))
    assert 0.6 < visible.mean() < 1.0  # some self-occlusion, mostly visible
    # upright people: head above hips above ankles
    head, hips, ankles = y[:, :5].mean(1), y[:, 11:13].mean(1), y[:, 15:17].mean(1)
    assert np.all(head < hips) and np.all(hips < ankles)
    assert np.all(ankles - head > 0.6 * TINY["height"])


def _descriptor(keypoints: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(N, 51): keypoints centred and scaled by the person's height, plus visibility."""
    centred = keypoints - keypoints.mean(1, keepdims=True)
    height = np.ptp(keypoints[..., 1], axis=1)[:, None, None]
    return np.concatenate([(centred / height).reshape(len(keypoints), -1), scores], 1)


def test_pose_band_is_narrow_within_a_camera():
    """The spread of a pose descriptor within a camera is well below its spread across cameras."""
    cams = 4
    specs = plan(16, cams, 3, (3, 3), 1.0, 0)
    rendered = [render_spec(s, 3, cams, 64, 32) for s in specs]
    desc = _descriptor(np.stack([r[1] for r in rendered]), np.stack([r[2] for r in rendered]))
    cam_of = np.array([s.cam for s in specs])
    total = desc.var(0).sum()
    within = np.mean([desc[cam_of == c].var(0).sum() for c in range(1, cams + 1)])
    assert within < 0.3 * total, (within, total)


def test_side_view_hides_far_limbs():
    """Camera 2 of 4 looks at the person's right side: left-side keypoints are mostly occluded."""
    specs = [s for s in plan(8, 4, 0, (3, 3), 1.0, 0) if s.cam == 2]
    scores = np.stack([render_spec(s, 0, 4, 128, 64)[2] for s in specs])
    left, right = scores[:, [5, 11]].mean(), scores[:, [6, 12]].mean()  # shoulders, hips
    assert right == 1.0 and left < 0.5


# ----------------------------------------------------------------------------- identities


def test_identities_are_distinct_but_lookalikes_exist():
    traits = [visible_traits(sample_person(0, pid)) for pid in range(1, 49)]
    assert len(set(traits)) == len(traits)
    close = sum(sum(x != y for x, y in zip(a, b)) <= 2 for a, b in zip(traits, traits[1:]))
    assert close >= 5


# ----------------------------------------------------------------------------- caching


def test_ensure_synthetic_reuses_and_regenerates(tmp_path, monkeypatch):
    root = ensure_synthetic(tmp_path, progress=False, **TINY)
    assert root.parent == tmp_path and root.name == synthetic_dir_name(**TINY)
    assert synthetic_matches(root, **TINY)
    assert not synthetic_matches(root, **{**TINY, "seed": 1})
    calls = []
    original = synthetic.generate_synthetic
    monkeypatch.setattr(synthetic, "generate_synthetic", lambda *a, **k: calls.append(1) or original(*a, **k))
    assert ensure_synthetic(tmp_path, progress=False, **TINY) == root and calls == []
    meta = root / "synthetic.json"
    meta.write_text(meta.read_text().replace('"version": ', '"version": -'))  # stale cache
    assert ensure_synthetic(tmp_path, progress=False, **TINY) == root and calls == [1]
    assert synthetic_matches(root, **TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == [root.name]


def test_dir_name_tracks_parameters():
    base = synthetic_dir_name(**TINY)
    assert synthetic_dir_name(**{**TINY, "seed": 5}) != base
    assert synthetic_dir_name(**{**TINY, "query_fraction": 0.5}) != base
    assert synthetic_dir_name(num_ids=48, num_cameras=4, seed=0) == "synthetic-48ids-4cams-seed0-128x64"


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return render_spec(*args, **kwargs)

    monkeypatch.setattr(synthetic, "render_spec", failing)
    with pytest.raises(KeyboardInterrupt):
        _generate(tmp_path / "broken")
    assert list(tmp_path.iterdir()) == []
    assert not synthetic_matches(tmp_path / "broken", **TINY)


def test_existing_folder_needs_overwrite(tiny, tmp_path):
    target = tmp_path / "ds"
    target.mkdir()
    with pytest.raises(FileExistsError, match="ds"):
        _generate(target)
    assert _generate(target, overwrite=True) == target
    assert _images(target) == _images(tiny)


def test_pose_band_widens_each_cameras_viewpoint_spread_only():
    narrow, wide = sample_camera(0, 2, 4), sample_camera(0, 2, 4, 8.0)
    assert wide.yaw_std == pytest.approx(8.0 * narrow.yaw_std)
    assert wide.phase_halfwidth == pytest.approx(min(np.pi, 8.0 * narrow.phase_halfwidth))
    assert (wide.yaw, wide.gain, wide.cast, wide.jpeg_quality) == (narrow.yaw, narrow.gain, narrow.cast,
                                                                   narrow.jpeg_quality)
    # the stored parameters tell the two datasets apart, so a cache never mixes them up
    assert synthetic_dir_name(**TINY) != synthetic_dir_name(**TINY, pose_band=8.0)
    with pytest.raises(ValueError, match="pose_band"):
        synthetic_params(**TINY, pose_band=0.0)
