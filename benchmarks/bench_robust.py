"""Robust aggregation against one faulty camera: mean, median and trimmed mean, paired over seeds (issue 14.5).

The conditions are ``camfed experiment`` methods (``common.experiment``'s runner: in-process grid, real
ClientApp, paired seeds, 95 % t intervals), so the grid can also run as plain ``camfed experiment`` jobs::

    fedavg                 honest cameras, aggregation = "mean" (the experiment's paired reference)
    honest-median          aggregation = "median"
    honest-trimmed         aggregation = "trimmed-mean", trim-fraction = --trim-fraction
    x<S>-mean / -median / -trimmed   the same three with fault-injection-scale = S (--scale): the camera of
                           partition 0 replies its trained shared weights × S every round, a camera gone wrong
                           that screening cannot see (finite, conforming; common.federated.client.inject_fault)

``camfed experiment`` pairs every condition with ``fedavg``; this script adds the contrasts that answer the
question (``contrasts``): the fault's damage under each rule (x<S>-R − honest-R) and what each robust rule saves
under the fault (x<S>-R − x<S>-mean), with the same statistics (``mean_interval``, ``verdict``).  Run the grid and
print both::

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/bench_robust.py --out /tmp/robust --seeds 0,1,2 \\
        --run-config configs/experiment-market-dev-short.toml --trim-fraction 0.2

or, when the runs were made by ``camfed experiment`` jobs into DIR (e.g. one job per condition and seed), only
the report: ``python benchmarks/bench_robust.py --out DIR --report-only --scale 5``.  With 6 cameras a trim
fraction of 0.2 drops 1 value at each end (⌊1.2⌋); with 3 cameras 0.25 drops none (the server says so).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.config import load_config, parse_run_config  # noqa: E402  (after the path set-up)
from common.experiment import (  # noqa: E402
    REFERENCE,
    collect_results,
    markdown,
    mean_interval,
    parse_seeds,
    run_grid,
    verdict,
)

RULES = ("mean", "median", "trimmed")
HONEST = {"mean": REFERENCE, "median": "honest-median", "trimmed": "honest-trimmed"}


def faulty(rule: str, scale: float) -> str:
    """The name of the condition with the faulty camera under ``rule``: x5-mean, x5-median, x5-trimmed."""
    return f"x{scale:g}-{rule}"


def conditions(scale: float, trim_fraction: float) -> dict[str, dict]:
    """Condition name → run-config overrides (``camfed experiment`` methods)."""
    rules = {"mean": {"aggregation": "mean"}, "median": {"aggregation": "median"},
             "trimmed": {"aggregation": "trimmed-mean", "trim-fraction": trim_fraction}}
    honest = {HONEST[rule]: {"method": "fedavg", **overrides} for rule, overrides in rules.items()}
    hit = {faulty(rule, scale): {"method": "fedavg", **overrides, "fault-injection-scale": scale}
           for rule, overrides in rules.items()}
    return {**honest, **hit}


def method_argument(name: str, overrides: dict) -> str:
    """``camfed experiment``'s ``--method`` value for a condition: ``name="key=value ..."`` (strings single-quoted,
    so the whole fits in double quotes on a shell command line)."""
    values = " ".join(f"{k}='{v}'" if isinstance(v, str) else f"{k}={str(v).lower() if isinstance(v, bool) else v!r}"
                      for k, v in overrides.items())
    return f'{name}="{values}"'


def contrasts(results: list[dict], scale: float) -> list[dict]:
    """Paired mAP contrasts (same seeds) between conditions of ``results`` (``camfed experiment`` result dicts):
    the fault's damage under each rule, and each robust rule's gain over the mean under the fault.  Each entry:
    ``label``, ``minuend``, ``subtrahend``, ``per_seed`` (fractions), the ``mean_interval`` and ``verdict``."""
    by = {(r["method"], r["seed"]): r["mAP"] for r in results}
    pairs = [(f"damage of the ×{scale:g} camera under {rule}", faulty(rule, scale), HONEST[rule]) for rule in RULES]
    pairs += [(f"{rule} instead of mean under the ×{scale:g} camera", faulty(rule, scale), faulty("mean", scale))
              for rule in RULES[1:]]
    pairs += [(f"{rule} instead of mean, honest cameras", HONEST[rule], REFERENCE) for rule in RULES[1:]]
    found = []
    for label, minuend, subtrahend in pairs:
        seeds = sorted(s for m, s in by if m == minuend and (subtrahend, s) in by)
        if not seeds:
            continue
        per_seed = {s: by[(minuend, s)] - by[(subtrahend, s)] for s in seeds}
        stats = mean_interval(list(per_seed.values()))
        found.append({"label": label, "minuend": minuend, "subtrahend": subtrahend, "per_seed": per_seed,
                      **stats, "verdict": verdict(stats)})
    return found


def contrasts_markdown(found: list[dict]) -> str:
    lines = ["| contrast | Δ mAP (pp, mean ± 95 % CI) | seeds | per seed | verdict |", "|---|---:|---:|---|---|"]
    for c in found:
        interval = f"{100 * c['mean']:+.2f}" + ("" if c["n"] < 2 else f" ± {100 * c['ci95']:.2f}")
        per_seed = ", ".join(f"{100 * v:+.2f}" for v in c["per_seed"].values())
        lines.append(f"| {c['label']} ({c['minuend']} − {c['subtrahend']}) | {interval} | {c['n']} | {per_seed} | "
                     f"{c['verdict']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-config", default="", help="base run config (TOML file or \"key=value ...\")")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--scale", type=float, default=5.0, help="fault-injection-scale of the faulty camera")
    parser.add_argument("--trim-fraction", type=float, default=0.2)
    parser.add_argument("--conditions", default="", help="comma-separated subset of the conditions (default all)")
    parser.add_argument("--out", type=Path, help="the experiment folder (camfed experiment layout)")
    parser.add_argument("--report-only", action="store_true", help="print the contrasts of the runs in --out")
    parser.add_argument("--print-methods", action="store_true",
                        help="print camfed experiment's --method argument of each condition and exit")
    args = parser.parse_args()
    methods = conditions(args.scale, args.trim_fraction)
    chosen = [name.strip() for name in args.conditions.split(",") if name.strip()] or list(methods)
    unknown = sorted(set(chosen) - set(methods))
    if unknown:
        parser.error(f"--conditions: unknown {unknown}; known: {list(methods)}")
    if args.print_methods:
        print("\n".join(method_argument(name, methods[name]) for name in chosen))
        return
    if args.out is None:
        parser.error("--out is required")
    if not args.report_only:
        base = load_config(parse_run_config(args.run_config))
        content = run_grid(base, {name: methods[name] for name in chosen}, parse_seeds(args.seeds), args.out)
        print(markdown(content), flush=True)
    print(contrasts_markdown(contrasts(collect_results(args.out), args.scale)), flush=True)


if __name__ == "__main__":
    main()
