"""The strong-baseline ReID model: backbone → GAP → f → BNNeck (BN, frozen bias) → f_bn → classifier."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from common.config import Config, ConfigError
from common.models.backbones import build_backbone, run_stages


@dataclass
class ReIDOutput:
    """Training outputs: ``feature_map`` (B,C,h,w), ``features`` f (B,C), ``logits`` (B,num_classes)."""

    feature_map: torch.Tensor
    features: torch.Tensor
    logits: torch.Tensor | None


def bnneck(dim: int) -> nn.BatchNorm1d:
    """The BNNeck's BatchNorm1d over ``dim`` features: weight 1, bias 0 and frozen."""
    bn = nn.BatchNorm1d(dim)
    bn.bias.requires_grad_(False)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    return bn


class ReIDModel(nn.Module):
    """Backbone + BNNeck (shared by federated clients) + optional classifier (private to a client)."""

    def __init__(self, backbone: nn.Module, num_classes: int = 0, neck_feat: str = "after"):
        super().__init__()
        self.backbone = backbone
        self.feat_dim = backbone.out_channels
        self.bottleneck = bnneck(self.feat_dim)
        self.classifier = self.new_classifier(num_classes) if num_classes else None
        self.neck_feat = neck_feat
        self.frozen_prefixes: tuple[str, ...] = ()
        self.private_prefixes: tuple[str, ...] = ("classifier.",)  # state a federated client never sends
        self.input_stage = 0  # > 0: inputs are the outputs of the backbone's first ``input_stage`` stages

    def freeze_stages(self, count: int) -> None:
        """Freeze the backbone's first ``count`` stages (``stage_prefixes``): no gradient, BatchNorm kept in
        eval mode, and left out of ``shared_state`` (frozen weights are neither trained nor sent)."""
        stages = self.backbone.stage_prefixes()
        if not 0 <= count < len(stages):
            raise ConfigError(f"config key 'freeze-stages' = {count}: the backbone has {len(stages)} stages, "
                              f"so it must be in [0, {len(stages) - 1}]")
        self.frozen_prefixes = tuple(f"backbone.{p}" for stage in stages[:count] for p in stage)
        for name, param in self.named_parameters():
            if name.startswith(self.frozen_prefixes):
                param.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> "ReIDModel":
        super().train(mode)
        for name, module in self.named_modules():
            if self.frozen_prefixes and (name + ".").startswith(self.frozen_prefixes):
                module.eval()
        return self

    def new_classifier(self, num_classes: int) -> nn.Linear:
        classifier = nn.Linear(self.feat_dim, num_classes, bias=False)
        nn.init.normal_(classifier.weight, std=0.001)
        return classifier

    def set_num_classes(self, num_classes: int) -> None:
        """Replace the classifier (e.g. a client's own label space)."""
        device = self.bottleneck.weight.device
        self.classifier = self.new_classifier(num_classes).to(device)

    def pool(self, feature_map: torch.Tensor) -> torch.Tensor:
        """Global average pooling (B,C,h,w) → (B,C)."""
        return feature_map.mean(dim=(2, 3))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (B,num_classes) of pooled features f (B,C) through the BNNeck."""
        return self.classifier(self.bottleneck(features))

    def feature_map(self, inputs: torch.Tensor) -> torch.Tensor:
        """Backbone feature map (B, C, h, w) of images (B, 3, H, W), or of cached frozen-stage outputs when
        ``input_stage`` > 0 (``common.data.frozen_cache``)."""
        if self.input_stage == 0:
            return self.backbone(inputs)
        return run_stages(self.backbone, inputs, self.input_stage)

    def forward(self, images: torch.Tensor) -> ReIDOutput | torch.Tensor:
        """Training: ``ReIDOutput``; eval: test features (B,C), f_bn or f per ``neck_feat`` (not normalised).
        ``images``: (B, 3, H, W), or cached frozen-stage outputs when ``input_stage`` > 0."""
        feature_map = self.feature_map(images)
        features = self.pool(feature_map)
        if not self.training:
            return self.bottleneck(features) if self.neck_feat == "after" else features
        logits = self.classify(features) if self.classifier is not None else None
        return ReIDOutput(feature_map, features, logits)

    def shared_state(self) -> dict[str, torch.Tensor]:
        """Weights a federated client shares: backbone + BNNeck (+ added shared modules such as PEM); the
        classifier (and whatever else ``private_prefixes`` names) stays private and frozen stages are not sent."""
        return {k: v for k, v in self.state_dict().items()
                if not k.startswith(self.private_prefixes) and not k.startswith(self.frozen_prefixes)}

    def load_shared_state(self, shared: dict[str, torch.Tensor]) -> None:
        """Load shared weights: exactly the keys of ``shared_state`` (the classifier and frozen stages keep
        their own); anything else is a ``ValueError`` naming the keys."""
        expected = set(self.shared_state())
        missing, unexpected = sorted(expected - set(shared)), sorted(set(shared) - expected)
        if missing or unexpected:
            raise ValueError(f"shared weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        self.load_state_dict(shared, strict=False)


def build_model(config: Config, num_classes: int = 0) -> ReIDModel:
    """The configured ReID model; its first ``freeze-stages`` backbone stages frozen.  With ``cache-frozen`` it
    takes those stages' cached outputs as input (the loaders of ``common.data.loading`` then yield them)."""
    backbone = build_backbone(config.backbone, config.pretrained, config.last_stride)
    model = ReIDModel(backbone, num_classes, config.neck_feat)
    if config.freeze_stages:
        model.freeze_stages(config.freeze_stages)
    if config.cache_frozen:
        model.input_stage = config.freeze_stages
    return model
