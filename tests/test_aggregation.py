"""Aggregation rules, 16-bit transport and client-side differential privacy (issue 14, items 4 and 5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from camfed.inprocess import InProcessGrid, wire_copy
from client.app import app as client_app
from common.config import ConfigError, load_config
from common.federated.aggregation import aggregate, trimmed_count, trimmed_mean
from common.federated.arrays import arrays_to_state, signature, state_to_arrays
from common.federated.privacy import private_reply
from common.federated.server import CHECKPOINT, FederationFailed, run_federation
from common.federated.strategy import CameraFedAvg
from common.methods import get_method


def _state(w: list[float], count: int) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(w, dtype=torch.float32), "bn.num_batches_tracked": torch.tensor(count)}


# ----------------------------------------------------------------------------------------- rules


def test_median_and_trimmed_mean_by_hand():
    states = [_state([1, 10], 1), _state([2, -5], 7), _state([9, 0], 2), _state([3, 4], 4), _state([100, 1], 3)]
    median = aggregate(states, [1] * 5, "median")
    assert median["w"].tolist() == [3, 1] and median["bn.num_batches_tracked"].item() == 3
    trimmed = aggregate(states, [1] * 5, "trimmed-mean", trim_fraction=0.2)  # drops 1 at each end
    assert torch.allclose(trimmed["w"], torch.tensor([(2 + 3 + 9) / 3, (0 + 1 + 4) / 3]))
    assert trimmed["bn.num_batches_tracked"].item() == 3 and trimmed["bn.num_batches_tracked"].dtype == torch.int64
    even = aggregate(states[:4], [1] * 4, "median")  # the mean of the two middle values
    assert even["w"].tolist() == [2.5, 2] and even["bn.num_batches_tracked"].item() == 3  # (2 + 4) / 2


def test_trimmed_count_and_bad_input():
    assert [trimmed_count(n, 0.25) for n in (3, 4, 6, 8, 9)] == [0, 1, 1, 2, 2]
    assert trimmed_count(4, 0.49) == 1  # at least one value is kept
    with pytest.raises(ValueError, match="cannot drop 2 of 4"):
        trimmed_mean([_state([1], 1)] * 4, 2)
    with pytest.raises(ValueError, match="unknown rule 'krum'"):
        aggregate([_state([1], 1)], [1], "krum")
    with pytest.raises(ConfigError, match="trim-fraction"):
        load_config({"trim-fraction": 0.5})


def test_mean_is_accumulated_in_float64():
    """2^24 + 1 + 1 is 2^24 in float32: a float32 accumulator gives 5592405.5, float64 the exact 5592406."""
    states = [{"w": torch.tensor([2.0 ** 24])}, {"w": torch.tensor([1.0])}, {"w": torch.tensor([1.0])}]
    averaged = aggregate(states, [1, 1, 1], "mean")
    assert averaged["w"].dtype == torch.float32 and averaged["w"].item() == 5592406.0


def test_a_scaled_camera_is_neutralised_by_median_and_trimmed_mean_not_by_mean():
    g = torch.Generator().manual_seed(0)
    honest = [{"w": 1.0 + 0.01 * torch.randn(1000, generator=g)} for _ in range(4)]
    attacker = {"w": -100.0 * honest[0]["w"]}  # a camera that scales (and flips) its weights
    for rule, ok in (("mean", False), ("median", True), ("trimmed-mean", True)):
        result = aggregate(honest + [attacker], [1] * 5, rule, trim_fraction=0.2)["w"]
        assert bool((result - 1.0).abs().max() < 0.05) == ok, rule


def _echo_with_attacker(scale: float):
    """Cameras 1 and 2 return the global weights + 0.001, camera 3 returns them × ``scale`` (claiming 1000 images),
    all in float32."""
    def client(message: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        state = arrays_to_state(message.content["arrays"], widen=True)  # float32, whatever the transport
        state = {k: (v * scale if pid == 2 else v + 0.001) if v.is_floating_point() else v for k, v in state.items()}
        metrics = MetricRecord({"num-examples": 1000 if pid == 2 else 10, "camera": pid + 1, "loss": 1.0})
        return Message(RecordDict({"arrays": state_to_arrays(state), "metrics": metrics}), reply_to=message)
    return client


def test_aggregation_median_in_a_federation_ignores_a_scaling_camera(tiny_run_config):
    """One round, 3 cameras, one sending its weights × 3 and claiming 100× the images: with aggregation = median
    the global weights move by the honest cameras' 0.001 (the weighted mean would move them by ≈ 2·|w|)."""
    values = {**tiny_run_config, "num-server-rounds": 1, "aggregation": "median"}
    config = load_config(values)
    initial = get_method("fedavg").initial_shared_state(config)
    run_federation(InProcessGrid(_echo_with_attacker(3.0), 3, values), config)
    final = torch.load(Path(config.output_dir) / CHECKPOINT, weights_only=False)["model"]
    change = max(float((final[k] - initial[k]).abs().max()) for k in initial if initial[k].is_floating_point())
    assert change == pytest.approx(0.001, rel=0.01)


# ------------------------------------------------------------------------------------- transport


def _tiny_shared(tiny_config) -> dict[str, torch.Tensor]:
    return get_method("fedavg").initial_shared_state(tiny_config)


# relative bound (half a unit in the last place) and absolute one (half the smallest subnormal) of rounding
@pytest.mark.parametrize("transport,relative,absolute", [("float16", 2.0 ** -11, 2.0 ** -25),
                                                         ("bfloat16", 2.0 ** -8, 2.0 ** -134)])
def test_16_bit_round_trip_error_bound_integer_buffers_exact_and_bytes_halved(tiny_config, transport, relative,
                                                                                absolute):
    shared = _tiny_shared(tiny_config)
    shared = {k: v + 1 if k.endswith("num_batches_tracked") else v for k, v in shared.items()}
    wide, narrow = state_to_arrays(shared), wire_copy(state_to_arrays(shared, transport))
    back = arrays_to_state(narrow, widen=True)
    assert signature(back) == signature(shared)  # widened to float32 on arrival, integer dtypes kept
    assert signature(arrays_to_state(narrow)) == signature(shared, transport)
    for key, value in shared.items():
        if value.is_floating_point():  # round to nearest
            assert bool(((back[key] - value).abs() <= relative * value.abs() + absolute).all()), key
        else:
            assert torch.equal(back[key], value), key
    assert 0.49 < narrow.count_bytes() / wide.count_bytes() < 0.51


def test_float16_overflow_names_the_key():
    with pytest.raises(ValueError, match="'big'.*float16.*bfloat16"):
        state_to_arrays({"big": torch.tensor([7e4])}, "float16")
    wide = arrays_to_state(state_to_arrays({"big": torch.tensor([7e4])}, "bfloat16"), widen=True)
    assert wide["big"].item() == pytest.approx(7e4, rel=2.0 ** -8)


def test_a_reply_in_the_wrong_dtype_is_rejected(tiny_run_config):
    """transport-dtype = float16, but every camera replies in float32: all replies are rejected, the run stops."""
    values = {**tiny_run_config, "num-server-rounds": 1, "transport-dtype": "float16"}
    with pytest.raises(FederationFailed, match="float32, expected .* torch.float16"):
        run_federation(InProcessGrid(_echo_with_attacker(1.0), 3, values), load_config(values))


def test_16_bit_federation_halves_the_bytes_and_stores_float32(tiny_run_config):
    """One round of the real ClientApp with float16 transport: bytes both ways ≈ half of the float32 record."""
    config = load_config({**tiny_run_config, "num-server-rounds": 1, "transport-dtype": "float16"})
    run_federation(InProcessGrid(client_app, 3, config.to_run_config()), config)
    out = Path(config.output_dir)
    [record] = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    full = state_to_arrays(_tiny_shared(config)).count_bytes()
    assert record["clients"] == 3 and 0.49 < record["bytes_down_per_client"] / full < 0.51
    assert 0.49 < record["bytes_up"] / (3 * full) < 0.51
    model = torch.load(out / CHECKPOINT, weights_only=False)["model"]
    assert {v.dtype for v in model.values() if v.is_floating_point()} == {torch.float32}


def test_frozen_stages_are_not_in_the_train_message(tiny_run_config):
    values = {**tiny_run_config, "backbone": "efficientnet_lite0", "pretrained": "imagenet"}
    full, frozen = load_config(values), load_config({**values, "freeze-stages": 6})
    sizes = {}
    for name, config in (("full", full), ("frozen", frozen)):
        shared = get_method("fedavg").initial_shared_state(config)
        [message] = CameraFedAvg(config, shared).train_messages(1, state_to_arrays(shared), ConfigRecord(), [1])
        keys, sizes[name] = set(message.content["arrays"].keys()), message.content["arrays"].count_bytes()
        assert any(k.startswith("backbone._blocks.0.") for k in keys) == (name == "full")
    assert sizes["frozen"] < 0.9 * sizes["full"]


# ------------------------------------------------------------------------------------------- privacy


def _dp_config(tiny_config, clip: float, sigma: float):
    return load_config({**tiny_config.to_run_config(), "dp-clip-norm": clip, "dp-noise-multiplier": sigma})


def test_clipping_bounds_the_update_norm_and_leaves_integers(tiny_config):
    received = {"w": torch.zeros(100), "bn.running_var": torch.ones(10), "bn.num_batches_tracked": torch.tensor(0)}
    trained = {"w": torch.full((100,), 0.3), "bn.running_var": torch.full((10,), 1.4),
               "bn.num_batches_tracked": torch.tensor(40)}
    assert private_reply(received, trained, tiny_config)[0] is trained  # dp-clip-norm = 0: off
    clipped = private_reply(received, trained, _dp_config(tiny_config, 0.5, 0.0))[0]
    update = torch.cat([clipped["w"] - received["w"], clipped["bn.running_var"] - received["bn.running_var"]])
    assert update.norm().item() == pytest.approx(0.5, rel=1e-5)  # ‖(3, 0.4·√10…)‖ = 3.03 > 0.5: scaled to 0.5
    assert torch.allclose(update[:100] / update[0], torch.ones(100))  # direction kept
    assert clipped["bn.num_batches_tracked"].item() == 40
    small = private_reply(received, {**trained, "w": torch.full((100,), 0.001), "bn.running_var": torch.ones(10)},
                          _dp_config(tiny_config, 0.5, 0.0))[0]
    assert torch.equal(small["w"], torch.full((100,), 0.001))  # within the bound: unchanged


def test_noise_has_the_configured_std_and_variances_stay_non_negative(tiny_config):
    received = {"w": torch.zeros(200_000), "bn.running_var": torch.full((1000,), 0.01)}
    config = _dp_config(tiny_config, 0.2, 0.5)  # std 0.1 per coordinate
    noised = private_reply(received, received, config, torch.Generator().manual_seed(0))[0]
    assert noised["w"].std().item() == pytest.approx(0.1, rel=0.01) and abs(noised["w"].mean().item()) < 1e-3
    assert noised["bn.running_var"].min().item() == 0.0  # 0.01 + N(0, 0.1²) is often < 0: clamped
    again = private_reply(received, received, config)[0]
    assert not torch.equal(again["w"], private_reply(received, received, config)[0]["w"])  # fresh noise every call
    with pytest.raises(ConfigError, match="dp-noise-multiplier"):
        load_config({"dp-noise-multiplier": 1.0})
