"""Issue 14.5 measured with power: the benchmarks' fault injection (``fault-injection-scale``), the cameras'
pre-clip update norms in ``rounds.jsonl``, the DP accountant, and the reports of benchmarks/bench_robust.py and
benchmarks/bench_dp.py."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from camfed.inprocess import InProcessGrid
from client.app import app as client_app
from common.config import ConfigError, load_config
from common.experiment import mean_interval, parse_methods
from common.federated.arrays import arrays_to_state, state_to_arrays
from common.federated.client import inject_fault
from common.federated.privacy import gaussian_delta, gaussian_epsilon, private_reply, update_norm
from common.federated.server import run_federation
from common.federated.strategy import update_norm_stats, weighted_metrics
from common.methods import get_method

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rounds(config) -> list[dict]:
    return [json.loads(line) for line in (Path(config.output_dir) / "rounds.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------ fault injection


def test_inject_fault_scales_partition_0s_floats_only(tiny_config):
    shared = {"w": torch.tensor([1.0, -2.0]), "bn.num_batches_tracked": torch.tensor(7)}
    assert inject_fault(shared, tiny_config, 0, 1) is shared  # fault-injection-scale = 0: off
    config = load_config({**tiny_config.to_run_config(), "fault-injection-scale": 5.0})
    hit = inject_fault(shared, config, 0, 1)
    assert hit["w"].tolist() == [5.0, -10.0] and hit["bn.num_batches_tracked"].item() == 7
    assert inject_fault(shared, config, 1, 1) is shared  # every other partition replies as trained
    with pytest.raises(ConfigError, match="fault-injection-scale"):
        load_config({"fault-injection-scale": float("inf")})


def _train(run_config: dict, shared: dict, partition: int) -> Message:
    context = Context(run_id=1, node_id=1001 + partition, node_config={"partition-id": partition, "num-partitions": 3},
                      state=RecordDict(), run_config=run_config)
    message = Message(RecordDict({"arrays": state_to_arrays(shared),
                                  "config": ConfigRecord({"server-round": 1, "lr": 3.5e-4, "run-tag": "0123abcd"})}),
                      dst_node_id=1001 + partition, message_type=MessageType.TRAIN)
    return client_app(message, context)


def test_the_clientapp_of_partition_0_replies_its_trained_weights_scaled(tiny_run_config, tmp_path):
    """The same local round (same seed, fresh state) with and without the key: partition 0's reply × 5 exactly,
    its reported update norm that of the honest update."""
    InProcessGrid(client_app, 3, tiny_run_config)  # sets Flower's task identity for building messages
    shared = get_method("fedavg").initial_shared_state(load_config(tiny_run_config))
    honest = _train({**tiny_run_config, "state-dir": str(tmp_path / "a")}, shared, 0)
    hit = _train({**tiny_run_config, "state-dir": str(tmp_path / "b"), "fault-injection-scale": 5.0}, shared, 0)
    before, after = arrays_to_state(honest.content["arrays"]), arrays_to_state(hit.content["arrays"])
    for key, value in before.items():
        assert torch.equal(after[key], value * 5 if value.is_floating_point() else value), key
    assert hit.content["metrics"]["update-norm"] == honest.content["metrics"]["update-norm"]
    assert honest.content["metrics"]["update-norm"] == pytest.approx(update_norm(shared, before), rel=1e-9)


# ------------------------------------------------------------------------------------------ update norms


def test_update_report_and_round_statistics(tiny_config):
    received, trained = {"w": torch.zeros(4), "n": torch.tensor(0)}, {"w": torch.tensor([3.0, 4.0, 0, 0]),
                                                                       "n": torch.tensor(9)}
    assert update_norm(received, trained) == 5.0  # integer buffers do not count
    assert private_reply(received, trained, tiny_config)[1] == {"update-norm": 5.0}  # no DP: no clipped flag
    dp = load_config({**tiny_config.to_run_config(), "dp-clip-norm": 4.0})
    assert private_reply(received, trained, dp)[1] == {"update-norm": 5.0, "update-clipped": 1.0}
    assert private_reply(received, trained, load_config({**dp.to_run_config(), "dp-clip-norm": 6.0}))[1][
        "update-clipped"] == 0.0
    assert private_reply(received, trained, load_config({**dp.to_run_config(), "report-update-norm": False}))[1] == {}
    records = [MetricRecord({"update-norm": n, "update-clipped": c, "num-examples": 10, "loss": 1.0})
               for n, c in ((1.0, 0.0), (4.0, 1.0), (2.0, 0.0), (9.0, 1.0))]
    assert update_norm_stats(records) == {"update_norm_median": 3.0, "update_norm_max": 9.0, "clipped_fraction": 0.5}
    assert update_norm_stats([MetricRecord({"loss": 1.0})]) == {}
    assert set(weighted_metrics(records, [1, 1, 1, 1])) == {"loss"}  # norms are not image-weighted means


def test_rounds_jsonl_holds_the_cameras_pre_clip_norms_and_the_clipped_share(tiny_run_config):
    """Real ClientApps, 1 round, 3 cameras: without DP the recorded median / max are those of the replies'
    actual updates; with a clip norm below every update each camera is clipped; the key turns the report off."""
    updates: list[float] = []

    def recording(message: Message, context) -> Message:
        reply = client_app(message, context)
        received = arrays_to_state(message.content["arrays"])
        updates.append(update_norm(received, arrays_to_state(reply.content["arrays"])))
        return reply

    values = {**tiny_run_config, "num-server-rounds": 1}
    config = load_config(values)
    run_federation(InProcessGrid(recording, 3, values), config)
    [record] = _rounds(config)
    assert sorted(updates)[1] == pytest.approx(record["update_norm_median"], rel=1e-6)
    assert max(updates) == pytest.approx(record["update_norm_max"], rel=1e-6)
    assert "clipped_fraction" not in record and "update-norm" not in record

    clipped = load_config({**values, "output-dir": values["output-dir"] + "-dp", "dp-clip-norm": 1e-4})
    run_federation(InProcessGrid(client_app, 3, clipped.to_run_config()), clipped)
    [record] = _rounds(clipped)
    assert record["clipped_fraction"] == 1.0 and record["update_norm_median"] > 1e-4

    silent = load_config({**values, "output-dir": values["output-dir"] + "-off", "report-update-norm": False})
    run_federation(InProcessGrid(client_app, 3, silent.to_run_config()), silent)
    [record] = _rounds(silent)
    assert not {"update_norm_median", "update_norm_max", "clipped_fraction"} & set(record)


# ------------------------------------------------------------------------------------------- accountant


def test_gaussian_epsilon_by_hand_and_composition():
    # one release, noise std = sensitivity (μ = 1): δ(1) = Φ(−0.5) − e·Φ(−1.5) = 0.308538 − 2.718282 · 0.066807
    assert gaussian_delta(1.0, 1.0) == pytest.approx(0.308538 - 2.718282 * 0.066807, abs=2e-6)
    assert gaussian_epsilon(1.0, 1, gaussian_delta(1.0, 1.0)) == pytest.approx(1.0, abs=1e-6)
    # 4 releases at σ are one release at σ / 2; doubling the sensitivity is halving σ
    assert gaussian_epsilon(1.0, 4, 1e-5) == pytest.approx(gaussian_epsilon(0.5, 1, 1e-5), rel=1e-9)
    assert gaussian_epsilon(1.0, 10, 1e-5, sensitivity=2.0) == pytest.approx(gaussian_epsilon(0.5, 10, 1e-5), rel=1e-9)
    assert gaussian_epsilon(2.0, 10, 1e-5) < gaussian_epsilon(1.0, 10, 1e-5) < gaussian_epsilon(0.3, 10, 1e-5)
    assert gaussian_epsilon(1000.0, 1, 0.5) == 0.0 and gaussian_epsilon(0.0, 10, 1e-5) == math.inf
    with pytest.raises(ValueError, match="delta"):
        gaussian_epsilon(1.0, 10, 0.0)


# ------------------------------------------------------------------------------------ benchmark reports


def test_bench_robust_conditions_as_camfed_experiment_methods_and_contrasts():
    bench = _load("bench_robust")
    conditions = bench.conditions(5.0, 0.2)
    assert list(conditions) == ["fedavg", "honest-median", "honest-trimmed", "x5-mean", "x5-median", "x5-trimmed"]
    assert conditions["x5-trimmed"] == {"method": "fedavg", "aggregation": "trimmed-mean", "trim-fraction": 0.2,
                                        "fault-injection-scale": 5.0}
    # the --method text of a job parses back to the same overrides (common.experiment.parse_methods)
    text = [bench.method_argument(name, o).split("=", 1) for name, o in conditions.items()]
    assert parse_methods(",".join(conditions), {n: v.strip('"') for n, v in text}) == conditions
    for overrides in conditions.values():
        load_config(overrides)
    maps = {"fedavg": (0.10, 0.12), "x5-mean": (0.04, 0.05), "x5-median": (0.09, 0.10), "honest-median": (0.09, 0.11)}
    results = [{"method": m, "seed": s, "mAP": v} for m, pair in maps.items() for s, v in enumerate(pair)]
    found = {c["label"]: c for c in bench.contrasts(results, 5.0)}
    damage = found["damage of the ×5 camera under mean"]
    assert (damage["minuend"], damage["subtrahend"]) == ("x5-mean", "fedavg")
    assert damage["per_seed"] == pytest.approx({0: -0.06, 1: -0.07})
    assert damage["ci95"] == pytest.approx(mean_interval([-0.06, -0.07])["ci95"]) and damage["verdict"] == "worse"
    assert found["median instead of mean under the ×5 camera"]["mean"] == pytest.approx(0.05)
    assert found["damage of the ×5 camera under median"]["per_seed"] == pytest.approx({0: 0.0, 1: -0.01})
    assert not any("trimmed" in label for label in found)  # no trimmed runs: no trimmed contrasts
    assert "| damage of the ×5 camera under mean (x5-mean − fedavg) | -6.50 ± " in bench.contrasts_markdown(
        list(found.values()))


def test_bench_dp_clip_norm_from_a_run_and_report(tmp_path, tiny_config):
    bench = _load("bench_dp")
    assert [bench.significant(v) for v in (0.012345, 3456.0, 1.0, 0.0)] == [0.012, 3500.0, 1.0, 0.0]
    run = tmp_path / "runs" / "dp-1.0" / "seed-0"
    run.mkdir(parents=True)
    rounds = [{"round": r, "update_norm_median": m, "update_norm_max": 2 * m, "clipped_fraction": c}
              for r, (m, c) in enumerate(((1.234, 0.5), (0.5, 1.0), (2.0, 0.0)), 1)]
    (run / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    with pytest.raises(FileNotFoundError, match="result.json"):
        bench.clip_norm_from_run(run)  # not finished yet
    with pytest.raises(TimeoutError):
        bench.wait_for(run / "result.json", 0.01, poll=0.005)
    (run / "config.json").write_text(json.dumps({"dp-clip-norm": 1.2, "dp-noise-multiplier": 1.0}))
    stopped = bench.run_report(run, 1e-5)  # e.g. its features overflowed before the first evaluation
    assert (stopped["status"], stopped["mAP"], stopped["rounds"], stopped["method"]) == ("stopped", None, 3, "dp-1.0")
    assert "| dp-1.0 | 0 | stopped (3) |  | 1.2 | 1 |" in bench.report_markdown([stopped], 1e-5)
    (run / "result.json").write_text(json.dumps({"method": "dp-1.0", "seed": 0, "mAP": 0.05}))
    assert bench.clip_norm_from_run(run) == 1.2  # median of 1.234, 0.5, 2.0, to 2 significant digits
    entry = bench.run_report(run, 1e-5)
    assert entry["clipped_fraction"] == 0.5 and entry["update_norm_max"] == 4.0 and entry["rounds"] == 3
    assert entry["epsilon_add_remove"] == pytest.approx(gaussian_epsilon(1.0, 3, 1e-5))
    assert entry["epsilon_replace"] > entry["epsilon_add_remove"]
    assert entry["status"] == "finished"
    assert "| dp-1.0 | 0 | finished (3) | 5.00 | 1.2 | 1 | 1.23 / 4 | 0.50 |" in bench.report_markdown([entry], 1e-5)
