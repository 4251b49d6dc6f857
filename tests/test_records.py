"""The run records on torchreid's own engines: curves.csv, results.json and
the fast ranking, through scripts/main.py and in-process."""
import json
import os
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchreid

import pmm_torchreid  # noqa: F401  (registers the synthetic dataset)
from pmm_torchreid.engine import records
from pmm_torchreid.engine.curves import read_curves
from pmm_torchreid.engine.records import fast_ranking, with_run_records
from pmm_torchreid.metrics import rank as metrics

from conftest import ROOT

ENV = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')


def test_a_torchreid_engine_run_writes_curves_and_results(synthetic_root,
                                                          tmp_path):
    save_dir = str(tmp_path / 'log')
    proc = subprocess.run(
        [sys.executable, osp.join(ROOT, 'scripts', 'main.py'),
         '--config-file', osp.join(ROOT, 'configs', 'pmm_demo.yaml'),
         '--root', synthetic_root, 'model.name', 'osnet_x0_25',
         'model.pretrained', 'False', 'loss.name', 'triplet',
         'loss.triplet.weight_x', '1.0', 'data.height', '64',
         'data.width', '32', 'train.batch_size', '16', 'data.workers', '0',
         'train.max_epoch', '1', 'train.print_freq', '100',
         'data.save_dir', save_dir],
        cwd=str(tmp_path), env=ENV, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = read_curves(osp.join(save_dir, 'curves.csv'))
    train = [r for r in rows if r['kind'] == 'train']
    test = [r for r in rows if r['kind'] == 'test']
    assert len(train) == 1 and len(test) == 1
    # the numbers torchreid's triplet engine reports, averaged over the epoch
    assert train[0]['loss_t'] >= 0 and train[0]['loss_x'] > 0
    assert 0 <= train[0]['acc'] <= 100 and train[0]['lr'] > 0
    with open(osp.join(save_dir, 'results.json')) as f:
        record = json.load(f)
    logged = float(proc.stdout.split('mAP: ')[-1].split('%')[0])
    assert record['results']['pmm_synthetic']['mAP'] == \
        pytest.approx(test[0]['mAP'], abs=1e-3)
    assert test[0]['mAP'] == pytest.approx(logged, abs=0.05)
    assert record['evaluated_on'] == 'test' and record['loss'] == 'triplet'


def test_evaluation_ranks_with_the_plugins_evaluate_rank(synthetic_root,
                                                         monkeypatch):
    dm = torchreid.data.ImageDataManager(
        root=synthetic_root, sources='pmm_synthetic', height=32, width=16,
        workers=0, batch_size_train=8, batch_size_test=200)
    torch.manual_seed(0)
    model = torchreid.models.build_model('osnet_x0_25', dm.num_train_pids,
                                         pretrained=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    Engine = with_run_records(torchreid.engine.ImageSoftmaxEngine)
    engine = Engine(dm, model, optimizer=opt, use_gpu=False)
    calls = []
    real = metrics.evaluate_rank

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    # the name the run records rank with
    monkeypatch.setattr(records, 'evaluate_rank', spy)
    engine_module = sys.modules[torchreid.engine.Engine.__module__]
    before = engine_module.metrics
    rank1 = engine.test(save_dir='', dist_metric='euclidean')
    assert len(calls) == 1  # one ranking per evaluation, ours
    assert engine_module.metrics is before  # restored
    distmat, q_pids, g_pids, q_camids, g_camids = calls[0]
    cmc, mAP = torchreid.metrics.evaluate_rank(
        distmat, q_pids, g_pids, q_camids, g_camids, use_cython=False)
    assert rank1 == cmc[0]
    assert engine.results['pmm_synthetic']['mAP'] == \
        pytest.approx(float(mAP) * 100, abs=1e-6)
    # outside the block torchreid's own function is back
    with fast_ranking():
        assert engine_module.metrics.evaluate_rank is not \
            torchreid.metrics.evaluate_rank
        assert engine_module.metrics.compute_distance_matrix is \
            torchreid.metrics.compute_distance_matrix
    assert engine_module.metrics.evaluate_rank is \
        torchreid.metrics.evaluate_rank
    assert isinstance(cmc, np.ndarray)
