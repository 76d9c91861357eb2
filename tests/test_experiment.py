"""`camfed experiment`: a resumable grid of runs with per-method intervals and paired differences."""

import json
import math
from pathlib import Path

import pytest

from common.config import ConfigError, load_config
from common.experiment import mean_interval, parse_methods, run_grid, summarize, t_quantile_975, verdict


def test_grid_writes_tables_and_plot_and_never_redoes_a_finished_run(tiny_run_config, tmp_path, monkeypatch, capsys):
    from common import experiment

    base = load_config({**tiny_run_config, "num-server-rounds": 1})
    out = tmp_path / "grid"
    content = run_grid(base, parse_methods("fedavg,fedprox"), [0, 1], out)
    assert sorted((r["method"], r["seed"]) for r in content["results"]) == [
        ("fedavg", 0), ("fedavg", 1), ("fedprox", 0), ("fedprox", 1)]
    for name in ("experiment.md", "experiment.json", "experiment.png"):
        assert (out / name).stat().st_size > 0
    table = (out / "experiment.md").read_text()
    assert "| fedprox | 2 |" in table and "Paired difference to fedavg" in table
    stored = json.loads((out / "experiment.json").read_text())
    paired = stored["summary"]["fedprox"]["paired"]["mAP"]
    runs = {(r["method"], r["seed"]): r["mAP"] for r in stored["results"]}
    assert paired["per_seed"] == {str(s): runs[("fedprox", s)] - runs[("fedavg", s)] for s in (0, 1)}

    calls = []
    monkeypatch.setattr(experiment, "run_one", lambda config, centralized: calls.append(config) or [])
    run_grid(base, parse_methods("fedavg,fedprox"), [0, 1], out)
    assert calls == []  # every run finished before: nothing is trained again
    assert capsys.readouterr().out.count("finished before, kept") == 4


def test_grid_refuses_to_mix_settings(tiny_run_config, tmp_path):
    base = load_config({**tiny_run_config, "num-server-rounds": 1})
    out = tmp_path / "grid"
    run_grid(base, parse_methods("fedavg"), [0], out)
    other = load_config({**tiny_run_config, "num-server-rounds": 1, "lr": 0.01})
    with pytest.raises(ConfigError, match="'lr'"):
        run_grid(other, parse_methods("fedavg"), [1], out)


def test_a_centralized_name_trains_centralized_with_its_overrides(tiny_run_config, tmp_path, monkeypatch):
    from common import experiment

    calls = []

    def fake_run(config, centralized):
        calls.append((config.method, centralized, config.epochs))
        Path(config.output_dir).mkdir(parents=True)
        return [{"round": 1, "mAP": 0.1, "rank1": 0.2, "mINP": 0.05}]

    monkeypatch.setattr(experiment, "run_one", fake_run)
    base = load_config({**tiny_run_config, "num-server-rounds": 3, "local-epochs": 2})
    methods = parse_methods("centralized,centralized-calr,calr-fed",
                            {"centralized-calr": "method='calr'", "calr-fed": "method='calr'"})
    run_grid(base, methods, [0], tmp_path / "grid")
    assert calls == [("fedavg", True, 6), ("calr", True, 6), ("calr", False, base.epochs)]


def test_methods_carry_overrides_and_unknown_names_are_refused():
    methods = parse_methods("pem-pkd,mine", {"mine": "method='pem' pem-lr=0.002"})
    assert methods == {"pem-pkd": {"method": "pem", "pem-variant": "pkd"},
                       "mine": {"method": "pem", "pem-lr": 0.002}}
    with pytest.raises(ConfigError, match="unknown method"):
        parse_methods("fedavg,pem-typo")


def test_intervals_and_paired_differences_by_hand():
    assert t_quantile_975(4) == pytest.approx(2.776, abs=1e-3)
    stat = mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert stat["mean"] == 3.0 and stat["std"] == pytest.approx(math.sqrt(2.5))
    assert stat["ci95"] == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5), rel=1e-3)
    results = [{"method": m, "seed": s, "mAP": v, "rank1": v, "mINP": v}
               for m, values in (("fedavg", [0.10, 0.20, 0.30]), ("pem", [0.12, 0.23, 0.31]))
               for s, v in enumerate(values)]
    paired = summarize(results)["pem"]["paired"]["mAP"]
    assert paired["mean"] == pytest.approx(0.02)  # differences 0.02, 0.03, 0.01
    assert paired["ci95"] == pytest.approx(4.303 * 0.01 / math.sqrt(3), rel=1e-3)
    assert verdict(paired) == "within noise"  # 0.02 ± 0.0248 contains 0
    assert verdict({"n": 3, "mean": 0.02, "ci95": 0.0025}) == "better"
    assert verdict({"n": 3, "mean": -0.02, "ci95": 0.0025}) == "worse"
    assert verdict({"n": 1, "mean": 0.02, "ci95": math.nan}) == "too few seeds"


def test_protocol_metrics_are_kept_reported_and_filled_in_for_older_results(tiny_run_config, tmp_path, monkeypatch):
    from common import experiment
    from common.rundir import METRICS_FILE

    def record(mAP, cc_mAP):
        return {"round": 1, "mAP": mAP, "rank1": mAP, "mINP": mAP, "standard_mAP": mAP, "standard_rank1": mAP,
                "cloth_changing_mAP": cc_mAP, "cloth_changing_rank1": cc_mAP}

    values = {("fedavg", 0): (0.30, 0.10), ("fedavg", 1): (0.32, 0.12), ("fire2", 0): (0.31, 0.15),
              ("fire2", 1): (0.33, 0.16)}

    def fake_run(config, centralized):
        folder = Path(config.output_dir)
        folder.mkdir(parents=True)
        evaluation = record(*values[(config.method, config.seed)])
        (folder / METRICS_FILE).write_text(json.dumps(evaluation) + "\n")
        return [evaluation]

    monkeypatch.setattr(experiment, "run_one", fake_run)
    base = load_config({**tiny_run_config, "num-server-rounds": 1})
    out = tmp_path / "grid"
    content = run_grid(base, parse_methods("fedavg,fire2"), [0, 1], out)
    assert content["results"][0]["cloth_changing_mAP"] == pytest.approx(0.10)
    paired = content["summary"]["fire2"]["paired"]["cloth_changing_mAP"]
    assert paired["mean"] == pytest.approx(0.045) and paired["per_seed"] == pytest.approx({"0": 0.05, "1": 0.04})
    table = (out / "experiment.md").read_text()
    assert "| method | standard mAP | standard rank-1 | Δ standard mAP | verdict | cloth-changing mAP |" in table
    # Δ cloth-changing mAP +5, +4 points: 4.50 ± 12.706 · 0.707 / √2 = 4.50 ± 6.35, an interval containing 0
    assert ("| fire2 | 32.00 ± 12.71 | 32.00 ± 12.71 | 1.00 ± 0.00 | better | 15.50 ± 6.35 | 15.50 ± 6.35 | "
            "4.50 ± 6.35 | within noise |") in table

    # a result written before protocol metrics were kept: filled in from the run's metrics.jsonl, never retrained
    older = out / "runs" / "fire2" / "seed-0" / "result.json"
    stripped = {k: v for k, v in json.loads(older.read_text()).items() if not k.startswith(("standard", "cloth"))}
    older.write_text(json.dumps(stripped))
    monkeypatch.setattr(experiment, "run_one", lambda config, centralized: pytest.fail("retrained"))
    run_grid(base, parse_methods("fedavg,fire2"), [0, 1], out)
    assert json.loads(older.read_text())["cloth_changing_mAP"] == pytest.approx(0.15)
