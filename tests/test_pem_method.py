"""The three-stage PEM method: every ablation switch runs, state stays where it belongs, a federation trains."""

import json
from pathlib import Path

import pytest
import torch

from common.config import ConfigError, load_config
from common.data.loading import load_dataset
from common.data.partition import partition_by_camera
from common.engine import resolve_device
from common.methods import get_method
from common.methods.base import LocalJob


def _job(config, shared, private=None):
    dataset = load_dataset(config)
    return LocalJob(config=config, partition=partition_by_camera(dataset.train)[0], shared=shared,
                    private=private or {}, server_round=1, lr=config.lr, seed=5,
                    device=resolve_device("cpu"), data_root=dataset.root)


@pytest.mark.parametrize("overrides", [
    {"pem-variant": "pkd"}, {"pem-variant": "scm"}, {"pem-variant": "pkd+scm"}, {"pem-variant": "full"},
    {"pem-variant": "full", "pem-mask": False}, {"pem-variant": "full", "pem-partner": "hard"},
])
def test_every_variant_trains_pem_and_keeps_the_expert_private(tiny_run_config, overrides):
    config = load_config({**tiny_run_config, "method": "pem", **overrides})
    method = get_method("pem")
    shared = method.initial_shared_state(config)
    assert any(k.startswith("pem.") for k in shared)
    result = method.local_round(_job(config, shared))
    assert set(result.shared) == set(shared)
    assert not torch.equal(result.shared["pem.squeeze.weight"], shared["pem.squeeze.weight"])  # stage 2 trained
    assert not torch.equal(result.shared["backbone.stem.0.weight"], shared["backbone.stem.0.weight"])  # stage 3
    assert set(result.private) == {"classifier", "expert"}
    variant = config.pem_variant
    assert (result.metrics["pem_pose"] > 0) == (variant in ("pkd", "pkd+scm", "full"))
    assert (result.metrics["pem_cycle"] > 0) == (variant in ("scm", "pkd+scm", "full"))


def test_expert_persists_across_rounds(tiny_run_config):
    config = load_config({**tiny_run_config, "method": "pem", "pem-variant": "pkd"})
    method = get_method("pem")
    shared = method.initial_shared_state(config)
    first = method.local_round(_job(config, shared))
    second = method.local_round(_job(config, first.shared, first.private))
    key = "backbone.stem.0.weight"
    # round 2 starts the expert from round 1's expert, not from the new global weights
    assert not torch.equal(first.private["expert"][key], first.shared[key])
    assert not torch.equal(second.private["expert"][key], first.private["expert"][key])


def test_baseline_variant_shares_no_pem_and_equals_fedavg(tiny_run_config):
    config = load_config({**tiny_run_config, "method": "pem", "pem-variant": "baseline"})
    pem, fedavg = get_method("pem"), get_method("fedavg")
    shared = pem.initial_shared_state(config)
    assert set(shared) == set(fedavg.initial_shared_state(config))
    a = pem.local_round(_job(config, shared))
    b = fedavg.local_round(_job(load_config({**tiny_run_config, "method": "fedavg"}), shared))
    for key in shared:
        assert torch.allclose(a.shared[key].float(), b.shared[key].float(), atol=1e-6)


def test_missing_pose_file_names_the_setting(tiny_run_config, tmp_path):
    config = load_config({**tiny_run_config, "method": "pem", "pose-file": str(tmp_path / "none.npz")})
    method = get_method("pem")
    with pytest.raises(ConfigError, match="pose-file"):
        method.local_round(_job(config, method.initial_shared_state(config)))


def test_two_round_pem_federation_on_synthetic_cameras(tiny_run_config):
    from client.app import app as client_app
    from common.federated.inprocess import InProcessGrid
    from common.federated.server import run_federation

    config = load_config({**tiny_run_config, "method": "pem", "num-server-rounds": 2})
    grid = InProcessGrid(client_app, 3, config.to_run_config())
    evaluations = run_federation(grid, config)
    assert [e["round"] for e in evaluations] == [1, 2]
    out = Path(tiny_run_config["output-dir"])
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(0.0 <= e["mAP"] <= 1.0 for e in lines)
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    assert any(k.startswith("pem.") for k in checkpoint["model"])


def test_pem_losses_weight_the_papers_loss_terms(tiny_run_config):
    """L_cyc is the paper's L1 summed over the map (not a mean), L_pose the masked PKD; each times its weight."""
    from common.losses import cycle_consistency_loss, pose_distillation_loss
    from common.methods.pem import pem_losses
    from common.models.pem import PoseExtractionModule, swap_partners

    config = load_config({**tiny_run_config, "method": "pem", "pem-pose-weight": 3.0, "pem-cycle-weight": 2.0})
    torch.manual_seed(0)
    pem = PoseExtractionModule(64, 16)
    features, z = torch.randn(8, 64, 2, 1).relu(), torch.rand(8, 34)
    labels, valid = torch.arange(4).repeat_interleave(2), torch.ones(8, dtype=torch.bool)
    terms = pem_losses(pem, features, labels, z, valid, config, torch.Generator().manual_seed(1))
    delta = swap_partners(labels, z, False, torch.Generator().manual_seed(1), valid)
    assert torch.allclose(terms["cycle"], 2.0 * cycle_consistency_loss(pem, features, delta))
    assert torch.allclose(terms["pose"], 3.0 * pose_distillation_loss(z, pem.decouple(features)[0], labels, valid))


def test_pem_epochs_reuse_the_frozen_maps_of_one_pass(tiny_run_config, monkeypatch):
    """Stage 2 runs the frozen networks once over the camera, however many PEM epochs it trains."""
    from common.methods import pem as pem_module

    config = load_config({**tiny_run_config, "method": "pem", "pem-variant": "full", "pem-epochs": 3})
    calls = []
    original = pem_module.frozen_maps
    monkeypatch.setattr(pem_module, "frozen_maps", lambda networks, job: calls.append(len(networks))
                        or original(networks, job))
    method = get_method("pem")
    result = method.local_round(_job(config, method.initial_shared_state(config)))
    assert calls == [2]  # expert + local-global model (CR), once
    assert 0.0 <= result.metrics["pem_attention_std"] <= 0.5
    maps = original([method.shared_model(config).eval()], _job(config, method.initial_shared_state(config)))
    assert maps[0].dtype == torch.float16 and maps[0].shape[0] == len(_job(config, {}).partition.records)
