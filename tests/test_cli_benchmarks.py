"""The benchmarks in process: the generated ranking problems
(pmm_torchreid.metrics.problems), the ranking benchmark on its smallest size
and one kill of the checkpoint writer (its child finds the package)."""
import numpy as np

from pmm_torchreid.cli import benchmark_eval, stress_checkpoints
from pmm_torchreid.metrics.problems import SIZES, _split, make_problem


def test_problems_are_seeded_and_shaped_like_the_test_sets():
    spec = SIZES['small']
    a = make_problem(seed=3, **spec)
    b = make_problem(seed=3, **spec)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    distmat, q_pids, g_pids, q_camids, g_camids = a
    assert distmat.dtype == np.float32
    assert distmat.shape == (spec['num_q'], spec['num_g'])
    assert (g_pids == 0).sum() == spec['num_distractors'] and 0 not in q_pids
    assert set(q_pids) == set(range(1, spec['num_ids'] + 1))
    assert q_camids.max() < spec['num_cams'] and g_camids.max() < spec['num_cams']
    counts = _split(100, 7, 2, np.random.default_rng(0))
    assert counts.sum() == 100 and counts.min() >= 2


def test_ranking_benchmark_smallest_size(capsys):
    assert benchmark_eval.main(['--sizes', 'small-cuhk03', '--repeats', '1',
                                '--threads', '1']) == 0
    assert 'CMC equal bit for bit: True' in capsys.readouterr().out


def test_checkpoint_stress_child_finds_the_package(capsys):
    assert stress_checkpoints.main(['--kills', '1', '--megabytes', '1',
                                    '--delay', '0.1', '0.1']) == 0
    out = capsys.readouterr().out
    assert '1 kills of a writer of 1 MB checkpoints (save_checkpoint)' in out
