"""The plugin's networks on torchreid's own backbones
(pmm_torchreid.models.torchreid_backbones): the body is the network's
featuremaps, the map size and channels are the real ones, PMM and BDB train a
step and give one descriptor, torchreid's FeatureExtractor loads them, FMN and
MagnifierNet build, and ImageNet weights come from torchreid's files or fail
with a message that names the file."""
import os
import re
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchreid
import torchvision
from helpers import batch

import pmm_torchreid  # noqa: F401  (registers the models with torchreid)
from pmm_torchreid import config as C
from pmm_torchreid.engine import PMMEngine
from pmm_torchreid.models import BDB, FMN, MODEL_FACTORY, PMM, MagnifierNet
from pmm_torchreid.models import backbones as plugin_backbones
from pmm_torchreid.models.backbones import BACKBONES, build_backbone, feature_map_size
from pmm_torchreid.models.families import family_of
from pmm_torchreid.models.fmn import LOW_LEVEL_SPLIT, split_backbone
from pmm_torchreid.models.torchreid_backbones import (
    TORCHREID_BACKBONES,
    torchreid_network,
    torchreid_weights_location,
)

#: the backbones the issue asked for: every test runs on each
REQUIRED = ['osnet_x1_0', 'osnet_x0_5', 'osnet_ain_x1_0', 'resnet50_fc512',
            'mobilenetv2_x1_0', 'resnet50_stride32']
#: backbone -> (channels, stride) of its map
EXPECTED = {
    'osnet_x1_0': (512, 16), 'osnet_x0_75': (384, 16), 'osnet_x0_5': (256, 16),
    'osnet_ibn_x1_0': (512, 16), 'osnet_ain_x1_0': (512, 16),
    'osnet_ain_x0_75': (384, 16), 'osnet_ain_x0_5': (256, 16),
    'osnet_ain_x0_25': (128, 16), 'resnet50_fc512': (2048, 16),
    'resnet50_stride32': (2048, 32), 'mobilenetv2_x1_0': (1280, 32),
    'mobilenetv2_x1_4': (1792, 32),
}
HEIGHT, WIDTH = 64, 32  # a 4x2 map at stride 16, 2x1 at stride 32


def test_every_torchreid_backbone_is_registered_under_its_own_name():
    assert set(EXPECTED) == set(TORCHREID_BACKBONES) and set(REQUIRED) <= set(
        EXPECTED)
    table = vars(torchreid.models)['__model_factory']
    for name in TORCHREID_BACKBONES:
        for family in ('pmm', 'bdb', 'fmn', 'magnifiernet'):
            model = '{}_{}'.format(family, name)
            assert table[model] is MODEL_FACTORY[model]
            assert MODEL_FACTORY[model].backbone == name
            assert family_of(model).name == family
    # the plugin's own backbones are the ones they were
    assert BACKBONES['osnet_x0_25'] is plugin_backbones._osnet_x0_25
    assert MODEL_FACTORY['pmm'] is MODEL_FACTORY['pmm_resnet50']
    assert TORCHREID_BACKBONES['resnet50_stride32'].model == 'resnet50'


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_the_body_is_the_networks_featuremaps_at_its_real_size(name):
    channels, stride = EXPECTED[name]
    torch.manual_seed(0)
    built = build_backbone(name, pretrained=False)
    torch.manual_seed(0)
    net = torchreid_network(name).eval()
    body = built.body.eval()
    assert built.channels == channels and built.embedding is None
    # only the stages: no pooling, embedding or classifier parameters
    stage_params = sum(p.numel() for n, p in net.named_parameters()
                       if n.split('.')[0] not in ('fc', 'classifier'))
    assert sum(p.numel() for p in body.parameters()) == stage_params
    x = torch.randn(2, 3, HEIGHT, WIDTH)
    with torch.no_grad():
        out = body(x)
        torch.testing.assert_close(out, net.featuremaps(x), rtol=0, atol=0)
        # FMN's low-level map: the stride-16 stage, a cut of the same body
        low, high, low_channels = split_backbone(name, body)
        low_map = low(x)
        torch.testing.assert_close(high(low_map), out, rtol=0, atol=0)
    assert tuple(out.shape[1:]) == (channels, HEIGHT // stride, WIDTH // stride)
    assert tuple(low_map.shape[1:]) == (low_channels, 4, 2)
    assert LOW_LEVEL_SPLIT[name] == TORCHREID_BACKBONES[name].low_level


@pytest.mark.parametrize('name', REQUIRED)
def test_feature_map_size_is_the_real_one(name):
    stride = EXPECTED[name][1]
    assert feature_map_size(name, 256, 128) == (256 // stride, 128 // stride)
    body = build_backbone(name, pretrained=False).body.eval()
    with torch.no_grad():
        real = body(torch.zeros(1, 3, 100, 44)).shape[2:]
    assert feature_map_size(name, 100, 44) == tuple(real)


def _step(model, mix):
    """One training step of the plugin's engine; returns its summary."""
    engine = PMMEngine(type('NoData', (), {'train_loader': None,
                                           'test_loader': {}})(),
                       model, torch.optim.SGD(model.parameters(), lr=0.01),
                       use_gpu=False, mix=mix, block_size=(1, 1), top_k=1,
                       seed=1)
    model.train()
    return engine.forward_backward(batch(height=HEIGHT, width=WIDTH))


@pytest.mark.parametrize('name', REQUIRED)
def test_pmm_and_bdb_train_a_step_and_feature_extractor_loads_them(
        name, tmp_path):
    channels = EXPECTED[name][0]
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
              for _ in range(3)]
    for family, cls, mix in (('pmm', PMM, 'hard_mix'), ('bdb', BDB, 'none')):
        model_name = '{}_{}'.format(family, name)
        model = torchreid.models.build_model(model_name, num_classes=4,
                                             loss='pmm', pretrained=False)
        assert type(model) is cls and model.backbone_name == name
        assert model.feature_channels == channels
        summary = _step(model, mix)
        assert np.isfinite(summary['loss']) and summary['loss'] > 0
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert missing == []
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        stem = next(model.backbone.parameters())
        assert float(stem.grad.abs().sum()) > 0  # it reaches the backbone
        model.eval()
        with torch.no_grad():
            feats = model(batch(height=HEIGHT, width=WIDTH)['img'])
        assert feats.shape == (8, model.feature_dim) == (8, 1536)
        assert torch.isfinite(feats).all()
        if family == 'bdb':
            continue
        # torchreid's FeatureExtractor: the trained weights, one descriptor
        path = str(tmp_path / 'model.pth.tar')
        torch.save({'state_dict': model.state_dict()}, path)
        torch.manual_seed(1)  # the extractor's own initialisation differs
        extractor = torchreid.utils.FeatureExtractor(
            model_name=model_name, model_path=path,
            image_size=(HEIGHT, WIDTH), device='cpu', verbose=False)
        feats = extractor(images)
        assert feats.shape == (3, 1536)
        tensors = torch.stack([extractor.preprocess(extractor.to_pil(a))
                               for a in images])
        with torch.no_grad():
            torch.testing.assert_close(feats, model(tensors))


@pytest.mark.parametrize('name', REQUIRED)
def test_fmn_and_magnifiernet_build_and_train_on_it(name):
    torch.manual_seed(0)
    data = batch(height=HEIGHT, width=WIDTH)
    images, labels = data['img'], data['pid']
    regions = torch.randint(0, 5, (8, HEIGHT, WIDTH))
    for family, cls, width in (('fmn', FMN, 1024),
                               ('magnifiernet', MagnifierNet, 1536)):
        model = torchreid.models.build_model(
            '{}_{}'.format(family, name), num_classes=4, pretrained=False)
        assert type(model) is cls
        out = model.train()(images, labels, regions=regions)
        loss = sum(F.cross_entropy(z, labels) for z in out['logits'])
        loss = loss + sum(out.get('aux_losses', {}).values())
        loss.backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert missing == [] and torch.isfinite(loss)
        if family == 'fmn':  # the mask lies on the low-level (stride 16) map
            assert out['mask'].shape == (8, 1, 4, 2)
        with torch.no_grad():
            assert model.eval()(images).shape == (8, width)


def test_the_block_grid_follows_the_stride_32_map():
    cfg = C.get_default_config()
    C.merge_list(cfg, ['model.name', 'pmm_mobilenetv2_x1_0', 'data.height',
                       '256', 'data.width', '128', 'pmm.block_size',
                       '[2, 2]', 'pmm.top_k', '1'])
    assert C.mixed_blocks(cfg) == (1, 8)  # an 8x4 map in 2x2 blocks
    C.merge_list(cfg, ['model.name', 'pmm_osnet_x1_0'])
    assert C.mixed_blocks(cfg) == (1, 32)  # 16x8
    C.merge_list(cfg, ['model.name', 'pmm_resnet50_stride32',
                       'pmm.block_size', '[3, 2]'])
    with pytest.raises(ValueError, match='gives a 8x4 feature map'):
        C.mixed_blocks(cfg)


# --------------------------------------------------------------------------
# ImageNet weights
# --------------------------------------------------------------------------
@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty $TORCH_HOME, where nothing may be downloaded."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError('no network')

    monkeypatch.setattr('gdown.download', offline)
    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    return tmp_path, calls


@pytest.mark.parametrize('name', ['osnet_x1_0', 'resnet50_stride32',
                                  'mobilenetv2_x1_0'])
def test_weights_that_cannot_be_downloaded_name_the_file(name, torch_home):
    home, calls = torch_home
    path, url = torchreid_weights_location(name)
    assert path.startswith(str(home))
    with pytest.raises(RuntimeError) as info:
        MODEL_FACTORY['pmm_' + name](num_classes=3, pretrained=True)
    message = str(info.value)
    assert path in message and url in message
    assert 'model.pretrained False' in message
    assert len(calls) == (0 if name.startswith('mobilenetv2') else 1)
    left = [f for _, _, files in os.walk(str(home)) for f in files]
    assert left == []  # no partial download stays behind


def test_torchreids_file_names_and_folders():
    home = os.path.expanduser(os.getenv('TORCH_HOME', os.path.join(
        os.getenv('XDG_CACHE_HOME', '~/.cache'), 'torch')))
    assert torchreid_weights_location('osnet_ain_x1_0')[0] == os.path.join(
        home, 'checkpoints', 'osnet_ain_x1_0_imagenet.pth')
    for name in ('resnet50_stride32', 'resnet50_fc512'):
        path, url = torchreid_weights_location(name)
        assert url == torchreid.models.resnet.model_urls['resnet50']
        assert path == os.path.join(torch.hub.get_dir(), 'checkpoints',
                                    'resnet50-19c8e357.pth')


def _random_state(net, seed):
    """``net``'s state dict with every float tensor drawn at random."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.rand(v.shape, generator=gen) + 0.5
            if v.is_floating_point() else v
            for k, v in net.state_dict().items()}


def test_cached_osnet_weights_load_and_stage_i_starts_from_their_fc(
        torch_home, capsys):
    home, calls = torch_home
    name = 'osnet_x0_5'
    state = _random_state(torchreid_network(name), seed=3)
    path = torchreid_weights_location(name)[0]
    os.makedirs(os.path.dirname(path))
    # the way some files were saved: from a DataParallel model
    torch.save({'module.' + k: v for k, v in state.items()}, path)
    model = MODEL_FACTORY['pmm_' + name](num_classes=3, pretrained=True)
    assert calls == []  # the cached file is used
    stages = TORCHREID_BACKBONES[name].stages
    for i, stage in enumerate(stages):
        for key, value in model.backbone[i].state_dict().items():
            assert torch.equal(value, state['{}.{}'.format(stage, key)]), key
    conv, bn = model.global_head.reduction[0], model.global_head.reduction[1]
    assert torch.equal(conv.weight.flatten(1), state['fc.0.weight'])
    assert torch.equal(bn.weight, state['fc.1.weight'])
    torch.testing.assert_close(
        bn.running_mean, state['fc.1.running_mean'] - state['fc.0.bias'])
    assert 'starts from the pretrained embedding' in capsys.readouterr().out
    # another embedding size than the 512-d fc: stage I starts afresh, saying so
    model = MODEL_FACTORY['pmm_' + name](num_classes=3, pretrained=True,
                                         embedding_dim=64)
    assert 'does not fit the global head' in capsys.readouterr().out
    assert model.global_head.reduction[0].weight.shape == (64, 256, 1, 1)
    # a file without the body's tensors (another width) is refused by name
    torch.save(_random_state(torchreid_network('osnet_x0_75'), 4), path)
    with pytest.raises(RuntimeError, match=re.escape('refusing "{}"'.format(
            path))):
        build_backbone(name, pretrained=True)


def test_cached_resnet_weights_load_without_an_embedding(torch_home):
    home, calls = torch_home
    # torchvision's ImageNet file, in the legacy format of resnet50-19c8e357
    state = _random_state(torchvision.models.resnet50(), seed=5)
    path = torchreid_weights_location('resnet50_stride32')[0]
    os.makedirs(os.path.dirname(path))
    torch.save(state, path, _use_new_zipfile_serialization=False)
    for name in ('resnet50_stride32', 'resnet50_fc512'):
        built = build_backbone(name, pretrained=True)
        assert built.embedding is None  # fc512 is not in the ImageNet file
        assert torch.equal(built.body[0].weight, state['conv1.weight'])
        assert torch.equal(built.body[7][2].bn3.running_var,
                           state['layer4.2.bn3.running_var'])
    assert calls == []


def test_a_downloaded_osnet_file_is_kept_only_when_it_is_weights(
        torch_home, monkeypatch):
    home, _ = torch_home
    name = 'osnet_ain_x0_25'
    path, url = torchreid_weights_location(name)
    state = _random_state(torchreid_network(name), seed=6)
    pages = []

    def fake_download(link, output, quiet=False, **kwargs):
        pages.append(link)
        if len(pages) == 1:  # what Google Drive serves over its quota
            with open(output, 'w') as f:
                f.write('<html>quota exceeded</html>')
        else:
            torch.save(state, output)
        return output

    monkeypatch.setattr('gdown.download', fake_download)
    with pytest.raises(RuntimeError, match=re.escape('place it at ' + path)):
        build_backbone(name, pretrained=True)
    assert os.listdir(os.path.dirname(path)) == []
    built = build_backbone(name, pretrained=True)
    assert pages == [url, url] and os.path.isfile(path)
    assert torch.equal(built.body[0].conv.weight, state['conv1.conv.weight'])
    assert torch.equal(built.embedding[0].weight, state['fc.0.weight'])
