"""FIRe²'s networks: the ReID model with max + average pooling and a FAR head, and the cosine classifier over
fine-grained ids (Wang, Qian, Li, Xue, Fu, "Exploring Fine-Grained Representation and Recomposition for
Cloth-Changing Person Re-Identification", IEEE TIFS 2024; docs/fire2.md).

Only the backbone and the BNNeck are the test-time model: the FAR head and the fine-grained classifier are
training-only, private to a camera in a federation (``private_prefixes``), and never used by ``forward`` in eval
mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.config import Config
from common.models.backbones import build_backbone
from common.models.reid import ReIDModel, ReIDOutput, bnneck


@dataclass
class FIRe2Output(ReIDOutput):
    """``ReIDOutput`` plus ``embedding`` (B, D): the test-time feature computed in training mode (f_bn after the
    BNNeck, or f with ``neck-feat = "before"``), which the fine-grained classifier sees."""

    embedding: torch.Tensor | None = None


class FARHead(nn.Module):
    """FAR's own BNNeck (``bottleneck``, frozen bias) and identity classifier (``classifier``, set by
    ``FIRe2Model.set_num_classes``) over recomposed pooled features (B, D)."""

    def __init__(self, dim: int):
        super().__init__()
        self.bottleneck = bnneck(dim)
        self.classifier: nn.Linear | None = None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Identity logits (B, num_classes) of pooled recomposed features (B, D)."""
        return self.classifier(self.bottleneck(features))


class FIRe2Model(ReIDModel):
    """Backbone → pooling (max ‖ average, or average) → BNNeck → identity classifier, plus a FAR head when
    ``far`` (private state, like the classifier)."""

    def __init__(self, backbone: nn.Module, num_classes: int = 0, neck_feat: str = "after", max_avg: bool = True,
                 far: bool = True):
        super().__init__(backbone, 0, neck_feat)
        self.max_avg = max_avg
        if max_avg:
            self.feat_dim = 2 * backbone.out_channels
            self.bottleneck = bnneck(self.feat_dim)
        self.far_head = FARHead(self.feat_dim) if far else None
        if far:
            self.private_prefixes += ("far_head.",)
        if num_classes:
            self.set_num_classes(num_classes)

    def pool(self, feature_map: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) → (B, 2C) spatial max ‖ mean, or (B, C) mean without ``max_avg``."""
        mean = feature_map.mean(dim=(2, 3))
        return torch.cat([feature_map.amax(dim=(2, 3)), mean], dim=1) if self.max_avg else mean

    def set_num_classes(self, num_classes: int) -> None:
        """New identity classifiers (the model's and FAR's) over ``num_classes`` identities."""
        super().set_num_classes(num_classes)
        if self.far_head is not None:
            self.far_head.classifier = self.new_classifier(num_classes).to(self.bottleneck.weight.device)

    def forward(self, images: torch.Tensor) -> FIRe2Output | torch.Tensor:
        """Eval: the test feature (B, D), exactly ``ReIDModel``'s; training: ``FIRe2Output`` (the BNNeck runs
        once, so its running statistics update once per batch)."""
        if not self.training:
            return super().forward(images)
        feature_map = self.feature_map(images)
        features = self.pool(feature_map)
        neck = self.bottleneck(features)
        logits = self.classifier(neck) if self.classifier is not None else None
        return FIRe2Output(feature_map, features, logits, neck if self.neck_feat == "after" else features)


def build_fire2_model(config: Config, num_classes: int = 0, max_avg: bool | None = None,
                      far: bool | None = None) -> FIRe2Model:
    """FIRe²'s model for ``config``: pooling per ``fire2-pooling`` and a FAR head per ``fire2-far`` unless given
    (PEM with FAR passes average pooling and ``far=True``); frozen stages and cached inputs as ``build_model``."""
    max_avg = config.fire2_pooling == "max+avg" if max_avg is None else max_avg
    far = config.fire2_far if far is None else far
    model = FIRe2Model(build_backbone(config.backbone, config.pretrained, config.last_stride), num_classes,
                       config.neck_feat, max_avg, far)
    if config.freeze_stages:
        model.freeze_stages(config.freeze_stages)
    if config.cache_frozen:
        model.input_stage = config.freeze_stages
    return model


class FineGrainedClassifier(nn.Module):
    """Cosine classifier over fine-grained ids: logits (B, F) = cos(x, w_f) in [−1, 1] (the loss scales them).

    ``weight`` (F, D) starts as the given cluster centres (normalised here; the cosine ignores their norm)."""

    def __init__(self, centres: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(F.normalize(centres.detach().float(), dim=1).clone())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(features, dim=1), F.normalize(self.weight, dim=1))
