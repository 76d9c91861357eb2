"""scripts/gpu-check.sh without CUDA: one clear line, exit status 3, nothing installed or measured."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_without_cuda_says_so_and_exits_3(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "OUT": str(tmp_path),
           "CAMFED_WHEELHOUSE": str(tmp_path / "no-wheels")}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh")], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("gpu-check: no CUDA device")
    assert result.stdout == "" and list(tmp_path.iterdir()) == []
