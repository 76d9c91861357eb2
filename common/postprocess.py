"""Test-time feature post-processing: flip averaging, NFC, IPG aggregation, ID², k-reciprocal re-ranking.

Everything runs in torch on the features' device and is chunked so that MSMT17-size sets
(11,659 query + 82,161 gallery, 2048-d) fit in a few GiB: no N×N matrix is ever built, except by
:func:`dense_reciprocal_encoding` / :func:`dense_overlaps`, the clustering toolkit's path for a small set.

Methods: NFC, IPG aggregation and ID² from Yuan et al., *From Poses to Identity: Training-Free Person
Re-Identification via Feature Centralization* (Pose2ID), CVPR 2025, https://arxiv.org/abs/2503.00938;
re-ranking from Zhong et al., *Re-ranking Person Re-identification with k-reciprocal Encoding*, CVPR 2017.

Conventions:
- Distances are squared Euclidean, d(i, j) = |x_i|² + |x_j|² − 2 x_i·x_j, computed in float32.
- Nearest neighbours come from a symmetric blockwise scan (each BLOCK×BLOCK block of the distance
  matrix is computed once and top-k'd along rows and columns).  On CPU, NFC screens with a bfloat16
  matmul and re-scores candidates in float32; a rigorous rounding-error bound decides which rows
  are certainly right, the others are recomputed exactly, so the lists equal the float32 ones.
- Lists are sorted by distance; exact float32 ties (12 of 19,281 rows had one among their 21 nearest
  on random Market-size features) are broken in the order ``torch.topk`` / ``torch.sort`` return them,
  so results can differ from another implementation only where two distances are exactly equal.
- pid < 0 (junk) is ignored by :func:`representative_indices` and :func:`id2`.
- Generated (IPG) images are named ``<source_stem>_gen<m>.<ext>``, m = 0, 1, ...; e.g.
  ``0002_c1s1_000451_03_gen3.jpg`` is the 4th generated image of ``0002_c1s1_000451_03.jpg``.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

BLOCK = 8192  # side of a square distance block (256 MiB in float32); long rows keep torch.topk fast
PAIR_BUDGET = 2**23  # min-sum terms per re-ranking query chunk (~0.4 GiB of temporaries)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
_GENERATED = re.compile(r"^(?P<stem>.+)_gen(?P<index>\d+)$")
_BF16_EPS = 2.0**-8  # unit round-off of bfloat16 (8 significant bits)


# ----------------------------------------------------------------------------- small helpers


def _features(name: str, x: torch.Tensor, ndim: int = 2) -> torch.Tensor:
    """``x`` as a float32 tensor with ``ndim`` dims and no empty axis, else ValueError naming it."""
    x = torch.as_tensor(x)
    if x.ndim != ndim or 0 in x.shape:
        raise ValueError(f"{name}: expected a non-empty {ndim}-D tensor, got shape {tuple(x.shape)}")
    return x.float()


def _pids(pids: Sequence[int] | np.ndarray | torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """Person ids as an int64 tensor of length ``n``."""
    pids = torch.as_tensor(pids if isinstance(pids, torch.Tensor) else np.asarray(pids), dtype=torch.int64,
                           device=device)
    if pids.shape != (n,):
        raise ValueError(f"pids: expected shape ({n},) to match features, got {tuple(pids.shape)}")
    return pids


def _sqdist(xa: torch.Tensor, sa: torch.Tensor, xb: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (A, B) from rows xa (A, D) with squared norms sa (A,) to xb, sb."""
    return torch.addmm(sb.unsqueeze(0), xa, xb.T, alpha=-2.0).add_(sa.unsqueeze(1))


def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t[idx] along dim 0 for any index shape (index_select: much faster than advanced indexing on CPU)."""
    return t.index_select(0, idx.reshape(-1)).view(*idx.shape, *t.shape[1:])


def _segments(starts: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expand ranges [starts[e], starts[e] + counts[e]) -> (owner e of each position, position)."""
    owner = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    shift = starts - (torch.cumsum(counts, 0) - counts)
    return owner, torch.arange(len(owner), device=counts.device).add_(_take(shift, owner))


# ----------------------------------------------------------------------------- flip / IPG / ID²


def flip_average(features: torch.Tensor, flipped_features: torch.Tensor) -> torch.Tensor:
    """normalise(f(x) + f(flip(x))).  Both (N, D); returns (N, D) float32, L2-normalised.

    The paper (§3.2.1) sums the two features; we L2-normalise the sum so the result is a
    drop-in replacement for normalised test features (cosine ranking is unchanged by it).
    """
    f = _features("features", features)
    g = _features("flipped_features", flipped_features)
    if f.shape != g.shape:
        raise ValueError(f"flipped_features: shape {tuple(g.shape)} != features shape {tuple(f.shape)}")
    return F.normalize(f + g, dim=1)


def aggregate_generated(features: torch.Tensor, generated_features: torch.Tensor, eta: float = 2.0) -> torch.Tensor:
    """IPG centralization: normalise(f + η/M Σ_m f_m).

    features (N, D) of the real images; generated_features (N, M, D) of M generated images per
    real image, used as given (extract them the same way as ``features``).  Returns (N, D).
    """
    f = _features("features", features)
    g = _features("generated_features", generated_features, ndim=3)
    if g.shape[0] != f.shape[0] or g.shape[2] != f.shape[1]:
        raise ValueError(f"generated_features: shape {tuple(g.shape)} does not match features "
                         f"{tuple(f.shape)}; expected (N, M, D) = ({f.shape[0]}, M, {f.shape[1]})")
    return F.normalize(f + eta * g.mean(dim=1), dim=1)


def _generated_by_source(names: Iterable[str], source_files: Sequence[str | Path], what: str) -> list[list[int]]:
    """For each source, positions in ``names`` of its generated images (ordered by m); errors if any has none."""
    sources = [Path(s).stem for s in source_files]
    duplicated = sorted(s for s, c in Counter(sources).items() if c > 1)
    if duplicated:
        raise ValueError(f"source_files: stems are not unique ({', '.join(duplicated[:5])}); "
                         "generated images cannot be matched to sources")
    found: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for position, name in enumerate(names):
        match = _GENERATED.match(Path(name).stem)
        if match:
            found[match["stem"]].append((int(match["index"]), position))
    missing = [s for s in sources if s not in found]
    if missing:
        raise ValueError(f"{what}: no generated images '<stem>_gen<m>' for {len(missing)} of {len(sources)} "
                         f"sources, e.g. {', '.join(missing[:5])}")
    return [[position for _, position in sorted(found[s])] for s in sources]


def group_generated_images(folder: str | Path, source_files: Sequence[str | Path]) -> list[list[Path]]:
    """Generated images of each source file, found in ``folder`` as ``<source_stem>_gen<m>.<ext>``.

    Returns one list per source (in ``source_files`` order) sorted by m.  Files of other sources
    are ignored; a source with no generated image is an error.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"generated-image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    groups = _generated_by_source([p.name for p in files], source_files, str(folder))
    return [[files[i] for i in group] for group in groups]


def load_generated_features(path: str | Path, source_files: Sequence[str | Path]) -> torch.Tensor:
    """(N, M, D) float32 generated-image features per source, from an .npz or .pt file.

    The file holds ``files`` (K,) generated-image names (``<source_stem>_gen<m>.<ext>``, any
    directory prefix) and ``features`` (K, D).  Every source must have the same number M.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"generated-feature file not found: {path}")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            data = {key: archive[key] for key in archive.files}
    elif path.suffix == ".pt":
        data = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{path}: expected a .npz or .pt file")
    if not isinstance(data, dict) or not {"files", "features"} <= data.keys():
        raise ValueError(f"{path}: expected entries 'files' and 'features'")
    files, feats = [str(f) for f in data["files"]], torch.as_tensor(data["features"])
    feats = _features(f"{path} 'features'", feats)
    if len(files) != len(feats):
        raise ValueError(f"{path}: {len(files)} files but {len(feats)} feature rows")
    groups = _generated_by_source(files, source_files, str(path))
    counts = {len(g) for g in groups}
    if len(counts) != 1:
        raise ValueError(f"{path}: sources have different numbers of generated images {sorted(counts)}")
    return feats[torch.tensor(groups)]


def _identity_centres(x: torch.Tensor, pids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(unique pids, label of each row, (U, D) mean feature per pid) over rows with pid >= 0."""
    keep = pids >= 0
    if not keep.any():
        raise ValueError("pids: no identity with pid >= 0")
    unique, label = torch.unique(pids[keep], return_inverse=True)
    sums = torch.zeros(len(unique), x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, label, x[keep])
    counts = torch.bincount(label, minlength=len(unique)).unsqueeze(1)
    return unique, label, sums / counts


def representative_indices(features: torch.Tensor, pids: Sequence[int] | torch.Tensor) -> dict[int, int]:
    """pid -> row index of the feature nearest (Euclidean) its identity's mean feature.

    features (N, D) as given (the paper averages raw features); pids (N,).  Ties -> lowest index.
    """
    x = _features("features", features)
    p = _pids(pids, len(x), x.device)
    unique, label, centres = _identity_centres(x, p)
    rows = torch.nonzero(p >= 0).squeeze(1)
    dist = (x[rows] - centres[label]).pow(2).sum(1)
    order = torch.sort(dist, stable=True).indices
    order = order[torch.sort(label[order], stable=True).indices]  # by pid, then distance, then index
    counts = torch.bincount(label, minlength=len(unique))
    first = torch.cumsum(counts, 0) - counts
    return dict(zip(unique.tolist(), rows[order[first]].tolist()))


def id2(features: torch.Tensor, pids: Sequence[int] | torch.Tensor, normalise_centres: bool = False) -> float:
    """Identity density ID² (lower is denser).

    Mean over ids of the mean Euclidean distance between each L2-normalised feature and its id's
    centre.  The paper's equation defines the centre as the plain mean of the normalised
    features (the default); its text also says centres are L2-normalised, which
    ``normalise_centres=True`` gives.  features (N, D), pids (N,); pid < 0 ignored.
    """
    x = F.normalize(_features("features", features), dim=1)
    p = _pids(pids, len(x), x.device)
    unique, label, centres = _identity_centres(x, p)
    if normalise_centres:
        centres = F.normalize(centres, dim=1)
    dist = (x[p >= 0] - centres[label]).norm(dim=1)
    per_id = torch.zeros(len(unique), dtype=dist.dtype, device=x.device).index_add_(0, label, dist)
    return float((per_id / torch.bincount(label, minlength=len(unique))).mean())


# ----------------------------------------------------------------------------- k-nearest neighbours


def _merge_topk(values: list[torch.Tensor], indices: list[torch.Tensor], k: int, largest: bool):
    """Top-k over per-block candidate lists (sorted)."""
    v, pos = torch.cat(values, 1).topk(k, dim=1, largest=largest)
    return v, torch.cat(indices, 1).gather(1, pos)


def _scan_rows(x: torch.Tensor, sq: torch.Tensor, rows: torch.Tensor, k: int):
    """Exact float32 k nearest (sorted, self excluded) of x[rows] among all rows: dist (R, k), idx (R, k)."""
    xr, sr = x[rows], sq[rows]
    values, indices = [], []
    for start in range(0, len(x), BLOCK):
        stop = min(start + BLOCK, len(x))
        d = _sqdist(xr, sr, x[start:stop], sq[start:stop])
        hit = torch.nonzero((rows >= start) & (rows < stop)).squeeze(1)
        d[hit, rows[hit] - start] = torch.inf
        v, i = d.topk(min(k, stop - start), dim=1, largest=False)
        values.append(v)
        indices.append(i + start)
    return _merge_topk(values, indices, k, largest=False)


def _update(best: torch.Tensor, idx: torch.Tensor, rows: slice, scores: torch.Tensor, offset: int,
            largest: bool) -> None:
    """Merge the best k of a block (rows, columns offset..) into the running lists best/idx[rows]."""
    v, i = scores.topk(min(best.shape[1], scores.shape[1]), dim=1, largest=largest)
    best[rows], idx[rows] = _merge_topk([best[rows], v.to(best.dtype)], [idx[rows], i + offset], best.shape[1], largest)


def _symmetric_topk(x: torch.Tensor, k: int, score, dtype: torch.dtype, largest: bool, exclude_self: bool,
                    row_max: bool, on_block=None):
    """Best k columns of every row of the symmetric N×N score matrix of x given blockwise by score(ra, rb).

    Each (a, b) block (``dtype``) with a <= b is computed once and serves its rows and, transposed, its
    columns; ``on_block(ra, rb, block)`` (optional) sees each block first.  Returns best (N, k) float32
    sorted, idx (N, k) int64, and (if ``row_max``) each row's maximum score, self included (else None).
    """
    n, worst = len(x), -torch.inf if largest else torch.inf
    best = torch.full((n, k), worst, device=x.device)
    idx = torch.zeros((n, k), dtype=torch.int64, device=x.device)
    high = torch.full((n,), -torch.inf, device=x.device) if row_max else None
    transposed = torch.empty(min(n, BLOCK) ** 2, dtype=dtype, device=x.device)  # reused across blocks
    for a in range(0, n, BLOCK):
        ra = slice(a, min(a + BLOCK, n))
        for b in range(a, n, BLOCK):
            rb = slice(b, min(b + BLOCK, n))
            block = score(ra, rb)
            if on_block is not None:
                on_block(ra, rb, block)
            if row_max:
                high[ra] = torch.maximum(high[ra], block.amax(1))
                high[rb] = torch.maximum(high[rb], block.amax(0))
            if b != a:
                flipped = transposed[:block.numel()].view(block.shape[1], block.shape[0]).copy_(block.T)
                _update(best, idx, rb, flipped, a, largest)
            elif exclude_self:
                block.fill_diagonal_(worst)
            _update(best, idx, ra, block, b, largest)
    return best, idx, high


def _exact_knn(x: torch.Tensor, sq: torch.Tensor, k: int, exclude_self: bool, on_block=None):
    """Exact float32 k nearest (sorted) of every row: dist (N, k), idx (N, k), far (N,) = max_j d(i, j)."""
    return _symmetric_topk(x, k, lambda ra, rb: _sqdist(x[ra], sq[ra], x[rb], sq[rb]), torch.float32,
                           largest=False, exclude_self=exclude_self, row_max=True, on_block=on_block)


def _coarse_bound(x: torch.Tensor) -> float:
    """e with |Ŝ − x·y| <= e |x| |y|, Ŝ = float32-accumulated product of bf16-rounded x and y.

    Rounding inputs to bf16 costs 2u + u² relative to Σ|x_k y_k| <= |x||y| (u = 2^-8); float32
    accumulation of D terms in any order adds γ_D (1 + u)² with γ_D = D·2^-24 / (1 − D·2^-24).
    """
    u, gamma = _BF16_EPS, x.shape[1] * 2.0**-24 / (1 - x.shape[1] * 2.0**-24)
    return 2 * u + u * u + gamma * (1 + u) ** 2


def _coarse_knn(x: torch.Tensor, sq: torch.Tensor, k: int, candidates: int, chunk_size: int):
    """Exact k nearest neighbours (self excluded) via a bfloat16 screen + float32 re-check.

    For each row the ``candidates`` largest bf16 dot products are re-scored exactly; a row is accepted
    only if its exact k-th distance is below a guaranteed lower bound on the distance of every
    non-candidate; other rows are recomputed by :func:`_scan_rows`.  A non-candidate's bf16 score is
    <= the K-th candidate's c, so its true dot product is <= c + u|c|/(1 − u) (bf16 output rounding)
    + :func:`_coarse_bound` |x_i| max|x|.
    Returns dist (N, k), idx (N, k) and the number of recomputed rows.
    """
    xb = x.bfloat16()
    top, cand, _ = _symmetric_topk(x, candidates, lambda ra, rb: xb[ra] @ xb[rb].T, torch.bfloat16,
                                   largest=True, exclude_self=True, row_max=False)
    norms, last = sq.sqrt(), top[:, -1]
    highest = last + last.abs() * _BF16_EPS / (1 - _BF16_EPS) + _coarse_bound(x) * norms.max() * norms
    bound = sq + sq.min() - 2 * highest
    cand = cand.sort(dim=1).values.reshape(-1)
    rows = torch.arange(len(x), device=x.device).repeat_interleave(candidates)
    exact = (_take(sq, rows) + _take(sq, cand) - 2 * _pair_dots(x, rows, cand)).view(-1, candidates)
    cand = cand.view(-1, candidates)
    dist, order = exact.sort(dim=1, stable=True)
    dist, idx = dist[:, :k].contiguous(), cand.gather(1, order[:, :k])
    redo = torch.nonzero(dist[:, -1] >= bound).squeeze(1)
    for s in range(0, len(redo), chunk_size):
        rows = redo[s:s + chunk_size]
        dist[rows], idx[rows] = _scan_rows(x, sq, rows, k)
    return dist, idx, len(redo)


def knn(features: torch.Tensor, k: int, chunk_size: int = 1024, coarse: bool | None = None):
    """k nearest neighbours of every row among the other rows (self excluded), squared Euclidean.

    features (N, D); returns dist (N, k) float32 sorted ascending and idx (N, k) int64.
    ``coarse`` (default: on CPU) screens with a bfloat16 matmul and re-checks in float32 with a
    rigorous error bound, so the result equals the exact float32 search; CUDA always runs exact.
    """
    x = _features("features", features)
    if not 1 <= k < len(x):
        raise ValueError(f"k={k}: need 1 <= k < number of features ({len(x)})")
    if coarse is None:
        coarse = x.device.type == "cpu"
    if coarse and x.device.type != "cpu":
        raise ValueError("coarse=True: the bfloat16 screen is only validated on CPU")
    sq = (x * x).sum(1)
    candidates = 4 * k + 16  # on random 2048-d features (a hard case) < 1% of rows need the exact re-scan
    if coarse and candidates < len(x) - 1:
        dist, idx, _ = _coarse_knn(x, sq, k, candidates, chunk_size)
        return dist, idx
    dist, idx, _ = _exact_knn(x, sq, k, exclude_self=True)
    return dist, idx


# ----------------------------------------------------------------------------- NFC


def nfc(features: torch.Tensor, k1: int = 2, k2: int = 2, chunk_size: int = 1024,
        coarse: bool | None = None) -> torch.Tensor:
    """Neighbour Feature Centralization on ONE set (apply to query and gallery separately).

    features (N, D), L2-normalised here first (the method is defined on unit features).  For each i,
    j in i's k1 nearest (squared Euclidean, self excluded) is kept if i is among j's k2 nearest;
    f̃_i = normalise(f_i + Σ_kept f_j) using the normalised input features.  Returns (N, D) float32.
    ``coarse``: see :func:`knn`.
    """
    x = F.normalize(_features("features", features), dim=1)
    if k1 < 1 or k2 < 1:
        raise ValueError(f"nfc: k1={k1}, k2={k2} must be >= 1")
    if max(k1, k2) >= len(x):
        raise ValueError(f"nfc: k1={k1}, k2={k2} need more than {max(k1, k2)} features, got {len(x)}")
    _, idx = knn(x, max(k1, k2), chunk_size, coarse)
    near = idx[:, :k1]
    back = _take(idx[:, :k2], near)  # (N, k1, k2)
    mutual = (back == torch.arange(len(x), device=x.device).view(-1, 1, 1)).any(2)
    rows, slots = torch.nonzero(mutual, as_tuple=True)
    out = x.clone()
    for s in range(0, len(rows), chunk_size * 8):
        part = slice(s, s + chunk_size * 8)
        out.index_add_(0, rows[part], _take(x, near[rows[part], slots[part]]))
    return F.normalize(out, dim=1)


# ----------------------------------------------------------------------------- k-reciprocal re-ranking


def _reciprocal(lists: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """(N, K) bool: out[i, a] is True when i is among the K entries of lists[lists[i, a]] (mutual)."""
    out = torch.empty(lists.shape, dtype=torch.bool, device=lists.device)
    for s in range(0, len(lists), chunk_size):
        rows = torch.arange(s, min(s + chunk_size, len(lists)), device=lists.device)
        out[rows] = (_take(lists, lists[rows]) == rows.view(-1, 1, 1)).any(2)
    return out


def _expanded_sets(top: torch.Tensor, half: torch.Tensor, half_rec: torch.Tensor, rows: torch.Tensor):
    """Zhong et al.'s k-reciprocal expansion for ``rows``: (row, column) pairs of the sets, sorted.

    top (N, k1+1) and half (N, h = round(k1/2)+1) are nearest lists that include the point itself;
    half_rec = :func:`_reciprocal` (half).  R(i) = reciprocal members of top[i]; each c in R(i)
    adds its reciprocal set H(c) from ``half`` when |H(c) ∩ R(i)| > 2/3 |H(c)|.
    """
    near = top[rows]
    rec = (_take(top, near) == rows.view(-1, 1, 1)).any(2)  # (r, k1+1)
    members = torch.where(rec, near, -1)
    cand_half, cand_rec = _take(half, near), _take(half_rec, near)  # (r, k1+1, h)
    in_r = (cand_half.unsqueeze(3) == members.unsqueeze(1).unsqueeze(2)).any(3) & cand_rec
    accept = rec & (in_r.sum(2).double() > (2.0 / 3.0) * cand_rec.sum(2).double())
    extra = torch.where(accept.unsqueeze(2) & cand_rec, cand_half, -1).flatten(1)
    sets = torch.cat([members, extra], 1).sort(dim=1).values
    valid = sets >= 0
    valid[:, 1:] &= sets[:, 1:] != sets[:, :-1]
    local, _ = torch.nonzero(valid, as_tuple=True)
    return rows[local], sets[valid]


@contextmanager
def _sparse_beta():
    """Silence torch's warnings that sparse CSR support is in beta."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*", category=UserWarning)
        yield


def _csr(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, n: int) -> torch.Tensor:
    """Sparse (n, n) CSR tensor."""
    with _sparse_beta():
        return torch.sparse_csr_tensor(crow, col, val, (n, n))


def _pair_dots(x: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """x[row[p]]·x[col[p]] for pairs sorted by row, then column (one sampled dense-dense matmul)."""
    crow = torch.cat([row.new_zeros(1), torch.cumsum(torch.bincount(row, minlength=len(x)), 0)])
    with _sparse_beta():
        return torch.sparse.sampled_addmm(_csr(crow, col, x.new_zeros(len(col)), len(x)), x, x.T, beta=0.0).values()


def _weight_pairs(x, sq, scale, top, half, chunk_size) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """V's entries as pairs sorted by row, then column: row, col (P,) int64 and V[row, col] (P,) float32 =
    exp(−d(i,j)/scale_i) over i's expanded set, normalised per row."""
    n, half_rec = len(x), _reciprocal(half, chunk_size)
    pairs = [_expanded_sets(top, half, half_rec, torch.arange(s, min(s + chunk_size, n), device=x.device))
             for s in range(0, n, chunk_size)]
    row, col = (torch.cat(p) for p in zip(*pairs))
    w = torch.exp(-(_take(sq, row) + _take(sq, col) - 2 * _pair_dots(x, row, col)) / _take(scale, row))
    total = torch.zeros_like(sq).index_add_(0, row, w)
    return row, col, w / _take(total, row)


def _weights(x, sq, scale, top, half, chunk_size) -> torch.Tensor:
    """Sparse CSR V (N, N): V[i, j] = exp(−d(i,j)/scale_i) over i's expanded set, normalised per row."""
    row, col, val = _weight_pairs(x, sq, scale, top, half, chunk_size)
    crow = torch.cat([row.new_zeros(1), torch.cumsum(torch.bincount(row, minlength=len(x)), 0)])
    return _csr(crow, col, val, len(x))


def _query_expand(v: torch.Tensor, near: torch.Tensor) -> torch.Tensor:
    """V_qe[i] = mean of the V rows near[i] (N, k2): a sparse product A @ V with A[i, near[i]] = 1/k2."""
    n, k2 = near.shape
    crow = torch.arange(0, n * k2 + 1, k2, device=near.device)
    a = _csr(crow, near.sort(dim=1).values.reshape(-1), torch.full((n * k2,), 1.0 / k2, device=near.device), n)
    with _sparse_beta():
        return a @ v


def reciprocal_encoding(x: torch.Tensor, sq: torch.Tensor, nearest: torch.Tensor, k1: int, k2: int,
                        scale: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Zhong et al.'s k-reciprocal encoding V as a sparse CSR (N, N) float32 matrix (rows sum to 1).

    x (N, D) with squared norms sq (N,); nearest (N, >= max(k1 + 1, k2)) sorted nearest lists that include
    the point itself; V[i, j] = exp(−d(i, j)/scale_i) over i's expanded k-reciprocal set (:func:`_expanded_sets`),
    normalised per row, then (k2 > 1) averaged over the k2 nearest rows (query expansion).
    """
    v = _weights(x, sq, scale, *_reciprocal_lists(nearest, k1), chunk_size)
    return _query_expand(v, nearest[:, :k2].contiguous()) if k2 != 1 else v


def _reciprocal_lists(nearest: torch.Tensor, k1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k1 + 1 and round(k1 / 2) + 1 nearest (self included) of each row of ``nearest`` (N, >= k1 + 1)."""
    return nearest[:, :k1 + 1].contiguous(), nearest[:, :round(k1 / 2) + 1].contiguous()


def dense_reciprocal_encoding(x: torch.Tensor, sq: torch.Tensor, nearest: torch.Tensor, k1: int, k2: int,
                              scale: torch.Tensor, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`reciprocal_encoding` as a dense (N, N) float32 tensor ``v``, bitwise equal to it on the CPU, for
    small N (the sum orders below are those of torch's CPU kernels).

    Same arguments.  Also returns ``order`` (N, W) int64, W = the most entries a row of the sparse V has: each row's
    columns in the order its sparse row stores them (columns of zeros pad the end), the order in which
    :class:`ReciprocalOverlap` adds a row's terms, so that :func:`dense_overlaps` adds them alike.  Without
    query expansion (k2 = 1) that is ascending; the sparse product A @ V that expands queries stores a row's
    columns in order of first appearance over the k2 rows it averages (ascending row order, each row's columns
    ascending) and sums each entry in that row order, which the dense expansion repeats.
    """
    n, columns = len(x), torch.arange(len(x), device=x.device)
    row, col, val = _weight_pairs(x, sq, scale, *_reciprocal_lists(nearest, k1), chunk_size)
    v = x.new_zeros(n, n).index_put_((row, col), val)
    absent = n * k2  # sorts after every first-appearance key t·n + column
    if k2 == 1:
        key = torch.full((n, n), absent, device=x.device).index_put_((row, col), col)
    else:
        near = nearest[:, :k2].sort(dim=1).values
        terms = (_take(v, near) * x.new_tensor(1.0 / k2)).numpy(force=True)  # (N, k2, N): the product's terms
        expanded = terms[:, 0].copy()
        for t in range(1, k2):  # summed one row after the other, as the sparse product does
            expanded += terms[:, t]
        key = torch.where(_take(v, near) > 0, torch.arange(0, absent, n, device=x.device)[:, None] + columns,
                          absent).amin(1)
        v = torch.from_numpy(expanded).to(x.device)
    width = int((key < absent).sum(1).max())
    return v, key.argsort(dim=1)[:, :width]


def dense_overlaps(v: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """s (N, N) float32, s[i, j] = Σ_k min(v[i, k], v[j, k]) for a dense encoding and ``order`` (N, W) from
    :func:`dense_reciprocal_encoding`; row i's terms are added one by one in ``order[i]``, so s equals
    :meth:`ReciprocalOverlap.sums` bitwise.  Memory: the (N, W, N) float32 terms (N = 64: at most 1 MiB)."""
    terms = torch.minimum(v.gather(1, order).unsqueeze(2), _take(v.T.contiguous(), order)).numpy(force=True)
    s = np.zeros((len(v), len(v)), dtype=np.float32)
    for position in range(order.shape[1]):
        s += terms[:, position]
    return torch.from_numpy(s).to(v.device)


class ReciprocalOverlap:
    """Overlaps s(i, j) = Σ_k min(V[i, k], V[j, k]) of k-reciprocal encodings, computed sparsely by row chunks.

    ``v``: sparse CSR (N, N) from :func:`reciprocal_encoding`; rows i < ``num_rows`` are compared with
    columns j >= ``first_column`` (re-ranking: queries × gallery; clustering: all × all with 0 and N).
    Only an inverted index of the column rows and one dense (rows, N − first_column) chunk are held.
    """

    def __init__(self, v: torch.Tensor, num_rows: int, first_column: int):
        self.crow, self.col, self.val = v.crow_indices(), v.col_indices(), v.values()
        self.inverted = _column_index(self.crow, self.col, self.val, first_column)
        self.num_columns = len(self.crow) - 1 - first_column
        self.pairs_per_row = _pairs_per_row(self.crow, self.col, self.inverted[0], num_rows)

    def row_chunks(self, max_rows: int):
        """Contiguous row-index tensors covering rows 0..num_rows−1, each within ``max_rows`` and the pair budget."""
        return _row_ranges(self.pairs_per_row, max_rows=max_rows, max_pairs=PAIR_BUDGET)

    def sums(self, rows: torch.Tensor) -> torch.Tensor:
        """Dense (len(rows), N − first_column) float32 overlaps of the contiguous ``rows``."""
        crow, col, val = self.crow, self.col, self.val
        colptr, g_row, g_val = self.inverted
        lo, hi = int(crow[rows[0]]), int(crow[rows[-1] + 1])
        k = col[lo:hi]
        owner = torch.repeat_interleave(torch.arange(len(rows), device=col.device), crow[rows + 1] - crow[rows])
        entry, pos = _segments(_take(colptr, k), _take(colptr, k + 1) - _take(colptr, k))
        target = _take(owner, entry).mul_(self.num_columns).add_(_take(g_row, pos))
        s = val.new_zeros(len(rows), self.num_columns)
        s.view(-1).index_add_(0, target, torch.minimum(_take(val[lo:hi], entry), _take(g_val, pos)))
        return s


def _column_index(crow, col, val, first_row):
    """Inverted index of rows >= first_row: CSC parts (colptr, row - first_row, val)."""
    n = len(crow) - 1
    start = int(crow[first_row])
    counts = crow[first_row + 1:] - crow[first_row:-1]
    rows = torch.repeat_interleave(torch.arange(n - first_row, device=col.device), counts)
    order = torch.sort(col[start:], stable=True).indices
    colptr = torch.cat([torch.zeros(1, dtype=torch.int64, device=col.device),
                        torch.cumsum(torch.bincount(col[start:], minlength=n), 0)])
    return colptr, _take(rows, order), _take(val[start:], order)


def _keep_query_gallery(out: torch.Tensor, nq: int):
    """on_block callback copying the query-row × gallery-column part of a distance block into out (Q, G).

    Query rows come first and blocks have a <= b, so that part is never in the transposed half.
    """
    def keep(ra: slice, rb: slice, block: torch.Tensor) -> None:
        r1, c0 = min(ra.stop, nq), max(rb.start, nq)
        if ra.start < r1 and c0 < rb.stop:
            out[ra.start:r1, c0 - nq:rb.stop - nq] = block[:r1 - ra.start, c0 - rb.start:]
    return keep


def _jaccard_into(out, overlap: ReciprocalOverlap, rows, lambda_value, far):
    """out[rows] = (1−λ)·Jaccard(V_q, V_g) + λ·out[rows]/far for query ``rows`` (contiguous; out holds d)."""
    s = overlap.sums(rows)
    jaccard = s.mul(-2.0).add_(2.0).div_(s.neg_().add_(2.0))  # 1 − s/(2 − s) = (2 − 2s)/(2 − s)
    block = out[rows[0]:rows[-1] + 1]
    block.div_(far[rows].unsqueeze(1)).mul_(lambda_value).add_(jaccard, alpha=1.0 - lambda_value)


def k_reciprocal_rerank(query_features: torch.Tensor, gallery_features: torch.Tensor, k1: int = 20, k2: int = 6,
                        lambda_value: float = 0.3, chunk_size: int = 1024) -> torch.Tensor:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017), sparse and chunked.  Returns (Q, G) float32.

    Restates the standard implementation on the given features:
    d = squared Euclidean over all N = Q + G points; the standard code divides each column of d by
    its maximum and transposes, i.e. row i is divided by far_i = max_j d(i, j) (d is symmetric):
    od(i, j) = d(i, j) / far_i.  k-reciprocal sets from the (k1+1)-nearest lists (self included),
    expanded by candidates' round(k1/2)+1 reciprocal sets overlapping by > 2/3;
    V[i, j] = exp(−od(i, j)) normalised over the set; V ← mean of V over the k2 nearest rows
    (if k2 > 1, all N rows); s(i, j) = Σ_k min(V[i, k], V[j, k]);
    result = (1 − λ)(1 − s/(2 − s)) + λ·od for query rows × gallery columns.
    Differences from the standard code: V is float32 (it uses float16) and sparse, so no N×N
    matrix is formed; only the (Q, G) output is dense.
    """
    q = _features("query_features", query_features)
    g = _features("gallery_features", gallery_features).to(q.device)
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"gallery_features: dimension {g.shape[1]} != query dimension {q.shape[1]}")
    x = torch.cat([q, g])
    nq, n = len(q), len(q) + len(g)
    if k1 < 1 or k2 < 1 or max(k1 + 1, k2) > n:
        raise ValueError(f"k1={k1}, k2={k2}: need k1, k2 >= 1 and max(k1 + 1, k2) <= {n} features")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value={lambda_value} must be in [0, 1]")
    sq = (x * x).sum(1)
    out = torch.empty(nq, n - nq, dtype=torch.float32, device=x.device)  # d(query, gallery) first
    _, nearest, far = _exact_knn(x, sq, max(k1 + 1, k2), exclude_self=False, on_block=_keep_query_gallery(out, nq))
    overlap = ReciprocalOverlap(reciprocal_encoding(x, sq, nearest, k1, k2, far, chunk_size), nq, nq)
    for rows in overlap.row_chunks(max_rows=max(1, min(chunk_size, 2**26 // (n - nq)))):
        _jaccard_into(out, overlap, rows, lambda_value, far)
    return out


def _pairs_per_row(crow, col, colptr, nq):
    """Number of min-sum terms of each query row: Σ over its nonzero columns of the column's gallery count."""
    per_entry = _take(colptr[1:] - colptr[:-1], col[:int(crow[nq])])
    owner = torch.repeat_interleave(torch.arange(nq, device=col.device), crow[1:nq + 1] - crow[:nq])
    return torch.zeros(nq, dtype=torch.int64, device=col.device).index_add_(0, owner, per_entry)


def _row_ranges(pairs_per_row, max_rows, max_pairs):
    """Yield contiguous row-index tensors, each <= max_rows rows and <= max_pairs terms (or one row)."""
    start, pairs = 0, 0
    for row, count in enumerate(pairs_per_row.tolist()):
        if row > start and (row - start >= max_rows or pairs + count > max_pairs):
            yield torch.arange(start, row, device=pairs_per_row.device)
            start, pairs = row, 0
        pairs += count
    yield torch.arange(start, len(pairs_per_row), device=pairs_per_row.device)
