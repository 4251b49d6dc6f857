"""test.descriptor: what an eval-mode network returns ('all', the stages
concatenated; 'global', stage I alone), on every family, through the config
and an evaluation run."""
import glob
import json
import os

import pytest
import torch
from helpers import in_process, main_args

import pmm_torchreid  # noqa: F401  (registers the models)
from pmm_torchreid import config as C
from pmm_torchreid import launch
from pmm_torchreid.models.descriptors import DESCRIPTORS, set_descriptor
from pmm_torchreid.models.factory import MODEL_FACTORY

FAMILIES = ('pmm', 'bdb', 'fmn', 'magnifiernet')


@pytest.fixture(scope='module', params=FAMILIES)
def network(request):
    torch.manual_seed(0)
    name = '{}_resnet18'.format(request.param)
    return name, MODEL_FACTORY[name](6, pretrained=False).eval()


def test_global_is_stage_one_and_leads_the_full_descriptor(network):
    name, net = network
    images = torch.randn(3, 3, 64, 32)
    try:
        with torch.no_grad():
            full = net(images)
            assert net.descriptor == 'all' and net.descriptor_dim == full.shape[1]
            net.set_descriptor('global')
            short = net(images)
            stage_one = net.global_head(net.backbone(images))[1]
    finally:
        net.set_descriptor('all')
    assert short.shape == (3, 512) and net.global_head.classifier.in_features \
        == 512 and full.shape[1] > 512, name
    assert torch.equal(short, stage_one)
    assert torch.equal(full[:, :512], short)  # the same numbers, fewer of them


def test_the_choice_changes_neither_training_nor_the_weights(network):
    name, net = network
    keys = list(net.state_dict())
    net.set_descriptor('global')
    try:
        assert list(net.state_dict()) == keys  # checkpoints stay as they are
        net.train()
        torch.manual_seed(3)
        images, labels = torch.randn(4, 3, 64, 32), torch.tensor([0, 0, 1, 1])
        kwargs = {'regions': torch.zeros(4, 64, 32, dtype=torch.long)} \
            if name.startswith('magnifiernet') else {}
        out = net(images, labels, **kwargs) if kwargs or name.startswith(
            'pmm') else net(images)
        assert isinstance(out, dict) and len(out['embeddings']) >= 2
    finally:
        net.set_descriptor('all')
        net.eval()


def test_a_bad_choice_names_the_value():
    net = MODEL_FACTORY['bdb_resnet18'](4, pretrained=False)
    with pytest.raises(ValueError, match=r"descriptor 'part' of BDB: expected "
                       r"one of \('all', 'global'\)"):
        net.set_descriptor('part')
    assert net.descriptor == 'all'
    # torchreid's own models have one descriptor: 'all' passes, 'global' not
    set_descriptor(torch.nn.Linear(2, 2), 'all', 'osnet_x0_25')
    with pytest.raises(ValueError, match=r"model 'osnet_x0_25' has one "
                       r"descriptor only"):
        set_descriptor(torch.nn.Linear(2, 2), 'global', 'osnet_x0_25')


def test_the_config_key_is_checked(synthetic_root):
    assert DESCRIPTORS[0] == C.get_default_config().test.descriptor == 'all'
    cfg = C.get_default_config()
    C.merge_list(cfg, ['model.name', 'pmm_resnet18', 'test.descriptor',
                         'stage1'])
    with pytest.raises(ValueError, match=r"config test.descriptor = 'stage1': "
                       r"expected 'all' or 'global'"):
        C.check_config(cfg)
    cfg = C.get_default_config()
    C.merge_list(cfg, ['model.name', 'osnet_x0_25', 'loss.name', 'softmax',
                         'test.descriptor', 'global'])
    with pytest.raises(ValueError, match=r"test.descriptor = 'global': "
                       r"expected 'all' for torchreid's own model"):
        C.check_config(cfg)
    cfg = C.get_default_config()
    C.merge_list(cfg, ['model.name', 'pmm_resnet18', 'model.pretrained',
                         'False', 'test.descriptor', 'global'])
    assert launch.build_model(cfg, 5).descriptor == 'global'


@pytest.mark.slow
def test_evaluation_with_the_global_descriptor(demo_run, synthetic_root,
                                               tmp_path):
    save_dir, _ = demo_run
    from pmm_torchreid.cli.train import main  # lazy: the cli in process
    weights = os.path.join(save_dir, 'model', 'model.pth.tar-2')
    printed = {}
    for choice in DESCRIPTORS:
        proc = in_process(main, main_args(
            synthetic_root, str(tmp_path / choice), 'test.evaluate', 'True',
            'model.load_weights', weights, 'test.descriptor', choice))
        assert proc.returncode == 0, proc.stderr[-3000:]
        printed[choice] = proc.stdout
    assert 'by-1536 matrix' in printed['all']
    assert 'by-512 matrix' in printed['global']
    maps = {c: out.split('mAP:')[1].split('\n')[0] for c, out in printed.items()}
    assert maps['all'] != maps['global']  # another descriptor, another ranking
    # a training run records which descriptor its results come from
    proc = in_process(main, main_args(
        synthetic_root, str(tmp_path / 'train'), 'train.max_epoch', '1',
        'test.descriptor', 'global'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(str(tmp_path / 'train' / 'results.json')) as f:
        assert json.load(f)['descriptor'] == 'global'
    assert glob.glob(str(tmp_path / 'train' / 'model' / 'model.pth.tar-1'))
