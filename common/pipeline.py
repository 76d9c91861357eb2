"""The post-training pipeline: features of a model → post-processing steps in the user's order → a report.

Steps (config ``post`` or ``camfed evaluate --post``), applied cumulatively:
  flip    f ← normalise(f(x) + f(flip x))            (query and gallery)
  nfc     f ← NFC(f), query and gallery separately   (``nfc-k1``, ``nfc-k2``)
  ipg     f ← normalise(f + η/M Σ f_generated)       (``ipg-features`` file, ``ipg-eta``)
  rerank  distances ← k-reciprocal re-ranking of the current features (``rerank-k1/k2/lambda``);
          later feature steps are re-ranked again.
After every step: mAP, rank-1/5/10, mINP and ID² (of the query + gallery features, distractors excluded).
Outputs in the report folder: evaluation.json, evaluation.md, cmc.png, retrieval.png.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.config import Config, ConfigError
from common.data.loading import check_dataset, load_dataset, test_loader
from common.data.records import ReIDDataset, clothes_ids
from common.engine import protocol_metrics, resolve_device
from common.evaluation import compute_distance, evaluate_features, evaluate_rank, extract_features, reported_protocols
from common.models.reid import build_model
from common.postprocess import aggregate_generated, flip_average, id2, k_reciprocal_rerank, load_generated_features, nfc
from common.report import load_checkpoint_model, write_report
from common.rundir import check_report_folder, config_differences, read_checkpoint, stored_config

MODEL_KEYS = {"backbone", "height", "width", "neck-feat", "last-stride"}  # keys a checkpoint's model is made of


class FlipInput(nn.Module):
    """``model`` applied to left-right flipped images."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(torch.flip(images, dims=[3]))


@dataclass
class SplitFeatures:
    """Features of one split: ``features`` (N, D) float32 L2-normalised, ``pids``/``camids`` (N,), ``paths``,
    ``clothes`` (N,) ids or None (unknown)."""

    features: torch.Tensor
    pids: np.ndarray
    camids: np.ndarray
    paths: list[str]
    flipped: torch.Tensor | None = None
    clothes: np.ndarray | None = None


def extract_split(model: nn.Module, records, config: Config, device: torch.device, with_flip: bool) -> SplitFeatures:
    loader = test_loader(records, config)
    features, pids, camids = extract_features(model, loader, device)
    flipped = extract_features(FlipInput(model), loader, device)[0] if with_flip else None
    return SplitFeatures(F.normalize(features, dim=1), pids, camids, [r.path for r in records], flipped,
                         clothes_ids(records))


def apply_step(step: str, split: SplitFeatures, config: Config) -> torch.Tensor:
    """New features of ``split`` after the feature step ``step`` (flip, nfc or ipg)."""
    if step == "flip":
        return flip_average(split.features, split.flipped)
    if step == "nfc":
        return nfc(split.features, k1=config.nfc_k1, k2=config.nfc_k2)
    if step == "ipg":
        if not config.ipg_features:
            raise ConfigError("config key 'ipg-features': the 'ipg' step needs a file of generated-image features")
        generated = load_generated_features(config.ipg_features, split.paths)
        return aggregate_generated(split.features, generated, eta=config.ipg_eta)
    raise ConfigError(f"config key 'post': unknown step {step!r}")


def _metrics(query: SplitFeatures, gallery: SplitFeatures, reranked: torch.Tensor | None, config: Config):
    """(``eval-protocol``'s result, its metrics with each protocol's mAP / rank-1 when clothes ids exist, and ID²)."""
    ids = (query.pids, gallery.pids, query.camids, gallery.camids)
    clothes = {"q_clothes": query.clothes, "g_clothes": gallery.clothes}

    def evaluate(protocol: str) -> dict:
        if reranked is not None:
            return evaluate_rank(reranked.cpu().numpy(), *ids, protocol=protocol, **clothes)
        return evaluate_features(query.features, gallery.features, *ids, metric=config.distance, protocol=protocol,
                                 **clothes)

    result, metrics = protocol_metrics(evaluate, config.eval_protocol, reported_protocols(*ids, **clothes))
    features = torch.cat([query.features, gallery.features])
    pids = np.concatenate([query.pids, gallery.pids])
    return result, {**metrics, "ID2": id2(features, np.where(pids > 0, pids, -1))}


def run_pipeline(model: nn.Module, dataset: ReIDDataset, config: Config, steps: list[str], device: torch.device,
                 output_dir: Path) -> list[dict]:
    """Evaluate ``model`` before and after each step; write the table, CMC curves and a retrieval grid."""
    with_flip = "flip" in steps
    query = extract_split(model, dataset.query, config, device, with_flip)
    gallery = extract_split(model, dataset.gallery, config, device, with_flip)
    reranked = None
    result, row = _metrics(query, gallery, None, config)
    rows, curves = [{"step": "baseline", **row}], {"baseline": result["cmc"]}
    done: list[str] = []
    for step in steps:
        if step != "rerank":
            query.features, gallery.features = apply_step(step, query, config), apply_step(step, gallery, config)
        if step == "rerank" or reranked is not None:
            reranked = k_reciprocal_rerank(query.features, gallery.features, k1=config.rerank_k1,
                                           k2=config.rerank_k2, lambda_value=config.rerank_lambda)
        done.append(step)
        name = "+".join(done)
        result, row = _metrics(query, gallery, reranked, config)
        rows.append({"step": name, **row})
        curves[name] = result["cmc"]
    table = write_report(rows, output_dir, name="evaluation")
    plot_cmc(curves, output_dir / "cmc.png")
    plot_retrieval_grid(query, gallery, reranked, config, output_dir / "retrieval.png")
    print(table)
    return rows


def evaluate_checkpoint(checkpoint: Path | None, overrides: Mapping[str, Any], post: str | None = None,
                        output_dir: Path | None = None) -> list[dict]:
    """``camfed evaluate``: the checkpoint's model (``None``: the config's model as built, e.g. ImageNet
    weights with ``pretrained='imagenet'``) on the test split, then the ``post`` steps (``None``: the
    config's ``post``).  The config is the one stored in the checkpoint with the run-config ``overrides``
    (kebab-case keys) applied (``evaluation_config``).  Prints the table; writes it and the plots to
    ``output_dir`` (default ``<output-dir>/evaluation``), which must not hold a report unless ``overwrite``."""
    state = read_checkpoint(checkpoint) if checkpoint else None
    config = evaluation_config(state, checkpoint, {**overrides, **({"post": post} if post is not None else {})})
    report_dir = output_dir or Path(config.output_dir) / "evaluation"
    check_report_folder(report_dir, config.overwrite)
    check_post_inputs(config)
    dataset = load_dataset(config)
    check_dataset(dataset, training=False, protocol=config.eval_protocol)
    device = resolve_device(config.device)
    model = (load_checkpoint_model(checkpoint, config) if checkpoint else build_model(config)).to(device)
    return run_pipeline(model, dataset, config, config.post_steps, device, report_dir)


def evaluation_config(state: dict | None, path: Path | None, overrides: Mapping[str, Any]) -> Config:
    """The config stored in checkpoint ``state`` (read from ``path``) with ``overrides`` applied; an override of
    a key that defines the model (``MODEL_KEYS``) is refused.  Without a stored config: ``overrides`` alone."""
    if state is None or "config" not in state:
        if state is not None:
            print(f"camfed evaluate: {path} stores no config; using the given run config", file=sys.stderr)
        return Config.from_mapping(overrides)
    trained = stored_config(state, path)
    config = Config.from_mapping(overrides, base=trained)
    changed = config_differences(trained, config, keys=MODEL_KEYS)
    if changed:
        raise ConfigError(f"the run config changes the model stored in {path}: {'; '.join(changed)}; leave these "
                          "keys out (the checkpoint's own config is used)")
    return config


def check_post_inputs(config: Config) -> None:
    """Check the files the ``post`` steps read before any feature extraction."""
    if "ipg" in config.post_steps and not Path(config.ipg_features).is_file():
        raise ConfigError(f"config key 'ipg-features': file not found: {config.ipg_features}")


def plot_cmc(curves: dict[str, np.ndarray], path: Path, max_rank: int = 20) -> None:
    """CMC curves (percent vs rank 1..max_rank), one line per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, cmc in curves.items():
        ranks = np.arange(1, min(max_rank, len(cmc)) + 1)
        ax.plot(ranks, 100 * np.asarray(cmc[: len(ranks)]), marker=".", label=name)
    ax.set(xlabel="rank", ylabel="matching rate (%)", title="CMC")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def top_matches(query: SplitFeatures, gallery: SplitFeatures, rows: np.ndarray, distances: torch.Tensor | None,
                metric: str, k: int) -> np.ndarray:
    """(len(rows), k) gallery indices ranked for the given queries, same-id-same-camera items removed."""
    d = distances[rows] if distances is not None else compute_distance(query.features[rows], gallery.features, metric)
    d = d.clone().float()
    junk = (torch.as_tensor(gallery.pids)[None, :] == torch.as_tensor(query.pids[rows])[:, None]) & \
           (torch.as_tensor(gallery.camids)[None, :] == torch.as_tensor(query.camids[rows])[:, None])
    d[junk] = float("inf")
    return torch.topk(d, min(k, d.shape[1]), dim=1, largest=False).indices.cpu().numpy()


def plot_retrieval_grid(query: SplitFeatures, gallery: SplitFeatures, distances: torch.Tensor | None,
                        config: Config, path: Path, num_queries: int = 8, k: int = 10) -> None:
    """Each row: a query and its top-k gallery images, true matches framed green, false red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    rows = np.linspace(0, len(query.pids) - 1, min(num_queries, len(query.pids))).astype(int)
    ranked = top_matches(query, gallery, rows, distances, config.distance, k)
    fig, axes = plt.subplots(len(rows), k + 1, figsize=(1.1 * (k + 1), 2.1 * len(rows)), squeeze=False)
    for r, q in enumerate(rows):
        _show(axes[r][0], Image.open(query.paths[q]), "black", f"query {query.pids[q]}")
        for c, g in enumerate(ranked[r]):
            color = "green" if gallery.pids[g] == query.pids[q] else "red"
            _show(axes[r][c + 1], Image.open(gallery.paths[g]), color, str(c + 1))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _show(ax, image, color: str, title: str) -> None:
    ax.imshow(image)
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(3)
