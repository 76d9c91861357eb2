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

``private_reply`` is what a camera sends: its clipped and noised weights, and its pre-clip update norm (and
whether it was clipped) for its reply's metrics (``report-update-norm``): a diagnostic for choosing C, sent
without noise, so not covered by the guarantee.
``gaussian_epsilon`` is the accountant: the exact ε of ``releases`` Gaussian releases at a given δ.
"""

from __future__ import annotations

import math
import secrets

import torch

from common.config import Config

StateDict = dict[str, torch.Tensor]


def private_reply(received: StateDict, trained: StateDict, config: Config,
                  generator: torch.Generator | None = None) -> tuple[StateDict, dict[str, float]]:
    """What a camera sends, from one computation of its update ``trained − received`` (same keys):

    - the weights: ``trained`` with that update clipped to ``dp-clip-norm`` and noised by ``dp-noise-multiplier``;
      ``trained`` itself when ``dp-clip-norm`` = 0;
    - the reply metrics about the update before clipping and noise (``report-update-norm``; else {}): see
      ``_report``.

    ``generator``: for tests only."""
    if not config.dp_clip_norm and not config.report_update_norm:
        return trained, {}
    update = _update(received, trained)
    norm = _norm(update)
    report = _report(norm, config) if config.report_update_norm else {}
    return (_clip_and_noise(received, trained, update, norm, config, generator) if config.dp_clip_norm
            else trained), report


def _clip_and_noise(received: StateDict, trained: StateDict, update: StateDict, norm: float, config: Config,
                    generator: torch.Generator | None) -> StateDict:
    """``received`` + ``update`` (of L2 norm ``norm``) clipped to ``dp-clip-norm``, plus Gaussian noise of std
    ``dp-noise-multiplier`` · ``dp-clip-norm`` per coordinate, in ``trained``'s dtypes."""
    scale = min(1.0, config.dp_clip_norm / norm) if norm > 0 else 1.0
    std = config.dp_noise_multiplier * config.dp_clip_norm
    if generator is None:
        generator = torch.Generator().manual_seed(secrets.randbits(63))
    result = dict(trained)
    for key in update:
        noise = torch.randn(update[key].shape, generator=generator, dtype=torch.float64) * std if std else 0.0
        value = received[key].to(torch.float64) + update[key] * scale + noise
        if key.endswith("running_var"):
            value = value.clamp(min=0.0)
        result[key] = value.to(trained[key].dtype)
    return result


def _update(received: StateDict, trained: StateDict) -> StateDict:
    """trained − received in float64, for every floating tensor (the update that DP clips)."""
    return {k: trained[k].to(torch.float64) - received[k].to(torch.float64)
            for k, v in trained.items() if v.is_floating_point()}


def _norm(update: StateDict) -> float:
    return float(torch.sqrt(sum(((u * u).sum() for u in update.values()), torch.zeros((), dtype=torch.float64))))


def update_norm(received: StateDict, trained: StateDict) -> float:
    """The L2 norm of the update ``trained − received`` over all floating tensors together (what ``private_reply``
    clips to ``dp-clip-norm``)."""
    return _norm(_update(received, trained))


def _report(norm: float, config: Config) -> dict[str, float]:
    """``update-norm``, and with ``dp-clip-norm`` > 0 ``update-clipped`` (1.0 when the norm exceeded it, else 0.0).

    These scalars are sent as they are: with DP on they are not private (outside the (ε, δ) of the weights)."""
    report = {"update-norm": norm}
    if config.dp_clip_norm:
        report["update-clipped"] = float(norm > config.dp_clip_norm)  # exactly when _clip_and_noise scales it
    return report


def gaussian_delta(epsilon: float, mu: float) -> float:
    """δ(ε) of a Gaussian mechanism whose sensitivity is ``mu`` noise standard deviations, exactly:
    Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2) (Balle & Wang, "Improving the Gaussian Mechanism for Differential Privacy:
    Analytical Calibration and Optimal Denoising", ICML 2018; μ-GDP in Dong, Roth, Su, "Gaussian Differential
    Privacy", JRSS-B 2022)."""
    from scipy.special import log_ndtr

    return math.exp(log_ndtr(-epsilon / mu + mu / 2)) - math.exp(epsilon + log_ndtr(-epsilon / mu - mu / 2))


def gaussian_epsilon(noise_multiplier: float, releases: int, delta: float, sensitivity: float = 1.0) -> float:
    """The smallest ε such that ``releases`` Gaussian releases, each with noise std ``noise_multiplier``·C and
    sensitivity ``sensitivity``·C, are (ε, δ)-DP.  Exact, without subsampling: k releases of a μ-GDP mechanism
    compose to √k·μ-GDP, μ = sensitivity / noise_multiplier (Dong, Roth, Su).

    For a camera's replies in camfed (every round, all its images, no sampling): ``sensitivity`` = 1 compares
    its clipped update with no update (add / remove, as DP-FedAvg papers count), 2 with the update of any other
    images of the camera (replace: the honest bound for replies the server sees one by one).  ∞ without noise."""
    if not 0 < delta < 1 or releases < 1 or sensitivity <= 0:
        raise ValueError(f"gaussian_epsilon: need 0 < delta < 1, releases >= 1, sensitivity > 0 (got {delta}, "
                         f"{releases}, {sensitivity})")
    if noise_multiplier <= 0:
        return math.inf
    from scipy.optimize import brentq

    mu = math.sqrt(releases) * sensitivity / noise_multiplier
    if gaussian_delta(0.0, mu) <= delta:
        return 0.0
    high = 1.0
    while gaussian_delta(high, mu) > delta:
        high *= 2
    return float(brentq(lambda e: gaussian_delta(e, mu) - delta, 0.0, high, xtol=1e-10, rtol=1e-12))
