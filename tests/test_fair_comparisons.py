"""Issue 24, a fair MagnifierNet: its fusion without the GRU
(``magnifiernet.fusion 'mean'``), BDB with MagnifierNet's bands as a branch
of its own (``bdb.bands 4``), the defaults left as they were, the parameters
a network uses at inference, and the ablation runner's columns for them."""
import csv
import json
import os
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from helpers import ROOT, batch, in_process

from pmm_torchreid import config as C
from pmm_torchreid import launch
from pmm_torchreid.data.parsing import band_regions
from pmm_torchreid.engine import PMMEngine
from pmm_torchreid.engine.comparison import ComparisonEngine
from pmm_torchreid.models import MODEL_FACTORY
from pmm_torchreid.models.bdb import BDB, BandBranch
from pmm_torchreid.models.capacity import inference_capacity
from pmm_torchreid.models.heads import MeanFusion
from pmm_torchreid.models.magnifiernet import GatedFusion, MagnifierNet, region_shares
from pmm_torchreid.models.regions import BANDS, band_shares

DEMO = os.path.join(ROOT, 'configs', 'pmm_demo.yaml')
CUHK01 = os.path.join(ROOT, 'configs', 'ablation_cuhk01.yaml')
MAIN = os.path.join(ROOT, 'scripts', 'main.py')
BACKBONE = 'osnet_x0_25'
GRU_KEYS = {'fusion.gates.weight', 'fusion.gates.bias',
            'fusion.candidate.weight', 'fusion.candidate.bias'}


def _count(module):
    return sum(p.numel() for p in module.parameters())


def _seeded(cls, **kwargs):
    torch.manual_seed(0)
    return cls(5, backbone=BACKBONE, pretrained=False, **kwargs)


def _stripes(n, height=64, width=32):
    """Region maps of 4 horizontal bands of whole feature cells."""
    rows = torch.arange(height) // (height // 4) + 1
    return rows.view(1, -1, 1).expand(n, height, width).to(torch.uint8)


def _engine(cls, model, **kwargs):
    """An engine on a data manager with no data (the training step only),
    learning rate 0."""
    fake = types.SimpleNamespace(train_loader=None, test_loader={})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    return cls(fake, model, optimizer, use_gpu=False, mix='none', **kwargs)


def _setup(*opts):
    return launch.setup_config(launch.build_parser().parse_args(
        ['--config-file', DEMO] + list(opts) + ['model.pretrained', 'False']))


# --------------------------------------------------------------------------
# the defaults are the networks they were
# --------------------------------------------------------------------------
@pytest.mark.parametrize('name', ['bdb_' + BACKBONE, 'magnifiernet_' + BACKBONE])
def test_the_config_default_builds_the_constructors_default(name):
    """The config's new keys at their defaults reach the constructor and
    build, under the same seed, the network its plain defaults build: the
    same tensors bit for bit and the same descriptor."""
    torch.manual_seed(0)
    plain = MODEL_FACTORY[name](num_classes=7, pretrained=False)
    cfg = _setup('-m', name, 'pmm.mix', 'none')
    torch.manual_seed(0)
    built = launch.build_model(cfg, 7)
    a, b = plain.state_dict(), built.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    images = batch()['img']
    with torch.no_grad():
        assert torch.equal(plain.eval()(images), built.eval()(images))
    assert not any(k.startswith('band_branch.') for k in a)
    assert (GRU_KEYS <= set(a)) == name.startswith('magnifiernet')


def test_the_new_parts_are_built_after_the_old_ones():
    """Under one seed, BDB with bands holds the default BDB's tensors
    unchanged plus its band branch; MagnifierNet with the mean fusion holds
    the default's tensors without the GRU's, the same up to the heads that
    are initialised after the GRU is built."""
    plain, banded = _seeded(BDB).state_dict(), _seeded(BDB, bands=4).state_dict()
    assert [k for k in banded if k in plain] == list(plain)
    assert all(torch.equal(plain[k], banded[k]) for k in plain)
    assert {k.split('.')[0] for k in banded if k not in plain} == {'band_branch'}
    gru = _seeded(MagnifierNet).state_dict()
    mean = _seeded(MagnifierNet, fusion='mean').state_dict()
    assert set(gru) - set(mean) == GRU_KEYS and set(mean) <= set(gru)
    before = list(gru)[:list(gru).index('parsing_head.0.weight')]
    assert 'srb_head.reduction.0.weight' in before
    assert all(torch.equal(gru[k], mean[k]) for k in before)


# --------------------------------------------------------------------------
# magnifiernet.fusion 'mean'
# --------------------------------------------------------------------------
def test_mean_fusion_has_no_gru_and_averages_the_regions():
    gru, mean = _seeded(MagnifierNet), _seeded(MagnifierNet, fusion='mean')
    assert isinstance(mean.fusion, MeanFusion)
    assert not any(isinstance(m, GatedFusion) for m in mean.modules())
    assert mean.sfb_reduction[0].weight.shape == (512, 256)
    # the GRU's parameters, and half of the reduction's input weights, go
    assert _count(gru) - _count(mean) == _count(gru.fusion) + 256 * 512
    mean.eval()
    feats = torch.randn(3, 4, 256)
    with torch.no_grad():
        logits, emb = mean.fuse(feats)
        torch.testing.assert_close(emb, mean.sfb_reduction(feats.mean(dim=1)))
        assert mean(batch()['img']).shape == (8, 1536)
    with pytest.raises(ValueError, match="fusion must be one of"):
        MagnifierNet(5, backbone=BACKBONE, pretrained=False, fusion='max')


def test_mean_fusion_trains_one_step_through_the_comparison_engine():
    model = _seeded(MagnifierNet, fusion='mean')
    engine = _engine(ComparisonEngine, model)
    data = batch()
    torch.manual_seed(0)
    summary = engine.forward_backward(dict(data, regions=_stripes(8)))
    assert np.isfinite(summary['loss'])
    assert {'loss_t3', 'loss_x3', 'acc3', 'loss_sd', 'loss_parsing'} <= \
        set(summary)
    for name, p in model.sfb_reduction.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


# --------------------------------------------------------------------------
# bdb.bands 4
# --------------------------------------------------------------------------
def test_the_bands_are_magnifiernets_band_regions_pooled_on_the_map():
    """band_shares is what MagnifierNet's parsing head learns on the band
    regions of data.parsing: the area shares of each map row."""
    for height, rows in ((128, 8), (64, 4), (256, 16), (384, 24), (32, 2)):
        image = torch.from_numpy(np.array(band_regions(8, height)))[None]
        expected = region_shares(image, (rows, 1))[0, 1:, :, 0]
        torch.testing.assert_close(band_shares(height, rows), expected)
    shares = band_shares(128, 8)
    torch.testing.assert_close(shares.sum(dim=0), torch.ones(8))
    assert shares.shape == (len(BANDS), 8)
    assert float(shares[0, 0]) == 1.0 and float(shares[3, 7]) == 13 / 16


def test_bdb_with_bands_trains_one_step_through_the_pmm_engine():
    model = _seeded(BDB, bands=4)
    assert isinstance(model.band_branch, BandBranch) and model.num_stages == 3
    engine = _engine(PMMEngine, model)
    summary = engine.forward_backward(batch())
    assert np.isfinite(summary['loss'])
    assert summary['loss'] == pytest.approx(sum(
        summary['loss_t{}'.format(s)] + summary['loss_x{}'.format(s)]
        for s in (1, 2, 3)), rel=1e-5)
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    for name, p in model.band_branch.named_parameters():
        assert float(p.grad.abs().sum()) > 0, name


def test_bdb_with_bands_descriptors():
    model = _seeded(BDB, bands=4).eval()
    images = batch()['img']
    with torch.no_grad():
        full = model(images)
        assert full.shape == (8, 2048) and model.descriptor_dim == 2048
        fmap = model.backbone(images)
        _, bands = model.band_branch(fmap, images.shape[-2])
        torch.testing.assert_close(full[:, 1536:], bands)
        model.set_descriptor('global')
        glob = model(images)
    assert glob.shape == (8, 512) and model.descriptor_dim == 512
    torch.testing.assert_close(glob, full[:, :512])
    for bad in (1, 3, 8):
        with pytest.raises(ValueError, match='bands must be 0'):
            BDB(5, backbone=BACKBONE, pretrained=False, bands=bad)


# --------------------------------------------------------------------------
# the config
# --------------------------------------------------------------------------
def test_the_config_reaches_the_constructors():
    cfg = _setup('-m', 'bdb_' + BACKBONE, 'pmm.mix', 'none', 'bdb.bands', '4')
    kwargs = C.model_kwargs(cfg, 10)
    assert kwargs['bands'] == 4 and kwargs['band_dim'] == 256
    assert launch.build_model(cfg, 10).feature_dim == 2048
    cfg = _setup('-m', 'magnifiernet_' + BACKBONE, 'pmm.mix', 'none',
                 'magnifiernet.fusion', 'mean')
    assert C.model_kwargs(cfg, 10)['fusion'] == 'mean'
    assert isinstance(launch.build_model(cfg, 10).fusion, MeanFusion)


@pytest.mark.parametrize('opts, match', [
    (['-m', 'bdb_resnet18', 'pmm.mix', 'none', 'bdb.bands', '3'],
     "bdb.bands = 3: expected 0 \\(no band branch\\) or 4"),
    (['-m', 'bdb_resnet18', 'pmm.mix', 'none', 'bdb.band_dim', '0'],
     'bdb.band_dim = 0: expected >= 1'),
    (['-m', 'pmm_resnet18', 'bdb.bands', '4'],
     "bdb.bands = 4: expected 0 for model.name = 'pmm_resnet18'"),
    (['-m', 'magnifiernet_resnet18', 'pmm.mix', 'none',
      'magnifiernet.fusion', 'max'],
     "magnifiernet.fusion = 'max': expected 'gru' .* or 'mean'"),
    (['-m', 'fmn_resnet18', 'pmm.mix', 'none', 'magnifiernet.fusion', 'mean'],
     "magnifiernet.fusion = 'mean': expected 'gru' for model.name = "
     "'fmn_resnet18'"),
])
def test_the_config_check_refuses_bad_values(opts, match):
    with pytest.raises(ValueError, match=match):
        _setup(*opts)


# --------------------------------------------------------------------------
# parameters at inference
# --------------------------------------------------------------------------
class _Tiny(nn.Module):
    """A body, a head, a gate that acts through a detached path, a shared
    layer used twice, a parameter of the model's own, a classifier whose
    logits the eval forward computes and throws away, and a branch that
    only trains."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 4, 3, bias=False)  # 108
        self.gate = nn.Conv2d(4, 1, 1)  # 5, detached
        self.head = nn.Linear(4, 6)  # 30
        self.shared = nn.Linear(6, 6)  # 42, called twice
        self.scale = nn.Parameter(torch.ones(6), requires_grad=False)  # 6
        self.classifier = nn.Linear(6, 10)  # 70, not counted
        self.train_only = nn.Linear(4, 100)  # 500, not counted

    def forward(self, x):
        f = F.relu(self.body(x))
        w = torch.sigmoid(self.gate(f)).detach()
        v = (f * w).mean(dim=(2, 3))
        if self.training:
            return self.train_only(v)
        e = self.shared(self.shared(self.head(v))) * self.scale
        self.classifier(e)
        return e


def test_inference_capacity_of_a_hand_made_model():
    model = _Tiny()
    rng = torch.get_rng_state()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cap = inference_capacity(model, 12, 8)
    assert cap.parameters == 108 + 5 + 30 + 42 + 6
    assert cap.descriptor_dim == 6 and cap.total == cap.parameters + 70 + 500
    assert cap.by_child == {'body': 108, 'gate': 5, 'head': 30, 'shared': 42,
                            '': 6}
    # the model, its flags and torch's generator as they were
    assert model.training and not model.scale.requires_grad
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    with pytest.raises(TypeError, match='one N x D tensor'):
        inference_capacity(nn.Conv2d(3, 2, 1), 8, 8)


def test_inference_capacity_of_the_comparison_networks():
    """On the networks of the study: the classifiers never count, the
    parsing head does (its detached softmax weights the fusion branch's
    pooling at test time), and the variants differ by what they add."""
    def measure(cls, **kwargs):
        model = _seeded(cls, **kwargs)
        return model, inference_capacity(model, 64, 32)

    def classifiers(model):
        return sum(p.numel() for n, p in model.named_parameters()
                   if 'classifier' in n)  # sfb_classifier too
    bdb, bdb_cap = measure(BDB)
    banded, banded_cap = measure(BDB, bands=4)
    gru, gru_cap = measure(MagnifierNet)
    mean, mean_cap = measure(MagnifierNet, fusion='mean')
    for model, cap, dim in ((bdb, bdb_cap, 1536), (banded, banded_cap, 2048),
                            (gru, gru_cap, 1536), (mean, mean_cap, 1536)):
        assert cap.descriptor_dim == dim
        assert cap.total - cap.parameters == classifiers(model)
    assert banded_cap.parameters - bdb_cap.parameters == \
        _count(banded.band_branch) - _count(banded.band_branch.classifier)
    assert gru_cap.parameters - mean_cap.parameters == \
        _count(gru.fusion) + 256 * 512
    assert gru_cap.by_child['parsing_head'] == _count(gru.parsing_head)
    assert 'fusion' not in mean_cap.by_child


# --------------------------------------------------------------------------
# the ablation runner's columns
# --------------------------------------------------------------------------
OLD_CSV = ('setting,split_id,seed,status,rank1,mAP,epoch,train_seconds,'
           'run_seconds,wall_seconds,model,mix,save_dir\n')


def _finished_run(out, slug, model, rank1, mAP):
    """A run folder as scripts/main.py leaves it (its results.json)."""
    folder = os.path.join(out, slug, 'split0', 'seed1')
    os.makedirs(folder)
    with open(os.path.join(folder, 'results.json'), 'w') as f:
        json.dump({'model': model, 'loss': 'pmm', 'mix': 'none', 'seed': 1,
                   'split_id': 0, 'results': {'cuhk01': {
                       'rank1': rank1, 'mAP': mAP, 'epoch': 30}},
                   'train_seconds': 600.0, 'run_seconds': 700.0,
                   'wall_seconds': 710.0}, f)
    return folder


def test_table_only_adds_the_columns_to_a_folder_written_before(tmp_path):
    """A folder the runner wrote before the columns existed (its recipe
    without the new keys, its results.csv without the columns) is
    tabulated again with them, measured once per setting."""
    from pmm_torchreid.cli.ablation import main
    from pmm_torchreid.study.ablation import recipe_of
    out = str(tmp_path / 'study')
    settings = ['bdb_osnet_x0_25', 'bdb_osnet_x0_25,bdb.bands=4']
    recipe = recipe_of(CUHK01, [])
    old = yaml.safe_load(recipe['config'])  # as the runner dumped it before
    del old['bdb'], old['magnifiernet']['fusion']
    recipe['config'] = yaml.safe_dump(old)
    os.makedirs(out)
    with open(os.path.join(out, 'recipe.json'), 'w') as f:
        json.dump(recipe, f)
    with open(os.path.join(out, 'results.csv'), 'w') as f:
        f.write(OLD_CSV)
    _finished_run(out, 'bdb_osnet_x0_25', 'bdb_osnet_x0_25', 70.0, 68.0)
    _finished_run(out, 'bdb_osnet_x0_25_bdb.bands=4', 'bdb_osnet_x0_25', 72.0,
                  69.5)
    proc = in_process(main, ['--config-file', CUHK01, '--out', out,
                             '--seeds', '1', '--table-only',
                             '--settings'] + settings, main_script=MAIN)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(os.path.join(out, 'table.md')) as f:
        rows = [line for line in f.read().splitlines() if line.startswith('|')]
    assert rows[0] == ('| setting | split 0 R1 | split 0 mAP | train min/run '
                       '| params at inference (M) | descriptor |')
    assert rows[2] == '| bdb_osnet_x0_25 | 70.0 (1) | 68.0 (1) | 10.0 | 0.353 | 1536 |'
    assert rows[3] == ('| bdb_osnet_x0_25,bdb.bands=4 | 72.0 (1) | 69.5 (1) | '
                       '10.0 | 0.620 | 2048 |')
    with open(os.path.join(out, 'results.csv')) as f:
        records = list(csv.DictReader(f))
    assert [(r['setting'], r['inference_params'], r['descriptor_dim'])
            for r in records] == [(settings[0], '353288', '1536'),
                                  (settings[1], '620040', '2048')]
    with open(os.path.join(out, 'results.json')) as f:
        assert json.load(f)['runs'][1]['descriptor_dim'] == 2048


def test_a_setting_that_cannot_be_built_gets_dashes(tmp_path, capsys):
    from pmm_torchreid.study.ablation import Setting, recipe_of, write_outputs
    recipe = recipe_of(CUHK01, [])
    recipe['config'] += 'removed_section:\n  key: 1\n'
    text = write_outputs(str(tmp_path), [], [Setting('bdb_osnet_x0_25')], [0],
                         recipe)
    assert '| bdb_osnet_x0_25 | - | - | - | - | - |' in text
    assert 'bdb_osnet_x0_25: no parameter count' in capsys.readouterr().out


# --------------------------------------------------------------------------
# export (slow: the dynamo exporter)
# --------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize('cls, kwargs, dim', [
    (MagnifierNet, {'fusion': 'mean'}, 1536), (BDB, {'bands': 4}, 2048)])
def test_the_variants_export_to_onnx(cls, kwargs, dim):
    pytest.importorskip('onnx')
    pytest.importorskip('onnxscript')
    ort = pytest.importorskip('onnxruntime')
    from pmm_torchreid.deploy.export import export_onnx
    model = _seeded(cls, **kwargs).eval()
    proto = export_onnx(model, 64, 32)
    session = ort.InferenceSession(proto.SerializeToString(),
                                   providers=['CPUExecutionProvider'])
    images = batch(n_ids=3, per_id=1)['img']
    with torch.no_grad():
        ref = model(images).numpy()
    out = session.run(['features'], {'images': images.numpy()})[0]
    assert out.shape == (3, dim)
    assert np.abs(out - ref).max() <= 1e-4
