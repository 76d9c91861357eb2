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
    assert set(result.private) == {"classifier", "expert", "expert-optimizer"}
    variant = config.pem_variant
    assert (result.metrics["pem_pose"] > 0) == (variant in ("pkd", "pkd+scm", "full"))
    assert (result.metrics["pem_cycle"] > 0) == (variant in ("scm", "pkd+scm", "full"))
    # the gradient ratio is measured whenever both terms act, and every stage reports its time
    assert (result.metrics["pem_grad_ratio"] > 0) == (variant in ("pkd+scm", "full"))
    assert 0.0 <= result.metrics["pem_attention_image_std"] <= 0.5
    assert all(result.metrics[f"seconds_{s}"] > 0 for s in ("expert", "pem_maps", "pem", "local"))


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
    from camfed.inprocess import InProcessGrid
    from client.app import app as client_app
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
    """L_cyc is the paper's summed L1 relative to the batch's mean ‖F_i‖₁, L_pose the masked PKD; each
    times its weight."""
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
    mean_l1 = features.abs().flatten(1).sum(1).mean()
    assert torch.allclose(terms["cycle"], 2.0 * cycle_consistency_loss(pem, features, delta) / mean_l1)
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


def test_expert_optimizer_state_survives_private_state(tiny_run_config, tmp_path):
    """Round 2's expert optimizer starts from round 1's moments (saved to disk as private state and read back)."""
    from common.federated.state import PrivateStateStore

    config = load_config({**tiny_run_config, "method": "pem", "pem-variant": "scm"})
    method = get_method("pem")
    first = method.local_round(_job(config, method.initial_shared_state(config)))
    store = PrivateStateStore(tmp_path / "camera")
    store.save(first.private, "ab12", 1)
    restored = store.load("ab12", 2)
    saved = first.private["expert-optimizer"]["state"]
    assert saved and all(torch.equal(saved[i]["exp_avg"], restored["expert-optimizer"]["state"][i]["exp_avg"])
                         for i in saved)
    expert, optimizer = method._train_expert(_job(config, first.shared, restored))
    step = next(iter(optimizer.state.values()))["step"]
    assert float(step) == 2 * float(next(iter(saved.values()))["step"])  # one epoch more, not restarted


# ------------------------------------------------------------------ stage 3: one objective


def _stage3(objective_attention, labels, seed=0):
    """A tiny ReID model, its training outputs on random maps, and PEM's stage-3 objective whose PEM
    returns ``objective_attention`` (d,) for every image."""
    from common.engine import Batch
    from common.methods.pem import PoseSwapObjective
    from common.models.reid import ReIDModel, ReIDOutput

    torch.manual_seed(seed)
    backbone = torch.nn.Conv2d(3, 6, 1)
    backbone.out_channels = 6
    model = ReIDModel(backbone, num_classes=int(labels.max()) + 1).train()
    images = torch.randn(len(labels), 3, 2, 2)

    class ConstantPEM(torch.nn.Module):
        def forward(self, maps):
            return objective_attention.expand(len(maps), -1)[:, :, None, None]

    config = load_config({"label-smoothing": 0.1, "triplet-margin": 0.3})
    objective = PoseSwapObjective(ConstantPEM(), config, None, torch.Generator().manual_seed(1))
    feature_map = model.backbone(images)
    features = model.pool(feature_map)
    outputs = ReIDOutput(feature_map, features, model.classify(features))
    return model, outputs, objective, Batch(images, labels, torch.arange(len(labels)))


def test_stage3_objective_equals_fedavg_loss_when_the_swap_changes_nothing():
    from common.engine import reid_loss

    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    model, outputs, objective, batch = _stage3(torch.zeros(6), labels)  # A ≡ 0: the swap returns F_i
    fedavg = reid_loss(model, outputs, labels, objective.config)
    terms = objective(model, outputs, batch)
    assert set(terms) == set(fedavg)
    for name in fedavg:
        torch.testing.assert_close(terms[name], fedavg[name])
    # no partner of another identity in the batch: nothing is swapped, FedAvg's loss exactly
    same = torch.zeros(4, dtype=torch.int64)
    model, outputs, objective, batch = _stage3(torch.full((6,), 0.7), same)
    fedavg = reid_loss(model, outputs, same, objective.config)
    assert all(torch.equal(objective(model, outputs, batch)[k], fedavg[k]) for k in fedavg)


def test_stage3_objective_adds_swapped_features_to_one_ce_and_one_triplet():
    from common.losses import batch_hard_triplet, cross_entropy_smooth

    labels = torch.tensor([0, 0, 1, 1])
    attention = torch.tensor([0.0, 1.0, 0.5, 0.2, 0.9, 0.3])
    model, outputs, objective, batch = _stage3(attention, labels)
    terms = objective(model, outputs, batch)
    delta = torch.multinomial((labels[:, None] != labels[None, :]).float(), 1,
                              generator=torch.Generator().manual_seed(1)).squeeze(1)
    swapped = (1 - attention) * outputs.features + attention * outputs.features[delta]
    mean, var = swapped.mean(0), swapped.var(0, unbiased=False)
    normalised = (swapped - mean) / torch.sqrt(var + model.bottleneck.eps) * model.bottleneck.weight
    logits = torch.cat([outputs.logits, model.classifier(normalised)])
    torch.testing.assert_close(terms["ce"], cross_entropy_smooth(logits, torch.cat([labels, labels]), 0.1))
    torch.testing.assert_close(terms["triplet"], batch_hard_triplet(outputs.features, labels, 0.3,
                                                                    positives=swapped))


def test_stage3_gradient_reaches_the_backbone_only_through_the_anchors_own_part():
    """PEM is a fixed function in stage 3: ∂/∂F of the swapped features is (1 − A_i) on the anchor's own
    map, with no term through A and none through the partner's F⁺_δ(i)."""
    from common.methods.pem import PoseExtractionModule

    labels = torch.tensor([0, 0, 1, 1])
    model, outputs, objective, batch = _stage3(torch.zeros(6), labels)
    pem = PoseExtractionModule(6, reduction=2)
    objective.pem = pem
    feature_map = outputs.feature_map.detach().requires_grad_(True)
    outputs.feature_map = feature_map
    captured = {}
    original = model.pool
    model.pool = lambda m: captured.setdefault("swapped", m) is m and original(m)
    objective(model, outputs, batch)
    swapped = captured["swapped"]
    weights = torch.randn_like(swapped)
    (grad,) = torch.autograd.grad((swapped * weights).sum(), feature_map)
    attention = pem(outputs.feature_map.detach())
    torch.testing.assert_close(grad, (1 - attention) * weights)
    assert all(p.grad is None for p in pem.parameters())


def test_stage3_swapped_batch_leaves_the_bnneck_statistics_alone():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    model, outputs, objective, batch = _stage3(torch.full((6,), 0.6), labels)
    before = (model.bottleneck.running_mean.clone(), model.bottleneck.running_var.clone(),
              int(model.bottleneck.num_batches_tracked))
    objective(model, outputs, batch)
    assert torch.equal(model.bottleneck.running_mean, before[0])
    assert torch.equal(model.bottleneck.running_var, before[1])
    assert int(model.bottleneck.num_batches_tracked) == before[2]


def test_untrained_pem_control_swaps_without_expert_or_pem_training(tiny_run_config):
    """pem-epochs = 0: stage 3 swaps with the initial attention; no expert is trained, PEM's weights stay."""
    config = load_config({**tiny_run_config, "method": "pem", "pem-epochs": 0})
    method = get_method("pem")
    shared = method.initial_shared_state(config)
    result = method.local_round(_job(config, shared))
    assert torch.equal(result.shared["pem.squeeze.weight"], shared["pem.squeeze.weight"])
    assert set(result.private) == {"classifier"}
    assert not torch.equal(result.shared["backbone.stem.0.weight"], shared["backbone.stem.0.weight"])
    with pytest.raises(ConfigError, match="pem-epochs"):
        load_config({**tiny_run_config, "pem-epochs": -1})
