"""Ranking evaluation (CMC and mAP) that gives torchreid's numbers, fast.

:func:`evaluate_rank` takes the arguments of torchreid's
``torchreid.reid.metrics.evaluate_rank`` and returns the same values as its
Python path: the CMC curve bit for bit and the mAP to within rounding (1e-15
in practice, 1e-6 promised).

How the market1501 metric is computed
-------------------------------------
torchreid sorts every row of the distance matrix (``np.argsort``), drops the
gallery items of the query's identity seen by the query's camera ("junk") and
reads the positions of the true matches in what is left.  Sorting whole rows
is not needed for that: with the query's ``R`` kept matches sorted by distance
``s_1 <= ... <= s_R``, the ``j``-th of them sits at position
``N_j + j - 1`` of the kept list, where ``N_j`` is the number of gallery items
of *other* identities closer than ``s_j``, as long as no such item is exactly
as far as a match.  ``N_j`` only needs the items closer than the farthest
match, so each row is filtered to those, the (usually short) rest is sorted
with NumPy's SIMD sort and the ``s_j`` are looked up in it.

Ties.  NumPy's default ``argsort`` (quicksort, which is a SIMD sort on x86
CPUs with AVX-512 or AVX2) is *not* stable: equal distances come out in an
order that depends on the whole row.  Only a tie between a true match and an
item of another identity can change the result; a row with such a tie (or a
non-finite match distance) is handed to ``np.argsort`` of that very row,
which is what torchreid does for it, so results are equal by construction.
With float32 distances from features few rows take that path (none of 3,368
and 45 of 11,659 in ``scripts/benchmark_eval.py``'s Market-1501 and MSMT17
sized problems); with coarse or integer-valued distances most rows do.

The CUHK03 metric (``use_metric_cuhk03=True``) samples one gallery image per
identity with ``np.random.choice``, ten times per query, in an order that
depends on the full ranking, so that path sorts every row with
``np.argsort`` (exact).  The draws come from NumPy's global legacy
``RandomState`` in exactly torchreid's order and number, so for the same
``np.random.seed`` the CMC is bit for bit torchreid's and the generator is
left in the same state.  Instead of one ``np.random.choice`` call per draw,
the raw 32-bit outputs of the generator are read in blocks and NumPy's
bounded-integer rule (masked rejection sampling) is replayed on them; a
self-check against real ``np.random.choice`` calls runs once per process and,
should it ever disagree (another NumPy), the literal calls are used.

Devices and memory
------------------
A CUDA ``distmat`` is evaluated on its GPU: rows are processed in chunks of
``B`` rows that are sorted whole (``torch.sort``) and searched
(``torch.searchsorted``), with ``B`` chosen so that the chunk's temporaries
(about 24 bytes per distance) stay within ``memory_budget`` (256 MiB by
default).  Everything else runs on the CPU with NumPy (its sort is ten times
faster than ``torch.sort`` on CPU), in chunks of at most 256 rows spread over
``num_threads`` threads (default ``torch.get_num_threads()``; NumPy releases
the GIL while it sorts); the temporaries are about ``(1 + 2 * itemsize)``
bytes per gallery item per thread, plus, for a CPU tensor of a dtype NumPy
lacks (bfloat16), a float32 copy of the chunk, bounded by ``memory_budget``.
The distance matrix itself is never copied (a ``numpy.memmap`` works).
"""
from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    'evaluate_rank', 'evaluate_rank_details', 'RankResult',
    'DEFAULT_MEMORY_BUDGET'
]

logger = logging.getLogger(__name__)

#: Bytes of temporaries one chunk of rows may take (see the module docstring).
DEFAULT_MEMORY_BUDGET = 256 * 2**20

_CUHK03_REPEATS = 10  # torchreid's num_repeats
_CPU_MAX_CHUNK_ROWS = 256
_GPU_BYTES_PER_DISTANCE = 24  # working copy, sorted values, int64 indices, ...


class RankResult(NamedTuple):
    """What :func:`evaluate_rank_details` returns.

    Attributes:
        cmc (numpy.ndarray): float32 CMC curve, as torchreid's.
        mAP (numpy.float64): mean average precision, as torchreid's.
        num_valid (int): queries with at least one true match in the gallery.
        num_skipped (int): queries without one (left out of both numbers).
        num_exact_sorts (int): valid rows ranked by ``np.argsort`` (ties, or
            every valid row for the CUHK03 metric).
    """
    cmc: np.ndarray
    mAP: Any
    num_valid: int
    num_skipped: int
    num_exact_sorts: int


def evaluate_rank(
    distmat: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    max_rank: int = 50,
    use_metric_cuhk03: bool = False,
    *,
    memory_budget: Optional[int] = None,
    num_threads: Optional[int] = None
) -> Tuple[np.ndarray, Any]:
    """CMC and mAP, equal to torchreid's ``evaluate_rank`` (Python path).

    Gallery items of the query's identity taken by the query's camera are
    ignored; queries without a true match left in the gallery are skipped
    (their number is logged at INFO level, see
    :func:`evaluate_rank_details`).  ``max_rank`` larger than the gallery is
    cut to the gallery size with torchreid's note.

    Args:
        distmat (numpy.ndarray or Tensor): num_query x num_gallery distances
            (any real dtype; a ``numpy.memmap`` is fine).  A CUDA tensor is
            evaluated on its GPU.
        q_pids (array-like): num_query identities of the queries.
        g_pids (array-like): num_gallery identities of the gallery items.
        q_camids (array-like): num_query camera ids of the queries.
        g_camids (array-like): num_gallery camera ids of the gallery items.
        max_rank (int, optional): length of the CMC curve. Default is 50.
        use_metric_cuhk03 (bool, optional): CUHK03's single-gallery-shot
            metric (one random gallery image per identity, 10 repeats, drawn
            from ``np.random`` exactly as torchreid draws them).
            Default is False.
        memory_budget (int, optional): bytes of temporaries per chunk of rows;
            default :data:`DEFAULT_MEMORY_BUDGET` (256 MiB).
        num_threads (int, optional): CPU threads; default
            ``torch.get_num_threads()``.

    Returns:
        tuple: ``(cmc, mAP)``: the float32 CMC curve of length ``max_rank``
        (the gallery size if smaller) and the mAP as a ``numpy.float64``,
        both as torchreid returns them.

    Raises:
        ValueError: shapes or types that do not fit, no query with a true
            match (torchreid's assertion), or valid queries whose CMC curves
            would have different lengths (torchreid fails there too).

    Examples::

        >>> from pmm_torchreid.metrics import evaluate_rank
        >>> distmat = compute_distance_matrix(qf, gf)       # Q x G tensor
        >>> cmc, mAP = evaluate_rank(distmat, q_pids, g_pids,
        ...                          q_camids, g_camids)
        >>> print('mAP {:.1%}, rank-1 {:.1%}'.format(mAP, cmc[0]))  # doctest: +ELLIPSIS
        mAP ...%, rank-1 ...%
    """
    result = _rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank,
                   use_metric_cuhk03, memory_budget, num_threads)
    return result.cmc, result.mAP


def evaluate_rank_details(*args, **kwargs) -> RankResult:
    """:func:`evaluate_rank` with the counts of valid, skipped and tied rows.

    Args:
        The arguments of :func:`evaluate_rank`.

    Returns:
        RankResult: ``cmc``, ``mAP``, ``num_valid``, ``num_skipped`` and
        ``num_exact_sorts``.

    Examples::

        >>> res = evaluate_rank_details(distmat, q_pids, g_pids,
        ...                             q_camids, g_camids)
        >>> res.num_skipped        # queries whose identity is not in the gallery
        0
    """
    return _rank(*args, **kwargs)


def _rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50,
          use_metric_cuhk03=False, memory_budget=None,
          num_threads=None) -> RankResult:
    prob = _Problem(distmat, q_pids, g_pids, q_camids, g_camids)
    if isinstance(max_rank, bool) or int(max_rank) != max_rank \
            or max_rank < 1:
        raise ValueError(
            'max_rank must be a positive integer, got {!r}'.format(max_rank))
    max_rank = int(max_rank)
    if prob.num_g < max_rank:
        max_rank = prob.num_g
        print(
            'Note: number of gallery samples is quite small, got {}'.format(
                prob.num_g))
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None \
        else int(memory_budget)
    if budget < 1:
        raise ValueError('memory_budget must be positive, got {!r}'.format(
            memory_budget))
    threads = torch.get_num_threads() if num_threads is None \
        else int(num_threads)
    threads = max(1, threads)

    if use_metric_cuhk03:
        return _eval_cuhk03(prob, max_rank, budget)
    if prob.device is not None:
        rows = _market_gpu(prob, budget)
    else:
        rows = _market_cpu(prob, budget, threads)
    return _summarise_market(prob, rows, max_rank)


# ----------------------------------------------------------------------------
# input


def _to_numpy_1d(x: Any, name: str, length: int) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 1 or arr.shape[0] != length:
        raise ValueError(
            '{} must be 1-D with {} entries (one per {} row/column of '
            'distmat), got shape {}'.format(
                name, length, 'query' if name.startswith('q') else
                'gallery', arr.shape))
    return arr


def _codes(a: np.ndarray, b: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Equal values of ``a`` and ``b`` as equal small int64 codes."""
    both = np.concatenate([a, b])
    if both.dtype.kind not in 'biuf':
        raise TypeError(
            'identities and camera ids must be numbers, got dtype {}'.format(
                both.dtype))
    _, inverse = np.unique(both, return_inverse=True)
    inverse = inverse.reshape(-1).astype(np.int64)
    return inverse[:a.shape[0]], inverse[a.shape[0]:]


class _Problem:
    """Validated inputs: identities and cameras as codes, and row access."""

    def __init__(self, distmat, q_pids, g_pids, q_camids, g_camids):
        self.device = None
        self.tensor = None
        self.array = None
        if isinstance(distmat, torch.Tensor):
            t = distmat.detach()
            if t.dim() != 2:
                raise ValueError(
                    'distmat must be 2-D (num_query x num_gallery), got '
                    'shape {}'.format(tuple(t.shape)))
            if t.is_complex():
                raise TypeError(
                    'distmat must hold real numbers, got {}'.format(t.dtype))
            if t.device.type != 'cpu':
                self.device = t.device
                self.tensor = t
            elif t.dtype == torch.bfloat16:
                self.tensor = t  # NumPy lacks it: float32 rows per chunk
            else:
                self.array = t.resolve_conj().resolve_neg().numpy()
            shape = tuple(t.shape)
        else:
            arr = np.asarray(distmat)
            if arr.ndim != 2:
                raise ValueError(
                    'distmat must be 2-D (num_query x num_gallery), got '
                    'shape {}'.format(arr.shape))
            if arr.dtype.kind not in 'biuf':
                raise TypeError(
                    'distmat must hold real numbers, got dtype {}'.format(
                        arr.dtype))
            self.array = arr
            shape = arr.shape
        self.num_q, self.num_g = int(shape[0]), int(shape[1])
        q_pids = _to_numpy_1d(q_pids, 'q_pids', self.num_q)
        g_pids = _to_numpy_1d(g_pids, 'g_pids', self.num_g)
        q_camids = _to_numpy_1d(q_camids, 'q_camids', self.num_q)
        g_camids = _to_numpy_1d(g_camids, 'g_camids', self.num_g)
        self.q_pid, self.g_pid = _codes(q_pids, g_pids)
        self.q_cam, self.g_cam = _codes(q_camids, g_camids)
        # gallery indices of every identity code, ascending: by_pid[a:b]
        num_codes = int(max(self.q_pid.max(initial=-1),
                            self.g_pid.max(initial=-1))) + 1
        self.by_pid = np.argsort(self.g_pid, kind='stable')
        counts = np.bincount(self.g_pid, minlength=num_codes)
        self.pid_end = np.cumsum(counts)
        self.pid_start = self.pid_end - counts

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as NumPy would hold them (a view where
        possible; float32 for bfloat16, which NumPy lacks)."""
        if self.array is not None:
            return self.array[start:stop]
        rows = self.tensor[start:stop]
        if rows.dtype == torch.bfloat16:
            rows = rows.float()
        return rows.cpu().resolve_conj().resolve_neg().numpy()

    def exact_row(self, i: int) -> np.ndarray:
        """Row ``i`` as torchreid would see it (NumPy, float32 for types
        NumPy lacks)."""
        return self.rows(i, i + 1)[0]

    def same_pid(self, q: int) -> np.ndarray:
        code = self.q_pid[q]
        return self.by_pid[self.pid_start[code]:self.pid_end[code]]

    def row_bytes(self) -> int:
        """Bytes of one row as :meth:`rows` returns it."""
        if self.array is not None:
            return self.num_g * self.array.dtype.itemsize
        return self.num_g * max(4, self.tensor.element_size())


# ----------------------------------------------------------------------------
# market1501 metric


class _MarketRows(NamedTuple):
    """Per query: first kept match position (-1: no match), AP, kept count
    and whether np.argsort ranked it."""
    first: np.ndarray
    ap: np.ndarray
    kept: np.ndarray
    exact: np.ndarray


def _new_rows(n: int) -> _MarketRows:
    return _MarketRows(
        np.full(n, -1, np.int64), np.full(n, np.nan), np.zeros(n, np.int64),
        np.zeros(n, bool))


def _average_precision(positions: np.ndarray) -> float:
    """AP from the ascending 0-based positions of the true matches among the
    kept gallery items."""
    hits = np.arange(1, positions.shape[0] + 1, dtype=np.float64)
    return float(np.sum(hits / (positions + 1.0)) / positions.shape[0])


def _exact_positions(prob: _Problem, q: int, row: np.ndarray) -> np.ndarray:
    """torchreid's ranking of one row: kept positions of its true matches."""
    order = np.argsort(row)
    pid = prob.g_pid[order] == prob.q_pid[q]
    junk = pid & (prob.g_cam[order] == prob.q_cam[q])
    return np.flatnonzero(pid[~junk])


def _market_cpu(prob: _Problem, budget: int, threads: int) -> _MarketRows:
    out = _new_rows(prob.num_q)
    chunk = _CPU_MAX_CHUNK_ROWS
    if prob.array is None:  # converted float32 copies count against it
        chunk = min(chunk, max(1, budget // (threads * prob.row_bytes())))
    # a few chunks per thread, so that the threads stay busy to the end
    chunk = max(1, min(chunk, -(-prob.num_q // (4 * threads))))
    bounds = [(a, min(a + chunk, prob.num_q))
              for a in range(0, prob.num_q, chunk)]

    def work(bound):
        _market_cpu_chunk(prob, bound[0], bound[1], out)

    _run(work, bounds, threads)
    return out


def _run(fn: Callable, items: Sequence, threads: int) -> None:
    if threads <= 1 or len(items) <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
        for _ in pool.map(fn, items):
            pass


def _market_cpu_chunk(prob: _Problem, start: int, stop: int,
                      out: _MarketRows) -> None:
    rows = prob.rows(start, stop)
    is_float = rows.dtype.kind == 'f'
    num_g = prob.num_g
    for i in range(stop - start):
        q = start + i
        same = prob.same_pid(q)
        if same.shape[0] == 0:
            continue
        junk = prob.g_cam[same] == prob.q_cam[q]
        matches = same[~junk]
        num_match = matches.shape[0]
        if num_match == 0:
            continue
        out.kept[q] = num_g - (same.shape[0] - num_match)
        row = rows[i]
        s = np.sort(row[matches])
        far = s[-1]
        positions = None
        if not is_float or np.isfinite(far):
            closer = row <= far  # NaN compares False
            closer[same] = False  # only other identities are counted
            others = row[closer]
            others.sort()
            before = others.searchsorted(s, 'left')
            if (others.searchsorted(s, 'right') == before).all():
                positions = before + np.arange(num_match)
        if positions is None:  # a tie with another identity: sort the row
            positions = _exact_positions(prob, q, row)
            out.exact[q] = True
        out.first[q] = positions[0]
        out.ap[q] = _average_precision(positions)


def _market_gpu(prob: _Problem, budget: int) -> _MarketRows:
    out = _new_rows(prob.num_q)
    t = prob.tensor
    dev = prob.device
    work_dtype = t.dtype if t.dtype in (torch.float32, torch.float64) \
        else (torch.float64 if not t.is_floating_point() else torch.float32)
    chunk = max(1, budget // max(1, (prob.num_g + 1) * _GPU_BYTES_PER_DISTANCE))
    g_cam = prob.g_cam
    for start in range(0, prob.num_q, chunk):
        stop = min(start + chunk, prob.num_q)
        qs = np.arange(start, stop)
        sames = [prob.same_pid(q) for q in qs]
        counts = np.array([s.shape[0] for s in sames], np.int64)
        width = int(counts.max(initial=0))
        if width == 0:
            continue
        # padded same-identity gallery indices; the padding points at an
        # extra column that holds +inf
        idx = np.full((stop - start, width), prob.num_g, np.int64)
        match = np.zeros((stop - start, width), bool)
        for i, same in enumerate(sames):
            idx[i, :same.shape[0]] = same
            match[i, :same.shape[0]] = g_cam[same] != prob.q_cam[start + i]
        num_match = match.sum(1)
        if not num_match.any():
            continue
        has_q = np.flatnonzero(num_match > 0)
        out.kept[start + has_q] = prob.num_g - (counts - num_match)[has_q]
        d = torch.empty((stop - start, prob.num_g + 1), dtype=work_dtype,
                        device=dev)
        d[:, :prob.num_g] = t[start:stop]
        d[:, prob.num_g] = math.inf
        if d.is_floating_point():
            d.nan_to_num_(nan=math.inf, posinf=math.inf, neginf=-math.inf)
        idx_t = torch.from_numpy(idx).to(dev)
        match_t = torch.from_numpy(match).to(dev)
        s = torch.where(match_t, d.gather(1, idx_t),
                        torch.full((), math.inf, dtype=work_dtype, device=dev))
        s = torch.sort(s, dim=1).values
        num_match_t = torch.from_numpy(num_match).to(dev)
        far = s.gather(1, (num_match_t - 1).clamp(min=0).view(-1, 1))
        d.scatter_(1, idx_t, math.inf)  # only other identities are counted
        d = torch.sort(d, dim=1).values
        before = torch.searchsorted(d, s, right=False)
        tie = torch.searchsorted(d, s, right=True) != before
        j = torch.arange(width, device=dev).view(1, -1)
        tie = (tie & (j < num_match_t.view(-1, 1))).any(1)
        tie |= ~torch.isfinite(far.view(-1).double())
        before = before.cpu().numpy()
        tie = tie.cpu().numpy()
        del d, s
        for i in has_q:
            q = start + i
            if tie[i]:
                positions = _exact_positions(prob, q, prob.exact_row(q))
                out.exact[q] = True
            else:
                positions = before[i, :num_match[i]] + np.arange(num_match[i])
            out.first[q] = positions[0]
            out.ap[q] = _average_precision(positions)
    return out


def _cmc_length(prob: _Problem, lengths: np.ndarray) -> int:
    """torchreid stacks one curve per valid query; they must agree."""
    length = int(lengths[0])
    if (lengths != length).any():
        raise ValueError(
            'the CMC curves of the valid queries have different lengths '
            '({} to {}): max_rank is larger than what some queries have '
            'left once their same-camera images are removed; torchreid '
            'cannot stack them either (inhomogeneous shape).  Use a smaller '
            'max_rank (at most {}).'.format(
                int(lengths.min()), int(lengths.max()), int(lengths.min())))
    return length


def _cmc_from_first(first: np.ndarray, length: int,
                    num_valid: int) -> np.ndarray:
    hits = np.bincount(first[first < length], minlength=length)
    cmc = np.cumsum(hits).astype(np.float32)
    # torchreid: float32 sum of 0/1 rows (exact), divided in float32
    return cmc / np.float32(num_valid)


def _count_valid(num_valid: int, num_q: int) -> int:
    """The skipped queries (logged); an error when none is valid."""
    if num_valid == 0:
        raise ValueError(
            'Error: all query identities do not appear in gallery (no query '
            'has a true match in the gallery once same-camera images are '
            'removed)')
    num_skipped = num_q - num_valid
    if num_skipped:
        logger.info('%d of %d queries have no true match in the gallery and '
                    'are skipped', num_skipped, num_q)
    return num_skipped


def _summarise_market(prob: _Problem, rows: _MarketRows,
                      max_rank: int) -> RankResult:
    valid = rows.first >= 0
    num_valid = int(valid.sum())
    num_skipped = _count_valid(num_valid, prob.num_q)
    length = _cmc_length(prob, np.minimum(rows.kept[valid], max_rank))
    cmc = _cmc_from_first(rows.first[valid], length, num_valid)
    mAP = np.mean(rows.ap[valid])
    return RankResult(cmc, mAP, num_valid, num_skipped,
                      int(rows.exact[valid].sum()))


# ----------------------------------------------------------------------------
# CUHK03 metric


def _eval_cuhk03(prob: _Problem, max_rank: int, budget: int) -> RankResult:
    draw = _ChoiceReplay() if _replay_is_exact() else _LiteralChoice()
    curves: List[np.ndarray] = []
    aps: List[float] = []
    chunk = max(1, min(_CPU_MAX_CHUNK_ROWS,
                       budget // max(1, prob.num_g * 16)))
    try:
        for start in range(0, prob.num_q, chunk):
            stop = min(start + chunk, prob.num_q)
            rows = prob.rows(start, stop)
            for i in range(stop - start):
                q = start + i
                if prob.same_pid(q).shape[0] == 0:
                    continue  # identity not in the gallery: no draws either
                res = _cuhk03_row(prob, q, rows[i], max_rank, draw)
                if res is not None:
                    curves.append(res[0])
                    aps.append(res[1])
    finally:
        draw.finish()
    num_valid = len(curves)
    num_skipped = _count_valid(num_valid, prob.num_q)
    _cmc_length(prob, np.array([c.shape[0] for c in curves]))
    # same float32 array and reduction as torchreid, so the same rounding
    cmc = np.asarray(curves).astype(np.float32).sum(0) / np.float32(num_valid)
    return RankResult(cmc, np.mean(np.asarray(aps)), num_valid, num_skipped,
                      num_valid)


def _cuhk03_row(prob, q, row, max_rank, draw):
    order = np.argsort(row)
    pids = prob.g_pid[order]
    same = pids == prob.q_pid[q]
    kept = ~(same & (prob.g_cam[order] == prob.q_cam[q]))
    pids = pids[kept]
    positions = np.flatnonzero(same[kept])
    if positions.shape[0] == 0:
        return None
    # one group per identity, in order of first appearance, each holding its
    # kept positions in ascending order (torchreid's dict of lists)
    grouped = np.argsort(pids, kind='stable')
    sorted_pids = pids[grouped]
    starts = np.flatnonzero(np.r_[True, sorted_pids[1:] != sorted_pids[:-1]])
    sizes = np.diff(np.r_[starts, sorted_pids.shape[0]])
    by_first = np.argsort(grouped[starts])  # first positions are distinct
    starts, sizes = starts[by_first], sizes[by_first]
    own = int(np.flatnonzero(sorted_pids[starts] == prob.q_pid[q])[0])
    num_groups = starts.shape[0]
    picks = draw(np.tile(sizes, _CUHK03_REPEATS))
    chosen = grouped[starts + picks.reshape(_CUHK03_REPEATS, num_groups)]
    rank = (chosen < chosen[:, own:own + 1]).sum(1)  # other identities ahead
    length = min(max_rank, num_groups)
    hits = np.bincount(rank[rank < length], minlength=length)
    curve = np.cumsum(hits).astype(np.float32) / np.float32(_CUHK03_REPEATS)
    return curve, _average_precision(positions)


class _LiteralChoice:
    """One ``np.random.choice`` call per draw, as torchreid makes them."""

    def __call__(self, sizes: np.ndarray) -> np.ndarray:
        return np.array([np.random.choice(int(n)) for n in sizes], np.int64)

    def finish(self) -> None:
        pass


class _ChoiceReplay:
    """Replays ``np.random.choice(n)`` draws of the global legacy RandomState.

    ``RandomState.choice(n)`` is ``randint(0, n)``, which (for ``n <= 2**32``)
    draws nothing when ``n == 1`` and otherwise takes 32-bit outputs ``u``
    of MT19937 until ``u & mask <= n - 1`` (``mask``: all ones up to the top
    bit of ``n - 1``) and returns ``u & mask``.  Raw outputs are read in
    blocks with ``randint(0, 2**32, dtype=uint32)`` (one output per value);
    :meth:`finish` rewinds the generator and advances it by exactly the
    outputs the replayed draws used.
    """

    block = 1 << 16  # raw outputs fetched at a time (at least)
    per_draw, slack = 4, 4096  # outputs reserved per call: see __call__

    def __init__(self):
        self.state = np.random.get_state()
        self.raw: List[int] = []
        self.pos = 0
        self.used = 0  # outputs consumed before self.raw[0]

    def _reserve(self, need: int) -> None:
        """At least ``need`` unread raw outputs in the buffer."""
        if len(self.raw) - self.pos >= need:
            return
        fresh = np.random.randint(0, 2**32, size=max(self.block, need),
                                  dtype=np.uint32).tolist()
        self.used += self.pos
        self.raw = self.raw[self.pos:] + fresh
        self.pos = 0

    def __call__(self, sizes: np.ndarray) -> np.ndarray:
        sizes = np.asarray(sizes, np.int64)
        if sizes.shape[0] and sizes.min() < 1:
            raise ValueError('cannot choose from an empty group')
        tops = sizes - 1
        # all ones up to the top bit of n - 1 (0 for n == 1: nothing drawn);
        # frexp's exponent is the bit length for these (< 2**53) integers
        masks = np.left_shift(1, np.frexp(tops.astype(np.float64))[1]) - 1
        # Every draw takes one output with probability > 1/2, so four per
        # draw are practically always enough; should they not be, the call
        # is replayed with a larger buffer.
        need = self.per_draw * sizes.shape[0] + self.slack
        while True:
            self._reserve(need)
            raw, pos = self.raw, self.pos
            out: List[int] = []
            append = out.append
            try:
                for top, mask in zip(tops.tolist(), masks.tolist()):
                    if mask:
                        value = raw[pos] & mask
                        pos += 1
                        while value > top:
                            value = raw[pos] & mask
                            pos += 1
                        append(value)
                    else:
                        append(0)
            except IndexError:  # about 2**-4096 likely (tests force it)
                need = 2 * need + 1
                continue
            self.pos = pos
            return np.array(out, np.int64)

    def finish(self) -> None:
        consumed = self.used + self.pos
        np.random.set_state(self.state)
        while consumed > 0:
            step = min(consumed, 1 << 22)
            np.random.randint(0, 2**32, size=step, dtype=np.uint32)
            consumed -= step


_REPLAY_OK: Optional[bool] = None


def _states_equal(a, b) -> bool:
    return (a[0] == b[0] and np.array_equal(a[1], b[1]) and a[2:] == b[2:])


def _replay_is_exact() -> bool:
    """Once per process: do replayed draws equal real ``np.random.choice``
    draws (values and the generator's state afterwards)?"""
    global _REPLAY_OK
    if _REPLAY_OK is None:
        saved = np.random.get_state()
        try:
            np.random.seed(12345)
            sizes = np.array([1, 2, 3, 5, 6, 7, 8, 9, 13, 17, 31, 33, 64, 65,
                              100, 1000, 4097, 70001, 2**20 + 1, 1, 3] * 40)
            start = np.random.get_state()
            literal = [np.random.choice(list(range(n))) if n < 200 else
                       np.random.choice(n) for n in sizes.tolist()]
            after_literal = np.random.get_state()
            np.random.set_state(start)
            replay = _ChoiceReplay()
            replay.block = 97  # exercise refills
            replayed = np.concatenate([replay(part) for part in
                                       np.array_split(sizes, 50)])
            replay.finish()
            _REPLAY_OK = (replayed.tolist() == [int(v) for v in literal]
                          and _states_equal(np.random.get_state(),
                                            after_literal))
        except Exception:  # noqa: BLE001  (whatever fails: use real calls)
            _REPLAY_OK = False
        finally:
            np.random.set_state(saved)
        if not _REPLAY_OK:  # pragma: no cover
            logger.warning('replayed np.random.choice draws differ from real '
                           'ones in this NumPy; using np.random.choice calls')
    return _REPLAY_OK
