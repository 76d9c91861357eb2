"""Differential privacy on the camera: its update is clipped and noised before it leaves the node.

With ``dp-clip-norm`` C > 0 a camera's update Δ = (its trained shared weights) − (the global weights it received),
taken over every floating tensor of the shared state, is scaled to an L2 norm of at most C; with
``dp-noise-multiplier`` σ > 0 it then adds Gaussian noise N(0, (σC)²) to every coordinate and sends
global + Δ.  Each release of a camera's weights is then the Gaussian mechanism with sensitivity C (McMahan,
Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models", ICLR 2018,
https://arxiv.org/abs/1710.06963), protecting the camera's images from whoever sees its reply, the server
included.  Integer tensors (BatchNorm's ``num_batches_tracked``, a step count) are sent as trained, and
BatchNorm running variances are clamped at 0 after the noise (post-processing does not weaken the guarantee).
The noise comes from the operating system's entropy, never from ``seed``, which the server knows: runs
with noise are not reproducible, by design.

Why not Flower's DP tools (flwr 1.41): ``fixedclipping_mod`` / ``LocalDpMod`` clip the whole reply record,
so a BatchNorm step counter (a 0-d int64 array whose update is the number of local steps) enters the norm
and scales every weight's update towards 0 while itself staying unclipped; as mods they see the reply after
it was cast to the transport dtype; and ``LocalDpMod`` sets its noise from (ε, δ) by the classical bound
that holds for ε < 1 only.  The server-side wrappers (``DifferentialPrivacyClientSideFixedClipping``)
add the noise on the server, which must then be trusted; their ``aggregate_train`` skips a round when any
reply is an error, undoing the fault tolerance of ``CameraFedAvg``, and size the noise for an unweighted
mean over a fixed number of cameras, where ``CameraFedAvg`` weights by images and closes rounds at a timeout.
"""

from __future__ import annotations

import secrets

import torch

from common.config import Config

StateDict = dict[str, torch.Tensor]


def privatize(received: StateDict, trained: StateDict, config: Config,
              generator: torch.Generator | None = None) -> StateDict:
    """``trained`` with its update from ``received`` (same keys) clipped to ``dp-clip-norm`` and noised by
    ``dp-noise-multiplier``; ``trained`` itself when ``dp-clip-norm`` = 0.  ``generator``: for tests only."""
    if not config.dp_clip_norm:
        return trained
    floating = [k for k, v in trained.items() if v.is_floating_point()]
    update = {k: trained[k].to(torch.float64) - received[k].to(torch.float64) for k in floating}
    norm = float(torch.sqrt(sum((u * u).sum() for u in update.values())))
    scale = min(1.0, config.dp_clip_norm / norm) if norm > 0 else 1.0
    std = config.dp_noise_multiplier * config.dp_clip_norm
    if generator is None:
        generator = torch.Generator().manual_seed(secrets.randbits(63))
    result = dict(trained)
    for key in floating:
        noise = torch.randn(update[key].shape, generator=generator, dtype=torch.float64) * std if std else 0.0
        value = received[key].to(torch.float64) + update[key] * scale + noise
        if key.endswith("running_var"):
            value = value.clamp(min=0.0)
        result[key] = value.to(trained[key].dtype)
    return result
