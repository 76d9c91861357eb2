"""PEM experiments: FedAvg vs PEM (full and ablations) vs the centralized upper bound, same data and seeds.

Each federated run goes through the real ServerApp/ClientApp code paths on an in-process grid
(messages serialised as on the wire), so the numbers are those of `flwr run` without its process overhead.

Usage:
  python benchmarks/run_experiments.py --name synthetic --run-config "dataset='synthetic' ..." \
      --runs fedavg,pem-full,pem-pkd,centralized --rounds 10 --out outputs/experiments
Writes OUT/NAME/<run>/metrics.jsonl (per run) and OUT/NAME/summary.{json,md}; prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common.config import load_config, parse_run_config

# run name → run-config overrides
RUNS: dict[str, dict] = {
    "fedavg": {"method": "fedavg"},
    "fedprox": {"method": "fedprox"},
    "pem-baseline": {"method": "pem", "pem-variant": "baseline"},
    "pem-pkd": {"method": "pem", "pem-variant": "pkd"},
    "pem-scm": {"method": "pem", "pem-variant": "scm"},
    "pem-pkd+scm": {"method": "pem", "pem-variant": "pkd+scm"},
    "pem-full": {"method": "pem", "pem-variant": "full"},
    "pem-nomask": {"method": "pem", "pem-variant": "full", "pem-mask": False},
    "pem-hard": {"method": "pem", "pem-variant": "full", "pem-partner": "hard"},
}


def run_federated(base: dict, overrides: dict, out: Path) -> dict:
    from client.app import app as client_app
    from common.data.loading import load_dataset
    from common.data.partition import partition_by_camera
    from common.federated.inprocess import InProcessGrid
    from common.federated.server import run_federation

    config = load_config({**base, **overrides, "output-dir": str(out), "state-dir": str(out / "client-state")})
    num_cameras = len(partition_by_camera(load_dataset(config).train))
    grid = InProcessGrid(client_app, num_cameras, config.to_run_config())
    return run_federation(grid, config)[-1]


def run_centralized(base: dict, epochs: int, out: Path) -> dict:
    from common.centralized import train_centralized

    config = load_config({**base, "epochs": epochs, "eval-every": epochs, "output-dir": str(out)})
    return train_centralized(config)[-1]


def markdown(rows: list[dict]) -> str:
    lines = ["| run | mAP | rank-1 | rank-5 | mINP | wall s |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['run']} | {100 * r['mAP']:.2f} | {100 * r['rank1']:.2f} | {100 * r['rank5']:.2f} | "
              f"{100 * r['mINP']:.2f} | {r['seconds']:.0f} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--run-config", default="")
    parser.add_argument("--runs", default="fedavg,pem-full,centralized",
                        help=f"comma-separated, in order: centralized, {', '.join(RUNS)}")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--centralized-epochs", type=int, default=0, help="epochs of 'centralized' (default: rounds)")
    parser.add_argument("--out", default="outputs/experiments")
    args = parser.parse_args()
    base = {**parse_run_config(args.run_config), "num-server-rounds": args.rounds, "eval-every": args.rounds}
    root = Path(args.out) / args.name
    summary_path = root / "summary.json"
    rows = json.loads(summary_path.read_text()) if summary_path.is_file() else []
    names = [n for n in args.runs.split(",") if n]
    unknown = [n for n in names if n not in RUNS and n != "centralized"]
    if unknown:
        raise SystemExit(f"unknown run(s) {unknown}; known: centralized, {sorted(RUNS)}")
    for name in names:
        began = time.perf_counter()
        if name == "centralized":
            result = run_centralized(base, args.centralized_epochs or args.rounds, root / name)
        else:
            result = run_federated(base, RUNS[name], root / name)
        row = {"run": name, **{k: result[k] for k in ("mAP", "rank1", "rank5", "rank10", "mINP")},
               "seconds": time.perf_counter() - began}
        rows = [r for r in rows if r["run"] != name] + [row]
        root.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(json.dumps(rows, indent=2))
        (root / "summary.md").write_text(markdown(rows) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
