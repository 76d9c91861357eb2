"""CALR: camera-aware label refinement for unsupervised person ReID (Li et al.), its stages and centralized run.

Stages (``camfed train-centralized --run-config "method='calr' ..."``):

1. intra-camera: per camera, a network of its own trains on that camera's images alone; every epoch its
   features are clustered (k-reciprocal Jaccard distance + DBSCAN) and it trains against a cluster memory of
   those clusters.  The camera's final clusters (``local`` labels) are kept;
2. inter-camera: a fresh network; every epoch all features are clustered globally (Infomap on a kNN graph),
   each global cluster is refined by its pivot's local cluster (``refine``), and the network trains against a
   cluster memory of the refined clusters, plus camera alignment (camera CE through gradient reversal) in the
   first ``calr-align-epochs`` epochs.

Identity labels are never read in training: the stages receive ``unlabeled`` records (pid −1) and carry
pseudo-labels in the pid field of the records they build for the P×K sampler.  Only ``ClusteringLog`` holds
the true identities, to report pseudo-label quality in ``clustering.jsonl`` (an evaluation, not training).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.clustering import cluster_quality, cluster_stats, dbscan, infomap_clusters, jaccard_distance, relabel
from common.config import Config
from common.data.loading import check_dataset, load_dataset, test_loader, train_loader
from common.data.records import ImageRecord
from common.engine import (
    append_jsonl,
    atomic_save,
    derived_seed,
    evaluate_model,
    learning_rate,
    make_optimizer,
    resolve_device,
    seed_everything,
    set_lr,
    write_config_snapshot,
)
from common.evaluation import extract_features
from common.models.calr import CALRModel, CameraClassifier, build_calr_model
from common.models.cluster_memory import ClusterMemory
from common.progress import StepProgress
from common.rundir import (
    CHECKPOINT,
    METRICS_FILE,
    evaluation_missing,
    is_evaluation_step,
    keep_records_up_to,
    load_weights,
    open_run,
)

CLUSTERING_FILE = "clustering.jsonl"


def unlabeled(records: list[ImageRecord]) -> list[ImageRecord]:
    """``records`` without identities (pid −1): what CALR's training may see (path and camera)."""
    return [ImageRecord(r.path, -1, r.camid) for r in records]


def embed_all(model: CALRModel, records: list[ImageRecord], config: Config, device: torch.device) -> torch.Tensor:
    """L2-normalised eval-mode features (N, D) float32 of ``records`` in order (the features clustering uses)."""
    features, _, _ = extract_features(model, test_loader(records, config), device)
    return F.normalize(features, dim=1)


def intra_camera_labels(features: torch.Tensor, config: Config) -> np.ndarray:
    """One camera's clusters (N,) int64, −1 outliers: DBSCAN (``calr-intra-eps``, ``calr-min-samples``) on the
    Jaccard distance (``calr-intra-k1``, ``calr-intra-k2``) of its features (N, D)."""
    distance = jaccard_distance(features, config.calr_intra_k1, config.calr_intra_k2)
    return dbscan(distance, config.calr_intra_eps, config.calr_min_samples)


def drop_probability(epoch: int, epochs: int, schedule: str) -> float:
    """Probability that refinement drops a member in inter-camera ``epoch`` (0-based) of ``epochs``.

    ``cosine`` (self-paced): 0.5·(1 + cos(π·epoch / (3·epochs))), from 1 down to ~0.75, so refinement
    relaxes as the features improve; ``constant``: always 1.
    """
    return 0.5 * (1.0 + math.cos(math.pi * epoch / (3 * epochs))) if schedule == "cosine" else 1.0


def refine(global_labels: np.ndarray, density: np.ndarray, local_labels: np.ndarray, camids: np.ndarray,
           probability: float, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Pivot-based refinement of global clusters by local (per-camera) ones.  All arrays (N,).

    In each global cluster the pivot is the member with the highest ``density`` among those with a local
    cluster; members from the pivot's camera that are not in the pivot's local cluster are dropped (−1),
    each with ``probability``.  Members from other cameras are kept.  Returns (labels renumbered 0..C−1, number
    dropped).
    """
    refined = global_labels.copy()
    dropped = 0
    for cluster in np.unique(global_labels[global_labels >= 0]):
        members = np.flatnonzero((global_labels == cluster) & (local_labels >= 0))
        if len(members) == 0:
            continue
        pivot = members[np.argmax(density[members])]
        everyone = np.flatnonzero(global_labels == cluster)
        strangers = everyone[(camids[everyone] == camids[pivot]) & (local_labels[everyone] != local_labels[pivot])]
        strangers = strangers[rng.random(len(strangers)) < probability]
        refined[strangers] = -1
        dropped += len(strangers)
    return relabel(refined), dropped


class ClusteringLog:
    """Appends one record per re-clustering to ``clustering.jsonl``: stage, epoch, camera, number of clusters,
    outliers and — against the true identities it holds, for evaluation only — pairwise precision, recall,
    F-score and expansion."""

    def __init__(self, path: Path, pids: np.ndarray):
        self.path, self.pids = path, np.asarray(pids)

    def __call__(self, stage: str, labels: np.ndarray, rows: np.ndarray | None = None, **fields) -> dict:
        """Record ``labels`` of the training records at positions ``rows`` (all when None) with ``fields``
        (``epoch`` for inter-camera epochs, ``intra_epoch`` and ``camera`` for the intra-camera stage)."""
        pids = self.pids if rows is None else self.pids[rows]
        record = {"stage": stage, **fields, **cluster_stats(labels), **cluster_quality(labels, pids)}
        append_jsonl(self.path, record)
        return record


@dataclass
class CrossCameraTargets:
    """Cross-camera clusters as one camera sees them (federated CALR with ``calr-share-centroids``): a cluster
    memory over the server's cross-camera centroids (G, D) and each training record's cross-camera cluster
    ``labels`` (N,) int64 (−1: none)."""

    memory: ClusterMemory
    labels: np.ndarray


@dataclass
class CameraAlignment:
    """The camera head and each training record's camera index (0..cameras−1) for the camera CE."""

    head: CameraClassifier
    index: dict[int, int]  # camid -> camera index


def train_memory_epoch(model: CALRModel, records: list[ImageRecord], labels: np.ndarray, memory: ClusterMemory,
                       optimizer: torch.optim.Optimizer, config: Config, device: torch.device, seed: int,
                       alignment: CameraAlignment | None = None, desc: str = "calr",
                       cross: CrossCameraTargets | None = None) -> dict[str, float]:
    """One P×K pass over the records with a cluster (``labels`` >= 0): cluster-memory CE, plus camera CE
    through the gradient-reversal head with ``alignment``, plus CE over the cross-camera memory for the
    samples with a cross-camera cluster with ``cross``.  Returns the mean per batch of the ``memory``
    (``camera``, ``cross_camera``) losses over the batches where they apply, and ``num_examples``; ``{}`` when
    no batch can be formed."""
    rows = np.flatnonzero(labels >= 0)
    kept = [ImageRecord(records[i].path, int(labels[i]), records[i].camid) for i in rows]
    if not kept:
        return {}
    loader = train_loader(kept, {int(c): int(c) for c in np.unique(labels[labels >= 0])}, config, seed=seed)
    model.train()
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    seen = 0
    for images, targets, camids, indices in tqdm(loader, desc=desc, leave=False, disable=None):
        embedding = model.embed(images.to(device))
        terms = {"memory": memory(embedding, targets.to(device))}
        if alignment is not None:
            cameras = torch.tensor([alignment.index[int(c)] for c in camids], device=device)
            terms["camera"] = F.cross_entropy(alignment.head(embedding), cameras)
        if cross is not None:
            cross_labels = torch.from_numpy(cross.labels[rows[indices.numpy()]])
            if (cross_labels >= 0).any():
                has = cross_labels >= 0
                terms["cross_camera"] = cross.memory(embedding[has.to(device)], cross_labels[has].to(device))
        optimizer.zero_grad(set_to_none=True)
        sum(terms.values()).backward()
        optimizer.step()
        for name, value in terms.items():
            totals[name] = totals.get(name, 0.0) + float(value.detach()) * len(targets)
            counts[name] = counts.get(name, 0) + len(targets)
        seen += len(targets)
    return {**{k: v / counts[k] for k, v in totals.items()}, "num_examples": seen} if seen else {}


def clustering_epoch(model: CALRModel, records: list[ImageRecord], labels: np.ndarray, features: torch.Tensor,
                     optimizer: torch.optim.Optimizer, config: Config, device: torch.device, seed: int,
                     alignment: CameraAlignment | None = None, desc: str = "calr",
                     cross: CrossCameraTargets | None = None) -> tuple[dict[str, float], ClusterMemory | None]:
    """A cluster memory of ``labels`` built from ``features`` (N, D), then ``train_memory_epoch``; returns its
    losses and the memory after the pass (``({}, None)`` without any cluster)."""
    if not (labels >= 0).any():
        return {}, None
    memory = ClusterMemory.from_features(features, labels, config.calr_temperature,
                                         config.calr_memory_momentum).to(device)
    stats = train_memory_epoch(model, records, labels, memory, optimizer, config, device, seed, alignment, desc,
                               cross)
    return stats, memory


# ------------------------------------------------------------------------------------------ centralized


def intra_camera_stage(records: list[ImageRecord], config: Config, device: torch.device,
                       log: ClusteringLog) -> np.ndarray:
    """Stage 1 on every camera; returns the local labels (N,) of all records (per-camera label spaces, −1
    outliers), clustered with each camera's final network."""
    camids = np.array([r.camid for r in records])
    local = np.full(len(records), -1, dtype=np.int64)
    for camid in sorted(set(camids.tolist())):
        rows = np.flatnonzero(camids == camid)
        local[rows] = train_one_camera([records[i] for i in rows], config, device, log, rows)
    return local


def train_one_camera(records: list[ImageRecord], config: Config, device: torch.device, log: ClusteringLog,
                     rows: np.ndarray) -> np.ndarray:
    """``calr-intra-epochs`` epochs of a fresh network on one camera's records; its final clusters (N_c,)."""
    camid = records[0].camid
    seed_everything(derived_seed(config.seed, camid, 1))
    model = build_calr_model(config).to(device)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], config)
    for epoch in range(config.calr_intra_epochs):
        set_lr(optimizer, learning_rate(epoch, config))
        features = embed_all(model, records, config, device)
        labels = intra_camera_labels(features, config)
        log("intra", labels, rows, camera=camid, intra_epoch=epoch + 1)
        clustering_epoch(model, records, labels, features, optimizer, config, device,
                         seed=derived_seed(config.seed, camid, epoch), desc=f"camera {camid} epoch {epoch + 1}")
    labels = intra_camera_labels(embed_all(model, records, config, device), config)
    log("local", labels, rows, camera=camid, intra_epoch=config.calr_intra_epochs)
    return labels


def inter_camera_labels(features: torch.Tensor, local: np.ndarray, camids: np.ndarray, epoch: int,
                        config: Config, log: ClusteringLog) -> tuple[np.ndarray, dict]:
    """Global clusters of all features (N, D) (Infomap), refined by the local labels unless ``calr-refine`` is
    off; both are logged.  Epoch is 0-based.  Returns the labels to train on and their log record."""
    result = infomap_clusters(features, config.calr_knn, config.calr_max_distance, config.calr_max_outlier_size,
                              seed=derived_seed(config.seed, epoch))
    record = log("global", result.labels, epoch=epoch + 1)
    if not config.calr_refine:
        return result.labels, record
    probability = drop_probability(epoch, config.epochs, config.calr_refine_schedule)
    labels, dropped = refine(result.labels, result.density, local, camids, probability,
                             np.random.default_rng(derived_seed(config.seed, epoch, 2)))
    return labels, log("refined", labels, epoch=epoch + 1, dropped=dropped, drop_probability=probability)


def train_calr_centralized(config: Config) -> list[dict]:
    """CALR on the whole training set without identity labels: stage 1 on every camera, then ``epochs``
    inter-camera epochs, checkpointed every epoch (``resume`` continues after stage 1 or any epoch) and evaluated
    every ``eval-every`` epochs (``metrics.jsonl``); re-clusterings go to ``clustering.jsonl``."""
    output_dir = Path(config.output_dir)
    checkpoint = open_run(config)
    dataset = load_dataset(config)
    check_dataset(dataset, protocol=config.eval_protocol)
    device = resolve_device(config.device)
    records = unlabeled(dataset.train)
    camids = np.array([r.camid for r in records])
    log = ClusteringLog(output_dir / CLUSTERING_FILE, np.array([r.pid for r in dataset.train]))
    write_config_snapshot(config, output_dir)
    if checkpoint is None:
        (output_dir / CLUSTERING_FILE).unlink(missing_ok=True)
        local = intra_camera_stage(records, config, device, log)
    else:
        local = np.asarray(checkpoint["local_labels"])
    seed_everything(derived_seed(config.seed, 0, 3))
    model = build_calr_model(config).to(device)
    cameras = sorted(set(camids.tolist()))
    alignment = CameraAlignment(CameraClassifier(model.feat_dim, len(cameras), config.calr_align_hidden,
                                                 config.calr_align_alpha).to(device),
                                {c: i for i, c in enumerate(cameras)})
    optimizer = make_optimizer([p for p in [*model.parameters(), *alignment.head.parameters()] if p.requires_grad],
                               config)
    done = _restore(checkpoint, output_dir / CHECKPOINT, model, alignment.head, optimizer) if checkpoint else 0
    for name in (METRICS_FILE, CLUSTERING_FILE):  # intra-camera records have no 'epoch': kept
        keep_records_up_to(output_dir / name, "epoch", done)
    if checkpoint is None:
        _save(output_dir, 0, model, alignment.head, optimizer, local, config, None)
    return _inter_camera_stage(config, dataset, records, camids, local, model, alignment, optimizer, done, log,
                               device)


def _inter_camera_stage(config, dataset, records, camids, local, model, alignment, optimizer, done, log,
                        device) -> list[dict]:
    """Epochs ``done+1 .. epochs`` of stage 2; returns the evaluation records written."""
    output_dir = Path(config.output_dir)
    records_out = []
    if evaluation_missing(output_dir, "epoch", done, config.epochs, config.eval_every):
        records_out.append(_evaluate(model, dataset, config, device, done, None))
    progress = StepProgress("epoch", config.epochs, start=done)
    for epoch in range(done, config.epochs):
        seed_everything(derived_seed(config.seed, epoch))
        set_lr(optimizer, learning_rate(epoch, config))
        began = time.monotonic()
        features = embed_all(model, records, config, device)
        labels, clustering = inter_camera_labels(features, local, camids, epoch, config, log)
        stats, _ = clustering_epoch(model, records, labels, features, optimizer, config, device,
                                 seed=derived_seed(config.seed, epoch, 4),
                                 alignment=alignment if epoch < config.calr_align_epochs else None,
                                 desc=f"epoch {epoch + 1}/{config.epochs}")
        train_loss = stats.get("memory", 0.0) + stats.get("camera", 0.0) if stats else None
        _save(output_dir, epoch + 1, model, alignment.head, optimizer, local, config, train_loss)
        print(progress.line(epoch + 1, {"loss": train_loss, "clusters": int(labels.max()) + 1,
                                        "lr": learning_rate(epoch, config),
                                        "img/s": stats.get("num_examples", 0) / (time.monotonic() - began)}),
              flush=True)
        if is_evaluation_step(epoch + 1, config.epochs, config.eval_every):
            records_out.append(_evaluate(model, dataset, config, device, epoch + 1, train_loss, clustering))
    return records_out


def _save(output_dir: Path, epoch: int, model, head, optimizer, local: np.ndarray, config: Config,
          train_loss: float | None) -> None:
    atomic_save({"epoch": epoch, "model": model.state_dict(), "camera_head": head.state_dict(),
                 "optimizer": optimizer.state_dict(), "local_labels": torch.from_numpy(local),
                 "train_loss": train_loss, "method": "calr", "config": config.to_run_config()},
                output_dir / CHECKPOINT)


def _restore(state: dict, path: Path, model, head, optimizer) -> int:
    """Load a CALR checkpoint ``state`` (read from ``path``); returns its inter-camera epoch."""
    if "local_labels" not in state:
        raise ValueError(f"{path} is not a CALR checkpoint (no local labels); start a new run in another output-dir")
    load_weights(model, state["model"], path)
    head.load_state_dict(state["camera_head"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"])


def _evaluate(model, dataset, config: Config, device: torch.device, epoch: int, train_loss: float | None,
              clustering: dict | None = None) -> dict:
    """Evaluate after inter-camera ``epoch``; append to ``metrics.jsonl`` with the epoch's ``clustering`` record
    (the pseudo-labels it trained on: ``clusters``, ``outliers`` and their quality against the true identities,
    keys prefixed ``pseudo_``)."""
    pseudo = {f"pseudo_{k}": clustering[k] for k in ("clusters", "outliers", "precision", "recall", "fscore",
                                                     "expansion")} if clustering else {}
    record = {"epoch": epoch, **evaluate_model(model, dataset, config, device), "train_loss": train_loss, **pseudo}
    append_jsonl(Path(config.output_dir) / METRICS_FILE, record)
    print(json.dumps(record), flush=True)
    return record
