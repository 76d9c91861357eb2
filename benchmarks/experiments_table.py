"""One markdown table per experiment: run_experiments.py's summary plus pem_diagnostics.py's findings.

Usage: python benchmarks/experiments_table.py OUT/NAME [OUT/NAME ...]
Reads NAME/summary.json and, where present, NAME/<run>/diagnostics.json and NAME/<run>/rounds.jsonl.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = ("run", "mAP", "rank-1", "mINP", "s / round", "A spread", "F⁺ pose corr", "F⁻ pose corr",
           "swap keeps id", "swap takes partner id")


def round_seconds(run_dir: Path) -> str:
    """Mean server-side seconds per round (send → aggregate), from rounds.jsonl."""
    path = run_dir / "rounds.jsonl"
    if not path.is_file():
        return ""
    seconds = [json.loads(line)["seconds"] for line in path.read_text().splitlines()]
    return f"{sum(seconds) / len(seconds):.1f}"


def row(root: Path, summary: dict) -> list[str]:
    run_dir = root / summary["run"]
    path = run_dir / "diagnostics.json"
    diag = json.loads(path.read_text()) if path.is_file() else {}
    found = [f"{diag[k]:.3f}" if k in diag else "" for k in
             ("attention_channel_std", "pose_corr_Fplus", "pose_corr_Fminus", "swap_keeps_id", "swap_takes_partner_id")]
    return [summary["run"], f"{100 * summary['mAP']:.2f}", f"{100 * summary['rank1']:.2f}",
            f"{100 * summary['mINP']:.2f}", round_seconds(run_dir), *found]


def table(root: Path) -> str:
    rows = [row(root, s) for s in json.loads((root / "summary.json").read_text())]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiments", nargs="+", type=Path)
    for root in parser.parse_args().experiments:
        print(f"\n{root.name}\n\n{table(root)}")


if __name__ == "__main__":
    main()
