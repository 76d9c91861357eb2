"""Backbones, the BNNeck ReID model and the Pose Extraction Module."""

from common.models.pem import PoseExtractionModule
from common.models.reid import ReIDModel, build_model

__all__ = ["PoseExtractionModule", "ReIDModel", "build_model"]
