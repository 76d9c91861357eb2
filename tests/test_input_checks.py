"""Bad input fails early with one line naming the key or file; progress is readable without a terminal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common.centralized as centralized
import common.pipeline as pipeline
from common.cli import main
from common.config import ConfigError, load_config
from common.data.loading import check_dataset, load_dataset
from common.data.pose import PoseTable, dataset_pose_vectors, load_pose_file, save_pose_file
from common.data.readers import parse_market_name, read_market1501, read_market_folder
from common.deploy import split_by_camera
from common.engine import atomic_save, lr_schedule_lines
from common.federated.launch import app_config
from common.models.reid import build_model
from common.postprocess import nfc
from common.progress import StepProgress
from common.report import load_checkpoint_model
from common.rundir import CHECKPOINT, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _pairs(mapping: dict) -> str:
    """A run-config mapping as ``key=value`` pairs for ``--run-config``."""
    return " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower()}" for k, v in mapping.items())


# --------------------------------------------------------------------------- pose files (item 7)


def _pose_table(names: list[str], size: tuple[int, int], scale: float = 1.0, score: float = 0.9) -> PoseTable:
    """Standing-person keypoints for images of ``size`` (height, width), coordinates × ``scale``."""
    rng = np.random.default_rng(0)
    height, width = size
    base = np.stack([np.linspace(0.3, 0.7, 17) * width, np.linspace(0.1, 0.9, 17) * height], axis=1)
    keypoints = (base[None] + rng.normal(0, 1, (len(names), 17, 2))) * scale
    return PoseTable(np.asarray(names), keypoints.astype(np.float32), np.full((len(names), 17), score, np.float32))


def test_pose_share_is_reported_and_too_few_usable_poses_are_an_error(capsys):
    names = [f"{i:04d}_c1s1_000001_00.jpg" for i in range(20)]
    dataset_pose_vectors(_pose_table(names, (128, 64)), names, (128, 64), source="good.npz", min_usable_share=0.5)
    assert "good.npz: 20 of 20 images (100%) have a usable pose" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"zero.npz: 0 of 20 images \(0%\).*no keypoint.*pem-min-usable-poses"):
        dataset_pose_vectors(_pose_table(names, (128, 64), score=0.0), names, (128, 64), source="zero.npz",
                             min_usable_share=0.5)
    dataset_pose_vectors(_pose_table(names, (128, 64), scale=2.0), names, (128, 64), source="twice.npz",
                         min_usable_share=0.5)  # most rows keep 6 usable keypoints: accepted, but said
    assert "outside their image (a pose file made for another image size?)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="big.npz: 0 of 20 images.*of the confident keypoints lie outside"):
        dataset_pose_vectors(_pose_table(names, (128, 64), scale=4.0), names, (128, 64), source="big.npz",
                             min_usable_share=0.5)


def test_pem_checks_the_usable_share_of_each_camera(tiny_config, tmp_path):
    from common.methods.pem import record_pose_vectors

    dataset = load_dataset(tiny_config)
    records = [r for r in dataset.train if r.camid == 1]
    names = [dataset.relative(r) for r in records]
    path = tmp_path / "poses.npz"
    save_pose_file(path, _pose_table(names, (128, 64), score=0.0))
    with pytest.raises(ValueError, match=r"poses.npz \(camera 1\): 0 of"):
        record_pose_vectors(tiny_config, path, records, dataset.root)


def test_a_text_file_as_pose_file_is_named(tmp_path):
    path = tmp_path / "poses.npz"
    path.write_text("not an archive")
    with pytest.raises(ValueError, match="poses.npz is not an .npz"):
        load_pose_file(path)


# --------------------------------------------------------------------------- Market names (item 8)


def test_market_names_are_anchored_and_cameras_may_have_two_digits(tmp_path):
    assert parse_market_name("0002_c12s1_000451_03.jpg") == (2, 12)
    assert parse_market_name("-1_c3s2_000001_00.jpg") == (-1, 3)
    with pytest.raises(ValueError, match="IMG_2023_c1.jpg"):
        parse_market_name("IMG_2023_c1.jpg")
    (tmp_path / "query").mkdir()
    (tmp_path / "query" / "IMG_2023_c1.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="query.*IMG_2023_c1.jpg"):
        read_market_folder(tmp_path / "query", keep_distractors=False)


# --------------------------------------------------------------------------- NFC input (item 9)


def test_nfc_normalises_its_input():
    raw = torch.randn(30, 8, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 10, 30)[:, None]
    assert torch.allclose(nfc(raw, 2, 2), nfc(F.normalize(raw, dim=1), 2, 2), atol=1e-6)


# --------------------------------------------------------------------------- checked before the work (item 10)


def test_post_ipg_without_features_is_refused_when_the_config_is_read():
    with pytest.raises(ConfigError, match="ipg-features"):
        load_config("post='flip,ipg'")


@pytest.fixture
def checkpoint(tiny_config, tmp_path) -> Path:
    path = tmp_path / "ckpt.pt"
    atomic_save({"model": build_model(tiny_config).state_dict(), "config": tiny_config.to_run_config()}, path)
    return path


@pytest.fixture
def no_extraction(monkeypatch):
    """Feature extraction that fails the test: the error must come before it."""
    monkeypatch.setattr(pipeline, "extract_split", lambda *a, **k: pytest.fail("features were extracted"))


def test_evaluate_checks_post_inputs_and_the_report_folder_before_extracting(checkpoint, tmp_path, no_extraction):
    with pytest.raises(ConfigError, match="ipg-features.*missing.npz"):
        pipeline.evaluate_checkpoint(checkpoint, {"ipg-features": str(tmp_path / "missing.npz")}, post="ipg",
                                     output_dir=tmp_path / "r")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        pipeline.evaluate_checkpoint(checkpoint, {}, post="", output_dir=tmp_path / "file" / "report")


@pytest.mark.parametrize("text, key", [("nfc-k1=0", "nfc-k1"), ("device='gpu'", "device"),
                                       ("last-stride=0", "last-stride"), ("lr=-1", "lr"), ("pad=-5", "pad"),
                                       ("num-instances=1", "num-instances")])
def test_bad_values_name_the_key(text, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(text)


def test_unquoted_string_gets_a_quoting_hint():
    with pytest.raises(ConfigError, match="'epochs'.*quote strings: epochs='abc'"):
        load_config("epochs=abc")


def _market_copy(source: Path, target: Path, query_from: str) -> Path:
    """A Market folder with ``source``'s train and gallery and its ``query_from`` folder as query."""
    for name, origin in (("bounding_box_train", "bounding_box_train"), ("bounding_box_test", "bounding_box_test"),
                         ("query", query_from)):
        shutil.copytree(source / origin, target / name)
    return target


def test_a_query_set_without_a_true_match_fails_before_training(tiny_config, tiny_run_config, tmp_path):
    data = _market_copy(load_dataset(tiny_config).root, tmp_path / "data", query_from="bounding_box_train")
    config = load_config({**tiny_run_config, "dataset": "market1501", "data-dir": str(data)})
    with pytest.raises(ValueError, match="no query has a true match"):
        centralized.train_centralized(config)
    assert not (Path(config.output_dir) / CHECKPOINT).exists()


def test_an_empty_training_folder_is_named(tiny_config, tmp_path):
    data = _market_copy(load_dataset(tiny_config).root, tmp_path / "data", query_from="query")
    shutil.rmtree(data / "bounding_box_train")
    (data / "bounding_box_train").mkdir()
    with pytest.raises(ValueError, match="no training images"):
        check_dataset(read_market1501(data))


# --------------------------------------------------------------------------- one line, no traceback (items 11, 12)


def test_output_dir_under_a_file_is_one_line(tiny_run_config, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    settings = {**tiny_run_config, "output-dir": str(tmp_path / "file" / "out")}
    assert main(["train-centralized", "--run-config", _pairs(settings)]) == 2
    error = capsys.readouterr().err
    assert "'output-dir'" in error and "is a file" in error and len(error.strip().splitlines()) == 1


def test_ctrl_c_says_where_the_checkpoint_is(tiny_run_config, monkeypatch, capsys):
    out = Path(tiny_run_config["output-dir"])
    out.mkdir(parents=True)
    (out / CHECKPOINT).write_bytes(b"")

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(centralized, "train_centralized", interrupted)
    assert main(["train-centralized", "--run-config", _pairs(tiny_run_config)]) == 130
    error = capsys.readouterr().err
    assert f"interrupted; checkpoint at {out / CHECKPOINT}" in error and "resume=true" in error


def test_federate_resume_without_checkpoint_is_one_line_before_flower_starts(tmp_path, capsys):
    run_config = f"resume=true output-dir='{tmp_path / 'out'}'"
    assert main(["federate", "--app", str(ROOT), "--run-config", run_config]) == 2
    error = capsys.readouterr().err
    assert "no checkpoint" in error and len(error.strip().splitlines()) == 1


def test_federate_outside_the_repository_says_to_pass_app(tmp_path):
    with pytest.raises(ConfigError, match="--app"):
        app_config(tmp_path)


def test_a_failed_federation_does_not_point_at_metrics(tmp_path, monkeypatch, capsys):
    from contextlib import nullcontext

    import common.federated.launch as launch

    monkeypatch.setattr(launch, "local_superlink", lambda *a, **k: nullcontext())
    monkeypatch.setattr(launch, "flwr_run", lambda *a, **k: (7, ""))
    monkeypatch.setattr(launch, "run_status", lambda *a: "finished:failed")
    assert launch.federate(f"output-dir='{tmp_path / 'out'}'", ROOT, num_supernodes=2) == 1
    output = capsys.readouterr().out
    assert "run 7 finished:failed" in output and "metrics in" not in output


def test_checkpoint_of_another_backbone_is_one_error(checkpoint, tiny_config):
    other = load_config({**tiny_config.to_run_config(), "backbone": "efficientnet_lite0", "pretrained": "none"})
    with pytest.raises(ConfigError, match="does not fit the configured model.*'backbone'") as caught:
        load_checkpoint_model(checkpoint, other)
    assert len(str(caught.value).splitlines()) == 1


def test_garbage_checkpoint_is_named(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"\x00 not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt is not a readable checkpoint"):
        read_checkpoint(path)


def test_invalid_onnx_pose_model_is_named(tmp_path):
    pytest.importorskip("rtmlib")
    from common.pose_extract import CropPoseEstimator

    path = tmp_path / "model.onnx"
    path.write_text("not onnx")
    with pytest.raises(RuntimeError, match="model.onnx cannot be loaded as an ONNX model"):
        CropPoseEstimator(str(path))


# --------------------------------------------------------------------------- split-by-camera (item 13)


def test_split_by_camera_refuses_the_dataset_itself_and_leaves_nothing_on_failure(tiny_config, tmp_path):
    root = load_dataset(tiny_config).root
    before = sorted(p.name for p in root.iterdir())
    for out in (root, root / "split"):
        with pytest.raises(ValueError, match="inside the dataset"):
            split_by_camera(root, out, dataset="synthetic")
    assert sorted(p.name for p in root.iterdir()) == before
    bad = tmp_path / "bad.npz"
    bad.write_text("not an archive")
    with pytest.raises(ValueError, match="bad.npz"):
        split_by_camera(root, tmp_path / "split", dataset="synthetic", pose_file=bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz"]  # no partial folders block a retry
    assert "camera-1" in split_by_camera(root, tmp_path / "split", dataset="synthetic")


# --------------------------------------------------------------------------- progress and schedule (items 6, 14)


def test_progress_line_has_values_elapsed_and_eta():
    line = StepProgress("round", 4).line(2, {"loss": 1.23456, "clients": 3, "skipped": None})
    assert line.startswith("round 2/4: loss 1.235, clients 3, elapsed 0:00:00, ETA 0:00:00")


def test_warm_up_not_shorter_than_the_run_is_warned():
    config = load_config("epochs=7 warmup-epochs=10 lr-steps='3'")
    lines = lr_schedule_lines(config, config.epochs, "epoch")
    assert "x0.1 from epoch 4" in lines[0] and "warm-up" in lines[0]
    assert "'warmup-epochs' (10) is not shorter than the run (7 epochs)" in lines[1]
    assert len(lr_schedule_lines(load_config("epochs=20 warmup-epochs=10"), 20, "epoch")) == 1


def test_metrics_plot_has_integer_round_ticks(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from common.federated.history import plot_metrics

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"round": r, "mAP": 0.1 * r, "rank1": 0.2}) + "\n" for r in (1, 2, 3)))
    ticks, savefig = [], Figure.savefig

    def recording_savefig(self, *args, **kwargs):
        ticks.extend(self.axes[0].get_xticks())
        return savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording_savefig)
    plot_metrics(metrics, tmp_path / "metrics.png")
    assert ticks and all(float(t).is_integer() for t in ticks)
