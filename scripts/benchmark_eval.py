#!/usr/bin/env python
"""Speed and memory of :func:`pmm_torchreid.metrics.evaluate_rank` against
torchreid's ``evaluate_rank`` on problems the size of Market-1501 and MSMT17.

The problems are synthetic but shaped like the real test sets: identities
seen by a few cameras each, queries and gallery images drawn from them
(Market-1501 also has distractor images of identity 0), 64-d features made of
an identity centroid, a camera offset and per-image noise, and float32
squared Euclidean distances computed by torchreid's own
``compute_distance_matrix`` (chunk by chunk for MSMT17).

Timing: ours runs ``--repeats`` times (min and median are reported);
torchreid's Python path runs once, at Market-1501 size only (it takes about a
minute; ``--skip-torchreid`` skips it), and its Cython path too when an
upstream Cython build is importable.  The outputs are compared: CMC bit for
bit, mAP to 1e-6.  The size ``cuhk03`` (not run by default) uses the CUHK03
single-gallery-shot metric, with ``np.random`` seeded before each evaluation;
torchreid's Python path takes about two minutes there.

Memory: the peak resident set size (RSS) of the process *during* one
evaluation, above the RSS just before it.  The distance matrix is built
first, so it is not counted (it is 3.8 GB at MSMT17 size); the peak is reset
before each evaluation through ``/proc/self/clear_refs`` (Linux) and read
from ``VmHWM`` in ``/proc/self/status``.  Where that is not possible, a
thread samples the RSS every millisecond instead (which can miss short
peaks); the method used is printed.

Examples::

    python scripts/benchmark_eval.py                          # both sizes
    python scripts/benchmark_eval.py --sizes market --repeats 5
    python scripts/benchmark_eval.py --sizes msmt17 --threads 2 --skip-torchreid
    python scripts/benchmark_eval.py --sizes cuhk03 --repeats 1
"""
import argparse
import os
import os.path as osp
import statistics
import sys
import threading
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

warnings.filterwarnings('ignore', message='Cython evaluation')

from pmm_torchreid.metrics import evaluate_rank_details  # noqa: E402

#: Problem sizes: queries, gallery images, identities, cameras, distractors
#: (gallery images of identity 0, which no query has), the cameras per
#: identity (uniform between the two numbers) and the feature noise, set so
#: that the accuracy is that of a decent model (mAP about 72% and 55%).
SIZES = {
    'market': dict(num_q=3368, num_g=15913, num_ids=751, num_cams=6,
                   num_distractors=15913 - 751 * 14, cams_per_id=(2, 6),
                   noise=0.8),
    'msmt17': dict(num_q=11659, num_g=82161, num_ids=3060, num_cams=15,
                   num_distractors=0, cams_per_id=(2, 8), noise=0.95),
    # CUHK03 (new protocol) sizes, evaluated with the CUHK03 metric
    'cuhk03': dict(num_q=1400, num_g=5332, num_ids=700, num_cams=2,
                   num_distractors=0, cams_per_id=(2, 2), noise=0.8),
    # seconds-sized checks of the same shapes (the test suite runs them)
    'small': dict(num_q=300, num_g=3000, num_ids=150, num_cams=6,
                  num_distractors=900, cams_per_id=(2, 6), noise=0.8),
    'small-cuhk03': dict(num_q=40, num_g=300, num_ids=40, num_cams=2,
                         num_distractors=0, cams_per_id=(2, 2), noise=0.8),
}
#: Sizes evaluated with ``use_metric_cuhk03=True`` (np.random seeded with
#: ``--seed`` before each evaluation, so all draws are the same).
CUHK03_METRIC = {'cuhk03', 'small-cuhk03'}


def _split(total, parts, minimum, rng):
    """``parts`` counts of at least ``minimum`` that add up to ``total``."""
    extra = total - minimum * parts
    assert extra >= 0
    return minimum + rng.multinomial(extra, np.full(parts, 1.0 / parts))


def make_problem(num_q, num_g, num_ids, num_cams, num_distractors,
                 cams_per_id, seed=0, dim=64, noise=0.8, cam_shift=0.35,
                 chunk_rows=1024):
    """A seeded ranking problem with realistic structure.

    Returns:
        tuple: ``distmat`` (float32 NumPy, num_q x num_g, squared Euclidean
        as torchreid computes it), ``q_pids``, ``g_pids``, ``q_camids``,
        ``g_camids``.
    """
    from torchreid.reid.metrics import compute_distance_matrix
    rng = np.random.default_rng(seed)
    lo, hi = cams_per_id
    cams = [rng.choice(num_cams, size=rng.integers(lo, hi + 1),
                       replace=False) for _ in range(num_ids)]
    q_per_id = _split(num_q, num_ids, 1, rng)
    g_per_id = _split(num_g - num_distractors, num_ids, 2, rng)
    q_pids = np.repeat(np.arange(1, num_ids + 1), q_per_id)
    g_pids = np.concatenate([np.repeat(np.arange(1, num_ids + 1), g_per_id),
                             np.zeros(num_distractors, np.int64)])
    q_camids = np.concatenate(
        [rng.choice(cams[i], size=n) for i, n in enumerate(q_per_id)])
    g_camids = np.concatenate(
        [rng.choice(cams[i], size=n) for i, n in enumerate(g_per_id)]
        + [rng.integers(0, num_cams, size=num_distractors)])
    centroids = rng.standard_normal((num_ids + 1, dim)).astype(np.float32)
    shifts = cam_shift * rng.standard_normal((num_cams, dim)).astype(
        np.float32)

    def features(pids, camids):
        f = centroids[pids] + shifts[camids]
        f += noise * rng.standard_normal(f.shape).astype(np.float32)
        # distractors: each its own random person
        distract = pids == 0
        f[distract] = rng.standard_normal(
            (int(distract.sum()), dim)).astype(np.float32)
        return torch.from_numpy(f)

    qf, gf = features(q_pids, q_camids), features(g_pids, g_camids)
    # shuffle the gallery so that identities are not in blocks
    perm = rng.permutation(num_g)
    g_pids, g_camids, gf = g_pids[perm], g_camids[perm], gf[perm]
    distmat = np.empty((num_q, num_g), np.float32)
    for a in range(0, num_q, chunk_rows):
        b = min(a + chunk_rows, num_q)
        distmat[a:b] = compute_distance_matrix(qf[a:b], gf).numpy()
    return distmat, q_pids, g_pids, q_camids, g_camids


class PeakRSS:
    """Peak RSS growth (bytes) while the block runs; see the docstring."""

    def __init__(self):
        self.method = None
        self.peak = None

    @staticmethod
    def _status(key):
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(key + ':'):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def __enter__(self):
        self.base = self._status('VmRSS')
        try:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')  # resets VmHWM to the current RSS
            self.method = 'VmHWM after clear_refs'
        except OSError:
            self.method = 'RSS sampled every 1 ms'
            self._max = self.base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self._max = max(self._max, self._status('VmRSS'))

    def __exit__(self, *exc):
        if self.method.startswith('VmHWM'):
            top = self._status('VmHWM')
        else:
            self._stop.set()
            self._thread.join()
            top = self._max
        self.peak = max(0, top - self.base)
        return False


def timed(fn):
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
    return out, seconds, mem


def same(a, b):
    return (a[0].dtype == b[0].dtype and np.array_equal(a[0], b[0])
            and abs(float(a[1]) - float(b[1])) <= 1e-6)


def mib(n):
    return '{:.0f} MiB'.format(n / 2**20)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--sizes', nargs='+', choices=sorted(SIZES),
                        default=['market', 'msmt17'])
    parser.add_argument('--threads', type=int, default=None,
                        help='CPU threads (default: torch.get_num_threads())')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--max-rank', type=int, default=50)
    parser.add_argument('--skip-torchreid', action='store_true',
                        help="do not time torchreid's Python path")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    from torchreid.reid.metrics import rank as tr_rank
    print('torch {}, numpy {}, {} thread(s), {} CPU(s), load average {}'.format(
        torch.__version__, np.__version__, threads, os.cpu_count(),
        ' '.join('{:.2f}'.format(x) for x in os.getloadavg())))
    print('torchreid Cython evaluation importable: {}'.format(
        tr_rank.IS_CYTHON_AVAI))

    ok = True
    for name in args.sizes:
        spec = SIZES[name]
        t0 = time.perf_counter()
        distmat, q_pids, g_pids, q_camids, g_camids = make_problem(
            seed=args.seed, **spec)
        print('\n== {}: {} queries x {} gallery, {} identities, {} cameras{}; '
              'distance matrix {} (float32) built in {:.1f} s'.format(
                  name, spec['num_q'], spec['num_g'], spec['num_ids'],
                  spec['num_cams'], ', CUHK03 metric' if name in
                  CUHK03_METRIC else '', mib(distmat.nbytes),
                  time.perf_counter() - t0))
        cuhk03 = name in CUHK03_METRIC
        call = (distmat, q_pids, g_pids, q_camids, g_camids, args.max_rank,
                cuhk03)

        def seeded(fn, *fn_args, **fn_kwargs):
            def run():
                np.random.seed(args.seed)
                return fn(*fn_args, **fn_kwargs)
            return run

        times = []
        for _ in range(max(1, args.repeats)):
            res, sec, mem = timed(seeded(evaluate_rank_details, *call,
                                         num_threads=threads))
            times.append(sec)
            print('ours: {:.3f} s, peak RSS growth {} ({})'.format(
                sec, mib(mem.peak), mem.method))
        ours = (res.cmc, res.mAP)
        best, median = min(times), statistics.median(times)
        print('ours: min {:.3f} s, median {:.3f} s over {} run(s); mAP '
              '{:.4f}, rank-1 {:.4f}, rank-5 {:.4f}; {} valid, {} skipped '
              'queries; {} rows ({:.2%}) ranked by np.argsort'.format(
                  best, median, len(times), res.mAP, res.cmc[0], res.cmc[4],
                  res.num_valid, res.num_skipped, res.num_exact_sorts,
                  res.num_exact_sorts / res.num_valid))

        if tr_rank.IS_CYTHON_AVAI:
            ref, sec, mem = timed(seeded(tr_rank.evaluate_rank, *call,
                                         use_cython=True))
            equal = same(ref, ours)
            ok &= equal
            print('torchreid Cython: {:.3f} s, peak RSS growth {}; ratio '
                  '{:.1f}x (min), {:.1f}x (median); outputs equal: {}'.format(
                      sec, mib(mem.peak), sec / best, sec / median, equal))
        if name != 'msmt17' and not args.skip_torchreid:
            try:
                ref, sec, mem = timed(seeded(tr_rank.evaluate_rank, *call,
                                             use_cython=False))
            except AttributeError as exc:  # np.bool on NumPy 1.24 to 1.26
                print('torchreid Python: fails on NumPy {}: {}'.format(
                    np.__version__, exc))
                continue
            equal = same(ref, ours)
            ok &= equal
            print('torchreid Python: {:.3f} s, peak RSS growth {}; ratio '
                  '{:.1f}x (min), {:.1f}x (median); CMC equal bit for bit: '
                  '{}, |mAP difference| {:.2e}'.format(
                      sec, mib(mem.peak), sec / best, sec / median,
                      np.array_equal(ref[0], ours[0]),
                      abs(float(ref[1]) - float(ours[1]))))
        del distmat, call
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
