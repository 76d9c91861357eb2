"""``camfed experiment``: a grid of runs (methods × seeds) on identical partitions, with paired statistics.

Every run of a grid shares the base run config; a run differs only by its method's overrides and its
``seed``.  Federated runs go through the real ServerApp / ClientApp code on an in-process grid (messages
serialised as on the wire); ``centralized`` trains on all cameras for ``num-server-rounds × local-epochs``
epochs (the same passes over the data), supervised; a method named ``centralized-<name>`` trains centralized too,
with its own overrides (e.g. ``--method centralized-calr="method='calr'"``: CALR as published).
Layout of ``--out DIR``::

    DIR/experiment.json          the grid's base config, its runs' results and the statistics
    DIR/experiment.md            the same as tables (with clothes ids: each evaluation protocol's too)
    DIR/experiment.png           mAP per round of every method: mean over seeds, 95 % band
    DIR/runs/<method>/seed-<s>/  one run folder (metrics.jsonl, rounds.jsonl, checkpoint.pt, result.json)

A run whose ``result.json`` exists is finished and never redone; an interrupted run resumes from its
checkpoint.  Re-running with another base config into the same ``DIR`` is refused (naming the keys that
differ), so results of different settings are never mixed; methods and seeds may be added at any time.

Statistics: per method the mean and a 95 % Student-t confidence interval over seeds; per method and seed
the paired difference to ``fedavg`` on the same seed (same partitions, same initialisation of the shared
weights), with its mean and 95 % interval over the seeds both ran.  A difference whose interval contains
0 is reported as within noise.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from common.config import CHOICES, Config, ConfigError, load_config, parse_run_config
from common.rundir import CHECKPOINT, METRICS_FILE, read_jsonl

# method name → run-config overrides ("centralized" is the centralized upper bound)
METHODS: dict[str, dict[str, Any]] = {
    "centralized": {},
    "fedavg": {"method": "fedavg"},
    "fedprox": {"method": "fedprox"},
    "moon": {"method": "moon"},
    "pem": {"method": "pem", "pem-variant": "full"},
    "pem-baseline": {"method": "pem", "pem-variant": "baseline"},
    "pem-pkd": {"method": "pem", "pem-variant": "pkd"},
    "pem-scm": {"method": "pem", "pem-variant": "scm"},
    "pem-pkd+scm": {"method": "pem", "pem-variant": "pkd+scm"},
    "pem-nomask": {"method": "pem", "pem-variant": "full", "pem-mask": False},
    "pem-hard": {"method": "pem", "pem-variant": "full", "pem-partner": "hard"},
    "pem-untrained": {"method": "pem", "pem-variant": "full", "pem-epochs": 0},
    "pem-centred": {"method": "pem", "pem-variant": "full", "pem-pkd-centre": True},
    # FIRe² ablation (docs/fire2.md): its model and schedule without FFM and FAR, each alone, both; PEM with FAR
    "fire2-baseline": {"method": "fire2", "fire2-ffm": False, "fire2-far": False},
    "fire2-ffm": {"method": "fire2", "fire2-far": False},
    "fire2-far": {"method": "fire2", "fire2-ffm": False},
    "fire2": {"method": "fire2"},
    "pem-far": {"method": "pem", "pem-variant": "full", "fire2-far-with-pem": True},
    # FedAvg with the shared weights on the wire in 16 bits (docs/federation.md, Thin links)
    "fedavg-fp16": {"method": "fedavg", "transport-dtype": "float16"},
    "fedavg-bf16": {"method": "fedavg", "transport-dtype": "bfloat16"},
}
REFERENCE = "fedavg"
METRICS = ("mAP", "rank1", "mINP")
# each evaluation protocol's mAP / rank-1, in evaluation records of datasets with clothes ids (common.engine)
PROTOCOL_METRICS = tuple(f"{p.replace('-', '_')}_{m}" for p in CHOICES["eval_protocol"] for m in ("mAP", "rank1"))
RESULT_FILE = "result.json"
# keys of the base config that may differ between invocations on one grid (where and how fast it runs)
FREE_KEYS = {"device", "num-workers", "output-dir", "state-dir", "cache-dir", "resume", "overwrite"}


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid: ``method`` (a name of ``methods``) with ``seed``."""

    method: str
    seed: int

    def folder(self, root: Path) -> Path:
        return root / "runs" / self.method / f"seed-{self.seed}"


def parse_methods(text: str, custom: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Method names (comma-separated) → overrides; ``custom`` maps extra names to ``"key=value ..."`` text."""
    known = {**METHODS, **{name: parse_run_config(values) for name, values in (custom or {}).items()}}
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise ConfigError(f"--methods: unknown method(s) {unknown}; known: {sorted(known)} "
                          "(define more with --method NAME=\"key=value ...\")")
    return {name: known[name] for name in names}


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds must name distinct seeds, got {text!r}")
    return seeds


def run_config_of(base: Config, overrides: Mapping[str, Any], spec: RunSpec, root: Path) -> Config:
    """The config of one run: ``base`` + the method's overrides + its seed and folder."""
    folder = spec.folder(root)
    values = {**base.to_run_config(), **overrides, "seed": spec.seed, "output-dir": str(folder),
              "state-dir": str(folder / "client-state"), "resume": (folder / CHECKPOINT).is_file(),
              "overwrite": not (folder / CHECKPOINT).is_file()}
    if is_centralized(spec.method):
        epochs = base.num_server_rounds * base.local_epochs
        values.update({"epochs": epochs, "eval-every": base.eval_every * base.local_epochs})
    return Config.from_mapping(values)


def is_centralized(method: str) -> bool:
    """Whether runs of ``method`` train centralized: ``centralized`` itself or any ``centralized-<name>``."""
    return method == "centralized" or method.startswith("centralized-")


def run_one(config: Config, centralized: bool) -> list[dict]:
    """Train one run; returns its evaluation records (``round`` per record, in rounds for centralized too)."""
    if centralized:
        from common.centralized import train_centralized

        train_centralized(config)
        records = read_jsonl(Path(config.output_dir) / METRICS_FILE)
        return [{**r, "round": r["epoch"] / config.local_epochs} for r in records]
    from camfed.inprocess import InProcessGrid
    from client.app import app as client_app
    from common.data.partition import partition_by_camera
    from common.federated.data import load_node_dataset
    from common.federated.server import run_federation

    cameras = len(partition_by_camera(load_node_dataset(config).train))
    run_federation(InProcessGrid(client_app, cameras, config.to_run_config()), config)
    return read_jsonl(Path(config.output_dir) / METRICS_FILE)


def final_metrics(evaluation: Mapping[str, Any]) -> dict[str, float]:
    """What a result keeps of a run's last evaluation record: ``METRICS`` and the ``PROTOCOL_METRICS`` it has."""
    return {k: evaluation[k] for k in METRICS + PROTOCOL_METRICS if k in evaluation}


def complete_result(folder: Path, config: Config, overrides: Mapping[str, Any]) -> None:
    """Add to a finished run's ``result.json`` what an older version of the runner did not store: PEM
    diagnostics, and the protocol metrics of its last evaluation record (``metrics.jsonl``)."""
    result = json.loads((folder / RESULT_FILE).read_text())
    records = read_jsonl(folder / METRICS_FILE)
    missing = {k: v for k, v in final_metrics(records[-1]).items() if k not in result} if records else {}
    if uses_pem(overrides) and "diagnostics" not in result:
        missing["diagnostics"] = diagnose(config)
    if missing:
        (folder / RESULT_FILE).write_text(json.dumps({**result, **missing}, indent=2))


def uses_pem(overrides: Mapping[str, Any]) -> bool:
    """Whether a method's runs train a PEM (so ``common.diagnostics.pem_diagnostics`` applies)."""
    return overrides.get("method") == "pem" and overrides.get("pem-variant", "full") != "baseline"


def diagnose(config: Config) -> dict[str, float]:
    """PEM diagnostics of a finished run's final global weights (its ``checkpoint.pt``)."""
    from common.diagnostics import pem_diagnostics
    from common.rundir import read_checkpoint

    return pem_diagnostics(config, read_checkpoint(Path(config.output_dir) / CHECKPOINT)["model"])


def round_seconds(folder: Path) -> float | None:
    """Mean seconds per federated round (server side, all cameras), from ``rounds.jsonl``."""
    rounds = read_jsonl(folder / "rounds.jsonl")
    return sum(r["seconds"] for r in rounds) / len(rounds) if rounds else None


def check_base(root: Path, base: Config) -> None:
    """Refuse a grid folder whose stored base config differs from ``base`` (except ``FREE_KEYS``)."""
    path = root / "experiment.json"
    if not path.is_file():
        return
    stored = json.loads(path.read_text())["base"]
    current = base.to_run_config()
    differ = [f"'{k}' {stored.get(k)!r} → {current[k]!r}" for k in current
              if k not in FREE_KEYS and stored.get(k, current[k]) != current[k]]
    if differ:
        raise ConfigError(f"{root} holds an experiment with another base config ({'; '.join(differ)}); "
                          "use another --out to keep results of different settings apart")


def run_grid(base: Config, methods: Mapping[str, Mapping[str, Any]], seeds: list[int], root: Path) -> dict:
    """Run every (method, seed) not finished yet, then write the report; returns ``experiment.json``'s content."""
    check_base(root, base)
    specs = [RunSpec(m, s) for s in seeds for m in methods]
    for number, spec in enumerate(specs, 1):
        folder = spec.folder(root)
        config = run_config_of(base, methods[spec.method], spec, root)
        if (folder / RESULT_FILE).is_file():
            print(f"[{number}/{len(specs)}] {spec.method} seed {spec.seed}: finished before, kept", flush=True)
            complete_result(folder, config, methods[spec.method])
            continue
        print(f"[{number}/{len(specs)}] {spec.method} seed {spec.seed}: training in {folder}", flush=True)
        began = time.monotonic()
        evaluations = run_one(config, is_centralized(spec.method))
        if not evaluations:
            raise RuntimeError(f"run {spec.method} seed {spec.seed} wrote no evaluation in {folder / METRICS_FILE}")
        result = {"method": spec.method, "seed": spec.seed, "overrides": dict(methods[spec.method]),
                  **final_metrics(evaluations[-1]), "seconds": time.monotonic() - began,
                  "seconds_per_round": round_seconds(folder),
                  "curve": [{"round": e["round"], "mAP": e["mAP"]} for e in evaluations]}
        if uses_pem(methods[spec.method]):
            result["diagnostics"] = diagnose(config)
        (folder / RESULT_FILE).write_text(json.dumps(result, indent=2))
        print(f"[{number}/{len(specs)}] {spec.method} seed {spec.seed}: mAP {100 * result['mAP']:.2f} "
              f"rank-1 {100 * result['rank1']:.2f} ({result['seconds']:.0f} s)", flush=True)
        write_report(root, base)
    return write_report(root, base)


# ------------------------------------------------------------------------------------------ statistics


def t_quantile_975(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (two-sided 95 % interval)."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def mean_interval(values: list[float]) -> dict[str, float]:
    """Mean, sample std and 95 % t half-width of ``values`` (half-width NaN for fewer than 2 values)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"n": n, "mean": mean, "std": math.nan, "ci95": math.nan}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return {"n": n, "mean": mean, "std": std, "ci95": t_quantile_975(n - 1) * std / math.sqrt(n)}


def reported_metrics(results: list[dict]) -> tuple[str, ...]:
    """``METRICS``, plus the ``PROTOCOL_METRICS`` that every result has (datasets with clothes ids)."""
    return METRICS + tuple(k for k in PROTOCOL_METRICS if results and all(k in r for r in results))


def summarize(results: list[dict]) -> dict:
    """Per-method intervals of each reported metric and paired differences to ``fedavg`` (same seed)."""
    metrics = reported_metrics(results)
    methods = list(dict.fromkeys(r["method"] for r in results))
    by = {(r["method"], r["seed"]): r for r in results}
    summary: dict[str, dict] = {}
    for method in methods:
        runs = [r for r in results if r["method"] == method]
        entry = {metric: mean_interval([r[metric] for r in runs]) for metric in metrics}
        seeds = [r["seed"] for r in runs if (REFERENCE, r["seed"]) in by]
        if method != REFERENCE and seeds:
            entry["paired"] = {
                metric: {**mean_interval([by[(method, s)][metric] - by[(REFERENCE, s)][metric] for s in seeds]),
                         "per_seed": {str(s): by[(method, s)][metric] - by[(REFERENCE, s)][metric] for s in seeds}}
                for metric in metrics}
        summary[method] = entry
    return summary


def verdict(paired: dict) -> str:
    """'better' / 'worse' when the 95 % interval of the paired difference excludes 0, else 'within noise'."""
    if paired["n"] < 2 or math.isnan(paired["ci95"]):
        return "too few seeds"
    low, high = paired["mean"] - paired["ci95"], paired["mean"] + paired["ci95"]
    return "better" if low > 0 else "worse" if high < 0 else "within noise"


# -------------------------------------------------------------------------------------------- report


def collect_results(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((root / "runs").glob(f"*/seed-*/{RESULT_FILE}"))]


def write_report(root: Path, base: Config) -> dict:
    """``experiment.json``, ``experiment.md`` and ``experiment.png`` from every finished run under ``root``."""
    results = collect_results(root)
    content = {"base": base.to_run_config(), "results": [{k: v for k, v in r.items() if k != "curve"}
                                                          for r in results],
               "summary": summarize(results) if results else {}}
    root.mkdir(parents=True, exist_ok=True)
    (root / "experiment.json").write_text(json.dumps(content, indent=2, allow_nan=True))
    (root / "experiment.md").write_text(markdown(content))
    if results:
        plot_curves(results, root / "experiment.png")
    return content


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _pct(stat: dict) -> str:
    if math.isnan(stat["ci95"]):
        return f"{100 * stat['mean']:.2f}"
    return f"{100 * stat['mean']:.2f} ± {100 * stat['ci95']:.2f}"


def markdown(content: dict) -> str:
    """Tables: every run; mean ± 95 % CI per method; paired difference to FedAvg with its verdict."""
    lines = ["# Experiment", "", "## Runs", "", "| method | seed | mAP | rank-1 | mINP | minutes | s / round |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['seed']} | {100 * r['mAP']:.2f} | {100 * r['rank1']:.2f} | "
              f"{100 * r['mINP']:.2f} | {r['seconds'] / 60:.1f} | {_seconds(r.get('seconds_per_round'))} |"
              for r in content["results"]]
    lines += ["", "## Per method (mean ± 95 % CI over seeds)", "",
              "| method | seeds | mAP | rank-1 | mINP |", "|---|---:|---:|---:|---:|"]
    for method, entry in content["summary"].items():
        lines.append(f"| {method} | {entry['mAP']['n']} | {_pct(entry['mAP'])} | {_pct(entry['rank1'])} | "
                     f"{_pct(entry['mINP'])} |")
    lines += ["", f"## Paired difference to {REFERENCE} (same seeds; mean ± 95 % CI, percentage points)", "",
              "| method | seeds | Δ mAP | Δ rank-1 | Δ mINP | per-seed Δ mAP | mAP verdict |",
              "|---|---:|---:|---:|---:|---|---|"]
    for method, entry in content["summary"].items():
        if "paired" not in entry:
            continue
        paired = entry["paired"]
        per_seed = ", ".join(f"{100 * v:+.2f}" for v in paired["mAP"]["per_seed"].values())
        lines.append(f"| {method} | {paired['mAP']['n']} | {_pct(paired['mAP'])} | {_pct(paired['rank1'])} | "
                     f"{_pct(paired['mINP'])} | {per_seed} | {verdict(paired['mAP'])} |")
    lines += protocols_markdown(content["summary"])
    lines += diagnostics_markdown(content["results"])
    return "\n".join(lines) + "\n"


def protocols_markdown(summary: dict) -> list[str]:
    """Each evaluation protocol's mAP / rank-1 per method and paired Δ mAP to FedAvg (clothes ids only)."""
    protocols = [p for p in CHOICES["eval_protocol"]
                 if any(f"{p.replace('-', '_')}_mAP" in entry for entry in summary.values())]
    if not protocols:
        return []
    keys = [p.replace("-", "_") for p in protocols]
    lines = ["", "## Per evaluation protocol (mean ± 95 % CI over seeds; paired Δ mAP to "
             f"{REFERENCE} with its verdict)", "",
             "| method | " + " | ".join(f"{p} mAP | {p} rank-1 | Δ {p} mAP | verdict" for p in protocols) + " |",
             "|---|" + "---:|---:|---:|---|" * len(protocols)]
    for method, entry in summary.items():
        cells = []
        for key in keys:
            paired = entry.get("paired", {}).get(f"{key}_mAP")
            cells += [_pct(entry[f"{key}_mAP"]), _pct(entry[f"{key}_rank1"]),
                      _pct(paired) if paired else "", verdict(paired) if paired else ""]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


DIAGNOSTICS = (("attention_channel_std", "A spread over channels"), ("attention_image_std", "A spread over images"),
               ("pose_corr_Fplus", "F⁺ pose corr"), ("pose_corr_Fminus", "F⁻ pose corr"),
               ("swap_keeps_id", "swap keeps id"), ("swap_takes_partner_id", "swap takes partner id"))


def diagnostics_markdown(results: list[dict]) -> list[str]:
    """Mean PEM diagnostics per method over its seeds (``common.diagnostics``), as table lines."""
    methods = [m for m in dict.fromkeys(r["method"] for r in results)
               if any("diagnostics" in r for r in results if r["method"] == m)]
    if not methods:
        return []
    lines = ["", "## PEM diagnostics (final global model, test images; mean over seeds)", "",
             "| method | " + " | ".join(label for _, label in DIAGNOSTICS) + " |",
             "|---|" + "---:|" * len(DIAGNOSTICS)]
    for method in methods:
        found = [r["diagnostics"] for r in results if r["method"] == method and "diagnostics" in r]
        lines.append(f"| {method} | " + " | ".join(f"{sum(d[k] for d in found) / len(found):.3f}"
                                                   for k, _ in DIAGNOSTICS) + " |")
    return lines


def plot_curves(results: list[dict], path: Path) -> None:
    """mAP per round of every method: mean over seeds, shaded 95 % t band (min–max with fewer than 3 seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in results):
        curves: dict[float, list[float]] = {}
        for r in results:
            if r["method"] == method:
                for point in r["curve"]:
                    curves.setdefault(point["round"], []).append(100 * point["mAP"])
        rounds = sorted(curves)
        stats = [mean_interval(curves[x]) for x in rounds]
        means = [s["mean"] for s in stats]
        if all(s["n"] >= 3 for s in stats):
            low = [s["mean"] - s["ci95"] for s in stats]
            high = [s["mean"] + s["ci95"] for s in stats]
        else:
            low, high = [min(curves[x]) for x in rounds], [max(curves[x]) for x in rounds]
        line, = ax.plot(rounds, means, marker="o", markersize=3, label=f"{method} (n={stats[-1]['n']})")
        ax.fill_between(rounds, low, high, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("round")
    ax.set_ylabel("mAP (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_from_args(args) -> int:
    """``camfed experiment``: parse the arguments, run the grid, print the paired table."""
    custom = dict(item.split("=", 1) for item in args.method or [])
    methods = parse_methods(args.methods, custom)
    seeds = parse_seeds(args.seeds)
    base = load_config(args.run_config)
    content = run_grid(base, methods, seeds, Path(args.out))
    print(markdown(content), flush=True)
    return 0
