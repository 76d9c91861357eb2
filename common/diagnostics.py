"""What a trained PEM does to features: is F⁺ pose, is F⁻ identity, do swapped positives keep their identity?

``pem_diagnostics(config, shared)`` takes the global weights of a PEM run (backbone + BNNeck + PEM, e.g. a
``checkpoint.pt``'s ``model``) and, on the test split (query + gallery) with its pose vectors, measures:

- ``attention_*``: mean of the channel attention A (the share of F routed to F⁺), its spread over channels
  (``attention_channel_std``: 0.5 for a binary channel mask) and over images (``attention_image_std``: 0 for
  a fixed mask that ignores the input, > 0 when PEM routes channels differently for different images);
- ``pose_corr_*``: Pearson correlation, over pairs of different identities with valid poses, between
  the pose similarity S_z and the cosine similarity of F, F⁺ and F⁻ (PKD asks for high corr of F⁺);
- ``mAP_*``: retrieval mAP with F, F⁻ and F⁺ (pooled, before the BNNeck; cosine);
- ``train_pose_spread``: the std of S_z over pairs of different identities within one camera of the
  training split, averaged over cameras: the signal PKD gets (swap partners and PKD pairs are always
  from the same camera), against ``train_pose_spread_all`` over all cameras together;
- ``swap_*``: for every image i and a random image δ(i) of another identity, the synthetic positive
  F⁻_i + F⁺_δ(i): its cosine to F_i, and whether its nearest identity centroid (mean F per identity
  of the test split) is i's (``swap_keeps_id``) or δ(i)'s (``swap_takes_partner_id``).  Stage 3 trains
  with these as positives of i, so a low ``swap_keeps_id`` means noisy positives.

``camfed experiment`` runs it on every finished PEM run and tabulates the results.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from common.config import Config
from common.data.loading import load_dataset, test_loader
from common.evaluation import evaluate_features
from common.methods import get_method
from common.methods.pem import pose_file, record_pose_vectors
from common.models.pem import recombine, swap_partners


@torch.inference_mode()
def pooled_features(model, loader) -> torch.Tensor:
    """Pooled backbone features F (N, d) of every test image, in loader order."""
    return torch.cat([model.pool(model.feature_map(images)) for images, *_ in loader])


def pose_correlations(z: torch.Tensor, valid: torch.Tensor, pids: torch.Tensor,
                      parts: dict[str, torch.Tensor]) -> dict[str, float]:
    """Pearson corr of S_z with each part's cosine-similarity matrix, over valid different-identity pairs."""
    zn = F.normalize(z, dim=1)
    mask = valid[:, None] & valid[None, :] & (pids[:, None] != pids[None, :])
    target = (zn @ zn.t())[mask]
    out = {}
    for name, x in parts.items():
        xn = F.normalize(x, dim=1)
        sim = (xn @ xn.t())[mask]
        out[f"pose_corr_{name}"] = float(torch.corrcoef(torch.stack([target, sim]))[0, 1])
    return out


def linear_pose_r2(train_x: torch.Tensor, train_z: torch.Tensor, test_x: torch.Tensor, test_z: torch.Tensor,
                   penalties: tuple[float, ...] = (1.0, 10.0, 100.0, 1e3, 1e4)) -> float:
    """How much pose a feature carries linearly: R² on ``test`` of ridge regression from features (N, D) to pose
    vectors (N, P), fitted on ``train`` (disjoint identities), best over ``penalties`` (on standardised features;
    chosen on ``test``, so an optimistic estimate).

    1 = pose is a linear function of the features, 0 = no better than the mean pose.  An upper bound of sorts for
    PEM: channel attention re-weights F, so F⁺ cannot carry pose that F does not."""
    mean, std = train_x.double().mean(0), train_x.double().std(0) + 1e-6
    a, b = (train_x.double() - mean) / std, (test_x.double() - mean) / std
    z_mean = train_z.double().mean(0)
    gram, target = a.t() @ a, a.t() @ (train_z.double() - z_mean)
    total = ((test_z.double() - test_z.double().mean(0)) ** 2).sum()
    scores = []
    for penalty in penalties:
        weights = torch.linalg.solve(gram + penalty * torch.eye(len(gram), dtype=gram.dtype), target)
        scores.append(1.0 - float(((b @ weights + z_mean - test_z.double()) ** 2).sum() / total))
    return max(scores)


def pose_spread(z: torch.Tensor, valid: torch.Tensor, pids: torch.Tensor, camids: torch.Tensor) -> dict[str, float]:
    """Std of pose cosine similarity over valid different-identity pairs: per camera (mean) and overall."""
    zn = F.normalize(z, dim=1)

    def spread(rows: torch.Tensor) -> float:
        rows = rows[valid[rows]]
        pairs = pids[rows][:, None] != pids[rows][None, :]
        return float((zn[rows] @ zn[rows].t())[pairs].std())

    cameras = [spread(torch.nonzero(camids == c).flatten()) for c in torch.unique(camids)]
    return {"train_pose_spread": float(np.mean(cameras)), "train_pose_spread_all": spread(torch.arange(len(z)))}


def swap_statistics(features: torch.Tensor, plus: torch.Tensor, minus: torch.Tensor, pids: torch.Tensor,
                    seed: int) -> dict[str, float]:
    """Where the synthetic positives F⁻_i + F⁺_δ(i) land relative to the identity centroids."""
    delta = swap_partners(pids, generator=torch.Generator().manual_seed(seed))
    swapped = recombine(minus, plus[delta])
    ids, index = torch.unique(pids, return_inverse=True)
    centroids = torch.zeros(len(ids), features.shape[1]).index_add_(0, index, F.normalize(features, dim=1))
    nearest = (F.normalize(swapped, dim=1) @ F.normalize(centroids, dim=1).t()).argmax(dim=1)
    return {
        "swap_cosine_to_anchor": float(F.cosine_similarity(swapped, features).mean()),
        "swap_keeps_id": float((nearest == index).float().mean()),
        "swap_takes_partner_id": float((nearest == index[delta]).float().mean()),
        "anchor_keeps_id": float(((F.normalize(features, dim=1) @ F.normalize(centroids, dim=1).t()).argmax(1)
                                  == index).float().mean()),
    }


@torch.inference_mode()
def pem_diagnostics(config: Config, shared: dict[str, torch.Tensor]) -> dict[str, float]:
    """The measurements of the module docstring for PEM global weights ``shared`` (CPU tensors)."""
    model = get_method("pem").global_model(config, shared).eval()
    dataset = load_dataset(config)
    records = dataset.query + dataset.gallery
    features = pooled_features(model, test_loader(records, config))
    attention = model.pem(features)
    plus, minus = model.pem.decouple(features)
    path = pose_file(config, dataset.root)
    z, valid = record_pose_vectors(config, path, records, dataset.root)
    pids = torch.as_tensor([r.pid for r in records])
    camids = np.asarray([r.camid for r in records])
    parts = {"F": features, "Fminus": minus, "Fplus": plus}
    nq = len(dataset.query)
    result = {"images": len(records), "valid_pose": float(valid.float().mean()),
              "attention_mean": float(attention.mean()), "attention_channel_std": float(attention.mean(0).std()),
              "attention_image_std": float(attention.std(0).mean())}
    result.update(pose_correlations(z, valid, pids, parts))
    for name, x in parts.items():
        metrics = evaluate_features(x[:nq], x[nq:], pids[:nq].numpy(), pids[nq:].numpy(), camids[:nq], camids[nq:])
        result[f"mAP_{name}"] = float(metrics["mAP"])
    result.update(swap_statistics(features, plus, minus, pids, config.seed))
    train_z, train_valid = record_pose_vectors(config, path, dataset.train, dataset.root)
    result.update(pose_spread(train_z, train_valid, torch.as_tensor([r.pid for r in dataset.train]),
                              torch.as_tensor([r.camid for r in dataset.train])))
    return result
