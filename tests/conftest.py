"""Shared fixtures: a tiny synthetic multi-camera dataset (generated once per session) and tiny configs.

``tiny_run_config`` is a kebab-case run-config mapping (as Flower passes it) that trains a ResNet-18
on 32×16 images of 12 identities seen by 3 cameras; ``tiny_config`` is the same as a typed Config.
Both write into the test's own ``tmp_path``.  ``write_run_config`` writes such a mapping as TOML.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import Config, load_config, write_run_config  # noqa: F401 (used by tests)

TINY_SETTINGS = {
    "dataset": "synthetic", "synth-ids": 12, "synth-cameras": 3, "synth-seed": 0,
    "backbone": "resnet18", "pretrained": "none", "height": 32, "width": 16, "pad": 2,
    "batch-size": 8, "num-instances": 4, "num-workers": 0, "device": "cpu", "amp": False,
    "warmup-epochs": 0, "lr-steps": "", "epochs": 1, "local-epochs": 1, "num-server-rounds": 2,
    "eval-every": 1, "min-train-clients": 2, "min-available-clients": 2,
}


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """A cache folder already holding the tiny synthetic dataset of ``TINY_SETTINGS``."""
    from common.data.synthetic import ensure_synthetic

    cache = tmp_path_factory.mktemp("camfed-cache")
    ensure_synthetic(cache, progress=False, num_ids=TINY_SETTINGS["synth-ids"],
                     num_cameras=TINY_SETTINGS["synth-cameras"], seed=TINY_SETTINGS["synth-seed"])
    return cache


@pytest.fixture
def tiny_run_config(tiny_cache, tmp_path) -> dict:
    """Run-config mapping (kebab-case) for the tiny dataset, writing to ``tmp_path / 'out'``."""
    return {**TINY_SETTINGS, "cache-dir": str(tiny_cache), "output-dir": str(tmp_path / "out")}


@pytest.fixture
def tiny_config(tiny_run_config) -> Config:
    return load_config(tiny_run_config)
