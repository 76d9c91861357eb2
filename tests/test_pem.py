"""Pose Extraction Module, pose swap, PKD and cycle-consistency losses."""

import math

import pytest
import torch

from common.losses import cycle_consistency_loss, pose_distillation_loss
from common.models.pem import PoseExtractionModule, recombine, swap_partners


def constant_attention_pem(attention: list[float]) -> PoseExtractionModule:
    """A PEM whose attention is ``attention`` for every input (zero weights, logit biases)."""
    pem = PoseExtractionModule(len(attention), reduction=len(attention))
    with torch.no_grad():
        for p in pem.parameters():
            p.zero_()
        pem.expand.bias.copy_(torch.logit(torch.tensor(attention)))
    return pem


def test_parameter_count_and_shapes():
    pem = PoseExtractionModule(2048)
    assert sum(p.numel() for p in pem.parameters()) == 2048 * 128 + 128 + 128 * 2048 + 2048 == 526_464
    maps = torch.randn(3, 2048, 4, 2)
    attention = pem(maps)
    assert attention.shape == (3, 2048, 1, 1) and 0 <= attention.min() and attention.max() <= 1
    plus, minus = pem.decouple(maps)
    assert plus.shape == minus.shape == maps.shape
    torch.testing.assert_close(plus + minus, maps)
    torch.testing.assert_close(plus, attention * maps)
    # attention depends on the pooled map only: decoupling pooled features = pooling decoupled maps
    pooled_plus, _ = pem.decouple(maps.mean(dim=(2, 3)))
    torch.testing.assert_close(pooled_plus, plus.mean(dim=(2, 3)), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        PoseExtractionModule(100, reduction=16)


def test_random_partners_never_share_the_label_and_lonely_anchors_map_to_themselves():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        delta = swap_partners(labels, generator=generator)
        assert delta.dtype == torch.int64
        assert (labels[delta] != labels).all()
        seen.update(delta[labels == 3].tolist())
    assert seen == {0, 1, 2, 3, 4, 5, 6}  # uniform over the other identities: all get picked
    assert swap_partners(torch.tensor([5, 5, 5])).tolist() == [0, 1, 2]


def test_hard_partner_is_the_most_dissimilar_pose_of_another_identity():
    labels = torch.tensor([0, 0, 1, 1])
    z = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [-1.0, 0.1], [0.6, 0.8]])
    # i=0: cos to 2 = -0.995 (the same-id item 1 at cos -1 is not allowed), to 3 = 0.6 -> 2
    # i=1: cos to 2 = 0.995, to 3 = -0.6 -> 3;  i=2: to 0 = -0.995, to 1 = 0.995 -> 0
    # i=3: to 0 = 0.6, to 1 = -0.6 -> 1
    assert swap_partners(labels, z, hard=True).tolist() == [2, 3, 0, 1]
    # with pose_valid: item 2 has no pose, so 0 takes 3; item 2 (invalid) gets a random partner
    valid = torch.tensor([True, True, False, True])
    delta = swap_partners(labels, z, hard=True, pose_valid=valid)
    assert delta[0] == 3 and delta[1] == 3 and delta[3] == 1 and labels[delta[2]] != 1
    with pytest.raises(ValueError, match="pose_vectors"):
        swap_partners(labels, hard=True)


def test_swap_keeps_labels_and_combines_own_unrelated_with_partner_pose():
    torch.manual_seed(0)
    pem = PoseExtractionModule(32, reduction=4)
    maps, labels = torch.randn(6, 32, 4, 2), torch.tensor([3, 3, 8, 8, 9, 9])
    result = pem.swap(maps, labels, generator=torch.Generator().manual_seed(1))
    assert torch.equal(result.labels, labels)
    assert (labels[result.delta] != labels).all() and result.paired.all()
    plus, minus = pem.decouple(maps)
    for i in range(6):
        torch.testing.assert_close(result.features[i], minus[i] + plus[result.delta[i]])
    torch.testing.assert_close(recombine(minus, plus), maps)
    lonely = pem.swap(maps[:2], labels[:2])
    assert not lonely.paired.any()
    torch.testing.assert_close(lonely.features, maps[:2])


# ------------------------------------------------------------------ PKD


def test_pose_distillation_by_hand():
    labels = torch.tensor([0, 0, 1])
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    plus = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    valid = torch.ones(3, dtype=torch.bool)
    # S_z: (0,1) 0, (0,2) 1/√2, (1,2) 1/√2;  S_F+: (0,1) 1, (0,2) 0, (1,2) 0
    # masked (different ids): pairs (0,2),(2,0),(1,2),(2,1), each (1/√2)² = 1/2 -> 1/2
    assert pose_distillation_loss(z, plus, labels, valid).item() == pytest.approx(0.5)
    # no mask: plus (0,1),(1,0) with (0-1)² = 1 -> (4·1/2 + 2)/6; diagonal excluded
    assert pose_distillation_loss(z, plus, labels, valid, use_mask=False).item() == pytest.approx(4 / 6)
    # item 2 has no pose: no cross-id pair left -> 0, still differentiable
    no_pose = torch.tensor([True, True, False])
    loss = pose_distillation_loss(z, plus, labels, no_pose)
    loss.backward()
    assert loss.item() == 0.0 and plus.grad is not None
    assert pose_distillation_loss(z, plus, labels, no_pose, use_mask=False).item() == pytest.approx(1.0)
    # feature maps are average-pooled first
    maps = plus.detach()[:, :, None, None].expand(3, 2, 2, 3)
    assert pose_distillation_loss(z, maps, labels, valid).item() == pytest.approx(0.5)


def test_pose_distillation_ignores_same_identity_similarities():
    # f1 rotates around f2's axis: cos(f1, f2) stays 1/√2, only the same-id cos(f0, f1) changes
    labels, valid = torch.tensor([0, 0, 1]), torch.ones(3, dtype=torch.bool)
    z = torch.tensor([[1.0, 0.2, 0.0], [0.3, 1.0, 0.5], [0.0, 0.4, 1.0]])

    def features(theta):
        return torch.tensor([[1.0, 0.0, 1.0], [math.cos(theta), math.sin(theta), 1.0], [0.0, 0.0, 1.0]])

    masked = [pose_distillation_loss(z, features(t), labels, valid).item() for t in (0.0, 1.0, 2.5)]
    unmasked = [pose_distillation_loss(z, features(t), labels, valid, use_mask=False).item() for t in (0.0, 2.5)]
    assert masked == pytest.approx([masked[0]] * 3, abs=1e-6)
    assert abs(unmasked[0] - unmasked[1]) > 1e-2


def test_centred_pose_distillation_ignores_a_shared_offset_of_the_valid_rows():
    torch.manual_seed(3)
    z, plus = torch.randn(6, 34), torch.randn(6, 8)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    valid = torch.tensor([True, True, True, True, False, True])
    offset = torch.full((1, 8), 5.0)
    centred = pose_distillation_loss(z, plus, labels, valid, centre=True)
    # by hand: the plain loss of F⁺ minus the mean of its valid rows
    manual = pose_distillation_loss(z, plus - plus[valid].mean(0), labels, valid)
    assert centred.item() == pytest.approx(manual.item(), rel=1e-6)
    # a channel offset every image shares (what non-negative ReLU features have) changes the paper's form only
    assert pose_distillation_loss(z, plus + offset, labels, valid, centre=True).item() == pytest.approx(
        centred.item(), rel=1e-5)
    assert abs(pose_distillation_loss(z, plus + offset, labels, valid).item()
               - pose_distillation_loss(z, plus, labels, valid).item()) > 1e-2


def test_pose_distillation_matches_a_loop_reference():
    torch.manual_seed(2)
    z, plus = torch.randn(8, 34), torch.randn(8, 16)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    valid = torch.tensor([True, True, True, False, True, True, True, True])
    num = den = 0.0
    for i in range(8):
        for j in range(8):
            if i != j and labels[i] != labels[j] and valid[i] and valid[j]:
                s_z = torch.dot(z[i], z[j]) / (z[i].norm() * z[j].norm())
                s_f = torch.dot(plus[i], plus[j]) / (plus[i].norm() * plus[j].norm())
                num, den = num + (s_z - s_f) ** 2, den + 1
    assert pose_distillation_loss(z, plus, labels, valid).item() == pytest.approx((num / den).item(), rel=1e-5)


# ------------------------------------------------------------------ SCM


def test_cycle_consistency_by_hand():
    # constant A = (1/2, 3/4): F_i − F_i^rec = 2A(1−A)(F_i − F_δ(i)) = (1/2, 3/8)·(F_i − F_δ(i))
    pem = constant_attention_pem([0.5, 0.75])
    features, delta = torch.tensor([[1.0, 2.0], [3.0, -1.0]]), torch.tensor([1, 0])
    # i=0: (1/2·|−2|, 3/8·|3|) = 1 + 1.125 = 2.125 for F_0 and the same for F_δ(0) = F_1;
    # i=1 likewise: total 4·2.125 / (2·2) = 2.125
    assert cycle_consistency_loss(pem, features, delta).item() == pytest.approx(2.125)
    assert cycle_consistency_loss(pem, features, torch.tensor([0, 1])).item() == 0.0
    # maps: L1 over every element of the (2, 2, 1, 3) map -> 3 times the pooled value
    maps = features[:, :, None, None].expand(2, 2, 1, 3)
    assert cycle_consistency_loss(pem, maps, delta).item() == pytest.approx(3 * 2.125)


def _cycle_reference(pem, maps, delta):
    """Per-sample loop: swap, decouple again with recomputed attention, swap back."""
    def split(x):
        a = pem(x[None])[0]
        return a * x, (1 - a) * x

    total = 0.0
    for i, d in enumerate(delta.tolist()):
        (pi, mi), (pd, md) = split(maps[i]), split(maps[d])
        x, y = mi + pd, md + pi  # F_i^δ(i), F_δ(i)^i
        (px, mx), (py, my) = split(x), split(y)
        total = total + (maps[i] - (mx + py)).abs().sum() + (maps[d] - (my + px)).abs().sum()
    return total / (2 * len(delta))


def test_cycle_consistency_matches_a_loop_reference_and_trains_pem():
    torch.manual_seed(3)
    pem = PoseExtractionModule(16, reduction=4)
    maps, labels = torch.randn(6, 16, 3, 2), torch.tensor([0, 0, 1, 1, 2, 2])
    delta = swap_partners(labels, generator=torch.Generator().manual_seed(0))
    loss = cycle_consistency_loss(pem, maps, delta)
    torch.testing.assert_close(loss, _cycle_reference(pem, maps, delta))
    assert loss.item() > 0
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pem.parameters())
