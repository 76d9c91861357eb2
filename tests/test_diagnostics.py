"""PEM diagnostics on hand-made features: pose correlation and the linear pose probe."""

import pytest
import torch

from common.diagnostics import linear_pose_r2, pose_correlations


def test_linear_pose_r2_tells_pose_features_from_pose_free_ones():
    generator = torch.Generator().manual_seed(0)
    x_train, x_test = torch.randn(400, 12, generator=generator), torch.randn(200, 12, generator=generator)
    mixing = torch.randn(12, 34, generator=generator)
    # pose a linear function of the features: R² ≈ 1; pose unrelated to them: R² ≈ 0 (never much above)
    assert linear_pose_r2(x_train, x_train @ mixing, x_test, x_test @ mixing) > 0.99
    noise_train, noise_test = torch.randn(400, 34, generator=generator), torch.randn(200, 34, generator=generator)
    assert linear_pose_r2(x_train, noise_train, x_test, noise_test) < 0.05


def test_pose_correlations_over_different_identity_pairs_with_valid_poses():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]])
    pids = torch.tensor([0, 1, 2, 3])
    valid = torch.ones(4, dtype=torch.bool)
    scaled = 3.0 * z  # same cosine similarities as the poses
    flipped = torch.stack([z[:, 1], z[:, 0]], dim=1) * torch.tensor([1.0, -1.0])  # a rotation: same cosines
    result = pose_correlations(z, valid, pids, {"same": scaled, "rotated": flipped})
    assert result["pose_corr_same"] == pytest.approx(1.0)
    assert result["pose_corr_rotated"] == pytest.approx(1.0)
    # same-identity pairs are left out: making items 0 and 1 one person removes their pair only
    anti = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    with_pair = pose_correlations(z, valid, pids, {"x": anti})["pose_corr_x"]
    without_pair = pose_correlations(z, valid, torch.tensor([0, 0, 2, 3]), {"x": anti})["pose_corr_x"]
    assert with_pair != pytest.approx(without_pair)
