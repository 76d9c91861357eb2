"""Backbones, the BNNeck ReID model and the Pose Extraction Module."""

from common.models.reid import ReIDModel, build_model

__all__ = ["ReIDModel", "build_model"]
