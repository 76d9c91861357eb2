"""How the server combines the cameras' shared weights (config key ``aggregation``).

- ``mean``: Σ wᵢ·stateᵢ / Σ wᵢ with wᵢ the camera's number of training images (FedAvg).
- ``median``: the coordinate-wise median over cameras (an even count averages the two middle values).
- ``trimmed-mean``: per coordinate, drop the ⌊trim-fraction·n⌋ largest and as many smallest values of the n
  cameras and average the rest.

The robust rules (median and trimmed mean; Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed
Learning: Towards Optimal Statistical Rates", ICML 2018, https://proceedings.mlr.press/v80/yin18a.html) give
every camera one vote: the number of images is reported by the camera itself, so a faulty or hostile camera
could claim any weight, and a rule meant to bound its influence cannot trust it.

Everything is accumulated in float64 and cast back to each tensor's dtype; integer tensors (BatchNorm's
``num_batches_tracked``) get the rounded result and stay integers.

Krum (Blanchard et al., NeurIPS 2017) is not offered: it keeps one camera's weights (or, as Multi-Krum, an
unweighted mean of a few), so each round would throw away most cameras' images, which here are different
viewpoints rather than samples of one distribution; it ignores the sample weights; and it needs
n > 2f + 2 cameras to tolerate f faulty ones, i.e. at least 5 cameras for one, more than the 4 of the demo.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from common.config import CHOICES

StateDict = dict[str, torch.Tensor]


def aggregate(states: Sequence[StateDict], weights: Sequence[float], rule: str = "mean",
              trim_fraction: float = 0.0) -> StateDict:
    """Combine ``states`` (same keys, shapes, dtypes) by ``rule``; ``weights`` (one per state, > 0) count for
    ``mean`` only, ``trim_fraction`` in [0, 0.5) for ``trimmed-mean`` only."""
    if not states or len(states) != len(weights):
        raise ValueError(f"aggregate: {len(states)} states and {len(weights)} weights")
    if rule == "mean":
        return weighted_average(states, weights)
    if rule == "median":
        return trimmed_mean(states, (len(states) - 1) // 2)
    if rule == "trimmed-mean":
        return trimmed_mean(states, trimmed_count(len(states), trim_fraction))
    raise ValueError(f"aggregate: unknown rule {rule!r}; expected one of {CHOICES['aggregation']}")


def trimmed_count(cameras: int, trim_fraction: float) -> int:
    """How many values ``trimmed-mean`` drops at each end of ``cameras`` values: ⌊trim_fraction·n⌋, keeping ≥ 1."""
    return min(math.floor(trim_fraction * cameras), (cameras - 1) // 2)


def weighted_average(states: Sequence[StateDict], weights: Sequence[float]) -> StateDict:
    """Σ wᵢ·stateᵢ / Σ wᵢ per key, accumulated in float64 and cast back to each tensor's dtype."""
    if not states or len(states) != len(weights):
        raise ValueError(f"weighted_average: {len(states)} states and {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weighted_average: weights must sum to > 0, got {list(weights)}")
    return {key: _cast_like(sum(float(w) * s[key].to(torch.float64) for s, w in zip(states, weights)) / total, first)
            for key, first in states[0].items()}


def trimmed_mean(states: Sequence[StateDict], trim: int) -> StateDict:
    """Per coordinate: the mean of the n values left after dropping the ``trim`` smallest and ``trim`` largest
    (``trim`` = (n − 1) // 2 is the median)."""
    n = len(states)
    if not 0 <= trim <= (n - 1) // 2:
        raise ValueError(f"trimmed_mean: cannot drop {trim} of {n} values at each end")
    result = {}
    for key, first in states[0].items():
        ordered = torch.stack([s[key].to(torch.float64) for s in states]).sort(dim=0).values  # (n, *shape)
        result[key] = _cast_like(ordered[trim:n - trim].mean(dim=0), first)
    return result


def _cast_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` (float64) in ``like``'s dtype; integer dtypes are rounded first."""
    return value.to(like.dtype) if like.is_floating_point() else value.round().to(like.dtype)
