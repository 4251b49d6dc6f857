"""End to end: scripts/main.py on the synthetic data, as a user runs it: train
with evaluation, checkpoint, visrank, FeatureExtractor.  (Resuming is
tests/test_interrupted_runs.py's.)"""
import glob
import os

import pytest
import torch
import torchreid
from helpers import SMALL_QUERIES, in_process, main_args


@pytest.mark.slow
def test_training_evaluates_logs_and_saves(demo_run):
    save_dir, out = demo_run
    assert 'Show configuration' in out and '** System info **' in out
    assert 'epoch: [1/2][1/' in out and 'epoch: [2/2][1/' in out
    assert 'loss_t3' in out and 'acc3' in out
    assert out.count('mAP:') == 2 and 'Rank-1' in out  # eval_freq 1
    assert 'Done, obtained {}-by-1536 matrix'.format(SMALL_QUERIES) in out
    logs = glob.glob(os.path.join(save_dir, 'train.log-*'))
    assert len(logs) == 1 and open(logs[0]).read().count('mAP:') == 2
    for epoch in (1, 2):
        ckpt = torch.load(os.path.join(save_dir, 'model',
                                       'model.pth.tar-{}'.format(epoch)),
                          weights_only=True)
        assert ckpt['epoch'] == epoch and type(ckpt['rank1']) is float


@pytest.mark.slow
def test_evaluate_with_visrank_writes_ranked_images(demo_run, synthetic_root,
                                                    tmp_path):
    save_dir, _ = demo_run
    vis_dir = str(tmp_path / 'eval')
    from pmm_torchreid.cli.train import main
    proc = in_process(main, main_args(  # scripts/main.py's main, in process
        synthetic_root, vis_dir, 'test.evaluate', 'True', 'test.visrank',
        'True', 'test.visrank_topk', '3', 'model.load_weights',
        os.path.join(save_dir, 'model', 'model.pth.tar-2')))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert 'Loaded pretrained weights' in out and 'mAP:' in out
    # the evaluation of the trained weights is the one the run printed
    train_log = glob.glob(os.path.join(save_dir, 'train.log-*'))[0]
    assert out.split('mAP:')[1].split('\n')[0] == \
        open(train_log).read().split('mAP:')[-1].split('\n')[0]
    images = glob.glob(os.path.join(vis_dir, 'visrank_pmm_synthetic', '*.jpg'))
    assert len(images) == SMALL_QUERIES  # one picture per query
    assert glob.glob(os.path.join(vis_dir, 'test.log-*'))


@pytest.mark.slow
def test_feature_extractor_loads_the_checkpoint(demo_run, synthetic_root):
    save_dir, _ = demo_run
    path = os.path.join(save_dir, 'model', 'model.pth.tar-2')
    extractor = torchreid.utils.FeatureExtractor(
        model_name='pmm_resnet18', model_path=path, image_size=(32, 16),
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


def test_bad_override_is_a_clear_error(synthetic_root, tmp_path):
    from pmm_torchreid.cli.train import main
    with pytest.raises(ValueError, match=r"config pmm.mix = 'mixup': "
                       r"expected one of \['hard_mix'"):
        main(main_args(synthetic_root, str(tmp_path), 'pmm.mix', 'mixup'))
    assert not os.listdir(str(tmp_path))  # refused before any work
