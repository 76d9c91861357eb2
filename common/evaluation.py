"""ReID evaluation: feature extraction, distances, CMC / mAP / mINP.

Protocol (Market-1501 / MSMT17, as torchreid's ``evaluate_rank``): each query ranks the whole
gallery by ascending distance, gallery items with the query's pid AND camera are dropped,
queries left without a true match are skipped. AP is non-interpolated (mean precision at each
true match), CMC@k is the fraction of valid queries with a true match in the top k, mINP is
the mean of (number of true matches) / (rank of the last true match).

Cloth-changing protocols (``protocol``, with per-image clothes ids; docs/cloth-changing.md): a
same-pid gallery item is a true match when ``true_match`` says so and is dropped otherwise, never
counted as a false match.  ``standard``: other camera; ``cloth-changing``: other camera and other
clothes (LTCC's cloth-changing setting, Qian et al., "Long-Term Cloth-Changing Person
Re-identification", ACCV 2020, arXiv:2005.12633, as the FIRe² authors evaluate it:
github.com/QizaoWang/FIRe-CCReID, evaluate/metrics_for_cc.py); ``same-clothes``: other camera and
the same clothes (PRCC's same-clothes test when the query holds B and C and the gallery A).

Ties: items at exactly equal distance are ordered by gallery index (as a stable sort would).
torchreid's ``np.argsort`` (quicksort) leaves the order of ties unspecified; without ties the
results are identical.

Algorithm (no row is ever sorted): per block of query rows, every gallery item gets a bucket
on a uniform grid spanning the query's true-match distances (monotone in the distance); a
per-row histogram gives the number of items in buckets below each true match, and only the
few items sharing a bucket with a true match are ordered exactly. Time O(Q·G), extra memory
O(block) (about 50 MiB).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from common.config import CHOICES

METRICS = ("cosine", "euclidean")
PROTOCOLS = CHOICES["eval_protocol"]  # standard, cloth-changing, same-clothes
_BLOCK_ELEMENTS = 1 << 22  # distance entries ranked at once
_FEATURE_CHUNK_ELEMENTS = 1 << 25  # distance entries computed per matmul (128 MiB)
_MAX_BUCKETS = 1 << 24  # bucket ids per block (rows x width) stay exact in float32 below this


# --------------------------------------------------------------------------- features


def extract_features(model: torch.nn.Module, loader, device: torch.device | str,
                     flip: bool = False) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Run ``model`` in eval mode over ``loader`` (batches ``(images, pids, camids, *rest)``).

    Returns features (N, D) float32 on CPU, NOT normalised (the distances normalise), pids (N,)
    int64 and camids (N,) int64. ``flip=True`` gives f(x) + f(x flipped left-right).
    The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    feats, pids, camids = [], [], []
    with torch.inference_mode():
        for images, batch_pids, batch_camids, *_ in loader:
            images = images.to(device)
            f = model(images)
            if flip:
                f = f + model(torch.flip(images, dims=[3]))
            feats.append(f.float().cpu())
            pids.append(np.asarray(batch_pids, dtype=np.int64))
            camids.append(np.asarray(batch_camids, dtype=np.int64))
    model.train(was_training)
    if not feats:
        raise ValueError("extract_features: the loader yielded no batch")
    return torch.cat(feats), np.concatenate(pids), np.concatenate(camids)


# --------------------------------------------------------------------------- distances


def _prepare(x: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x as float32, per-row factor): 1/‖x‖ for cosine, ‖x‖² for euclidean."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    x = x.float()
    if metric == "cosine":
        return x, 1.0 / x.norm(dim=1).clamp_min(1e-12)
    return x, (x * x).sum(dim=1)


def _pairwise(q: tuple[torch.Tensor, torch.Tensor], g: tuple[torch.Tensor, torch.Tensor],
              metric: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """(Q, G) float32 distances between prepared query and gallery sets (written to ``out``)."""
    dot = torch.matmul(q[0], g[0].T, out=out)
    if metric == "cosine":
        return dot.mul_(q[1][:, None]).mul_(g[1][None, :]).neg_().add_(1.0)
    return dot.mul_(-2.0).add_(q[1][:, None]).add_(g[1][None, :]).clamp_min_(0.0)


def compute_distance(qf: torch.Tensor, gf: torch.Tensor, metric: str = "cosine",
                     device: torch.device | str | None = None) -> torch.Tensor:
    """(Q, G) float32 distances between qf (Q, D) and gf (G, D), on ``device`` (default qf's).

    cosine: 1 - cos(q, g) in [0, 2] (L2 normalisation is implied); euclidean: SQUARED
    Euclidean distance (same ranking as the plain one).
    """
    device = qf.device if device is None else device
    return _pairwise(_prepare(qf.to(device), metric), _prepare(gf.to(device), metric), metric)


# --------------------------------------------------------------------------- ranking core


def _ids(ids, device) -> torch.Tensor:
    """(N,) int64 tensor on ``device`` from a list, numpy array or tensor."""
    return torch.as_tensor(ids, dtype=torch.int64, device=device).reshape(-1)


def true_match(same_camera, same_clothes, protocol: str):
    """Which same-pid gallery items are true matches under ``protocol`` (the others are dropped).

    ``same_camera``, ``same_clothes``: bool arrays (numpy or torch, broadcastable; ``same_clothes``
    is ignored by ``standard`` and may be None there)."""
    keep = ~same_camera
    if protocol == "cloth-changing":
        return keep & ~same_clothes
    if protocol == "same-clothes":
        return keep & same_clothes
    return keep


@dataclass
class _Ids:
    """pids, camids and clothes ids (None: unknown) of one side, as (N,) int64 tensors."""

    pids: torch.Tensor
    camids: torch.Tensor
    clothes: torch.Tensor | None

    @classmethod
    def build(cls, pids, camids, clothes, device) -> "_Ids":
        return cls(_ids(pids, device), _ids(camids, device), None if clothes is None else _ids(clothes, device))

    def rows(self, rows: slice) -> "_Ids":
        return _Ids(self.pids[rows], self.camids[rows], None if self.clothes is None else self.clothes[rows])


@dataclass
class _Gallery:
    """Gallery pids, camids and clothes ids (None: unknown); ``order`` sorts the gallery by (pid, index)."""

    pids: torch.Tensor
    camids: torch.Tensor
    clothes: torch.Tensor | None
    order: torch.Tensor
    sorted_pids: torch.Tensor

    @classmethod
    def build(cls, pids, camids, clothes, device) -> "_Gallery":
        ids = _Ids.build(pids, camids, clothes, device)
        order = torch.argsort(ids.pids, stable=True)
        return cls(ids.pids, ids.camids, ids.clothes, order, ids.pids[order])

    def same_pid(self, query: _Ids, protocol: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For B queries: gallery indices of their same-pid items (B, C) (padded), which are not padding
        (B, C) bool, and which are true matches under ``protocol`` (B, C) bool."""
        start = torch.searchsorted(self.sorted_pids, query.pids)
        count = torch.searchsorted(self.sorted_pids, query.pids, right=True) - start
        cols = torch.arange(max(int(count.max()), 1), device=query.pids.device)
        in_same = cols[None, :] < count[:, None]
        same = self.order[(start[:, None] + cols[None, :]).clamp_(max=len(self.order) - 1)]
        same_clothes = None if protocol == "standard" else self.clothes[same] == query.clothes[:, None]
        return same, in_same, in_same & true_match(self.camids[same] == query.camids[:, None], same_clothes,
                                                   protocol)


class _Workspace:
    """Buffers reused across blocks (a fresh large tensor page-faults on every block)."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype, device) -> torch.Tensor:
        size = int(np.prod(shape))
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < size or buf.dtype != dtype or buf.device != device:
            buf = self._buffers[name] = torch.empty(size, dtype=dtype, device=device)
        return buf[:size].view(shape)


@dataclass
class _Matches:
    """One block's same-pid gallery items (B, C) and true matches sorted by (distance, index)."""

    same: torch.Tensor  # gallery index of same-pid items (padded)
    in_same: torch.Tensor  # bool, not padding
    dist: torch.Tensor  # sorted true-match distances, +inf padding
    index: torch.Tensor  # their gallery indices
    count: torch.Tensor  # (B,) number of true matches

    @classmethod
    def find(cls, dist, query: _Ids, gal: _Gallery, protocol: str) -> "_Matches":
        same, in_same, is_match = gal.same_pid(query, protocol)
        d = dist.gather(1, same)
        if not torch.isfinite(d[is_match]).all():
            raise ValueError("distance matrix has a non-finite distance to a true match")
        match_d, perm = torch.sort(d.masked_fill(~is_match, float("inf")), dim=1, stable=True)
        return cls(same, in_same, match_d, same.gather(1, perm), is_match.sum(1))

    @property
    def real(self) -> torch.Tensor:
        """(B, C) bool: column holds a true match."""
        cols = torch.arange(self.dist.shape[1], device=self.dist.device)
        return cols[None, :] < self.count[:, None]


def _buckets(dist: torch.Tensor, m: _Matches, ws: _Workspace) -> tuple[torch.Tensor, int]:
    """Flat (B*G,) int32 buckets and the row width W: row r uses [r*W, (r+1)*W).

    Each row's true matches span buckets 1..W-2 of a uniform grid; distances below it share
    bucket 0, far above it bucket W-1. Every op rounds monotonically, so the bucket is
    monotone in the distance within a row.
    """
    nrows, ngal = dist.shape
    nbins = max(1, ngal // 4)
    rows = torch.arange(nrows, device=dist.device)
    has = m.count > 0
    lo = torch.where(has, m.dist[:, 0], 0.0)
    hi = torch.where(has, m.dist[rows, (m.count - 1).clamp_min(0)], 0.0)
    scale = (nbins / (hi.double() - lo.double())).clamp(1e-30, 1e30).to(dist.dtype)
    x = torch.sub(dist, lo[:, None], out=ws.get("x", dist.shape, dist.dtype, dist.device))
    x.mul_(scale[:, None]).clamp_(-1.0, nbins + 1.0)
    if torch.isnan(x.sum()):
        raise ValueError("distance matrix contains NaN")
    width = nbins + 3
    x.add_((rows * width + 1).to(x.dtype)[:, None])
    return ws.get("bins", (x.numel(),), torch.int32, dist.device).copy_(x.view(-1)), width


def _flatnonzero(mask: torch.Tensor) -> torch.Tensor:
    """Indices of True entries of a 1-D bool tensor (numpy's is much faster on CPU)."""
    if mask.device.type != "cpu":
        return torch.nonzero(mask).squeeze(1)
    return torch.from_numpy(np.flatnonzero(mask.numpy()))


def _count_before(grp_e, d_e, j_e, grp_m, d_m, j_m) -> torch.Tensor:
    """For each match m: number of elements e with grp_e == grp_m and (d_e, j_e) < (d_m, j_m)."""
    grp, d, j = torch.cat([grp_e, grp_m]), torch.cat([d_e, d_m]), torch.cat([j_e, j_m])
    o = torch.argsort(j, stable=True)
    o = o[torch.argsort(d[o], stable=True)]
    o = o[torch.argsort(grp[o], stable=True)]  # sorted by (grp, d, j)
    is_elem = (o < len(grp_e)).long()
    before = torch.cumsum(is_elem, 0) - is_elem
    grp_sorted = grp[o]
    in_group = before - before[torch.searchsorted(grp_sorted, grp_sorted)]
    counts = torch.empty(len(grp_m), dtype=torch.long, device=grp.device)
    is_m = is_elem == 0
    counts[o[is_m] - len(grp_e)] = in_group[is_m]
    return counts


def _match_ranks(dist, query: _Ids, gal: _Gallery, protocol: str, ws: _Workspace):
    """0-based rank of each true match among the row's kept gallery items.

    Returns ranks (B, C) int64 (meaningful where ``col < n_match``) and n_match (B,).
    rank = (other-pid items in lower buckets) + (other-pid items earlier in the same bucket)
    + (true matches ranked earlier).
    """
    nrows, ngal = dist.shape
    if not dist.is_floating_point() or dist.dtype in (torch.float16, torch.bfloat16):
        dist = dist.double()
    m = _Matches.find(dist, query, gal, protocol)
    bins, width = _buckets(dist, m, ws)
    grid = bins.view(nrows, ngal)
    hist = torch.bincount(bins, minlength=nrows * width)
    hist -= torch.bincount(grid.gather(1, m.same)[m.in_same], minlength=nrows * width)
    below = hist.view(nrows, width).cumsum_(1).view(-1)

    real = m.real
    m_bins = grid.gather(1, m.index)[real].long()
    mark = torch.zeros(nrows * width, dtype=torch.bool, device=dist.device)
    mark[m_bins] = True
    in_mark = torch.index_select(mark, 0, bins, out=ws.get("mask", bins.shape, torch.bool,
                                                           dist.device))
    flat = _flatnonzero(in_mark).to(dist.device)
    e_row, e_col = flat // ngal, flat % ngal
    other = gal.pids[e_col] != query.pids[e_row]
    flat, e_row, e_col = flat[other], e_row[other], e_col[other]
    same_bucket = _count_before(bins[flat].long(), dist[e_row, e_col], e_col,
                                m_bins, m.dist[real], m.index[real])
    ranks = torch.zeros_like(m.index)
    ranks[real] = below[m_bins - 1] + same_bucket + real.long().cumsum(1)[real] - 1
    return ranks, m.count


# --------------------------------------------------------------------------- metrics


@dataclass
class _Totals:
    """Sums over valid queries; ``first_hist[r]`` counts first true matches at 0-based rank r."""

    max_rank: int
    ap: float = 0.0
    inp: float = 0.0
    valid: int = 0
    first_hist: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.first_hist = torch.zeros(self.max_rank + 1, dtype=torch.long)

    def add(self, ranks: torch.Tensor, n_match: torch.Tensor):
        """Add a block's AP, INP and first-match rank of each query that has a true match."""
        keep = n_match > 0
        ranks, n = ranks[keep].double(), n_match[keep]
        if len(n) == 0:
            return
        cols = torch.arange(ranks.shape[1], device=ranks.device)
        precision = torch.where(cols[None, :] < n[:, None], (cols + 1.0) / (ranks + 1.0), 0.0)
        self.ap += float((precision.sum(1) / n).sum())
        last = ranks.gather(1, (n - 1)[:, None]).squeeze(1)
        self.inp += float((n / (last + 1.0)).sum())
        self.valid += len(n)
        first = ranks[:, 0].long().clamp_(max=self.max_rank).cpu()
        self.first_hist += torch.bincount(first, minlength=self.max_rank + 1)

    def result(self, protocol: str) -> dict:
        if self.valid == 0:
            raise ValueError(f"no query has a true match ({MATCH_RULES[protocol]}) in the gallery")
        cmc = np.cumsum(self.first_hist[:self.max_rank].numpy()) / self.valid
        return {"mAP": self.ap / self.valid, "mINP": self.inp / self.valid,
                "cmc": cmc.astype(np.float64), "num_valid_queries": self.valid}


MATCH_RULES = {"standard": "same pid, other camera", "cloth-changing": "same pid, other camera, other clothes",
               "same-clothes": "same pid, other camera, same clothes"}


def _check(n_query: int, n_gallery: int, ids: dict, max_rank: int,
           chunk_size: int | None, protocol: str) -> int:
    """Validate sizes and the protocol; return max_rank clamped to the gallery size (with a warning)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if protocol != "standard" and (ids["q_clothes"] is None or ids["g_clothes"] is None):
        raise ValueError(f"the {protocol} protocol needs clothes ids of the query and the gallery")
    for name, values in ids.items():
        if values is None:
            continue
        n = n_query if name.startswith("q_") else n_gallery
        if len(values) != n:
            raise ValueError(f"{name} has length {len(values)}, expected {n}")
    if n_query == 0 or n_gallery == 0:
        raise ValueError(f"empty query ({n_query}) or gallery ({n_gallery}) set")
    if max_rank < 1 or (chunk_size is not None and chunk_size < 1):
        raise ValueError(f"max_rank ({max_rank}) and chunk_size ({chunk_size}) must be >= 1")
    if max_rank > n_gallery:
        warnings.warn(f"max_rank {max_rank} > gallery size {n_gallery}; using {n_gallery}", stacklevel=2)
        return n_gallery
    return max_rank


@contextmanager
def _one_cpu_thread(device: torch.device):
    """Rank on one CPU thread: its many short parallel regions stall badly (5-8x measured)
    when the cores are shared with other processes, and gain < 2x when they are not."""
    previous = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _evaluate(chunks, ids: dict, device, max_rank: int, block_rows: int, protocol: str) -> dict:
    """Shared loop: ``chunks(workspace)`` yields (first row, (B, G) distances)."""
    gal = _Gallery.build(ids["g_pids"], ids["g_camids"], ids["g_clothes"], device)
    query = _Ids.build(ids["q_pids"], ids["q_camids"], ids["q_clothes"], device)
    block_rows = max(1, min(block_rows, _MAX_BUCKETS // (len(gal.pids) // 4 + 3)))
    totals, ws = _Totals(max_rank), _Workspace()
    for first, dist in chunks(ws):  # distances computed with the caller's thread setting
        with _one_cpu_thread(torch.device(device)):
            for i in range(0, len(dist), block_rows):
                block = dist[i:i + block_rows]
                rows = slice(first + i, first + i + len(block))
                totals.add(*_match_ranks(block, query.rows(rows), gal, protocol, ws))
    return totals.result(protocol)


# --------------------------------------------------------------------------- public API


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50,
                  chunk_size: int | None = None, *, q_clothes=None, g_clothes=None,
                  protocol: str = "standard") -> dict:
    """CMC / mAP / mINP from a (Q, G) distance matrix (numpy or torch; never copied whole).

    q_pids, q_camids: (Q,); g_pids, g_camids: (G,) integers (gallery pid 0 = distractor).
    q_clothes (Q,), g_clothes (G,): integer clothes ids (compared only between images of one pid),
    needed by the ``cloth-changing`` and ``same-clothes`` protocols (module docstring).
    Returns {"mAP": float, "mINP": float, "cmc": (max_rank,) float64 with cmc[0] = rank-1,
    "num_valid_queries": int}, metrics as fractions. Ties are ordered by gallery index.
    ``chunk_size``: query rows ranked at once (default: about 4M entries). Ranking runs on
    the matrix's device (one thread on CPU). Raises ValueError if no query has a true match,
    the matrix contains NaN, or a true match is at infinite distance (other +-inf are fine).
    """
    dist = torch.from_numpy(distmat) if isinstance(distmat, np.ndarray) else distmat
    if dist.dim() != 2:
        raise ValueError(f"distmat must be 2-D (Q, G), got shape {tuple(dist.shape)}")
    ids = {"q_pids": q_pids, "g_pids": g_pids, "q_camids": q_camids, "g_camids": g_camids,
           "q_clothes": q_clothes, "g_clothes": g_clothes}
    max_rank = _check(*dist.shape, ids, max_rank, chunk_size, protocol)
    block_rows = chunk_size or max(1, _BLOCK_ELEMENTS // dist.shape[1])
    return _evaluate(lambda ws: [(0, dist)], ids, dist.device, max_rank, block_rows, protocol)


def evaluate_features(query_features: torch.Tensor, gallery_features: torch.Tensor,
                      q_pids, g_pids, q_camids, g_camids, metric: str = "cosine",
                      max_rank: int = 50, chunk_size: int | None = None,
                      device: torch.device | str | None = None, *, q_clothes=None, g_clothes=None,
                      protocol: str = "standard") -> dict:
    """``evaluate_rank`` of ``compute_distance(query, gallery, metric)`` without ever holding
    the (Q, G) matrix: distances are computed for ``chunk_size`` query rows at a time
    (default: about 32M entries) on ``device`` (default: the query features' device).

    query_features: (Q, D), gallery_features: (G, D), any float dtype (used as float32).
    ``q_clothes``, ``g_clothes``, ``protocol``: as in ``evaluate_rank``.
    """
    if query_features.dim() != 2 or gallery_features.dim() != 2 \
            or query_features.shape[1] != gallery_features.shape[1]:
        raise ValueError(f"features must be (Q, D) and (G, D), got {tuple(query_features.shape)}"
                         f" and {tuple(gallery_features.shape)}")
    n_query, n_gallery = len(query_features), len(gallery_features)
    ids = {"q_pids": q_pids, "g_pids": g_pids, "q_camids": q_camids, "g_camids": g_camids,
           "q_clothes": q_clothes, "g_clothes": g_clothes}
    max_rank = _check(n_query, n_gallery, ids, max_rank, chunk_size, protocol)
    device = query_features.device if device is None else torch.device(device)
    gallery = _prepare(gallery_features.to(device), metric)
    step = chunk_size or max(1, _FEATURE_CHUNK_ELEMENTS // n_gallery)

    def chunks(ws: _Workspace):
        for i in range(0, n_query, step):
            query = _prepare(query_features[i:i + step].to(device), metric)
            out = ws.get("dist", (len(query[0]), n_gallery), torch.float32, device)
            yield i, _pairwise(query, gallery, metric, out=out)

    return _evaluate(chunks, ids, device, max_rank, _BLOCK_ELEMENTS // n_gallery, protocol)


def count_valid_queries(q_pids, g_pids, q_camids, g_camids, *, q_clothes=None, g_clothes=None,
                        protocol: str = "standard") -> int:
    """Number of queries with at least one true match under ``protocol`` (no features needed):
    the queries ``evaluate_rank`` would score.  Arguments as in ``evaluate_rank``."""
    ids = {"q_pids": q_pids, "g_pids": g_pids, "q_camids": q_camids, "g_camids": g_camids,
           "q_clothes": q_clothes, "g_clothes": g_clothes}
    _check(len(q_pids), len(g_pids), ids, 1, None, protocol)
    gal = _Gallery.build(g_pids, g_camids, g_clothes, "cpu")
    query = _Ids.build(q_pids, q_camids, q_clothes, "cpu")
    step = max(1, _BLOCK_ELEMENTS // int(torch.unique(gal.pids, return_counts=True)[1].max()))
    return sum(int(gal.same_pid(query.rows(slice(i, i + step)), protocol)[2].any(1).sum())
               for i in range(0, len(query.pids), step))


def reported_protocols(q_pids, g_pids, q_camids, g_camids, q_clothes=None, g_clothes=None) -> tuple[str, ...]:
    """The protocols a report lists (each one's mAP and rank-1): with clothes ids of query and gallery,
    every protocol under which some query has a true match; without clothes ids, none."""
    if q_clothes is None or g_clothes is None:
        return ()
    return tuple(protocol for protocol in PROTOCOLS
                 if count_valid_queries(q_pids, g_pids, q_camids, g_camids, q_clothes=q_clothes,
                                        g_clothes=g_clothes, protocol=protocol))
