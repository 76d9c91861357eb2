"""Robust aggregation against one faulty camera: final mAP of mean, median and trimmed mean (issue 14.5).

Runs, on the in-process grid with the real ClientApp, for every seed (paired: same partitions and initial
weights): ``honest-mean`` (no fault, ``aggregation = "mean"``) and ``scaled-<rule>`` for each rule, where the
camera of partition 0 replies its trained shared weights multiplied by ``--scale`` (a camera gone wrong:
the kind of reply ``CameraFedAvg``'s screening cannot tell from a real one, as it is finite and conforming).
Prints one JSON object per run and a Markdown table: mAP per seed, mean, and the paired difference to
``honest-mean``.  Example (the table in benchmarks/RESULTS.md)::

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/bench_robust.py --out /tmp/robust --seeds 0,1 \\
        --run-config "synth-ids=24 synth-cameras=3 height=64 width=32 num-server-rounds=3 local-epochs=1"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from camfed.inprocess import InProcessGrid  # noqa: E402  (after the path set-up)
from client.app import app as client_app  # noqa: E402
from common.config import load_config, parse_run_config  # noqa: E402
from common.experiment import RunSpec, mean_interval, parse_seeds, run_config_of  # noqa: E402
from common.federated.arrays import arrays_to_state, state_to_arrays  # noqa: E402
from common.federated.server import run_federation  # noqa: E402
from common.rundir import METRICS_FILE, read_jsonl  # noqa: E402

RULES = ("mean", "median", "trimmed-mean")


def scaling_camera(scale: float, transport: str):
    """The ClientApp, except that partition 0 replies its shared weights × ``scale`` (integer buffers kept)."""
    def client(message, context):
        reply = client_app(message, context)
        if int(context.node_config["partition-id"]) != 0 or reply.has_error():
            return reply
        state = arrays_to_state(reply.content["arrays"], widen=True)
        state = {k: v * scale if v.is_floating_point() else v for k, v in state.items()}
        reply.content["arrays"] = state_to_arrays(state, transport)
        return reply
    return client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-config", default="", help="base run config (TOML file or \"key=value ...\")")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--scale", type=float, default=5.0)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    base = load_config(parse_run_config(args.run_config))
    cameras = base.synth_cameras
    conditions = {"honest-mean": ("mean", None), **{f"scaled-{rule}": (rule, args.scale) for rule in RULES}}
    results: dict[str, dict[int, float]] = {name: {} for name in conditions}
    for seed in parse_seeds(args.seeds):
        for name, (rule, scale) in conditions.items():
            config = run_config_of(base, {"aggregation": rule}, RunSpec(name, seed), args.out)
            client = client_app if scale is None else scaling_camera(scale, config.transport_dtype)
            run_federation(InProcessGrid(client, cameras, config.to_run_config()), config)  # resumes a finished run
            final = read_jsonl(Path(config.output_dir) / METRICS_FILE)[-1]
            results[name][seed] = final["mAP"]
            print(json.dumps({"condition": name, "seed": seed, "mAP": final["mAP"], "rank1": final["rank1"]}),
                  flush=True)
    print("\n| condition | mAP per seed (%) | mean mAP (%) | paired Δ to honest-mean (pp, ± 95 % CI) |\n"
          "|---|---|---|---|")
    for name, per_seed in results.items():
        delta = mean_interval([100 * (per_seed[s] - results["honest-mean"][s]) for s in per_seed])
        print(f"| {name} | {', '.join(f'{100 * v:.2f}' for v in per_seed.values())} | "
              f"{100 * sum(per_seed.values()) / len(per_seed):.2f} | {delta['mean']:+.2f} ± {delta['ci95']:.2f} |")


if __name__ == "__main__":
    main()
