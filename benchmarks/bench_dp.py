"""Differential privacy on the camera: the clip norm from a measured run, the privacy accounting, a report.

Three commands (issue 14.5; docs/federation.md, Differential privacy on the camera):

``clip-norm RUN``     the clip norm C for DP runs set from a finished run without DP (``RUN`` = a run folder
                      with ``result.json`` and ``rounds.jsonl``): the median over rounds of the round's median
                      pre-clip update norm (``update_norm_median``), to 2 significant digits, so about half
                      of the cameras' updates are clipped.  Prints C alone (for ``$(...)`` in a job);
                      ``--wait S`` waits up to S seconds for the run to finish first.
``epsilon``           ε at δ of a camera's replies over ``--rounds`` rounds for each noise multiplier, for both
                      adjacencies (``common.federated.privacy.gaussian_epsilon``).
``report DIR``        per run of a ``camfed experiment`` folder: C, σ, the share of clipped updates, the pre-clip
                      update norms, σ·√d (the per-camera noise norm in units of C, d = shared floating
                      coordinates) and ε; the accuracy and its paired difference are in DIR/experiment.md.
                      A run that stopped (no ``result.json``: e.g. noise so large that the global model's
                      features overflowed, which the evaluation refuses) is listed with its rounds so far,
                      its last evaluation if any, and ``stopped``.

Example (the DP jobs of benchmarks/RESULTS.md)::

    C=$(python benchmarks/bench_dp.py clip-norm OUT/runs/fedavg/seed-0)
    camfed experiment --run-config configs/experiment-market-dev-short.toml --out OUT --seeds 0 \\
        --methods dp-1.0 --method dp-1.0="dp-clip-norm=$C dp-noise-multiplier=1.0"
    python benchmarks/bench_dp.py report OUT
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.federated.privacy import gaussian_epsilon  # noqa: E402  (after the path set-up)
from common.rundir import CHECKPOINT, METRICS_FILE, ROUNDS_FILE, read_jsonl  # noqa: E402

RESULT_FILE = "result.json"


def significant(value: float, digits: int = 2) -> float:
    """``value`` rounded to ``digits`` significant digits (0.012345 → 0.012, 3456 → 3500)."""
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


def clip_norm_from_run(folder: Path) -> float:
    """C from a finished run (see the module docstring); an error when the run or its norms are missing."""
    if not (folder / RESULT_FILE).is_file():
        raise FileNotFoundError(f"{folder} holds no finished run ({RESULT_FILE} is missing)")
    medians = [r["update_norm_median"] for r in read_jsonl(folder / ROUNDS_FILE) if "update_norm_median" in r]
    if not medians:
        raise ValueError(f"{folder / ROUNDS_FILE} holds no update_norm_median (a run with report-update-norm = true "
                         "and a camfed that records it is needed)")
    return significant(statistics.median(medians))


def wait_for(path: Path, seconds: float, poll: float = 30.0) -> None:
    """Return once ``path`` exists; raise ``TimeoutError`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{path} did not appear within {seconds:g} s")
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))


def epsilons(noise_multiplier: float, rounds: int, delta: float) -> dict[str, float]:
    """ε of one camera's ``rounds`` replies: add / remove (sensitivity C) and replace (2C)."""
    return {"epsilon_add_remove": gaussian_epsilon(noise_multiplier, rounds, delta, sensitivity=1.0),
            "epsilon_replace": gaussian_epsilon(noise_multiplier, rounds, delta, sensitivity=2.0)}


def run_report(folder: Path, delta: float) -> dict:
    """What ``report`` prints about one run folder (``runs/<method>/seed-<s>``) of a ``camfed experiment`` grid;
    ``status`` is ``finished`` (``result.json``) or ``stopped``, whose ``mAP`` is its last evaluation's or None."""
    finished = (folder / RESULT_FILE).is_file()
    evaluations = read_jsonl(folder / METRICS_FILE)
    result = json.loads((folder / RESULT_FILE).read_text()) if finished else {
        "method": folder.parent.name, "seed": int(folder.name.removeprefix("seed-")),
        "mAP": evaluations[-1]["mAP"] if evaluations else None}
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    rounds = read_jsonl(folder / ROUNDS_FILE)
    clip, sigma = float(config.get("dp-clip-norm", 0.0)), float(config.get("dp-noise-multiplier", 0.0))
    entry = {"method": result["method"], "seed": result["seed"], "mAP": result["mAP"], "clip_norm": clip,
             "noise_multiplier": sigma, "rounds": len(rounds), "status": "finished" if finished else "stopped",
             "evaluated_rounds": [e["round"] for e in evaluations]}
    medians = [r["update_norm_median"] for r in rounds if "update_norm_median" in r]
    if medians:
        entry["update_norm_median"] = statistics.median(medians)
        entry["update_norm_max"] = max(r["update_norm_max"] for r in rounds if "update_norm_max" in r)
    clipped = [r["clipped_fraction"] for r in rounds if "clipped_fraction" in r]
    if clipped:
        entry["clipped_fraction"] = sum(clipped) / len(clipped)
    if clip and sigma and (folder / CHECKPOINT).is_file():
        import torch

        model = torch.load(folder / CHECKPOINT, map_location="cpu", weights_only=False)["model"]
        coordinates = sum(v.numel() for v in model.values() if v.is_floating_point())
        entry["noise_norm_over_clip"] = sigma * math.sqrt(coordinates)
    if clip:
        entry.update(epsilons(sigma, len(rounds), delta))
    return entry


def report_markdown(entries: list[dict], delta: float) -> str:
    def cell(entry: dict, key: str, form: str) -> str:
        return format(entry[key], form) if key in entry else ""

    lines = [f"| method | seed | status (rounds) | mAP | C | σ | update norm median / max (pre-clip) | share clipped | "
             f"σ·√d | ε add/remove (δ = {delta:g}) | ε replace |",
             "|---|---:|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for e in entries:
        norms = f"{cell(e, 'update_norm_median', '.3g')} / {cell(e, 'update_norm_max', '.3g')}" \
            if "update_norm_median" in e else ""
        score = "" if e["mAP"] is None else f"{100 * e['mAP']:.2f}"
        lines.append(f"| {e['method']} | {e['seed']} | {e['status']} ({e['rounds']}) | {score} | {e['clip_norm']:g} | "
                     f"{e['noise_multiplier']:g} | {norms} | {cell(e, 'clipped_fraction', '.2f')} | "
                     f"{cell(e, 'noise_norm_over_clip', '.0f')} | {cell(e, 'epsilon_add_remove', '.1f')} | "
                     f"{cell(e, 'epsilon_replace', '.1f')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    clip = sub.add_parser("clip-norm", help="C from a finished run without DP")
    clip.add_argument("run", type=Path)
    clip.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the run's result.json")
    accounting = sub.add_parser("epsilon", help="ε of a camera's replies")
    accounting.add_argument("--noise-multipliers", default="0.3,1.0")
    accounting.add_argument("--rounds", type=int, default=10)
    accounting.add_argument("--delta", type=float, default=1e-5)
    report = sub.add_parser("report", help="clipping, norms and ε of every run of a camfed experiment folder")
    report.add_argument("out", type=Path)
    report.add_argument("--delta", type=float, default=1e-5)
    args = parser.parse_args()
    if args.command == "clip-norm":
        if args.wait:
            wait_for(args.run / RESULT_FILE, args.wait)
        print(f"{clip_norm_from_run(args.run):g}")
    elif args.command == "epsilon":
        print(f"| σ | rounds | ε add/remove (δ = {args.delta:g}) | ε replace |\n|---:|---:|---:|---:|")
        for sigma in (float(s) for s in args.noise_multipliers.split(",")):
            eps = epsilons(sigma, args.rounds, args.delta)
            print(f"| {sigma:g} | {args.rounds} | {eps['epsilon_add_remove']:.2f} | {eps['epsilon_replace']:.2f} |")
    else:
        folders = sorted(p.parent for p in args.out.glob(f"runs/*/seed-*/{ROUNDS_FILE}"))
        print(report_markdown([run_report(f, args.delta) for f in folders], args.delta), end="")


if __name__ == "__main__":
    main()
