"""Evaluation reports: loading a checkpoint's model, metrics tables as JSON + markdown."""

from __future__ import annotations

import json
from pathlib import Path

from common.config import Config
from common.methods import get_method
from common.models.reid import ReIDModel
from common.rundir import load_weights, read_checkpoint

METRIC_COLUMNS = ("mAP", "rank1", "rank5", "rank10", "mINP")


def load_checkpoint_model(path: Path, config: Config) -> ReIDModel:
    """A model of ``config`` with the checkpoint's backbone + BNNeck (a classifier or PEM in it is ignored)."""
    state = read_checkpoint(path)
    weights = state.get("model", state)
    if not isinstance(weights, dict):
        raise ValueError(f"checkpoint {path} holds no model state dict")
    model = get_method(config.method).shared_model(config)  # the method's architecture (CALR: GeM)
    load_weights(model, weights, path, ignore_prefixes=("classifier.", "pem."))
    return model


def markdown_table(rows: list[dict]) -> str:
    """Rows ``{"step": ..., metric: fraction}`` as a markdown table in percent."""
    extra = [k for k in rows[0] if k not in METRIC_COLUMNS and k != "step"]
    header = ["step", *METRIC_COLUMNS, *extra]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row["step"])] + [f"{100 * row[k]:.2f}" for k in METRIC_COLUMNS]
        cells += [f"{row[k]:.4f}" if isinstance(row[k], float) else str(row[k]) for k in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(rows: list[dict], output_dir: Path, name: str = "evaluation") -> str:
    """Write ``name.json`` and ``name.md``; returns the markdown table."""
    output_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    (output_dir / f"{name}.json").write_text(json.dumps(rows, indent=2))
    (output_dir / f"{name}.md").write_text(table + "\n")
    return table
