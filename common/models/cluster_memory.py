"""Cluster memory for clustering-based unsupervised ReID: one L2-normalised centroid per pseudo-label.

Loss: cross-entropy over the centroids, softmax(f·m_c / τ) for an L2-normalised feature f.  After the loss
(computed with the memory as it was), each sample of the batch moves its own centroid in batch order:
m_y ← normalise(μ·m_y + (1 − μ)·f), μ = momentum.  The memory is built anew from cluster means at every
re-clustering (``ClusterMemory.from_features``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.clustering import centroids


class ClusterMemory(nn.Module):
    """``features`` buffer (C, D): L2-normalised centroids; ``temperature`` τ; ``momentum`` μ."""

    def __init__(self, centres: torch.Tensor, temperature: float = 0.05, momentum: float = 0.1):
        super().__init__()
        if centres.ndim != 2 or len(centres) == 0:
            raise ValueError(f"ClusterMemory: expected (C, D) centroids with C >= 1, got shape {tuple(centres.shape)}")
        self.register_buffer("features", F.normalize(centres.detach().float(), dim=1))
        self.temperature, self.momentum = temperature, momentum

    @classmethod
    def from_features(cls, features: torch.Tensor, labels: np.ndarray, temperature: float = 0.05,
                      momentum: float = 0.1) -> "ClusterMemory":
        """Memory of the clusters 0..C−1 of ``labels`` (N,) (−1 ignored): normalised means of ``features`` (N, D)."""
        return cls(centroids(features.float(), labels), temperature, momentum)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean CE of normalised ``features`` (B, D) against their clusters ``labels`` (B,); then the update."""
        f = F.normalize(features.float(), dim=1)
        logits = f @ self.features.clone().T / self.temperature
        loss = F.cross_entropy(logits, labels)
        self.update(f.detach(), labels)
        return loss

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """m_y ← normalise(μ·m_y + (1 − μ)·f) for each (f, y) in batch order; ``features`` already normalised."""
        for f, y in zip(features, labels.tolist()):
            centre = self.momentum * self.features[y] + (1.0 - self.momentum) * f
            self.features[y] = centre / centre.norm()
