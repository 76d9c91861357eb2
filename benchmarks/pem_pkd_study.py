"""Can PKD make F⁺ pose-aware on a given backbone's features?  PEM trained alone, without the federation.

PEM's attention depends only on the globally pooled feature and PKD compares pooled F⁺, so PKD can be studied on
pooled features (N, d) of a frozen backbone: this script extracts them once for the training and test splits,
trains a fresh PEM on P×K batches drawn within each camera (as each camera does in a round), once per PKD form,
and reports on the test split how well F⁺'s similarities follow pose similarities (``pose_corr_*``, as in
``common.diagnostics``), the attention's spread, and the linear-probe ceiling ``linear_pose_r2`` of F itself.
SCM (``--with-scm``) runs on pooled features here (the federation applies it to maps).

Usage: PYTHONPATH=. python benchmarks/pem_pkd_study.py --run-config configs/experiment-market-dev.toml \
           [--checkpoint RUN/checkpoint.pt] [--epochs 10] [--lr 1e-3,1e-2] [--with-scm]
Prints one JSON object per PKD form and learning rate and writes them to --out (JSON) when given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from common.config import load_config
from common.data.dataset import PKSampler
from common.data.loading import load_dataset, test_loader
from common.diagnostics import linear_pose_r2, pooled_features, pose_correlations
from common.methods import get_method
from common.methods.pem import attention_spread, pem_losses, pk_batches, pose_file, record_pose_vectors
from common.models.pem import PoseExtractionModule

FORMS = {"paper": {"pem_pkd_centre": False}, "centred": {"pem_pkd_centre": True}}


def split_features(config, model, records, root, path):
    """Pooled features (N, d), pose vectors (N, 34), validity (N,), identities and cameras (N,) of ``records``."""
    features = pooled_features(model, test_loader(records, config)).float()
    z, valid = record_pose_vectors(config, path, records, root)
    return (features, z, valid, torch.as_tensor([r.pid for r in records]),
            torch.as_tensor([r.camid for r in records]))


def fresh_pem(config, channels: int, seed: int) -> PoseExtractionModule:
    """An untrained PEM over ``channels`` features, initialised from ``seed``."""
    torch.manual_seed(seed)
    return PoseExtractionModule(channels, config.pem_reduction)


def train_pem(config, train, epochs: int, lr: float, seed: int) -> PoseExtractionModule:
    """A fresh PEM trained with ``config``'s PEM losses on camera-wise P×K batches of pooled features."""
    features, z, valid, pids, camids = train
    pem = fresh_pem(config, features.shape[1], seed)
    optimizer = torch.optim.SGD(pem.parameters(), lr=lr, momentum=config.momentum)
    generator = torch.Generator().manual_seed(seed)
    cameras = [torch.nonzero(camids == c).flatten() for c in torch.unique(camids)]
    samplers = [PKSampler(pids[rows].tolist(), config.batch_size, config.num_instances, seed=seed)
                for rows in cameras]
    for epoch in range(epochs):
        for rows, sampler in zip(cameras, samplers):
            sampler.set_epoch(epoch)
            for batch in pk_batches(sampler, config.batch_size):
                index = rows[batch]
                terms = pem_losses(pem, features[index], pids[index], z[index], valid[index], config, generator)
                optimizer.zero_grad(set_to_none=True)
                (terms["pose"] + terms["cycle"]).backward()
                optimizer.step()
    return pem.eval()


@torch.no_grad()
def report(pem: PoseExtractionModule, test) -> dict[str, float]:
    features, z, valid, pids, _ = test
    attention = pem(features)
    plus, minus = pem.decouple(features)
    parts = {"F": features, "Fplus": plus, "Fminus": minus, "Fplus_centred": plus - plus[valid].mean(0)}
    return {**pose_correlations(z, valid, pids, parts), **attention_spread(attention)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-config", default="configs/experiment-market-dev.toml")
    parser.add_argument("--checkpoint", default="", help="global weights of a run (default: the initial model)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", default="1e-3", help="PEM learning rates to try, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--with-scm", action="store_true", help="train with L_pose + L_cyc (default: PKD only)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    config = load_config(args.run_config, method="pem", pem_variant="pkd+scm" if args.with_scm else "pkd")
    method = get_method("pem")
    shared = (torch.load(args.checkpoint, map_location="cpu")["model"] if args.checkpoint
              else method.initial_shared_state(config))
    model = method.global_model(config, shared).eval()
    dataset = load_dataset(config)
    path = pose_file(config, dataset.root)
    began = time.perf_counter()
    train = split_features(config, model, dataset.train, dataset.root, path)
    test = split_features(config, model, dataset.query + dataset.gallery, dataset.root, path)
    ceiling = linear_pose_r2(train[0][train[2]], train[1][train[2]], test[0][test[2]], test[1][test[2]])
    print(json.dumps({"features_seconds": round(time.perf_counter() - began, 1), "train": len(train[0]),
                      "test": len(test[0]), "linear_pose_r2_F": round(ceiling, 4)}), flush=True)
    untrained = fresh_pem(config, train[0].shape[1], args.seed).eval()
    results = {"linear_pose_r2_F": ceiling, "untrained": report(untrained, test)}
    for form, overrides in FORMS.items():
        for lr in map(float, args.lr.split(",")):
            trained = train_pem(dataclasses.replace(config, **overrides), train, args.epochs, lr, args.seed)
            results[f"{form} lr {lr:g}"] = measured = report(trained, test)
            print(json.dumps({"form": form, "lr": lr, **{k: round(v, 4) for k, v in measured.items()}}), flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"args": vars(args), **results}, handle, indent=2)


if __name__ == "__main__":
    main()
