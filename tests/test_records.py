"""The run records on torchreid's own engines: curves.csv, results.json and
the fast ranking, through scripts/main.py and in-process."""
import json
import os.path as osp
import sys

import numpy as np
import pytest
import torch
import torchreid
from helpers import ROOT, in_process

import pmm_torchreid  # noqa: F401  (registers the synthetic dataset)
from pmm_torchreid.engine import records
from pmm_torchreid.engine.curves import read_curves
from pmm_torchreid.engine.records import fast_ranking, with_run_records
from pmm_torchreid.metrics import rank as metrics


@pytest.mark.slow
def test_a_torchreid_engine_run_writes_curves_and_results(synthetic_root,
                                                          tmp_path):
    save_dir = str(tmp_path / 'log')
    from pmm_torchreid.cli.train import main
    proc = in_process(  # scripts/main.py's main, in this process
        main,
        ['--config-file', osp.join(ROOT, 'configs', 'pmm_demo.yaml'),
         '--root', synthetic_root, 'model.name', 'osnet_x0_25',
         'model.pretrained', 'False', 'loss.name', 'triplet',
         'loss.triplet.weight_x', '1.0', 'data.height', '32',
         'data.width', '16', 'train.batch_size', '16', 'data.workers', '0',
         'train.max_epoch', '1', 'train.print_freq', '100',
         'data.save_dir', save_dir, 'use_gpu', 'False',
         'train.channels_last', 'True'],  # torchreid's engines have it too
        cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert 'train.channels_last: channels-last memory layout' in proc.stdout
    state = torch.load(osp.join(save_dir, 'model', 'model.pth.tar-1'),
                       weights_only=True)['state_dict']
    convs = [v for v in state.values()  # not 1x1 or depthwise: unambiguous
             if v.dim() == 4 and v.shape[1] > 1 and v.shape[-1] > 1]
    assert convs and all(v.is_contiguous(memory_format=torch.channels_last)
                         and not v.is_contiguous() for v in convs)
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
    assert record['channels_last'] is True
    assert record['precision'] == 'float32'


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


def _cuhk03_engine():
    """A recorded softmax engine whose "network" passes 1-d features
    through, over one test set where the CUHK03 metric and the default one
    disagree: each of 4 queries (camera 0) has its identity in the gallery
    (camera 1) once near (0.1 away) and once far (6 away), and a distractor
    identity of its own in between (3 away).  The default rank-1 is 100%;
    the CUHK03 metric draws one gallery image per identity, so about half of
    its draws put the far image, behind the distractor, first."""
    import types

    import torch.nn as nn
    query, gallery = [], []
    for p in range(4):
        query.append((10.0 * p, p, 0))
        gallery += [(10.0 * p + 0.1, p, 1), (10.0 * p + 6, p, 1),
                    (10.0 * p + 3, 100 + p, 1)]

    def loader(items):
        return [{'img': torch.tensor([[x] for x, _, _ in items]),
                 'pid': torch.tensor([p for _, p, _ in items]),
                 'camid': torch.tensor([c for _, _, c in items])}]

    net = nn.Linear(1, 1)
    with torch.no_grad():
        net.weight.fill_(1.0)
        net.bias.zero_()
    dm = types.SimpleNamespace(
        train_loader=None, sources=['toy'], num_train_pids=2,
        test_loader={'toy': {'query': loader(query),
                             'gallery': loader(gallery)}})
    Engine = with_run_records(torchreid.engine.ImageSoftmaxEngine)
    engine = Engine(dm, net, optimizer=torch.optim.SGD(net.parameters(),
                                                       lr=0.1), use_gpu=False)
    feats = [torch.tensor([[x] for x, _, _ in s]) for s in (query, gallery)]
    distmat = torchreid.metrics.compute_distance_matrix(*feats).numpy()
    ids = [np.array([i[k] for i in s]) for k in (1, 2)
           for s in (query, gallery)]
    return engine, (distmat, ids[0], ids[1], ids[2], ids[3])


def test_use_metric_cuhk03_reaches_the_plugins_ranking(monkeypatch):
    engine, problem = _cuhk03_engine()
    returned = []
    real = metrics.evaluate_rank

    def spy(*args, **kwargs):
        returned.append(real(*args, **kwargs))
        return returned[-1]

    monkeypatch.setattr(records, 'evaluate_rank', spy)
    rank1 = {}
    for cuhk03 in (True, False):
        np.random.seed(7)  # the CUHK03 metric draws from NumPy's generator
        rank1[cuhk03] = engine.test(save_dir='', use_metric_cuhk03=cuhk03,
                                    ranks=[1, 5])
    assert len(returned) == 2  # each evaluation ranked with the plugin's
    (cmc, mAP), (cmc_default, mAP_default) = returned
    # torchreid's own CUHK03 metric, same seed, on the same distances
    np.random.seed(7)
    want_cmc, want_mAP = torchreid.metrics.evaluate_rank(
        *problem, use_metric_cuhk03=True, use_cython=False)
    np.testing.assert_array_equal(cmc, want_cmc)
    assert mAP == pytest.approx(want_mAP, abs=1e-12)
    assert rank1[True] == want_cmc[0]
    # ... and not the default metric, which the same engine gives without
    want_default, _ = torchreid.metrics.evaluate_rank(*problem,
                                                      use_cython=False)
    np.testing.assert_array_equal(cmc_default, want_default)
    assert rank1[False] == want_default[0] == 1.0
    assert 0.2 < rank1[True] < 0.8
    assert engine.results['toy']['rank1'] == pytest.approx(100.0)  # latest
