"""The PMM network: shapes, gradients, parameter count, registration, weights."""
import os
import types
import urllib.error

import pytest
import torch
import torch.nn as nn
import torchreid
import torchvision
from helpers import SHARED, images_and_labels
from torchvision.models.resnet import Bottleneck

import pmm_torchreid
from pmm_torchreid.engine import PMMEngine
from pmm_torchreid.models import MODEL_FACTORY, PMM
from pmm_torchreid.models.backbones import build_backbone
from pmm_torchreid.models.guidance import HardMix
from pmm_torchreid.registry import register_into

_batch = images_and_labels


@pytest.mark.parametrize('backbone, channels', [('resnet18', 512),
                                                ('osnet_x0_25', 128)])
def test_shapes_in_train_and_eval(backbone, channels):
    model = PMM(num_classes=7, backbone=backbone, pretrained=False)
    assert model.feature_channels == channels
    images, labels = _batch()
    model.train()
    out = model(images, labels, mixer=HardMix((2, 1), 2))
    assert [t.shape for t in out['logits']] == [(6, 7)] * 3
    assert [t.shape for t in out['embeddings']] == [(6, 512)] * 3
    assert [t.shape for t in out['masks']] == [(6, 1, 4, 2)] * 2
    assert [t.shape for t in out['partner_labels']] == [(6, )] * 2
    model.eval()
    feats = model(images)
    assert isinstance(feats, torch.Tensor) and feats.shape == (6, 1536)
    assert torch.isfinite(feats).all()


@pytest.mark.parametrize('stages, dim', [(1, 64), (2, 128), (4, 32)])
def test_stage_count_and_embedding_size_are_knobs(stages, dim):
    model = PMM(3, backbone='resnet18', pretrained=False,
                num_stages=stages, embedding_dim=dim)
    images, labels = _batch()
    out = model.train()(images, labels, mixer=HardMix((2, 1), 1))
    assert len(out['logits']) == stages and len(out['masks']) == stages - 1
    assert model.eval()(images).shape == (6, stages * dim)


def test_no_mixer_feeds_the_part_map_unchanged():
    model = PMM(3, backbone='resnet18', pretrained=False).train()
    images, labels = _batch()
    out = model(images, labels)
    assert 'masks' not in out
    # stages II and III see the same input P: with equal weights, equal outputs
    model.part_heads[1].load_state_dict(model.part_heads[0].state_dict())
    out = model(images, labels)
    torch.testing.assert_close(out['embeddings'][1], out['embeddings'][2])


def test_mixed_stage_sees_partner_blocks():
    model = PMM(3, backbone='resnet18', pretrained=False).train()
    images, labels = _batch()
    seen = []
    model.part_heads[0].register_forward_pre_hook(
        lambda m, inp: seen.append(inp[0].detach()))
    fmap = model.backbone(images)
    part = model.part_trunk(fmap).detach()
    rule = HardMix((2, 1), 2, generator=torch.Generator().manual_seed(3))
    drawn = []  # the partner indices the rule drew, stage by stage
    draw = rule.partners
    rule.partners = lambda lab: drawn.append(draw(lab)) or drawn[-1]
    out = model(images, labels, mixer=rule)
    mask, neg = out['masks'][0], drawn[0]
    expected = torch.where(mask.bool(), part, part[neg])
    torch.testing.assert_close(seen[-1], expected)
    # the model hands on the partners' labels, not their batch indices
    assert torch.equal(out['partner_labels'][0], labels[neg])
    assert torch.equal(out['partner_labels'][1], labels[drawn[1]])
    assert bool((labels[neg] != labels).all())
    assert int((mask == 0).sum()) == 6 * 2 * 2  # 2 blocks of 2x1 per sample


def test_one_engine_step_gives_every_parameter_a_gradient():
    model = PMM(3, backbone='resnet18', pretrained=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    fake = types.SimpleNamespace(train_loader=None, test_loader={})
    engine = PMMEngine(fake, model, opt, use_gpu=False, block_size=(2, 1),
                       top_k=2)
    model.train()
    images, labels = _batch(n_ids=3, per_id=4)
    engine.forward_backward({'img': images, 'pid': labels})
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def _count(*modules):
    return sum(p.numel() for m in modules for p in m.parameters())


def test_parameter_count_matches_bdb_for_resnet50():
    classes = 751
    model = PMM(classes, backbone='resnet50', pretrained=False)
    body = build_backbone('resnet50', pretrained=False).body
    # BDB (Dai et al., ICCV 2019): global 2048->512 (1x1 conv + BN), part
    # bottleneck, part 2048->1024 (Linear + BN), classifiers 512 and 1024 wide
    bdb = _count(body, Bottleneck(2048, 512),
                 nn.Conv2d(2048, 512, 1, bias=False), nn.BatchNorm2d(512),
                 nn.Linear(2048, 1024), nn.BatchNorm1d(1024),
                 nn.Linear(512, classes), nn.Linear(1024, classes))
    ours = _count(model)
    assert abs(ours - bdb) / bdb < 1e-3, (ours, bdb)
    assert ours - bdb == classes  # one more classifier bias, nothing else


def test_registered_with_torchreid():
    for name in ('pmm', 'pmm_resnet50', 'pmm_resnet18', 'pmm_osnet_x0_25'):
        assert name in vars(torchreid.models)['__model_factory']
    model = torchreid.models.build_model('pmm_resnet18', num_classes=4,
                                         pretrained=False, use_gpu=False)
    assert isinstance(model, PMM) and model.backbone_name == 'resnet18'
    assert torchreid.models.build_model(
        'resnet18', num_classes=4, pretrained=False).__class__.__name__ \
        == 'ResNet'  # torchreid's own models are untouched


def test_registration_is_idempotent_and_refuses_a_different_model():
    pmm_torchreid.register()
    pmm_torchreid.register()
    table = vars(torchreid.models)['__model_factory']
    assert table['pmm'] is MODEL_FACTORY['pmm']
    with pytest.raises(ValueError, match="different model named 'pmm'"):
        register_into(table, {'pmm': lambda **kw: None}, 'model')
    assert table['pmm'] is MODEL_FACTORY['pmm']
    with pytest.raises(ValueError, match="named 'resnet50'"):
        register_into(table, {'x_new': MODEL_FACTORY['pmm'],
                              'resnet50': MODEL_FACTORY['pmm']}, 'model')
    assert 'x_new' not in table  # nothing half-registered


def _recorded_hard_mix(seed=1):
    """A seeded HardMix that keeps the partner indices it draws in
    ``rule.drawn``."""
    rule = HardMix((2, 1), 1, torch.Generator().manual_seed(seed))
    rule.drawn = []
    draw = rule.partners
    rule.partners = lambda labels: rule.drawn.append(draw(labels)) or \
        rule.drawn[-1]
    return rule


def test_data_parallel_forward_is_the_models_with_per_sample_label_outputs():
    """Without GPUs ``nn.DataParallel`` calls the module itself; what the
    data-parallel path relies on is checked on that call: the wrapper gives
    the unwrapped model's outputs for the same draws; the labels reach
    forward (they pick the Grad-CAM class and the partners, each of another
    identity); and every output the loss needs is a per-sample tensor with
    the partners already turned into labels, so that gathering replicas
    along dim 0 keeps them right."""
    torch.manual_seed(0)
    inner = PMM(3, backbone='resnet18', pretrained=False).train()
    model = nn.DataParallel(inner)
    images, labels = _batch()
    rule = _recorded_hard_mix()
    out = model(images, labels, mixer=rule)
    alone = inner(images, labels, mixer=_recorded_hard_mix())
    for key in ('logits', 'embeddings', 'masks', 'partner_labels',
                'partner_weights'):
        assert len(out[key]) == len(alone[key]) > 0, key
        for got, want in zip(out[key], alone[key]):
            assert torch.equal(got, want), key
    assert len(rule.drawn) == 2
    for s, negatives in enumerate(rule.drawn):
        partner = out['partner_labels'][s]
        assert partner.shape == labels.shape  # labels, not indices
        assert torch.equal(partner, labels[negatives])
        assert bool((partner != labels).all())  # another identity
        assert torch.equal(out['partner_weights'][s], torch.zeros(6))
    for key in ('logits', 'embeddings', 'masks'):
        assert all(t.shape[0] == 6 for t in out[key]), key
    # other labels on the same images: other Grad-CAM classes, other masks,
    # and partners drawn from the new identities
    relabelled = (labels + 1) % 3
    other = model(images, relabelled, mixer=_recorded_hard_mix())
    assert any(not torch.equal(a, b)
               for a, b in zip(other['masks'], out['masks']))
    assert all(bool((p != relabelled).all()) for p in other['partner_labels'])
    with pytest.raises(ValueError, match='needs the labels'):
        model(images, mixer=_recorded_hard_mix())
    model.eval()
    torch.testing.assert_close(model(images), inner(images), rtol=0, atol=0)
    assert model(images).shape == (6, 1536)


def test_pretrained_resnet_without_network_names_the_file(monkeypatch,
                                                          tmp_path):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError('no network')

    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', offline)
    with pytest.raises(RuntimeError) as info:
        MODEL_FACTORY['pmm'](num_classes=3, pretrained=True)
    url = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url
    msg = str(info.value)
    assert os.path.join(str(tmp_path), 'hub', 'checkpoints',
                        os.path.basename(url)) in msg
    assert url in msg and 'model.pretrained False' in msg


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, 'weights')),
                    reason='../shared/weights not present')
def test_pretrained_osnet_loads_the_shared_imagenet_weights(monkeypatch,
                                                            tmp_path):
    (tmp_path / 'checkpoints').mkdir()
    src = os.path.join(SHARED, 'weights', 'osnet_x0_25_imagenet.pth')
    os.symlink(src, tmp_path / 'checkpoints' / 'osnet_x0_25_imagenet.pth')
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    model = MODEL_FACTORY['pmm_osnet_x0_25'](num_classes=3, pretrained=True)
    state = torch.load(src, map_location='cpu', weights_only=True)
    state = state.get('state_dict', state)
    key = next(k for k in state if k.endswith('conv1.conv.weight'))
    torch.testing.assert_close(model.backbone[0].conv.weight,
                               state[key].float())


# --------------------------------------------------------------------------
# BDB, the baseline
# --------------------------------------------------------------------------
def _bdb_with_drop_capture(backbone='resnet18'):
    from pmm_torchreid.models import BDB
    model = BDB(num_classes=3, backbone=backbone, pretrained=False)
    seen = []
    model.batch_drop.register_forward_hook(
        lambda m, inputs, out: seen.append((inputs[0].detach(),
                                            out.detach())))
    return model, seen


@pytest.mark.parametrize('backbone, channels', [('resnet18', 512),
                                                ('osnet_x0_25', 128)])
def test_bdb_shapes_and_descriptor(backbone, channels):
    model, seen = _bdb_with_drop_capture(backbone)
    images, labels = _batch(height=128, width=64)
    out = model.train()(images, labels)
    assert [t.shape for t in out['logits']] == [(6, 3), (6, 3)]
    assert [t.shape for t in out['embeddings']] == [(6, 512), (6, 1024)]
    assert seen[0][0].shape == (6, channels, 8, 4)
    model.eval()
    with torch.no_grad():
        feats = model(images)
    assert feats.shape == (6, 1536) and model.feature_dim == 1536


def test_bdb_drops_the_same_stripe_for_the_whole_batch_only_in_training():
    model, seen = _bdb_with_drop_capture()
    images, labels = _batch(height=192, width=64)  # 12 x 4 map: 4-row stripe
    regions = set()
    for _ in range(12):
        model.train()(images, labels)
        before, after = seen[-1]
        top, left, rows, cols = model.batch_drop.last_region
        assert (rows, cols) == (4, 4)  # round(0.33 * 12) x round(1.0 * 4)
        dropped = torch.zeros(12, 4, dtype=torch.bool)
        dropped[top:top + rows, left:left + cols] = True
        # every sample, every channel: zero inside, untouched outside
        assert bool((after[:, :, dropped] == 0).all())
        assert torch.equal(after[:, :, ~dropped], before[:, :, ~dropped])
        assert bool((before[:, :, dropped] != 0).any())
        regions.add(top)
    assert len(regions) > 1  # the stripe moves between batches
    model.eval()
    with torch.no_grad():
        first = model(images)
        second = model(images)
    before, after = seen[-1]
    assert torch.equal(before, after)  # no drop in eval
    assert torch.equal(first, second)


def test_bdb_registered_and_refuses_a_mixer():
    pmm_torchreid.register()
    for name in ('bdb', 'bdb_resnet50', 'bdb_resnet18', 'bdb_osnet_x0_25'):
        assert name in torchreid.models.__model_factory
    model = torchreid.models.build_model('bdb_resnet18', num_classes=4,
                                         pretrained=False)
    images, labels = _batch()
    with pytest.raises(ValueError, match="pmm.mix 'none'"):
        model.train()(images, labels, mixer=HardMix((2, 1), 1))


def test_bdb_trains_with_the_engine_on_both_branches():
    from pmm_torchreid.models import BDB
    torch.manual_seed(0)
    model = BDB(num_classes=3, backbone='resnet18', pretrained=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    fake = types.SimpleNamespace(train_loader=None, test_loader={})
    engine = PMMEngine(fake, model, opt, use_gpu=False, mix='none')
    images, labels = _batch()
    summary = engine.forward_backward({'img': images, 'pid': labels})
    assert set(summary) >= {'loss_t1', 'loss_x1', 'loss_t2', 'loss_x2'}
    assert 'loss_t3' not in summary
    total = sum(summary['loss_{}{}'.format(k, s)] for k in 'tx'
                for s in (1, 2))
    assert summary['loss'] == pytest.approx(total, rel=1e-5)
    for name, p in model.named_parameters():
        assert p.grad is not None, name


# --------------------------------------------------------------------------
# stage I starts from a pretrained embedding layer (OSNet's fc)
# --------------------------------------------------------------------------
def _random_fc(in_dim=128, dim=512):
    """An OSNet-style fc (Linear with bias, BatchNorm1d, ReLU) with random
    weights and non-trivial running statistics."""
    torch.manual_seed(3)
    fc = nn.Sequential(nn.Linear(in_dim, dim), nn.BatchNorm1d(dim),
                       nn.ReLU(inplace=True))
    with torch.no_grad():
        fc[0].bias.normal_(0, 2)
        fc[1].weight.uniform_(0.5, 2)
        fc[1].bias.normal_()
        fc[1].running_mean.normal_(0, 3)
        fc[1].running_var.uniform_(0.5, 4)
        fc[1].num_batches_tracked.fill_(123)
    return fc


@pytest.mark.parametrize('training', [False, True])
def test_global_head_computes_what_the_embedding_layer_computed(training):
    from pmm_torchreid.models import GlobalHead
    fc = _random_fc()
    head = GlobalHead(128, 512, num_classes=5)
    assert head.load_embedding(fc)
    fmap = torch.rand(6, 128, 8, 4) * 3
    fc.train(training), head.train(training)
    expected = fc(fmap.mean(dim=(2, 3)))
    _, emb = head(fmap)
    # float32 rounding: the batch mean of (Wx + b) vs of Wx, with |b| ~ 2
    assert torch.allclose(emb, expected, atol=1e-4, rtol=1e-4)
    if training:  # the running statistics move the same way (bias folded in)
        head_mean = head.reduction[1].running_mean
        assert torch.allclose(head_mean, fc[1].running_mean - fc[0].bias,
                              atol=1e-5)
        assert torch.allclose(head.reduction[1].running_var,
                              fc[1].running_var, atol=1e-5)
    # a head of another size keeps its own initialisation
    other = GlobalHead(128, 256, num_classes=5)
    before = other.reduction[0].weight.clone()
    assert not other.load_embedding(fc)
    assert torch.equal(other.reduction[0].weight, before)


@pytest.mark.skipif(not os.path.isfile(os.path.join(
    SHARED, 'weights', 'osnet_x0_25_imagenet.pth')),
    reason='needs ../shared/weights/osnet_x0_25_imagenet.pth')
@pytest.mark.parametrize('name', ['pmm_osnet_x0_25', 'bdb_osnet_x0_25'])
def test_stage_one_of_a_fresh_model_is_torchreids_osnet_feature(
        name, monkeypatch, tmp_path):
    """In eval mode, the first 512 entries of an untrained-head PMM (and of
    BDB's global branch) are torchreid's osnet_x0_25 feature."""
    (tmp_path / 'checkpoints').mkdir()
    os.symlink(os.path.join(SHARED, 'weights', 'osnet_x0_25_imagenet.pth'),
               tmp_path / 'checkpoints' / 'osnet_x0_25_imagenet.pth')
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    reference = torchreid.models.build_model('osnet_x0_25', 10,
                                             pretrained=True).eval()
    model = torchreid.models.build_model(name, 10, pretrained=True).eval()
    torch.manual_seed(0)
    images = torch.rand(4, 3, 128, 64) * 4 - 2  # about normalised images
    with torch.no_grad():
        expected = reference(images)
        ours = model(images)[:, :512]
    assert expected.abs().mean() > 0.1  # a real feature, not zeros
    assert torch.allclose(ours, expected, atol=1e-4)
    # without ImageNet weights there is nothing to start from
    fresh = torchreid.models.build_model(name, 10, pretrained=False).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(images)[:, :512], expected, atol=1e-2)
