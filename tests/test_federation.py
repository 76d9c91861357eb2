"""Federation pieces (fast) and in-process federated runs on the tiny synthetic dataset."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest
import tomllib
import torch
from flwr.app import Message

from camfed.inprocess import InProcessGrid
from client.app import app as client_app
from common.config import Config, ConfigError, load_config
from common.federated.aggregation import weighted_average
from common.federated.arrays import arrays_to_state, conformity_error, signature, state_to_arrays
from common.federated.client import node_settings, round_seed
from common.federated.data import camera_partition, load_node_dataset
from common.federated.history import idle_rounds
from common.federated.server import CHECKPOINT, run_federation
from common.federated.state import KEEP, PrivateStateStore, state_dir
from common.federated.strategy import CameraFedAvg
from common.methods import LocalJob, get_method
from common.methods.fedavg import FedAvg
from common.methods.fedprox import FedProx, proximal_term
from common.report import load_checkpoint_model

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- arrays and averaging


def _toy_states(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(3, 2, generator=g), "half": torch.randn(4, generator=g).half(),
             "bn.num_batches_tracked": torch.tensor(int(torch.randint(0, 100, (1,), generator=g)))}
            for _ in range(n)]


def test_weighted_average_matches_elementwise_reference():
    states, weights = _toy_states(3), [5, 1, 14]
    averaged = weighted_average(states, weights)
    for key in states[0]:
        flat = [s[key].double().flatten().tolist() for s in states]
        reference = [sum(w * f[i] for f, w in zip(flat, weights)) / sum(weights) for i in range(len(flat[0]))]
        assert averaged[key].dtype == states[0][key].dtype
        if key.endswith("num_batches_tracked"):
            assert averaged[key].item() == round(reference[0])
        else:
            tol = 1e-3 if key == "half" else 1e-6
            assert torch.allclose(averaged[key].double().flatten(), torch.tensor(reference, dtype=torch.float64),
                                  atol=tol)


def test_weighted_average_rejects_bad_weights():
    with pytest.raises(ValueError):
        weighted_average(_toy_states(2), [1.0])
    with pytest.raises(ValueError):
        weighted_average(_toy_states(2), [0, 0])


def test_array_record_round_trip_keeps_dtypes_and_values():
    state = _toy_states(1)[0]
    back = arrays_to_state(state_to_arrays(state))
    assert list(back) == list(state)
    for key in state:
        assert back[key].dtype == state[key].dtype and torch.equal(back[key], state[key])


def test_conformity_error_names_the_problem():
    state = _toy_states(1)[0]
    expected = signature(state)
    assert conformity_error(state, expected) == ""
    assert "unexpected ['classifier.weight']" in conformity_error({**state, "classifier.weight": torch.ones(1)},
                                                                  expected)
    assert "'w'" in conformity_error({**state, "w": torch.ones(2, 3)}, expected)
    assert "'w'" in conformity_error({**state, "w": state["w"].double()}, expected)


# --------------------------------------------------------------------------- private state


def test_private_store_loads_the_newest_earlier_round_of_the_same_run(tmp_path):
    store = PrivateStateStore(tmp_path / "camera-1")
    assert store.load("aa", before_round=1) == {}
    for server_round in (1, 2, 3):
        store.save({"classifier": {"weight": torch.full((2, 2), float(server_round))}}, "aa", server_round)
    assert store.load("aa", before_round=3)["classifier"]["weight"][0, 0] == 2  # a re-run round 3 starts from 2
    assert store.load("aa", before_round=9)["classifier"]["weight"][0, 0] == 3
    assert store.load("bb", before_round=9) == {}  # another run never sees this run's state
    names = sorted(p.name for p in (tmp_path / "camera-1").iterdir())
    assert names == [f"aa-round-{r:05d}.pt" for r in (2, 3)][-KEEP:]  # pruned, no temporary files left
    store.save({"x": 1}, "bb", 1)  # a new run drops the old run's files
    assert sorted(p.name for p in (tmp_path / "camera-1").iterdir()) == ["bb-round-00001.pt"]


def test_private_store_corrupt_file_is_named(tmp_path):
    store = PrivateStateStore(tmp_path)
    path = store.save({"x": 1}, "aa", 1)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match=path.name):
        store.load("aa", before_round=2)


def test_state_dir_default_and_override(tmp_path):
    assert state_dir(Config(output_dir=str(tmp_path)), 3) == tmp_path / "client-state" / "camera-3"
    assert state_dir(Config(state_dir=str(tmp_path / "s")), 3) == tmp_path / "s" / "camera-3"


# --------------------------------------------------------------------------- configuration


def test_pyproject_exposes_every_config_key_and_parses():
    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert set(app["config"]) == {f.name.replace("_", "-") for f in fields(Config)}
    config = load_config(app["config"])
    assert (config.dataset, config.data_dir) == ("synthetic", "")
    assert app["components"] == {"serverapp": "server.app:app", "clientapp": "client.app:app"}


@pytest.mark.parametrize("name", ["synthetic.toml", "market1501.toml", "msmt17.toml"])
def test_ready_run_configs_parse_and_use_known_keys(name):
    path = ROOT / "configs" / name
    keys = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    values = tomllib.loads(path.read_text())
    assert set(values) <= keys, f"{name}: keys flwr would reject: {set(values) - keys}"
    load_config(str(path))


def test_node_settings_and_overrides():
    assert node_settings({"partition-id": 1, "num-partitions": 3, "device": "cuda:1"}) == (1, 3, {"device": "cuda:1"})
    with pytest.raises(ConfigError, match="partition-id"):
        node_settings({"num-partitions": 3})


def test_camera_partition_checks_the_federation_size(tiny_config):
    dataset = load_node_dataset(tiny_config)
    assert camera_partition(dataset, 2, 3).camid == 3
    with pytest.raises(ConfigError, match="num-supernodes = 3"):
        camera_partition(dataset, 0, 4)
    with pytest.raises(ConfigError, match="partition-id"):
        camera_partition(dataset, 3, 3)


def test_round_seed_depends_only_on_seed_round_camera():
    assert round_seed(0, 1, 2) == round_seed(0, 1, 2)
    assert len({round_seed(0, 1, 2), round_seed(0, 2, 2), round_seed(0, 1, 3), round_seed(1, 1, 2)}) == 4


def test_method_registry():
    assert isinstance(get_method("fedavg"), FedAvg) and isinstance(get_method("fedprox"), FedProx)
    assert get_method("fedprox").name == "fedprox"
    with pytest.raises(ConfigError, match="nosuchmethod"):
        get_method("nosuchmethod")


# --------------------------------------------------------------------------- sampling


def _sampled_cameras(run_config: dict, config: Config, node_ids: list[int], rounds: int) -> list[list[int]]:
    """Partition-ids sampled per round when the node of partition i has id ``node_ids[i]``."""
    grid = InProcessGrid(client_app, len(node_ids), run_config)
    grid.contexts = dict(zip(node_ids, grid.contexts.values()))  # another deployment's node-id assignment
    strategy = CameraFedAvg(config, {"w": torch.zeros(1)})
    return [sorted(strategy.partitions[n] for n in strategy.sample(grid, r)) for r in range(1, rounds + 1)]


def test_sampling_is_keyed_on_camera_and_round_not_on_node_ids(tiny_run_config):
    config = Config(fraction_train=0.5, min_train_clients=1, min_available_clients=4, seed=3)
    picks = _sampled_cameras(tiny_run_config, config, [100 + 7 * i for i in range(6)], rounds=5)
    assert all(len(p) == 3 for p in picks)
    assert len({tuple(p) for p in picks}) > 1  # different rounds pick different cameras
    # node ids in the opposite order (another deployment, a restart): the same cameras in every round
    assert _sampled_cameras(tiny_run_config, config, [900 - 13 * i for i in range(6)], rounds=5) == picks
    strict = Config(fraction_train=0.1, min_train_clients=4, min_available_clients=2)
    assert len(_sampled_cameras(tiny_run_config, strict, [1, 2, 3, 4, 5, 6], rounds=1)[0]) == 4


# --------------------------------------------------------------------------- methods


def _job(config: Config, shared=None, private=None, seed: int = 5) -> LocalJob:
    partition = camera_partition(load_node_dataset(config), 0, 3)
    method = get_method(config.method)
    return LocalJob(config=config, partition=partition,
                    shared=shared if shared is not None else method.initial_shared_state(config),
                    private=private or {}, server_round=1, lr=config.lr, seed=seed, device=torch.device("cpu"))


def test_proximal_term_by_hand():
    model = torch.nn.Linear(3, 2)
    anchors = {name: p.detach() + 0.5 for name, p in model.named_parameters()}
    expected = 0.5 * 0.2 * sum(((p.detach() - anchors[n]) ** 2).sum() for n, p in model.named_parameters())
    assert torch.allclose(proximal_term(model, anchors, 0.2), expected)
    assert torch.isclose(expected, torch.tensor(0.5 * 0.2 * 0.25 * 8))


def test_fedavg_local_round_is_seeded_and_keeps_the_classifier_private(tiny_config):
    method = get_method("fedavg")
    first = method.local_round(_job(tiny_config))
    again = method.local_round(_job(tiny_config))
    assert conformity_error(first.shared, signature(method.initial_shared_state(tiny_config))) == ""
    assert all(torch.equal(first.shared[k], again.shared[k]) for k in first.shared)
    assert set(first.private) == {"classifier"}
    num_ids = camera_partition(load_node_dataset(tiny_config), 0, 3).num_ids
    assert first.private["classifier"]["weight"].shape == (num_ids, 512)
    assert first.num_examples == len(camera_partition(load_node_dataset(tiny_config), 0, 3).records)
    assert {"loss", "ce", "triplet", "accuracy"} <= set(first.metrics)
    # the stored classifier is used on the next round (a different one changes the result)
    resumed = method.local_round(_job(tiny_config, private=first.private))
    assert not torch.equal(resumed.shared["bottleneck.weight"], first.shared["bottleneck.weight"])


def test_fedprox_pulls_towards_the_global_weights(tiny_config):
    config = load_config({**tiny_config.to_run_config(), "method": "fedprox", "lr": 0.01, "prox-mu": 0.0})
    start = get_method("fedprox").initial_shared_state(config)
    free = get_method("fedprox").local_round(_job(config, shared=start))
    strong = load_config({**config.to_run_config(), "prox-mu": 100.0})
    held = get_method("fedprox").local_round(_job(strong, shared=start))

    def drift(state):
        return sum(((state[k] - start[k]) ** 2).sum() for k in start if start[k].is_floating_point())

    assert free.metrics["prox"] == 0.0 and held.metrics["prox"] > 0.0
    assert drift(held.shared) < drift(free.shared)


# --------------------------------------------------------------------------- in-process federated runs


def _capturing(client, replies: list):
    """A ClientApp wrapper recording every reply it sends."""

    def run(message: Message, context):
        reply = client(message, context)
        replies.append((int(context.node_config["partition-id"]), int(message.content["config"]["server-round"]),
                        reply))
        return reply

    return run


def test_federated_run_writes_metrics_plot_checkpoint_and_private_state(tiny_run_config, tiny_config):
    replies: list = []
    grid = InProcessGrid(_capturing(client_app, replies), 3, tiny_run_config)
    evaluations = run_federation(grid, tiny_config)
    out = Path(tiny_config.output_dir)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records == evaluations and [r["round"] for r in records] == [1, 2]
    for record in records:
        assert {"round", "mAP", "rank1", "rank5", "rank10", "mINP", "train_loss", "clients"} <= set(record)
        assert 0.0 <= record["mAP"] <= 1.0 and record["clients"] == 3
    assert (out / "metrics.png").stat().st_size > 1000
    checkpoint = torch.load(out / CHECKPOINT, weights_only=False)
    assert checkpoint["round"] == 2 and checkpoint["method"] == "fedavg"
    assert not any(k.startswith("classifier.") for k in checkpoint["model"])
    # the global model is exactly the sample-weighted average of the round-2 replies
    last = [(pid, reply) for pid, r, reply in replies if r == 2]
    weights = [reply.content["metrics"]["num-examples"] for _, reply in last]
    expected = weighted_average([arrays_to_state(reply.content["arrays"]) for _, reply in sorted(last)], weights)
    assert all(torch.equal(checkpoint["model"][k], expected[k]) for k in expected)
    assert checkpoint["model"]["bottleneck.num_batches_tracked"].dtype == torch.int64
    model = load_checkpoint_model(out / CHECKPOINT, tiny_config)  # `camfed evaluate --checkpoint` reads it
    assert torch.equal(model.state_dict()["bottleneck.weight"], expected["bottleneck.weight"])
    for camid in (1, 2, 3):
        assert PrivateStateStore(state_dir(tiny_config, camid)).load(checkpoint["run-tag"], 3)["classifier"]


def test_failing_and_vanishing_clients_do_not_end_the_run(tiny_run_config):
    def flaky(message: Message, context):
        pid, server_round = context.node_config["partition-id"], message.content["config"]["server-round"]
        if pid == 1:
            raise RuntimeError("camera 2 is broken")
        if pid == 2 and server_round == 2:
            return None  # vanished mid-round
        return client_app(message, context)

    config = load_config({**tiny_run_config, "min-train-clients": 1})
    run_federation(InProcessGrid(flaky, 3, tiny_run_config), config)
    rounds = [json.loads(line) for line in (Path(config.output_dir) / "rounds.jsonl").read_text().splitlines()]
    assert [(r["clients"], r["failed"], r["aggregated"]) for r in rounds] == [(2, 1, True), (1, 2, True)]
    assert json.loads((Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()[-1])["round"] == 2


def test_round_with_too_few_replies_keeps_the_global_weights_and_is_marked(tiny_run_config):
    def offline(message: Message, context):
        if context.node_config["partition-id"] != 2:
            return None  # camera offline: transient, the run goes on
        return client_app(message, context)

    config = load_config({**tiny_run_config, "min-train-clients": 2})
    initial = get_method("fedavg").initial_shared_state(config)
    run_federation(InProcessGrid(offline, 3, tiny_run_config), config)
    out = Path(config.output_dir)
    checkpoint = torch.load(out / CHECKPOINT, weights_only=False)
    assert checkpoint["round"] == 2 and all(torch.equal(checkpoint["model"][k], initial[k]) for k in initial)
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [(r["clients"], r["aggregated"]) for r in rounds] == [(1, False), (1, False)]
    assert [f["kind"] for f in rounds[0]["failures"]] == ["unavailable", "unavailable"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["aggregated"] for m in metrics] == [False, False]  # marked in metrics.jsonl ...
    assert idle_rounds(out) == [1, 2] and (out / "metrics.png").is_file()  # ... and in the plot


class _ServerCrash(Exception):
    pass


class _CrashingGrid(InProcessGrid):
    """Delivers round ``crash_round`` to the clients (they train and save state), then 'crashes' the server."""

    def __init__(self, *args, crash_round: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.crash_round = crash_round

    def push_messages(self, messages):
        messages = list(messages)
        ids = super().push_messages(messages)
        if messages and messages[0].content["config"]["server-round"] == self.crash_round:
            raise _ServerCrash()
        return ids


def test_resume_after_a_server_crash_equals_an_uninterrupted_run(tiny_run_config, tmp_path):
    plain = {**tiny_run_config, "output-dir": str(tmp_path / "plain")}
    run_federation(InProcessGrid(client_app, 3, plain), load_config(plain))

    crashed = {**tiny_run_config, "output-dir": str(tmp_path / "crashed")}
    with pytest.raises(_ServerCrash):
        run_federation(_CrashingGrid(client_app, 3, crashed, crash_round=2), load_config(crashed))
    assert torch.load(tmp_path / "crashed" / CHECKPOINT, weights_only=False)["round"] == 1
    resumed = {**crashed, "resume": True}
    run_federation(InProcessGrid(client_app, 3, resumed), load_config(resumed))

    a = torch.load(tmp_path / "plain" / CHECKPOINT, weights_only=False)
    b = torch.load(tmp_path / "crashed" / CHECKPOINT, weights_only=False)
    assert a["round"] == b["round"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert (tmp_path / "plain" / "metrics.jsonl").read_text() == (tmp_path / "crashed" / "metrics.jsonl").read_text()


def test_resume_without_checkpoint_or_with_another_method_is_an_error(tiny_run_config):
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        run_federation(InProcessGrid(client_app, 3, tiny_run_config), load_config({**tiny_run_config, "resume": True}))
    config = load_config({**tiny_run_config, "num-server-rounds": 1, "eval-every": 5})
    out = Path(config.output_dir)
    (out).mkdir(parents=True)
    trained_with = load_config({**tiny_run_config, "method": "fedprox"}).to_run_config()
    torch.save({"round": 1, "model": {}, "method": "fedprox", "run-tag": "ab", "config": trained_with},
               out / CHECKPOINT)
    with pytest.raises(ConfigError, match="fedprox"):
        run_federation(InProcessGrid(client_app, 3, tiny_run_config), load_config({**tiny_run_config, "resume": True}))


def test_node_dataset_cache_keys_on_every_data_setting(tiny_run_config):
    """Clients cache datasets per process: a setting missing from the key would silently reuse another dataset."""
    import dataclasses

    from common.data.loading import DATASET_FIELDS

    assert {f.name for f in dataclasses.fields(Config) if f.name.startswith("synth_")} <= set(DATASET_FIELDS)
    narrow = load_node_dataset(load_config(tiny_run_config))
    wide = load_node_dataset(load_config({**tiny_run_config, "synth-pose-band": 12.0}))
    assert narrow.root != wide.root
    assert json.loads((wide.root / "synthetic.json").read_text())["params"]["pose_band"] == 12.0
