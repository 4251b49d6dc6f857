"""End to end: scripts/main.py on the synthetic data, as a user runs it: train
with evaluation, checkpoint, resume, visrank, FeatureExtractor."""
import glob
import os
import subprocess
import sys

import pytest
import torch
import torchreid

from conftest import ROOT

FAST = [
    'data.height', '64', 'data.width', '32', 'pmm.block_size', '[1, 1]',
    'pmm.top_k', '2', 'train.batch_size', '16', 'data.workers', '0',
    'train.print_freq', '10', 'test.eval_freq', '1',
]


def run_main(*args, timeout=300):
    cmd = [sys.executable, os.path.join('scripts', 'main.py'),
           '--config-file', os.path.join('configs', 'pmm_demo.yaml')]
    proc = subprocess.run(cmd + list(args), cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope='module')
def trained(synthetic_root, tmp_path_factory):
    save_dir = str(tmp_path_factory.mktemp('log'))
    out = run_main('--root', synthetic_root, 'data.save_dir', save_dir,
                   'train.max_epoch', '1', *FAST)
    return save_dir, out


def test_training_evaluates_logs_and_saves(trained):
    save_dir, out = trained
    assert 'Show configuration' in out and '** System info **' in out
    assert 'epoch: [1/1][10/' in out and 'loss_t3' in out and 'acc3' in out
    assert 'mAP:' in out and 'Rank-1' in out
    logs = glob.glob(os.path.join(save_dir, 'train.log-*'))
    assert len(logs) == 1 and 'mAP:' in open(logs[0]).read()
    ckpt = torch.load(os.path.join(save_dir, 'model', 'model.pth.tar-1'),
                      weights_only=True)
    assert ckpt['epoch'] == 1 and type(ckpt['rank1']) is float


def test_resume_continues_from_the_checkpoint(trained, synthetic_root):
    save_dir, _ = trained
    out = run_main('--root', synthetic_root, 'data.save_dir', save_dir,
                   'train.max_epoch', '2', 'model.resume',
                   os.path.join(save_dir, 'model', 'model.pth.tar-1'), *FAST)
    assert 'Last epoch = 1' in out
    assert 'epoch: [2/2]' in out and 'epoch: [1/2]' not in out
    ckpt = torch.load(os.path.join(save_dir, 'model', 'model.pth.tar-2'),
                      weights_only=True)
    assert ckpt['epoch'] == 2


def test_evaluate_with_visrank_writes_ranked_images(trained, synthetic_root):
    save_dir, _ = trained
    vis_dir = os.path.join(save_dir, 'eval')
    out = run_main('--root', synthetic_root, 'data.save_dir', vis_dir,
                   'test.evaluate', 'True', 'test.visrank', 'True',
                   'test.visrank_topk', '3', 'model.load_weights',
                   os.path.join(save_dir, 'model', 'model.pth.tar-1'), *FAST)
    assert 'Loaded pretrained weights' in out and 'mAP:' in out
    images = glob.glob(os.path.join(vis_dir, 'visrank_pmm_synthetic', '*.jpg'))
    assert len(images) == 400  # one picture per query
    assert glob.glob(os.path.join(vis_dir, 'test.log-*'))


def test_feature_extractor_loads_the_checkpoint(trained, synthetic_root):
    save_dir, _ = trained
    path = os.path.join(save_dir, 'model', 'model.pth.tar-1')
    extractor = torchreid.utils.FeatureExtractor(
        model_name='pmm_resnet18', model_path=path, image_size=(64, 32),
        device='cpu', verbose=False)
    query = sorted(glob.glob(os.path.join(synthetic_root, 'pmm_synthetic',
                                          'query', '*.png')))[:4]
    feats = extractor(query)
    assert feats.shape == (4, 1536)
    # the extractor's model holds exactly the trained weights
    state = torch.load(path, weights_only=True)['state_dict']
    own = extractor.model.state_dict()
    for key, value in state.items():
        if 'classifier' not in key:
            assert torch.equal(own[key], value), key
    assert not torch.allclose(feats[0], feats[1])


def test_bad_override_is_a_clear_error(synthetic_root):
    cmd = [sys.executable, os.path.join('scripts', 'main.py'),
           '--config-file', os.path.join('configs', 'pmm_demo.yaml'),
           '--root', synthetic_root, 'pmm.mix', 'mixup']
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "pmm.mix = 'mixup'" in proc.stderr
