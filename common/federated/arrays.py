"""Shared weights on the wire: state dicts ↔ Flower ``ArrayRecord`` (in the ``transport-dtype``), and their checks.

Floating tensors travel in the transport dtype (float32, float16 or bfloat16; 16 bits halve the bytes) and are
widened to float32 on arrival, so training, averaging (in float64, ``common.federated.aggregation``) and the
stored global weights stay in float32; integer tensors (BatchNorm's ``num_batches_tracked``) travel unchanged.
NumPy has no bfloat16, so a bfloat16 tensor travels as an ``Array`` of its raw little-endian bytes
(``stype`` = ``RAW_STYPE``, ``dtype`` = "bfloat16").
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

StateDict = dict[str, torch.Tensor]
# transport-dtype → the dtype floating tensors travel in; "float32" sends them as stored (float32)
TRANSPORT_DTYPES: dict[str, torch.dtype | None] = {"float32": None, "float16": torch.float16,
                                                   "bfloat16": torch.bfloat16}
RAW_STYPE = "raw-bytes"  # Array.stype of bfloat16 tensors


def state_to_arrays(state: StateDict, transport: str = "float32") -> ArrayRecord:
    """``ArrayRecord`` of every tensor of ``state`` (same keys and order): floating tensors in the ``transport``
    dtype (a ``TRANSPORT_DTYPES`` name; "float32" keeps every dtype), integer ones unchanged.

    Raises ``ValueError`` naming the key when a finite value does not fit the transport dtype (float16 ends at 65504).
    """
    dtype = TRANSPORT_DTYPES[transport]
    arrays = {}
    for key, tensor in state.items():
        tensor = tensor.detach().cpu()
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            cast = tensor.to(dtype)
            if not bool((torch.isfinite(cast) | ~torch.isfinite(tensor)).all()):
                raise ValueError(f"'{key}' holds values up to {tensor.abs().max().item():.4g}, beyond what "
                                 f"transport-dtype = {transport} can hold; use bfloat16 or float32")
            tensor = cast
        arrays[key] = _to_array(tensor.contiguous())
    return ArrayRecord(arrays)


def arrays_to_state(arrays: ArrayRecord, widen: bool = False) -> StateDict:
    """CPU tensors (writable copies) of an ``ArrayRecord``; with ``widen``, 16-bit floating tensors become float32."""
    state = {key: _from_array(array) for key, array in arrays.items()}
    return widened(state) if widen else state


def widened(state: StateDict) -> StateDict:
    """``state`` with float16 / bfloat16 tensors cast to float32 (exact), other tensors as they are."""
    return {k: v.float() if v.dtype in (torch.float16, torch.bfloat16) else v for k, v in state.items()}


def _to_array(tensor: torch.Tensor) -> Array:
    if tensor.dtype == torch.bfloat16:
        raw = tensor.view(torch.int16).numpy().astype("<i2").tobytes()
        return Array(dtype="bfloat16", shape=tuple(tensor.shape), stype=RAW_STYPE, data=raw)
    return Array(tensor.numpy())


def _from_array(array: Array) -> torch.Tensor:
    """The tensor an ``Array`` holds; ``ValueError`` when a raw bfloat16 array's bytes do not fit its shape."""
    if array.stype == RAW_STYPE and array.dtype == "bfloat16":
        bits = np.frombuffer(array.data, dtype="<i2").astype(np.int16)
        if bits.size != int(np.prod(array.shape)):
            raise ValueError(f"{len(array.data)} bytes do not hold a bfloat16 array of shape {tuple(array.shape)}")
        return torch.from_numpy(bits.copy()).view(torch.bfloat16).reshape(tuple(array.shape))
    return torch.from_numpy(np.array(array.numpy()))


def signature(state: StateDict, transport: str | None = None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key → (shape, dtype): what a conforming state holds; with ``transport``, floating dtypes are the
    transport dtype (what a conforming ``arrays_to_state`` of a message holds)."""
    def dtype(v: torch.Tensor) -> torch.dtype:
        wire = TRANSPORT_DTYPES[transport] if transport else None
        return wire if wire is not None and v.is_floating_point() else v.dtype

    return {k: (tuple(v.shape), dtype(v)) for k, v in state.items()}


def conformity_error(state: StateDict, expected: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> str:
    """Empty when ``state`` has exactly the expected keys, shapes and dtypes; else what is wrong."""
    if set(state) != set(expected):
        extra, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
        return f"keys differ from the shared keys (unexpected {extra[:3]}, missing {missing[:3]})"
    for key, (shape, dtype) in expected.items():
        if tuple(state[key].shape) != shape or state[key].dtype != dtype:
            return f"'{key}' is {tuple(state[key].shape)} {state[key].dtype}, expected {shape} {dtype}"
    return ""
