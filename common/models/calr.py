"""CALR's networks: the ReID model with GeM pooling, and the camera classifier behind a gradient-reversal layer."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.config import Config
from common.models.backbones import build_backbone
from common.models.reid import ReIDModel


class GeM(nn.Module):
    """Generalised-mean pooling (B, C, h, w) → (B, C): (mean x^p)^(1/p) with a learnable p (initial ``p``)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return feature_map.clamp(min=self.eps).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)


class CALRModel(ReIDModel):
    """Backbone → GeM → BNNeck; ``embed`` gives the L2-normalised feature that clustering and the
    cluster memory use.  No classifier: the cluster memory plays its part."""

    def __init__(self, backbone: nn.Module, neck_feat: str = "after", gem_p: float = 3.0):
        super().__init__(backbone, 0, neck_feat)
        self.gem = GeM(gem_p)

    def pool(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.gem(feature_map)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised features (B, C) of images (or cached frozen-stage outputs) in the module's current mode:
        after the BNNeck's BN, or before it with ``neck_feat = "before"`` (the same feature as evaluation)."""
        features = self.pool(self.feature_map(images))
        return F.normalize(self.bottleneck(features) if self.neck_feat == "after" else features, dim=1)


def build_calr_model(config: Config) -> CALRModel:
    """CALR's model for ``config`` (backbone, initial weights, GeM p, frozen stages; with ``cache-frozen`` it takes
    the frozen stages' cached outputs as input, as ``build_model``)."""
    model = CALRModel(build_backbone(config.backbone, config.pretrained, config.last_stride), config.neck_feat,
                      config.calr_gem_p)
    if config.freeze_stages:
        model.freeze_stages(config.freeze_stages)
    if config.cache_frozen:
        model.input_stage = config.freeze_stages
    return model


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; gradient × (−α) backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.neg() * ctx.alpha, None


def reverse_gradient(x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Gradient-reversal layer: ``x`` unchanged, its gradient multiplied by −``alpha``."""
    return _ReverseGradient.apply(x, alpha)


class CameraClassifier(nn.Module):
    """Camera-alignment head: gradient reversal (α) → MLP in_dim → hidden → hidden → num_cameras (logits).

    Trained with camera cross-entropy, it learns to tell the cameras apart while the reversed gradient
    pushes the features to make that impossible (camera-invariant features)."""

    def __init__(self, in_dim: int, num_cameras: int, hidden: int = 100, alpha: float = 1.0):
        super().__init__()
        self.alpha = alpha
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden),
                                 nn.ReLU(inplace=True), nn.Linear(hidden, num_cameras))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(reverse_gradient(features, self.alpha))
