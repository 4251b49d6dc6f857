"""Generated ranking problems shaped like the real test sets (the ranking
benchmark, scripts/benchmark_eval.py, and the tests).

Identities seen by a few cameras each, queries and gallery images drawn from
them (Market-1501 also has distractor images of identity 0), 64-d features
made of an identity centroid, a camera offset and per-image noise, and float32
squared Euclidean distances computed by torchreid's own
``compute_distance_matrix`` (chunk by chunk): :func:`make_problem`, with the
sizes of :data:`SIZES`.
"""
from __future__ import annotations

import numpy as np
import torch

from pmm_torchreid.utils.torchreid_internals import submodule

__all__ = ['SIZES', 'CUHK03_METRIC', 'make_problem']

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
#: Sizes evaluated with ``use_metric_cuhk03=True`` (the benchmark seeds
#: np.random with its ``--seed`` before each evaluation: the same draws).
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
    compute_distance_matrix = submodule(
        'metrics.distance').compute_distance_matrix
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
