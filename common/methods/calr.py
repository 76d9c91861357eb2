"""CALR federated by camera: each camera runs CALR's intra-camera stage on its own images (common/calr.py).

Per round on camera c, for each of ``local-epochs`` epochs: extract the camera's features with the current
model, cluster them (Jaccard distance + DBSCAN), build a cluster memory from them and train one P×K pass
against it.  The server averages the shared weights (backbone + GeM + BNNeck).

What leaves a camera: the shared weights and scalar metrics (losses, the number of local clusters and the
share of outliers).  Pseudo-labels, features, centroids (the memory) and images stay on the camera; the
memory is rebuilt at every re-clustering, so there is no private state to keep between rounds.

The inter-camera stage (global clustering, pivot refinement, camera alignment) needs features from every
camera in one place, so it does not run here: cross-camera association comes only from averaging networks
each trained within one camera.  No identity label is read (the records are ``unlabeled``).
"""

from __future__ import annotations

from common.calr import clustering_epoch, embed_all, intra_camera_labels, unlabeled
from common.clustering import cluster_stats
from common.config import Config
from common.engine import derived_seed, make_optimizer, seed_everything, set_lr
from common.methods import register
from common.methods.base import LocalJob, LocalResult, Method
from common.models.calr import CALRModel, build_calr_model


@register("calr")
class CALR(Method):
    """Federated CALR: local intra-camera clustering and cluster-memory training, averaged backbones."""

    def shared_model(self, config: Config) -> CALRModel:
        return build_calr_model(config)

    def local_round(self, job: LocalJob) -> LocalResult:
        config, device = job.config, job.device
        seed_everything(job.seed)
        model = self.shared_model(config)
        model.load_shared_state(job.shared)
        model.to(device)
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], config)
        set_lr(optimizer, job.lr)
        records = unlabeled(job.partition.records)
        metrics: dict[str, float] = {}
        for epoch in range(config.local_epochs):
            features = embed_all(model, records, config, device)
            labels = intra_camera_labels(features, config)
            stats = clustering_epoch(model, records, labels, features, optimizer, config, device,
                                     seed=derived_seed(job.seed, epoch),
                                     desc=f"camera {job.partition.camid} round {job.server_round}")
            counts = cluster_stats(labels)
            metrics = {"loss": stats.get("memory", 0.0), "calr_clusters": float(counts["clusters"]),
                       "calr_outlier_fraction": counts["outlier_fraction"]}
        return LocalResult(
            shared={k: v.detach().cpu().clone() for k, v in model.shared_state().items()},
            private={}, metrics=metrics, num_examples=len(records))
