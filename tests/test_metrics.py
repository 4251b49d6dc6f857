"""pmm_torchreid.metrics.evaluate_rank against torchreid's evaluate_rank
(Python path): the CMC bit for bit, the mAP to 1e-6, the same errors, and for
the CUHK03 metric the same random draws (same CMC and the same state of
``np.random`` afterwards)."""
import contextlib
import inspect
import io
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

with warnings.catch_warnings():  # torchreid: "Cython evaluation ..."
    warnings.simplefilter('ignore')
    from torchreid.reid.metrics import rank as tr_rank

    from pmm_torchreid.metrics import evaluate_rank, evaluate_rank_details
    from pmm_torchreid.metrics import rank as metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROPERTY = settings(max_examples=150, deadline=None, derandomize=True)


def _torchreid_cuhk03():
    """torchreid's eval_cuhk03.  It spells ``np.bool``, which NumPy 1.24 to
    1.26 lack (NumPy 2 has it again); only there, a copy with ``np.bool_``
    is used (TEST-ONLY PATCH, nothing else changed)."""
    if hasattr(np, 'bool'):
        return tr_rank.eval_cuhk03
    source = inspect.getsource(tr_rank.eval_cuhk03)
    assert source.count('dtype=np.bool)') == 1
    namespace = dict(vars(tr_rank))
    exec(compile(source.replace('dtype=np.bool)', 'dtype=np.bool_)'),
                 '<eval_cuhk03 patched for np.bool>', 'exec'), namespace)
    return namespace['eval_cuhk03']


TR_CUHK03 = _torchreid_cuhk03()


def reference(distmat, q_pids, g_pids, q_camids, g_camids, max_rank,
              cuhk03=False, seed=0):
    """torchreid's result, or the exception it raises; and np.random's state
    afterwards."""
    np.random.seed(seed)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            if cuhk03:
                out = TR_CUHK03(distmat, q_pids, g_pids, q_camids, g_camids,
                                min(max_rank, distmat.shape[1]))
            else:
                out = tr_rank.evaluate_rank(
                    distmat, q_pids, g_pids, q_camids, g_camids, max_rank,
                    use_metric_cuhk03=False, use_cython=False)
    except (AssertionError, ValueError) as exc:
        out = exc
    return out, np.random.get_state()


def ours(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, cuhk03=False,
         seed=0, **kwargs):
    np.random.seed(seed)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            out = evaluate_rank_details(distmat, q_pids, g_pids, q_camids,
                                        g_camids, max_rank, cuhk03, **kwargs)
    except ValueError as exc:
        out = exc
    return out, np.random.get_state()


def same_state(a, b):
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and a[2:] == b[2:]


def assert_same(ref, got):
    """Equal CMC (dtype and bits) and mAP; or both failed (torchreid's
    assertion / ragged stacking, our ValueError)."""
    (r, r_state), (g, g_state) = ref, got
    if isinstance(r, Exception):
        assert isinstance(g, ValueError), (r, g)
        if isinstance(r, AssertionError):
            assert 'do not appear in gallery' in str(g)
        else:
            assert 'different lengths' in str(g)
    else:
        assert not isinstance(g, Exception), (r, g)
        cmc, mAP = r
        assert g.cmc.dtype == np.float32 == cmc.dtype
        assert g.cmc.shape == cmc.shape
        assert np.array_equal(g.cmc.view(np.uint32), cmc.view(np.uint32))
        assert abs(float(g.mAP) - float(mAP)) <= 1e-6
        assert isinstance(g.mAP, np.float64)
    assert same_state(r_state, g_state)


def random_problem(seed, num_q, num_g, num_ids, num_cams, kind):
    """Identities 0..num_ids-1, about one query in ten of an identity the
    gallery lacks; ``kind``: 'float' (continuous), 'ties' (integer-valued
    float32), 'int' (int64), 'float64', 'nan' (ties plus NaN and +-inf)."""
    rng = np.random.default_rng(seed)
    q_pids = rng.integers(0, num_ids, num_q)
    q_pids[rng.random(num_q) < 0.1] = num_ids
    g_pids = rng.integers(0, num_ids, num_g)
    q_camids = rng.integers(0, num_cams, num_q)
    g_camids = rng.integers(0, num_cams, num_g)
    if kind == 'float':
        distmat = rng.random((num_q, num_g)).astype(np.float32)
    elif kind == 'float64':
        distmat = rng.random((num_q, num_g))
    elif kind == 'int':
        distmat = rng.integers(0, 4, (num_q, num_g))
    else:
        distmat = rng.integers(0, 4, (num_q, num_g)).astype(np.float32)
        if kind == 'nan':
            distmat[rng.random(distmat.shape) < 0.15] = np.nan
            distmat[rng.random(distmat.shape) < 0.1] = np.inf
            distmat[rng.random(distmat.shape) < 0.05] = -np.inf
    return distmat, q_pids, g_pids, q_camids, g_camids


# one camera (everything of the query's identity is junk) has its own test
problems = st.tuples(
    st.integers(0, 2**31), st.integers(1, 25), st.integers(1, 80),
    st.integers(1, 8), st.integers(2, 4),
    st.sampled_from(['float', 'ties', 'int', 'float64', 'nan']))
# mostly within the gallery; 70 (past it) now and then
max_ranks = st.integers(1, 30).map(lambda k: 70 if k == 30 else k)


@PROPERTY
@given(problems, max_ranks)
def test_market_metric_equals_torchreid(problem, max_rank):
    args = random_problem(*problem)
    assert_same(reference(*args, max_rank), ours(*args, max_rank))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(problems, max_ranks, st.integers(0, 2**32 - 1))
def test_cuhk03_metric_equals_torchreid_draw_for_draw(problem, max_rank,
                                                      seed):
    args = random_problem(*problem)
    assert_same(reference(*args, max_rank, cuhk03=True, seed=seed),
                ours(*args, max_rank, cuhk03=True, seed=seed))


def torch_path(distmat, q_pids, g_pids, q_camids, g_camids, max_rank,
               memory_budget):
    """The CUDA code path, run with CPU tensors (no GPU needed)."""
    prob = metrics._Problem(distmat, q_pids, g_pids, q_camids, g_camids)
    prob.device, prob.tensor, prob.array = (
        torch.device('cpu'), torch.as_tensor(distmat), None)
    max_rank = min(max_rank, prob.num_g)
    return metrics._summarise_market(
        prob, metrics._market_gpu(prob, memory_budget), max_rank)


@PROPERTY
@given(problems, max_ranks, st.integers(1, 20000))
def test_torch_code_path_equals_torchreid(problem, max_rank, budget):
    # a small budget makes chunks of one or a few rows
    args = random_problem(*problem)
    try:
        got = torch_path(*args, max_rank, budget)
    except ValueError as exc:
        got = exc
    assert_same(reference(*args, max_rank), (got, np.random.get_state()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_equals_torchreid():
    for seed in range(20):
        args = random_problem(seed, 40, 300, 10, 3,
                              ['float', 'ties', 'nan'][seed % 3])
        got = ours(torch.from_numpy(args[0]).cuda(), *args[1:], 50,
                   memory_budget=300 * 24 * 7)
        assert_same(reference(*args, 50), got)


def test_inputs_as_tensors_and_views():
    distmat, q_pids, g_pids, q_camids, g_camids = random_problem(
        3, 20, 50, 5, 3, 'ties')
    ref = reference(distmat, q_pids, g_pids, q_camids, g_camids, 10)
    tensors = [torch.from_numpy(a) for a in
               (distmat, q_pids, g_pids, q_camids, g_camids)]
    assert_same(ref, ours(*tensors, 10))
    # a Fortran-ordered copy: torchreid sorts the same values
    assert_same(ref, ours(np.asfortranarray(distmat), q_pids, g_pids,
                          q_camids, g_camids, 10))
    # float16 stays float16 (torchreid would sort float16 values)
    half = distmat.astype(np.float16)
    assert_same(reference(half, q_pids, g_pids, q_camids, g_camids, 10),
                ours(half, q_pids, g_pids, q_camids, g_camids, 10))
    # bfloat16 tensors (NumPy has no bfloat16): as float32
    bf = torch.from_numpy(distmat).bfloat16()
    assert_same(reference(bf.float().numpy(), q_pids, g_pids, q_camids,
                          g_camids, 10),
                ours(bf, q_pids, g_pids, q_camids, g_camids, 10))


def test_threads_and_budget_do_not_change_results():
    args = random_problem(5, 200, 120, 12, 3, 'ties')
    base = evaluate_rank_details(*args, 20, num_threads=1)
    for threads, budget in ((2, None), (3, 1), (2, 10**9)):
        res = evaluate_rank_details(*args, 20, num_threads=threads,
                                    memory_budget=budget)
        assert np.array_equal(res.cmc, base.cmc) and res.mAP == base.mAP


def test_numpy_argsort_rows_are_the_rows_of_the_2d_argsort():
    """The exact fallback relies on this: argsort of one row (a view, a
    copy, a misaligned copy) equals that row of the 2-D argsort.  (The order
    of ties is not the stable one on this NumPy; this is not asserted, as it
    depends on the CPU.)"""
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64, np.int64, np.float16):
        a = rng.integers(0, 6, (12, 3001)).astype(dtype)
        full = np.argsort(a, axis=1)
        for i in range(a.shape[0]):
            assert np.array_equal(np.argsort(a[i]), full[i])
            buf = np.empty(a.shape[1] + 1, dtype)
            buf[1:] = a[i]
            assert np.array_equal(np.argsort(buf[1:]), full[i])


def test_ties_are_resolved_as_torchreid_and_a_wrong_tie_break_is_caught(
        monkeypatch):
    args = random_problem(11, 60, 400, 15, 3, 'ties')
    ref = reference(*args, 50)
    got = ours(*args, 50)
    assert_same(ref, got)
    assert got[0].num_exact_sorts > 0  # ties did occur
    # the same rows ranked with a stable sort (index order on ties): torchreid
    # does not do that, and the comparison notices
    real_argsort = np.argsort

    def stable_argsort(a, *rest, **kw):
        return real_argsort(a, kind='stable')

    def stable_positions(prob, q, row):
        with monkeypatch.context() as m:
            m.setattr(metrics.np, 'argsort', stable_argsort)
            return real_positions(prob, q, row)

    real_positions = metrics._exact_positions
    monkeypatch.setattr(metrics, '_exact_positions', stable_positions)
    with pytest.raises(AssertionError):
        assert_same(ref, ours(*args, 50))


def test_tie_detection_is_needed(monkeypatch):
    """Without the check for ties, counting alone gets tied rows wrong."""
    args = random_problem(12, 60, 400, 15, 3, 'ties')
    ref = reference(*args, 50)
    real = np.ndarray.searchsorted

    class Row(np.ndarray):
        def searchsorted(self, v, side='left', sorter=None):
            return real(self, v, 'left')  # 'right' answers like 'left'

    real_chunk = metrics._market_cpu_chunk

    def chunk_without_tie_check(prob, start, stop, out):
        real_rows = prob.rows
        prob.rows = lambda a, b: real_rows(a, b).view(Row)
        try:
            real_chunk(prob, start, stop, out)
        finally:
            del prob.rows

    monkeypatch.setattr(metrics, '_market_cpu_chunk', chunk_without_tie_check)
    # one thread: the patch above swaps an attribute of the shared problem
    got = ours(*args, 50, num_threads=1)
    assert got[0].num_exact_sorts == 0
    with pytest.raises(AssertionError):
        assert_same(ref, got)


def test_queries_without_matches_are_skipped_and_counted():
    rng = np.random.default_rng(4)
    distmat = rng.random((6, 30)).astype(np.float32)
    g_pids = np.repeat([1, 2, 3], 10)
    g_camids = np.tile([0, 1], 15)
    # query 0: identity 7 is not in the gallery; queries 1 and 5: identity 3
    # is only seen by the query's own camera, so all of it is junk
    q_pids = np.array([7, 3, 1, 2, 1, 3])
    q_camids = np.array([0, 0, 0, 1, 1, 0])
    g_camids[g_pids == 3] = 0
    args = (distmat, q_pids, g_pids, q_camids, g_camids)
    ref = reference(*args, 5)
    got = ours(*args, 5)
    assert_same(ref, got)
    assert (got[0].num_valid, got[0].num_skipped) == (3, 3)


def test_no_valid_query_is_an_error_as_in_torchreid():
    # a single camera: every same-identity gallery item is junk
    distmat, q_pids, g_pids, _, _ = random_problem(1, 10, 40, 4, 1, 'float')
    q_camids, g_camids = np.zeros(10, int), np.zeros(40, int)
    args = (distmat, q_pids, g_pids, q_camids, g_camids)
    for cuhk03 in (False, True):
        ref = reference(*args, 10, cuhk03)
        assert isinstance(ref[0], AssertionError)
        assert_same(ref, ours(*args, 10, cuhk03))


def test_junk_and_distractor_identities():
    rng = np.random.default_rng(6)
    g_pids = np.r_[np.repeat(np.arange(1, 9), 6), np.zeros(30, int),
                   -np.ones(10, int)]
    g_camids = rng.integers(0, 3, g_pids.shape[0])
    q_pids = np.arange(1, 9).repeat(2)
    q_camids = rng.integers(0, 3, q_pids.shape[0])
    distmat = rng.random((q_pids.shape[0], g_pids.shape[0])).astype(
        np.float32)
    for cuhk03 in (False, True):
        args = (distmat, q_pids, g_pids, q_camids, g_camids)
        assert_same(reference(*args, 50, cuhk03, seed=3),
                    ours(*args, 50, cuhk03, seed=3))


def test_max_rank_above_gallery_size(capsys):
    # every query keeps the whole gallery of 7 (no same-camera images)
    rng = np.random.default_rng(8)
    g_pids, g_camids = np.arange(7) % 3, np.ones(7, int)
    q_pids, q_camids = np.array([0, 1, 2, 1]), np.zeros(4, int)
    distmat = rng.random((4, 7)).astype(np.float32)
    args = (distmat, q_pids, g_pids, q_camids, g_camids)
    cmc, _ = evaluate_rank(*args, max_rank=50)
    assert 'number of gallery samples is quite small, got 7' in \
        capsys.readouterr().out
    assert cmc.shape == (7, )
    assert_same(reference(*args, 50), ours(*args, 50))
    # now query 0 loses a same-camera image: curves of 6 and 7 entries,
    # which torchreid cannot stack; we say why
    g_camids[0] = 0
    ref = reference(*args, 50)
    assert isinstance(ref[0], ValueError)
    got = ours(*args, 50)
    assert_same(ref, got)
    assert 'at most 6' in str(got[0])


@pytest.mark.slow
def test_benchmark_script_agrees_with_torchreid_on_small_problems():
    """scripts/benchmark_eval.py end to end: a 300 x 3000 problem shaped like
    Market-1501 and a CUHK03-metric one, each compared with torchreid's
    Python path (the script exits 1 when any output differs)."""
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'scripts', 'benchmark_eval.py'),
         '--sizes', 'small', 'small-cuhk03', '--repeats', '1',
         '--threads', '1', '--seed', '1'],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert out.count('CMC equal bit for bit: True') == 2, out
    found = re.search(r'mAP (0\.\d+), rank-1 [\d.]+, rank-5 [\d.]+; '
                      r'300 valid, 0 skipped', out)
    assert found and 0.3 < float(found.group(1)) < 0.95, out


def test_replayed_draws_equal_np_random_choice(monkeypatch):
    assert metrics._replay_is_exact()
    rng = np.random.default_rng(2)
    sizes = rng.integers(1, 3000, 5000)
    sizes[::7] = 1
    sizes[::11] = 2**rng.integers(0, 12, sizes[::11].shape[0])
    np.random.seed(77)
    literal = [np.random.choice(list(range(n))) if n < 50 else
               np.random.choice(n) for n in sizes.tolist()]
    after = np.random.get_state()
    for per_draw, slack in ((4, 4096), (0, 1)):  # (0, 1): buffer overruns
        np.random.seed(77)
        replay = metrics._ChoiceReplay()
        replay.block, replay.per_draw, replay.slack = 1000, per_draw, slack
        got = np.concatenate([replay(part)
                              for part in np.array_split(sizes, 40)])
        replay.finish()
        assert got.tolist() == literal
        assert same_state(np.random.get_state(), after)
    # and the one-call-per-draw path (used should the replay ever disagree)
    # gives the same results
    args = random_problem(21, 15, 60, 6, 3, 'ties')
    monkeypatch.setattr(metrics, '_REPLAY_OK', False)
    assert_same(reference(*args, 20, True, seed=5),
                ours(*args, 20, True, seed=5))


def test_a_wrong_draw_is_caught(monkeypatch):
    args = random_problem(22, 15, 60, 6, 3, 'float')
    ref = reference(*args, 20, True, seed=5)
    real = metrics._ChoiceReplay.__call__

    def off_by_one(self, sizes):
        picks = real(self, sizes)
        picks[0] = (picks[0] + 1) % sizes[0] if sizes[0] > 1 else 0
        picks[-1] = (picks[-1] + 1) % sizes[-1] if sizes[-1] > 1 else 0
        return picks

    monkeypatch.setattr(metrics._ChoiceReplay, '__call__', off_by_one)
    with pytest.raises(AssertionError):
        assert_same(ref, ours(*args, 20, True, seed=5))


def test_bad_inputs():
    distmat, q_pids, g_pids, q_camids, g_camids = random_problem(
        0, 4, 6, 2, 2, 'float')
    with pytest.raises(ValueError, match='q_pids must be 1-D with 4'):
        evaluate_rank(distmat, q_pids[:3], g_pids, q_camids, g_camids)
    with pytest.raises(ValueError, match='g_camids must be 1-D with 6'):
        evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids[:, None])
    with pytest.raises(ValueError, match='must be 2-D'):
        evaluate_rank(distmat[0], q_pids, g_pids, q_camids, g_camids)
    with pytest.raises(TypeError, match='real numbers'):
        evaluate_rank(distmat.astype(object), q_pids, g_pids, q_camids,
                      g_camids)
    with pytest.raises(ValueError, match='max_rank must be a positive'):
        evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, 0)
