"""Speed and memory of :func:`pmm_torchreid.metrics.evaluate_rank` against
torchreid's ``evaluate_rank`` (scripts/benchmark_eval.py), on the generated
problems of :mod:`pmm_torchreid.metrics.problems`.

Timing (:func:`bench_size`): ours runs ``repeats`` times (min and median are
reported); torchreid's Python path runs once (not at MSMT17 size), and its
Cython path too when an upstream Cython build is importable.  The outputs are
compared: CMC bit for bit, mAP to 1e-6.  CUHK03-metric sizes seed
``np.random`` before each evaluation, so all draws are the same.

Memory (:class:`PeakRSS`): the peak resident set size (RSS) of the process
*during* one evaluation, above the RSS just before it.  The distance matrix is
built first, so it is not counted; the peak is reset before each evaluation
through ``/proc/self/clear_refs`` (Linux) and read from ``VmHWM`` in
``/proc/self/status``.  Where that is not possible, a thread samples the RSS
every millisecond instead (which can miss short peaks); the method used is
printed.
"""
from __future__ import annotations

import os
import statistics
import threading
import time

import numpy as np
import torch

from pmm_torchreid.metrics.problems import CUHK03_METRIC, SIZES, make_problem
from pmm_torchreid.metrics.rank import evaluate_rank_details
from pmm_torchreid.utils.torchreid_internals import submodule

__all__ = ['PeakRSS', 'timed', 'same', 'mib', 'print_header', 'bench_size']


class PeakRSS:
    """Peak RSS growth (bytes) while the block runs; see the module
    docstring."""

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
    """``fn()``, its seconds and its :class:`PeakRSS`."""
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
    return out, seconds, mem


def same(a, b):
    """Two (CMC, mAP) pairs agree: CMC bit for bit, mAP to 1e-6."""
    return (a[0].dtype == b[0].dtype and np.array_equal(a[0], b[0])
            and abs(float(a[1]) - float(b[1])) <= 1e-6)


def mib(n):
    return '{:.0f} MiB'.format(n / 2**20)


def print_header(threads: int) -> None:
    """Versions, threads, CPUs, load, and whether torchreid's Cython
    evaluation is importable."""
    tr_rank = submodule('metrics.rank')
    print('torch {}, numpy {}, {} thread(s), {} CPU(s), load average {}'.format(
        torch.__version__, np.__version__, threads, os.cpu_count(),
        ' '.join('{:.2f}'.format(x) for x in os.getloadavg())))
    print('torchreid Cython evaluation importable: {}'.format(
        tr_rank.IS_CYTHON_AVAI))


def bench_size(name: str, seed: int = 0, repeats: int = 3, max_rank: int = 50,
               threads: int = 1, skip_torchreid: bool = False) -> bool:
    """Times (and prints) ours and torchreid's ranking on the problem
    ``SIZES[name]``; whether every compared output was equal."""
    tr_rank = submodule('metrics.rank')
    ok = True
    spec = SIZES[name]
    t0 = time.perf_counter()
    distmat, q_pids, g_pids, q_camids, g_camids = make_problem(
        seed=seed, **spec)
    print('\n== {}: {} queries x {} gallery, {} identities, {} cameras{}; '
          'distance matrix {} (float32) built in {:.1f} s'.format(
              name, spec['num_q'], spec['num_g'], spec['num_ids'],
              spec['num_cams'], ', CUHK03 metric' if name in
              CUHK03_METRIC else '', mib(distmat.nbytes),
              time.perf_counter() - t0))
    cuhk03 = name in CUHK03_METRIC
    call = (distmat, q_pids, g_pids, q_camids, g_camids, max_rank, cuhk03)

    def seeded(fn, *fn_args, **fn_kwargs):
        def run():
            np.random.seed(seed)
            return fn(*fn_args, **fn_kwargs)
        return run

    times = []
    for _ in range(max(1, repeats)):
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
    if name != 'msmt17' and not skip_torchreid:
        try:
            ref, sec, mem = timed(seeded(tr_rank.evaluate_rank, *call,
                                         use_cython=False))
        except AttributeError as exc:  # np.bool on NumPy 1.24 to 1.26
            print('torchreid Python: fails on NumPy {}: {}'.format(
                np.__version__, exc))
            return ok
        equal = same(ref, ours)
        ok &= equal
        print('torchreid Python: {:.3f} s, peak RSS growth {}; ratio '
              '{:.1f}x (min), {:.1f}x (median); CMC equal bit for bit: '
              '{}, |mAP difference| {:.2e}'.format(
                  sec, mib(mem.peak), sec / best, sec / median,
                  np.array_equal(ref[0], ours[0]),
                  abs(float(ref[1]) - float(ours[1]))))
    return ok
