"""Shared fixtures: a tiny synthetic multi-camera dataset (generated once per session) and tiny configs.

``tiny_run_config`` is a kebab-case run-config mapping (as Flower passes it) that trains a ResNet-18
on 32×16 images of 12 identities seen by 3 cameras; ``tiny_config`` is the same as a typed Config.
Both write into the test's own ``tmp_path``.  ``write_run_config`` writes such a mapping as TOML.
``require_shared_data`` gives files of ``../shared/data`` (real Market crops that cannot ship with the
repository): a missing file skips the test locally and fails it in CI (``CI=true``).
"""

from __future__ import annotations

import os
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

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def require_shared_data(*names: str, root: Path = SHARED_DATA) -> list[Path]:
    """The paths ``root / name``; if one is missing, skip the test, or fail it when ``CI=true``."""
    paths = [root / name for name in names]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        message = "../shared/data is absent: " + ", ".join(missing)
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (CI=true: CI must provide it)", pytrace=False)
        pytest.skip(message)
    return paths


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
