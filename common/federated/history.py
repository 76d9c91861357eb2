"""Run history files in the output folder: ``metrics.jsonl`` (evaluations), ``rounds.jsonl`` (every round), plot."""

from __future__ import annotations

from pathlib import Path

from common.rundir import METRICS_FILE, PLOT_FILE, ROUNDS_FILE, read_jsonl  # noqa: F401 (re-exported)


def idle_rounds(folder: Path) -> list[int]:
    """Rounds that averaged nothing (global weights unchanged), from ``rounds.jsonl`` and ``metrics.jsonl``."""
    records = read_jsonl(folder / ROUNDS_FILE) + read_jsonl(folder / METRICS_FILE)
    return sorted({r["round"] for r in records if r.get("aggregated") is False})


def plot_metrics(metrics_path: Path, out_path: Path) -> Path | None:
    """PNG of mAP and rank-1 (%) per round from ``metrics.jsonl``, rounds that averaged nothing marked by a
    dashed red line; None when there is nothing to plot."""
    records = read_jsonl(metrics_path)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = [r["round"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("mAP", "mAP"), ("rank1", "rank-1")):
        ax.plot(rounds, [100 * r[key] for r in records], marker="o", label=label)
    for i, idle in enumerate(idle_rounds(metrics_path.parent)):
        ax.axvline(idle, color="tab:red", linestyle="--", alpha=0.6, label="averaged nothing" if i == 0 else None)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("%")
    ax.set_title("global model on the test split")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_path.with_name(out_path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_path)
    return out_path
