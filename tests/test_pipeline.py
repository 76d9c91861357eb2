"""The post-training pipeline: steps in the user's order, metrics after each, report files and plots."""

import json

import pytest
import torch

from common.cli import main
from common.config import ConfigError, load_config
from common.data.loading import load_dataset
from common.engine import atomic_save, evaluate_model
from common.models.reid import build_model


@pytest.fixture
def checkpoint(tiny_config, tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_config, num_classes=3)
    path = tmp_path / "ckpt.pt"
    atomic_save({"model": model.state_dict()}, path)
    return path


def test_evaluate_with_post_steps_in_given_order(tiny_run_config, checkpoint, tmp_path):
    out = tmp_path / "report"
    config = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower()}"
                      for k, v in tiny_run_config.items())
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--run-config", config,
                 "--post", "nfc,flip,rerank", "--output", str(out)]) == 0
    rows = json.loads((out / "evaluation.json").read_text())
    assert [r["step"] for r in rows] == ["baseline", "nfc", "nfc+flip", "nfc+flip+rerank"]
    for row in rows:
        assert 0 <= row["mAP"] <= 1 and 0 <= row["rank1"] <= row["rank5"] <= row["rank10"] <= 1
        assert row["ID2"] > 0
    assert len({r["mAP"] for r in rows}) > 1  # the steps change the ranking
    assert (out / "evaluation.md").read_text().startswith("| step | mAP")
    assert (out / "cmc.png").stat().st_size > 1000 and (out / "retrieval.png").stat().st_size > 1000


def test_baseline_row_equals_plain_evaluation(tiny_run_config, tiny_config, checkpoint, tmp_path):
    from common.pipeline import evaluate_checkpoint
    from common.report import load_checkpoint_model

    rows = evaluate_checkpoint(checkpoint, tiny_run_config, post="", output_dir=tmp_path / "r")
    model = load_checkpoint_model(checkpoint, tiny_config)
    plain = evaluate_model(model, load_dataset(tiny_config), tiny_config, torch.device("cpu"))
    assert [r["step"] for r in rows] == ["baseline"]
    for key, value in plain.items():
        assert rows[0][key] == pytest.approx(value, abs=1e-6)


def test_ipg_without_features_names_the_key(tiny_run_config, checkpoint, tmp_path):
    from common.pipeline import evaluate_checkpoint

    with pytest.raises(ConfigError, match="ipg-features"):
        evaluate_checkpoint(checkpoint, tiny_run_config, post="ipg", output_dir=tmp_path / "r")


def test_unknown_step_is_rejected(tiny_run_config, checkpoint, tmp_path):
    from common.pipeline import evaluate_checkpoint

    with pytest.raises(ConfigError, match="post"):
        evaluate_checkpoint(checkpoint, tiny_run_config, post="flip,sharpen", output_dir=tmp_path / "r")


def test_top_matches_skip_same_camera_same_id():
    import numpy as np

    from common.pipeline import SplitFeatures, top_matches
    q = SplitFeatures(torch.eye(2, 3), np.array([1, 2]), np.array([1, 1]), ["a", "b"])
    g = SplitFeatures(torch.eye(3), np.array([1, 1, 2]), np.array([1, 2, 2]), ["x", "y", "z"])
    ranked = top_matches(q, g, np.array([0, 1]), None, "cosine", 2)
    assert 0 not in ranked[0]  # gallery 0 has query 0's id and camera
    assert ranked[1][0] == 1  # identical feature (distance 0)


def test_federation_runs_the_pipeline_on_its_final_model(tiny_run_config):
    from pathlib import Path

    from camfed.inprocess import InProcessGrid
    from client.app import app as client_app
    from common.federated.server import run_federation

    config = load_config({**tiny_run_config, "num-server-rounds": 1, "post": "flip,nfc"})
    evaluations = run_federation(InProcessGrid(client_app, 3, config.to_run_config()), config)
    rows = json.loads((Path(config.output_dir) / "post" / "evaluation.json").read_text())
    assert [r["step"] for r in rows] == ["baseline", "flip", "flip+nfc"]
    assert rows[0]["mAP"] == pytest.approx(evaluations[-1]["mAP"], abs=1e-6)  # same final global model
