"""The interface every federated method implements.

A method owns one client's local round: it receives the global shared weights and the camera's
private state, trains on the camera's images, and returns new shared weights (sent to the server),
new private state (kept on the client) and scalar metrics.  Which keys are shared is the method's
choice (``shared_model``); the server and the ClientApp only move those.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from common.config import Config
from common.data.partition import CameraPartition
from common.engine import seed_everything
from common.models.reid import ReIDModel, build_model

StateDict = dict[str, torch.Tensor]


@dataclass
class LocalJob:
    """Everything a client's local round needs.

    ``shared``: global shared weights (CPU tensors, keys of ``Method.shared_model``); ``private``:
    what this camera's previous round returned as private state (``{}`` on its first round);
    ``lr``: this round's learning rate (the server's schedule); ``seed``: derived from
    (config seed, round, camera) so a round does not depend on process history.
    """

    config: Config
    partition: CameraPartition
    shared: StateDict
    private: dict[str, Any]
    server_round: int
    lr: float
    seed: int
    device: torch.device
    data_root: Path | None = None  # dataset folder (e.g. to find the pose file)
    download: StateDict = field(default_factory=dict)  # what the server sent every camera besides the weights


@dataclass
class LocalResult:
    """``shared``: updated shared weights (same keys, shapes, dtypes as ``LocalJob.shared``);
    ``private``: state kept on the client (tensors, numbers, strings and dicts/lists of them);
    ``metrics``: scalars (losses, accuracy); ``num_examples``: the aggregation weight; ``upload``: arrays
    besides the weights that leave the camera, exactly the keys of ``Method.upload_keys`` (a privacy cost
    the method declares; ``{}`` for most methods)."""

    shared: StateDict
    private: dict[str, Any]
    metrics: dict[str, float]
    num_examples: int
    upload: StateDict = field(default_factory=dict)


class Method(ABC):
    """A federated training method, registered by name (see ``common.methods.register``)."""

    name: ClassVar[str] = ""

    def shared_model(self, config: Config) -> ReIDModel:
        """A fresh model whose ``shared_state()`` is exactly the shared state (default: backbone + BNNeck,
        without frozen stages)."""
        return build_model(config)

    def initial_shared_state(self, config: Config) -> StateDict:
        """The server's round-0 weights, seeded by ``config.seed`` (CPU tensors)."""
        seed_everything(config.seed)
        return {k: v.detach().cpu().clone() for k, v in self.shared_model(config).shared_state().items()}

    def global_model(self, config: Config, shared: StateDict) -> ReIDModel:
        """The model the server evaluates: eval-mode forward returns test features (B, D)."""
        model = self.shared_model(config)
        model.load_shared_state(shared)
        return model

    def upload_keys(self, config: Config) -> set[str]:
        """Names of the arrays besides the shared weights that a reply carries under ``config`` (default none);
        the ClientApp refuses to send anything else."""
        return set()

    def combine_uploads(self, config: Config, server_round: int,
                        uploads: list[tuple[int, StateDict]]) -> tuple[StateDict, dict[str, float]]:
        """Server side, after averaging round ``server_round``: the (camera id, upload) of every usable reply →
        (arrays sent to every camera with the next round's weights as ``LocalJob.download``, scalars for
        ``rounds.jsonl``).  Default: nothing."""
        return {}, {}

    @abstractmethod
    def local_round(self, job: LocalJob) -> LocalResult:
        """Train on ``job.partition`` starting from ``job.shared`` and ``job.private``."""
