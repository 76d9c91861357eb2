"""Shared weights on the wire: state dicts ↔ Flower ``ArrayRecord``, and their weighted average."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

StateDict = dict[str, torch.Tensor]


def state_to_arrays(state: StateDict) -> ArrayRecord:
    """``ArrayRecord`` holding every tensor of ``state`` (same keys and order, dtypes preserved)."""
    return ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy()) for k, v in state.items()})


def arrays_to_state(arrays: ArrayRecord) -> StateDict:
    """CPU tensors of an ``ArrayRecord`` (writable copies)."""
    return {k: torch.from_numpy(np.array(a.numpy())) for k, a in arrays.items()}


def signature(state: StateDict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key → (shape, dtype): what a conforming reply must hold."""
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}


def conformity_error(state: StateDict, expected: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> str:
    """Empty when ``state`` has exactly the expected keys, shapes and dtypes; else what is wrong."""
    if set(state) != set(expected):
        extra, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
        return f"keys differ from the shared keys (unexpected {extra[:3]}, missing {missing[:3]})"
    for key, (shape, dtype) in expected.items():
        if tuple(state[key].shape) != shape or state[key].dtype != dtype:
            return f"'{key}' is {tuple(state[key].shape)} {state[key].dtype}, expected {shape} {dtype}"
    return ""


def weighted_average(states: Sequence[StateDict], weights: Sequence[float]) -> StateDict:
    """Σ wᵢ·stateᵢ / Σ wᵢ per key, accumulated in float64 and cast back to each tensor's dtype.

    Floating tensors keep their dtype; integer tensors (BatchNorm's ``num_batches_tracked``)
    get the rounded weighted mean and stay integers.
    """
    if not states or len(states) != len(weights):
        raise ValueError(f"weighted_average: {len(states)} states and {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weighted_average: weights must sum to > 0, got {list(weights)}")
    averaged = {}
    for key, first in states[0].items():
        acc = sum(float(w) * s[key].to(torch.float64) for s, w in zip(states, weights)) / total
        averaged[key] = acc.to(first.dtype) if first.is_floating_point() else acc.round().to(first.dtype)
    return averaged
