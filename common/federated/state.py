"""A camera's private state (classifier, expert, ...) on the client's disk.

In deployment every message starts a fresh ClientApp process, so private state cannot live in
memory.  One file per (run tag, round) is written atomically (temporary file + rename) under the
camera's state directory; ``load`` returns the newest state of the same run from a round before
the current one, so a round re-run after a server crash starts from exactly the state it started
from the first time.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from common.config import Config
from common.engine import atomic_save

KEEP = 2  # newest files of the current run kept per camera
_NAME = re.compile(r"^(?P<tag>[0-9a-f]+)-round-(?P<round>\d+)\.pt$")


def state_dir(config: Config, camid: int) -> Path:
    """``<state-dir>/camera-<c>``; ``state-dir`` defaults to ``<output-dir>/client-state``."""
    base = Path(config.state_dir) if config.state_dir else Path(config.output_dir) / "client-state"
    return base.expanduser().absolute() / f"camera-{camid}"


class PrivateStateStore:
    """Private state files of one camera in ``directory``."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def _files(self, run_tag: str) -> dict[int, Path]:
        if not self.directory.is_dir():
            return {}
        found = {}
        for path in self.directory.iterdir():
            match = _NAME.match(path.name)
            if match and match["tag"] == run_tag:
                found[int(match["round"])] = path
        return found

    def load(self, run_tag: str, before_round: int) -> dict[str, Any]:
        """Newest state of run ``run_tag`` saved in a round < ``before_round``; ``{}`` if none."""
        rounds = [r for r in self._files(run_tag) if r < before_round]
        if not rounds:
            return {}
        path = self._files(run_tag)[max(rounds)]
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            return saved["state"]
        except Exception as err:
            raise RuntimeError(f"cannot read the private client state {path}: {err} "
                               "(delete the file to restart this camera from scratch)") from err

    def save(self, state: dict[str, Any], run_tag: str, server_round: int) -> Path:
        """Write the state of ``server_round``; drop other runs' files and all but the newest ``KEEP``."""
        if not re.fullmatch(r"[0-9a-f]+", run_tag):
            raise ValueError(f"run tag must be lowercase hex, got {run_tag!r}")
        path = self.directory / f"{run_tag}-round-{server_round:05d}.pt"
        atomic_save({"run-tag": run_tag, "round": server_round, "state": state}, path)
        own = self._files(run_tag)
        stale = [p for r, p in own.items() if r not in sorted(own)[-KEEP:]]
        stale += [p for p in self.directory.glob("*-round-*.pt") if p not in own.values()]
        for old in stale:
            old.unlink(missing_ok=True)
        return path
