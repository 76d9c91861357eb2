"""CALR federated by camera: each camera runs CALR's intra-camera stage on its own images (common/calr.py).

Per round on camera c, for each of ``local-epochs`` epochs: extract the camera's features with the current
model, cluster them (Jaccard distance + DBSCAN), build a cluster memory from them and train one P×K pass
against it.  The server averages the shared weights (backbone + GeM + BNNeck).

The inter-camera stage needs features of every camera in one place.  What stands in for it:

- ``calr-share-centroids = false`` (default): **only the shared weights and scalar metrics leave a camera**
  (losses, the number of local clusters, the share of outliers).  Pseudo-labels, features, centroids and images
  stay on the camera and nothing private is kept between rounds.  There is no global clustering, refinement or
  camera alignment: cross-camera association comes only from the averaged backbone, which every camera's
  next clustering starts from;
- ``calr-share-centroids = true`` (a privacy cost): after its last local epoch a camera also uploads its
  L2-normalised local cluster centroids (C_c, D) float32, the means of its own images' features per cluster.
  The server clusters all cameras' centroids as CALR clusters features globally (Infomap on their kNN graph,
  a cluster needs >= 2 centroids), refines each cluster as CALR does with the centroid as its own local cluster
  (the pivot's camera keeps only the pivot, every other centroid of that camera is dropped with the self-paced
  probability of round r), and keeps the clusters that span >= 2 cameras.  It sends every camera the
  normalised mean of each such cluster (G, D) and, per uploaded centroid, its camera and cluster.  In the next
  round a camera maps its previous round's local clusters (kept on the camera) to those cross-camera clusters
  and adds CE over a memory of the G centroids for its images in them: its images are pulled towards the
  same person's centroid seen by other cameras and away from the other people's.  The server's clusters are
  not checkpointed: a resumed run trains its first round without them.

No identity label is read (the records are ``unlabeled``).
"""

from __future__ import annotations

import numpy as np
import torch

from common.calr import (
    CrossCameraTargets,
    clustering_epoch,
    drop_probability,
    embed_all,
    intra_camera_labels,
    refine,
    unlabeled,
)
from common.clustering import centroids, cluster_stats, infomap_clusters, relabel
from common.config import Config
from common.engine import derived_seed, make_optimizer, seed_everything, set_lr
from common.methods import register
from common.methods.base import LocalJob, LocalResult, Method, StateDict
from common.models.calr import CALRModel, build_calr_model
from common.models.cluster_memory import ClusterMemory

CENTROIDS = "centroids"  # upload: a camera's local cluster centroids (C_c, D)
# download: cross-camera centroids (G, D); per uploaded centroid (M,): its camera and cross-camera cluster (−1 none)
CROSS_CENTROIDS, CENTROID_CAMERA, CENTROID_CLUSTER = "cross_centroids", "centroid_camera", "centroid_cluster"
LOCAL_LABELS = "labels"  # private: the local clusters (N,) whose centroids were uploaded


@register("calr")
class CALR(Method):
    """Federated CALR: local intra-camera clustering and cluster-memory training, averaged backbones; with
    ``calr-share-centroids``, cross-camera clusters of the cameras' centroids formed on the server."""

    def shared_model(self, config: Config) -> CALRModel:
        return build_calr_model(config)

    def upload_keys(self, config: Config) -> set[str]:
        return {CENTROIDS} if config.calr_share_centroids else set()

    def local_round(self, job: LocalJob) -> LocalResult:
        config, device = job.config, job.device
        seed_everything(job.seed)
        model = self.shared_model(config)
        model.load_shared_state(job.shared)
        model.to(device)
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], config)
        set_lr(optimizer, job.lr)
        records = unlabeled(job.partition.records)
        cross = cross_camera_targets(job, config) if config.calr_share_centroids else None
        metrics: dict[str, float] = {}
        for epoch in range(config.local_epochs):
            features = embed_all(model, records, config, device)
            labels = intra_camera_labels(features, config)
            stats, memory = clustering_epoch(model, records, labels, features, optimizer, config, device,
                                             seed=derived_seed(job.seed, epoch),
                                             desc=f"camera {job.partition.camid} round {job.server_round}",
                                             cross=cross)
            counts = cluster_stats(labels)
            metrics = {"loss": stats.get("memory", 0.0), "calr_clusters": float(counts["clusters"]),
                       "calr_outlier_fraction": counts["outlier_fraction"]}
            if config.calr_share_centroids:  # 0 in rounds without cross-camera targets
                metrics["calr_cross_camera"] = stats.get("cross_camera", 0.0)
        upload, private = {}, {}
        if config.calr_share_centroids:
            upload = {CENTROIDS: memory.features.detach().cpu().clone() if memory is not None
                      else torch.zeros(0, model.feat_dim)}
            private = {LOCAL_LABELS: torch.from_numpy(labels if memory is not None else np.full(len(records), -1))}
        return LocalResult(shared={k: v.detach().cpu().clone() for k, v in model.shared_state().items()},
                           private=private, metrics=metrics, num_examples=len(records), upload=upload)

    def combine_uploads(self, config: Config, server_round: int,
                        uploads: list[tuple[int, StateDict]]) -> tuple[StateDict, dict[str, float]]:
        if not config.calr_share_centroids:
            return {}, {}
        centres = torch.cat([upload[CENTROIDS].float() for _, upload in uploads]) if uploads else torch.zeros(0, 0)
        camids = np.concatenate([np.full(len(upload[CENTROIDS]), camid) for camid, upload in uploads]
                                ) if uploads else np.zeros(0, dtype=np.int64)
        labels, dropped = cross_camera_clusters(centres, camids, server_round, config)
        download = {CROSS_CENTROIDS: centroids(centres, labels),
                    CENTROID_CAMERA: torch.from_numpy(camids.astype(np.int64)),
                    CENTROID_CLUSTER: torch.from_numpy(labels)}
        merged = labels >= 0
        return download, {"calr_shared_centroids": float(len(labels)),
                          "calr_cross_camera_clusters": float(labels.max() + 1 if merged.any() else 0),
                          "calr_merged_centroids": float(merged.sum()), "calr_dropped_centroids": float(dropped)}


def cross_camera_clusters(centres: torch.Tensor, camids: np.ndarray, server_round: int,
                          config: Config) -> tuple[np.ndarray, int]:
    """Cross-camera clusters (M,) int64 (−1: none) of the cameras' local centroids ``centres`` (M, D) from
    cameras ``camids`` (M,), and the number of centroids refinement dropped.

    Infomap on their kNN graph (``calr-knn`` capped at M, ``calr-max-distance``; a cluster needs >= 2
    centroids); unless ``calr-refine`` is off, pivot refinement with each centroid as its own local cluster
    and the drop probability of round ``server_round`` of ``num-server-rounds``; then clusters within one camera
    are dropped.  Numbered 0..G−1.
    """
    if len(centres) < 2:
        return np.full(len(centres), -1, dtype=np.int64), 0
    result = infomap_clusters(centres, min(config.calr_knn, len(centres)), config.calr_max_distance,
                              max_outlier_size=1, seed=derived_seed(config.seed, server_round))
    labels, dropped = result.labels, 0
    if config.calr_refine:
        probability = drop_probability(server_round - 1, config.num_server_rounds, config.calr_refine_schedule)
        labels, dropped = refine(labels, result.density, np.arange(len(centres)), camids, probability,
                                 np.random.default_rng(derived_seed(config.seed, server_round, 2)))
    one_camera = [c for c in np.unique(labels[labels >= 0]) if len(np.unique(camids[labels == c])) < 2]
    return relabel(np.where(np.isin(labels, one_camera), -1, labels)), dropped


def cross_camera_targets(job: LocalJob, config: Config) -> CrossCameraTargets | None:
    """This camera's view of the server's cross-camera clusters: its previous local clusters (private state)
    mapped to them.  None in the first round, when the camera's centroids were not in the server's last
    combination, or when no image of it falls in a cross-camera cluster."""
    download, camid = job.download, job.partition.camid
    if not download or LOCAL_LABELS not in job.private:
        return None
    previous = job.private[LOCAL_LABELS].numpy()
    mapping = download[CENTROID_CLUSTER].numpy()[download[CENTROID_CAMERA].numpy() == camid]
    if len(mapping) == 0 or len(mapping) != previous.max() + 1:  # not this camera's last upload
        return None
    labels = np.where(previous >= 0, mapping[np.maximum(previous, 0)], -1)
    if not (labels >= 0).any():
        return None
    memory = ClusterMemory(download[CROSS_CENTROIDS], config.calr_temperature, config.calr_memory_momentum)
    return CrossCameraTargets(memory.to(job.device), labels)
