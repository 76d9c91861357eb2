"""Run folders (common/rundir.py): no run is lost or mixed, resume is exact and finishes what is missing, and
``camfed evaluate`` starts from the checkpoint's own config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import common.centralized as centralized
from camfed.inprocess import InProcessGrid
from client.app import app as client_app
from common.centralized import train_centralized
from common.config import ConfigError, load_config
from common.federated.server import run_federation
from common.pipeline import evaluate_checkpoint
from common.rundir import CHECKPOINT, check_run_folder

OLD_RUN = {"metrics.jsonl": '{"round": 1, "mAP": 0.5}\n', "rounds.jsonl": '{"round": 1}\n'}


def _old_run(folder: Path) -> dict[str, bytes]:
    """A folder holding an earlier run's files; returns their bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in OLD_RUN.items():
        (folder / name).write_text(text)
    torch.save({"round": 1, "model": {}, "config": {}}, folder / CHECKPOINT)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_federation_into_a_folder_holding_a_run_is_refused_and_the_run_kept(tiny_run_config, tiny_config):
    out = Path(tiny_config.output_dir)
    before = _old_run(out)
    with pytest.raises(ConfigError, match="already holds a run.*resume=true.*overwrite=true"):
        run_federation(InProcessGrid(client_app, 3, tiny_run_config), tiny_config)
    assert _files(out) == before


def test_centralized_into_a_folder_holding_a_run_is_refused_and_the_run_kept(tiny_config):
    out = Path(tiny_config.output_dir)
    before = _old_run(out)
    with pytest.raises(ConfigError, match="already holds a run"):
        train_centralized(tiny_config)
    assert _files(out) == before


def test_overwrite_replaces_the_old_run(tiny_run_config):
    config = load_config({**tiny_run_config, "overwrite": True, "num-server-rounds": 1})
    out = Path(config.output_dir)
    _old_run(out)
    (out / "post").mkdir()
    (out / "post" / "evaluation.json").write_text("[]")
    (out / "superlink.log").write_text("kept")
    run_federation(InProcessGrid(client_app, 3, tiny_run_config), config)
    assert [json.loads(line)["round"] for line in (out / "rounds.jsonl").read_text().splitlines()] == [1]
    assert "mAP" in json.loads((out / "metrics.jsonl").read_text())  # the new run's record only
    assert not (out / "post").exists() and (out / "superlink.log").read_text() == "kept"


def test_resume_with_another_config_names_the_keys_that_differ(tiny_run_config):
    out = Path(tiny_run_config["output-dir"])
    out.mkdir(parents=True)
    stored = load_config({**tiny_run_config, "lr": 0.01}).to_run_config()
    torch.save({"epoch": 1, "config": stored}, out / CHECKPOINT)
    changed = load_config({**tiny_run_config, "lr": 0.02, "backbone": "resnet50", "epochs": 9, "resume": True})
    with pytest.raises(ConfigError) as caught:
        train_centralized(changed)
    message = str(caught.value)
    assert "'lr' 0.01 → 0.02" in message and "'backbone'" in message and "'epochs'" not in message
    same_but_longer = load_config({**tiny_run_config, "lr": 0.01, "epochs": 9, "resume": True})
    assert check_run_folder(same_but_longer)["epoch"] == 1


def test_resume_and_overwrite_exclude_each_other():
    with pytest.raises(ConfigError, match="resume.*overwrite"):
        load_config("resume=true overwrite=true")


class _Crash(Exception):
    pass


def _crash_on_call(monkeypatch, module, name: str, call: int) -> None:
    """Make ``module.name`` raise ``_Crash`` on its ``call``-th call (1-based)."""
    original, calls = getattr(module, name), []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise _Crash()
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, crashing)


def test_centralized_resume_finishes_an_evaluation_that_crashed(tiny_run_config, monkeypatch, capsys):
    config = load_config({**tiny_run_config, "epochs": 1})
    with monkeypatch.context() as patch:
        _crash_on_call(patch, centralized, "evaluate_model", 1)
        with pytest.raises(_Crash):
            train_centralized(config)
    out = Path(config.output_dir)
    assert torch.load(out / CHECKPOINT, weights_only=False)["epoch"] == 1 and not (out / "metrics.jsonl").exists()
    records = train_centralized(load_config({**tiny_run_config, "epochs": 1, "resume": True}))
    assert [r["epoch"] for r in records] == [1] and records[0]["train_loss"] > 0
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    capsys.readouterr()
    assert train_centralized(load_config({**tiny_run_config, "epochs": 1, "resume": True})) == []
    assert "nothing to do" in capsys.readouterr().out


def test_centralized_resume_equals_an_uninterrupted_run(tiny_run_config, tmp_path, capsys):
    settings = {**tiny_run_config, "epochs": 2, "eval-every": 1}  # evaluation after epoch 1 draws random numbers
    plain = load_config({**settings, "output-dir": str(tmp_path / "plain")})
    train_centralized(plain)
    assert "epoch 1/2: loss" in capsys.readouterr().out  # one progress line per epoch, also without a terminal

    crashed = {**settings, "output-dir": str(tmp_path / "crashed")}
    with pytest.MonkeyPatch.context() as patch:
        _crash_on_call(patch, centralized, "train_epoch", 2)
        with pytest.raises(_Crash):
            train_centralized(load_config(crashed))
    train_centralized(load_config({**crashed, "resume": True}))

    a = torch.load(tmp_path / "plain" / CHECKPOINT, weights_only=False)
    b = torch.load(tmp_path / "crashed" / CHECKPOINT, weights_only=False)
    assert a["epoch"] == b["epoch"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert (tmp_path / "plain" / "metrics.jsonl").read_text() == (tmp_path / "crashed" / "metrics.jsonl").read_text()


@pytest.fixture
def trained_checkpoint(tiny_run_config) -> Path:
    """A checkpoint with its config stored, as train-centralized writes it (tiny model, one epoch)."""
    train_centralized(load_config(tiny_run_config))
    return Path(tiny_run_config["output-dir"]) / CHECKPOINT


def test_evaluate_starts_from_the_checkpoint_config(trained_checkpoint, tiny_run_config, tmp_path):
    rows = evaluate_checkpoint(trained_checkpoint, {}, post="", output_dir=tmp_path / "report")
    last = json.loads((trained_checkpoint.parent / "metrics.jsonl").read_text().splitlines()[-1])
    assert rows[0]["mAP"] == pytest.approx(last["mAP"], abs=1e-6)  # the tiny data at 32x16, as trained
    with pytest.raises(ConfigError, match="'height' 32 → 64"):
        evaluate_checkpoint(trained_checkpoint, {"height": 64}, post="", output_dir=tmp_path / "other")


def test_evaluate_refuses_a_report_folder_holding_a_report(trained_checkpoint, tmp_path):
    evaluate_checkpoint(trained_checkpoint, {}, post="", output_dir=tmp_path / "report")
    with pytest.raises(ConfigError, match="already holds a report"):
        evaluate_checkpoint(trained_checkpoint, {}, post="", output_dir=tmp_path / "report")
    evaluate_checkpoint(trained_checkpoint, {"overwrite": True}, post="", output_dir=tmp_path / "report")
