"""Pose Extraction Module (*Pose-guided Enriched Feature Learning for Federated-by-camera Person
Re-identification*, CVPR 2026): channel attention that splits features into a
pose-related part F⁺ = A ⊙ F and a pose-unrelated part F⁻ = (1 − A) ⊙ F, and the
cross-identity pose swap F_i^δ(i) = F⁻_i + F⁺_δ(i).

Shapes: every function takes feature maps (B, d, h, w) or pooled features (B, d) and returns
the same layout.  The attention depends only on the global average of F, so decoupling a
pooled vector equals pooling the decoupled map: the PKD loss may use pooled F⁺ (B, d), while
the cycle loss (SCM) works on the maps.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class PoseExtractionModule(nn.Module):
    """A = sigmoid(conv1x1(d→d/r) → ReLU → conv1x1(d/r→d)) on the globally pooled features.

    With d = 2048 and r = 16 (biases included): 2048·128 + 128 + 128·2048 + 2048 = 526,464 parameters.
    """

    def __init__(self, channels: int = 2048, reduction: int = 16):
        super().__init__()
        if channels % reduction:
            raise ValueError(f"PEM channels ({channels}) must be divisible by reduction ({reduction})")
        hidden = channels // reduction
        self.squeeze = nn.Conv2d(channels, hidden, kernel_size=1)
        self.expand = nn.Conv2d(hidden, channels, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Attention in [0, 1]: (B, d, 1, 1) for maps (B, d, h, w); (B, d) for pooled (B, d)."""
        pooled = _pooled(features)[:, :, None, None]
        attention = torch.sigmoid(self.expand(F.relu(self.squeeze(pooled))))
        return attention if features.dim() == 4 else attention.flatten(1)

    def decouple(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(F⁺, F⁻) = (A ⊙ F, (1 − A) ⊙ F), each shaped like ``features``."""
        attention = self(features)
        plus = attention * features
        return plus, features - plus

    def swap(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        pose_vectors: torch.Tensor | None = None,
        hard: bool = False,
        generator: torch.Generator | None = None,
        pose_valid: torch.Tensor | None = None,
    ) -> PoseSwap:
        """Pose-swapped features F⁻_i + F⁺_δ(i) of every anchor, labelled y_i (see ``swap_partners``)."""
        delta = swap_partners(labels, pose_vectors, hard, generator, pose_valid)
        plus, minus = self.decouple(features)
        swapped = recombine(minus, plus[delta])
        paired = delta != torch.arange(len(delta), device=delta.device)
        return PoseSwap(swapped, labels, delta, paired)


class PoseSwap(NamedTuple):
    """Result of ``PoseExtractionModule.swap``.

    features: (B, ...) F_i^δ(i), identity i with the pose of δ(i); labels: (B,) y_i (the anchor's);
    delta: (B,) int64 partner indices; paired: (B,) bool, False where no other identity was in
    the batch (then δ(i) = i and the feature equals F_i).
    """

    features: torch.Tensor
    labels: torch.Tensor
    delta: torch.Tensor
    paired: torch.Tensor


def _pooled(features: torch.Tensor) -> torch.Tensor:
    """(B, d) global average of (B, d, h, w) maps; (B, d) passes through."""
    if features.dim() == 4:
        return features.mean(dim=(2, 3))
    if features.dim() == 2:
        return features
    raise ValueError(f"PEM expects features (B,d,h,w) or (B,d), got shape {tuple(features.shape)}")


def recombine(minus: torch.Tensor, plus: torch.Tensor) -> torch.Tensor:
    """F⁻_i + F⁺_δ(i): pass ``plus`` already gathered by δ (e.g. ``plus[delta]``)."""
    return minus + plus


def swap_partners(
    labels: torch.Tensor,
    pose_vectors: torch.Tensor | None = None,
    hard: bool = False,
    generator: torch.Generator | None = None,
    pose_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Partner δ(i) of every anchor, with y_δ(i) ≠ y_i: (B,) int64 on the labels' device.

    Random (default): uniform over the batch items of other identities.  ``hard``: the item of
    another identity whose pose vector (B, P) is least cosine-similar to z_i; when ``pose_valid``
    (B,) bool is given, only valid-pose partners count, and anchors with an invalid pose or no
    valid partner fall back to a random one.  An anchor with no other identity in the batch maps
    to itself (flag: ``delta == arange(B)``).  ``generator`` must live on the labels' device.
    """
    other = labels[:, None] != labels[None, :]
    has_other = other.any(dim=1)
    weights = other.float()
    alone = torch.nonzero(~has_other).flatten()
    weights[alone, alone] = 1.0  # maps to itself when nobody else is in the batch
    delta = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    if not hard:
        return delta
    if pose_vectors is None:
        raise ValueError("hard pose partners need pose_vectors (B, P)")
    z = F.normalize(pose_vectors.float(), dim=1)
    candidates = other
    if pose_valid is not None:
        candidates = other & pose_valid[:, None] & pose_valid[None, :]
    similarity = (z @ z.t()).masked_fill(~candidates, float("inf"))
    hardest = similarity.argmin(dim=1)
    return torch.where(candidates.any(dim=1), hardest, delta)
