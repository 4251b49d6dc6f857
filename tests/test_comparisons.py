"""The comparison systems FMN and MagnifierNet: shapes in training and
evaluation, FMN's mask, MagnifierNet's occlusion and Semantic Diversity loss,
registration, the engine's summed losses and the config checks."""
import os
import types

import pytest
import torch
import torchreid
from helpers import ROOT, images_and_labels, in_process

import pmm_torchreid
from pmm_torchreid import config as C
from pmm_torchreid.engine import PMMEngine
from pmm_torchreid.engine.comparison import ComparisonEngine, engine_class
from pmm_torchreid.models import MODEL_FACTORY
from pmm_torchreid.models.backbones import BACKBONES
from pmm_torchreid.models.fmn import FMN, split_backbone
from pmm_torchreid.models.magnifiernet import (
    GatedFusion,
    MagnifierNet,
    downsample_regions,
    semantic_diversity_loss,
)

_batch = images_and_labels


def _stripes(n, height=64, width=32):
    """Region maps of 4 horizontal bands of whole feature cells (16 rows
    each): cell rows 0..3 are regions 1..4."""
    rows = torch.arange(height) // (height // 4) + 1
    return rows.view(1, -1, 1).expand(n, height, width).to(torch.uint8)


# --------------------------------------------------------------------------
# shapes
# --------------------------------------------------------------------------
@pytest.mark.parametrize('backbone', ['resnet18', 'osnet_x0_25'])
def test_fmn_shapes_in_train_and_eval(backbone):
    model = FMN(num_classes=7, backbone=backbone, pretrained=False)
    images, labels = _batch()
    out = model.train()(images, labels)
    assert [t.shape for t in out['logits']] == [(6, 7)] * 2
    assert [t.shape for t in out['embeddings']] == [(6, 512)] * 2
    model.eval()
    feats = model(images)
    assert isinstance(feats, torch.Tensor) and feats.shape == (6, 1024)
    assert torch.isfinite(feats).all()


@pytest.mark.parametrize('backbone', ['resnet18', 'osnet_x0_25'])
def test_magnifiernet_shapes_in_train_and_eval(backbone):
    model = MagnifierNet(num_classes=7, backbone=backbone, pretrained=False,
                         region_dim=32)
    images, labels = _batch()
    out = model.train()(images, labels, regions=_stripes(6))
    assert [t.shape for t in out['logits']] == [(6, 7)] * 3
    assert [t.shape for t in out['embeddings']] == [(6, 512)] * 3
    assert out['region_features'].shape == (6, 4, 32)
    assert out['keep'].shape == (6, 1, 4, 2)
    assert set(out['aux_losses']) == {'sd', 'parsing'}
    assert all(v.dim() == 0 and torch.isfinite(v)
               for v in out['aux_losses'].values())
    model.eval()
    feats = model(images)  # no masks needed at test time
    assert isinstance(feats, torch.Tensor) and feats.shape == (6, 1536)
    assert torch.isfinite(feats).all()


def test_magnifiernet_needs_masks_in_training_only():
    model = MagnifierNet(3, backbone='resnet18', pretrained=False).train()
    images, labels = _batch()
    with pytest.raises(ValueError, match='regions'):
        model(images, labels)
    assert model.eval()(images).shape == (6, 1536)


@pytest.mark.parametrize('name', ['fmn', 'fmn_resnet50', 'fmn_resnet18',
                                  'fmn_osnet_x0_25', 'magnifiernet',
                                  'magnifiernet_resnet50',
                                  'magnifiernet_resnet18',
                                  'magnifiernet_osnet_x0_25'])
def test_registered_with_torchreid(name):
    table = vars(torchreid.models)['__model_factory']
    assert table[name] is MODEL_FACTORY[name]
    backbone = name.split('_', 1)[1] if '_' in name else 'resnet50'
    assert MODEL_FACTORY[name].backbone == backbone
    assert C.uses_pmm_engine(name) and C.is_comparison_model(name)
    assert C.takes_no_mix(name) and not C.is_pmm_model(name)
    assert engine_class(name) is ComparisonEngine
    assert pmm_torchreid.FMN is FMN and pmm_torchreid.MagnifierNet is MagnifierNet


def test_build_model_uses_the_config_sizes():
    from pmm_torchreid import launch
    cfg = C.get_default_config()
    C.merge_list(cfg, ['model.name', 'magnifiernet_resnet18',
                       'model.pretrained', 'False', 'pmm.mix', 'none',
                       'magnifiernet.embedding_dim', '64',
                       'magnifiernet.region_dim', '16',
                       'magnifiernet.occluded_regions', '2',
                       'magnifiernet.occlusion_share', '0.5'])
    model = launch.build_model(cfg, 5)
    assert isinstance(model, MagnifierNet) and model.occluded_regions == 2
    assert model.occlusion_share == 0.5
    assert model.eval()(_batch()[0]).shape == (6, 192)
    C.merge_list(cfg, ['model.name', 'fmn_osnet_x0_25',
                       'fmn.embedding_dim', '32'])
    model = launch.build_model(cfg, 5)
    assert isinstance(model, FMN) and model.eval()(_batch()[0]).shape == (6, 64)


# --------------------------------------------------------------------------
# FMN's mask
# --------------------------------------------------------------------------
@pytest.mark.parametrize('backbone, low, channels', [
    ('resnet50', 1024, 2048), ('resnet18', 256, 512), ('osnet_x0_25', 96, 128)])
def test_low_level_split_of_every_backbone(backbone, low, channels):
    with torch.device('meta'):
        body = BACKBONES[backbone](False).body
        first, second, low_channels = split_backbone(backbone, body)
        x = first(torch.empty(2, 3, 64, 32))
        y = second(x)
    assert low_channels == low and x.shape == (2, low, 4, 2)
    assert y.shape == (2, channels, 4, 2)  # both at stride 16


@pytest.mark.parametrize('backbone', ['resnet18', 'osnet_x0_25'])
def test_fmn_mask_lies_in_0_1_on_the_low_level_map_and_reweights_it(backbone):
    model = FMN(5, backbone=backbone, pretrained=False).train()
    images, labels = _batch(height=96, width=48)
    seen = []
    model.masked_head.register_forward_pre_hook(
        lambda m, inp: seen.append(inp[0].detach()))
    low_maps = []
    model.backbone[model.split - 1].register_forward_hook(
        lambda m, i, out: low_maps.append(out.detach()))
    with torch.no_grad():  # make the mask far from constant
        model.mask_head.body[-1].bias.fill_(3.0)
        model.mask_head.body[-1].weight.normal_(0, 5)
    out = model(images, labels)
    mask = out['mask'].detach()
    assert mask.shape == (6, 1, 6, 3) == (6, 1) + low_maps[-1].shape[-2:]
    assert float(mask.min()) >= 0 and float(mask.max()) <= 1
    assert float(mask.max() - mask.min()) > 0.1  # a real spatial weighting
    torch.testing.assert_close(seen[-1], low_maps[-1] * mask)
    model.eval()
    with torch.no_grad():
        test_mask = model.feature_mask(images)
    assert test_mask.shape == mask.shape and float(test_mask.min()) >= 0


def test_fmn_takes_no_mixer():
    model = FMN(3, backbone='resnet18', pretrained=False)
    with pytest.raises(ValueError, match="pmm.mix 'none'"):
        model(*_batch(), mixer=object())


# --------------------------------------------------------------------------
# MagnifierNet's occlusion
# --------------------------------------------------------------------------
def test_downsample_regions_takes_the_majority_of_each_cell():
    regions = torch.zeros(1, 32, 16, dtype=torch.uint8)
    regions[0, :16, :] = 1  # top cell row: head
    regions[0, 16:, :10] = 3  # bottom-left cell: 10 of 16 columns lower body
    regions[0, 16:, 8:] = 4  # bottom-right: 8 columns shoes (+2 over left)
    cells = downsample_regions(regions, (2, 2))
    assert cells.tolist() == [[[1, 1], [3, 4]]]
    tie = torch.zeros(1, 16, 16, dtype=torch.uint8)
    tie[0, :8] = 2  # half upper body, half background: the lower id wins
    assert downsample_regions(tie, (1, 1)).tolist() == [[[0]]]


@pytest.mark.parametrize('k', [1, 2, 3])
def test_magnifiernet_occludes_exactly_the_chosen_regions_in_training(k):
    model = MagnifierNet(3, backbone='resnet18', pretrained=False,
                         occluded_regions=k).train()
    images, labels = _batch()
    seen, parts = [], []
    model.srb_head.register_forward_pre_hook(
        lambda m, inp: seen.append(inp[0].detach()))
    model.part_trunk.register_forward_hook(
        lambda m, i, out: parts.append(out.detach()))
    regions = _stripes(6)  # cell row r is region r + 1
    chosen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out = model(images, labels, regions=regions)
        ids = model.last_occluded
        assert len(ids) == len(set(ids)) == k and set(ids) <= {1, 2, 3, 4}
        chosen.update(ids)
        part, fed = parts[-1], seen[-1]
        for row in range(4):
            if row + 1 in ids:  # the whole region, every sample, every channel
                assert bool((fed[:, :, row] == 0).all())
            else:
                torch.testing.assert_close(fed[:, :, row], part[:, :, row])
        flags = torch.zeros(4, dtype=torch.bool)
        flags[[i - 1 for i in ids]] = True
        assert bool((out['occluded'] == flags).all())  # the same per sample
    assert chosen == {1, 2, 3, 4}  # every region gets its turn
    # evaluation: nothing is occluded, with or without masks
    model.eval()
    model(images)
    torch.testing.assert_close(seen[-1], parts[-1])


def test_occlusion_follows_each_samples_own_mask():
    model = MagnifierNet(3, backbone='resnet18', pretrained=False).train()
    images, labels = _batch()
    regions = _stripes(6).clone()
    regions[3:] = regions[3:].flip(1)  # samples 3..5 are upside down
    seen = []
    model.srb_head.register_forward_pre_hook(
        lambda m, inp: seen.append(inp[0].detach()))
    torch.manual_seed(0)
    model(images, labels, regions=regions)
    region = model.last_occluded[0]
    zero = (seen[-1] == 0).all(dim=1).all(dim=-1)  # N x 4 cell rows
    assert bool(zero[:3, region - 1].all()) and bool(zero[3:, 4 - region].all())
    assert int(zero.sum()) == 6


def test_a_cell_is_occluded_when_the_region_covers_a_quarter_of_it():
    model = MagnifierNet(3, backbone='resnet18', pretrained=False).train()
    images, labels = _batch()
    regions = torch.full((6, 64, 32), 2, dtype=torch.uint8)  # upper body
    # cell (0, 0) is 16 x 16 pixels: 4 rows of head (25 %) -> occluded with
    # the head; cell (0, 1): 3 rows (19 %) -> kept; cell (3, 0): all shoes
    regions[:, :4, :16] = 1
    regions[:, :3, 16:] = 1
    regions[:, 48:, :16] = 4
    seen, parts = [], []
    model.srb_head.register_forward_pre_hook(
        lambda m, inp: seen.append(inp[0].detach()))
    model.part_trunk.register_forward_hook(
        lambda m, i, out: parts.append(out.detach()))
    model.choose_regions = lambda device=None: torch.tensor([1], device=device)
    out = model(images, labels, regions=regions)
    zero = (seen[-1] == 0).all(dim=1)  # N x 4 x 2
    expected = torch.zeros(4, 2, dtype=torch.bool)
    expected[0, 0] = True
    assert bool((zero == expected).all())
    assert out['keep'][:, 0].eq(~expected).all()
    model.choose_regions = lambda device=None: torch.tensor([4, 2],
                                                            device=device)
    model(images, labels, regions=regions)
    zero = (seen[-1] == 0).all(dim=1)
    # upper body covers 75 % of cell (0, 0) and 81 % of (0, 1): all occluded
    assert bool(zero.all())
    with pytest.raises(ValueError, match='occlusion_share'):
        MagnifierNet(3, backbone='resnet18', pretrained=False,
                     occlusion_share=0)


def test_parsing_head_learns_shares_smaller_than_a_cell():
    """The parsing loss takes each cell's region shares as its target, so a
    region that covers no cell by majority (a small head) still counts."""
    from pmm_torchreid.models.magnifiernet import region_shares
    regions = torch.zeros(1, 32, 16, dtype=torch.uint8)
    regions[0, :4, 4:12] = 1  # 32 of 256 pixels of cell (0, 0)
    shares = region_shares(regions, (2, 1))
    assert shares.shape == (1, 5, 2, 1)
    assert float(shares[0, 1, 0, 0]) == pytest.approx(32 / 256)
    assert downsample_regions(regions, (2, 1)).tolist() == [[[0], [0]]]
    torch.testing.assert_close(shares.sum(dim=1), torch.ones(1, 2, 1))


def test_occlusion_draws_come_from_torchs_generator():
    model = MagnifierNet(3, backbone='resnet18', pretrained=False).train()
    draws = []
    for _ in range(2):
        torch.manual_seed(5)
        draws.append([model.choose_regions().tolist() for _ in range(8)])
    assert draws[0] == draws[1]


@pytest.mark.parametrize('k', [0, 4])
def test_occluded_regions_out_of_range_is_refused(k):
    with pytest.raises(ValueError, match='occluded_regions'):
        MagnifierNet(3, backbone='resnet18', pretrained=False,
                     occluded_regions=k)


# --------------------------------------------------------------------------
# MagnifierNet's gated fusion
# --------------------------------------------------------------------------
def _gru_by_hand(fusion, seq):
    """GatedFusion's documented GRU cell, step by step from a zero state:
    ``keep, reset = sigmoid(gates([x, h]))``, ``cand = tanh(candidate([x,
    reset * h]))``, ``h = keep * h + (1 - keep) * cand``."""
    w_g, b_g = fusion.gates.weight, fusion.gates.bias
    w_c, b_c = fusion.candidate.weight, fusion.candidate.bias
    hidden = fusion.hidden_dim
    h = torch.zeros(seq.shape[0], hidden)
    for t in range(seq.shape[1]):
        x = seq[:, t]
        z = torch.sigmoid(torch.cat([x, h], 1) @ w_g.T + b_g)
        keep, reset = z[:, :hidden], z[:, hidden:]
        cand = torch.tanh(torch.cat([x, reset * h], 1) @ w_c.T + b_c)
        h = keep * h + (1 - keep) * cand
    return h


def _set_gates(fusion, keep_bias, reset_bias):
    """Gates independent of the input: sigmoid(bias), 0 or 1 at +-50."""
    hidden = fusion.hidden_dim
    fusion.gates.weight.zero_()
    fusion.gates.bias[:hidden] = keep_bias
    fusion.gates.bias[hidden:] = reset_bias


@torch.no_grad()
def test_gated_fusion_is_the_documented_gru_cell():
    torch.manual_seed(0)
    fusion = GatedFusion(6, 5)
    seq = torch.randn(3, 4, 6)
    fusion.gates.bias.normal_(0, 1)  # gates well away from 1/2
    torch.testing.assert_close(fusion(seq), _gru_by_hand(fusion, seq))
    assert fusion.last_update.shape == (4,)
    assert bool(((fusion.last_update > 0) & (fusion.last_update < 1)).all())
    # every region counts: changing the first one changes the fused state
    other = seq.clone()
    other[:, 0] += 1
    assert float((fusion(other) - fusion(seq)).abs().max()) > 1e-4


@torch.no_grad()
def test_gated_fusion_follows_its_gates_at_their_extremes():
    torch.manual_seed(0)
    fusion = GatedFusion(6, 5)
    seq = torch.randn(3, 4, 6)
    # update gate shut (keep = 1): no region enters, the state stays zero
    _set_gates(fusion, 50.0, 0.0)
    assert bool((fusion(seq) == 0).all())
    torch.testing.assert_close(fusion.last_update, torch.zeros(4))
    # update gate open, reset gate shut: every step replaces the state with
    # the candidate of that step's region alone, so the last region decides
    _set_gates(fusion, -50.0, -50.0)
    last = torch.tanh(fusion.candidate(torch.cat(
        [seq[:, -1], torch.zeros(3, 5)], 1)))
    torch.testing.assert_close(fusion(seq), last)
    torch.testing.assert_close(fusion.last_update, torch.ones(4))
    earlier = seq.clone()
    earlier[:, :3] = torch.randn(3, 3, 6)
    torch.testing.assert_close(fusion(earlier), last)
    # update gate open, reset gate open: the previous state feeds the
    # candidate, so the earlier regions count again
    _set_gates(fusion, -50.0, 50.0)
    torch.testing.assert_close(fusion(seq), _gru_by_hand(fusion, seq))
    assert float((fusion(earlier) - fusion(seq)).abs().max()) > 1e-3


@torch.no_grad()
def test_magnifiernets_fused_descriptor_depends_on_the_fusion_gates():
    """The SFB third of the evaluation descriptor is sfb_reduction of the
    fused state: a shut update gate gives every image the same (that of a
    zero state), an open one gives each image its own."""
    model = MagnifierNet(3, backbone='resnet18', pretrained=False,
                         region_dim=16, embedding_dim=32).eval()
    images, _ = _batch()
    sfb = slice(64, 96)
    before = model(images)
    open_feats = before[:, sfb]
    assert float((open_feats - open_feats[:1]).abs().max()) > 1e-3
    _set_gates(model.fusion, 50.0, 0.0)
    shut = model(images)[:, sfb]
    zero_state = model.sfb_reduction(torch.zeros(1, 32))
    torch.testing.assert_close(shut, zero_state.expand(6, -1))
    torch.testing.assert_close(model.fusion.last_update, torch.zeros(4))
    # the global and SRB thirds do not go through the fusion
    _set_gates(model.fusion, -50.0, -50.0)
    gated = model(images)
    torch.testing.assert_close(gated[:, :64], before[:, :64])
    assert float((gated[:, sfb] - shut).abs().max()) > 1e-3


# --------------------------------------------------------------------------
# the Semantic Diversity loss
# --------------------------------------------------------------------------
def test_sd_loss_is_zero_for_orthogonal_region_features():
    eye = torch.eye(4, 8)
    feats = torch.stack([eye * 3, eye.roll(2, dims=1), -eye])  # N x 4 x 8
    assert float(semantic_diversity_loss(feats)) == 0.0
    rot = torch.linalg.qr(torch.randn(6, 6))[0][:4]  # orthonormal rows
    assert float(semantic_diversity_loss(rot[None] * 2.5)) < 1e-10
    zero = torch.zeros(2, 4, 5)  # a zero feature counts as orthogonal
    assert float(semantic_diversity_loss(zero)) == 0.0


def test_sd_loss_is_positive_otherwise():
    torch.manual_seed(0)
    feats = torch.rand(3, 4, 16)  # non-negative: never orthogonal
    assert float(semantic_diversity_loss(feats)) > 0
    same = torch.ones(2, 4, 5)
    assert float(semantic_diversity_loss(same)) == pytest.approx(1.0)
    one_pair = torch.eye(4, 8)[None].clone()
    one_pair[0, 1] = one_pair[0, 0]  # regions 0 and 1 identical, rest apart
    # 2 ordered pairs of 12 have cosine 1
    assert float(semantic_diversity_loss(one_pair)) == pytest.approx(2 / 12)
    opposite = torch.eye(4, 8)[None].clone()
    opposite[0, 1] = -opposite[0, 0]  # anti-parallel overlaps too
    assert float(semantic_diversity_loss(opposite)) == pytest.approx(2 / 12)
    feats.requires_grad_()
    semantic_diversity_loss(feats).backward()
    assert float(feats.grad.abs().sum()) > 0


# --------------------------------------------------------------------------
# the engine: losses summed as the papers say
# --------------------------------------------------------------------------
def _engine(model, **kwargs):
    """A ComparisonEngine built by its own constructor on a data manager
    with no data (only the training step is used), learning rate 0 so that
    steps leave the weights as they were."""
    fake = types.SimpleNamespace(train_loader=None, test_loader={})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    return ComparisonEngine(fake, model, optimizer, use_gpu=False, **kwargs)


def _magnifiernet_step(engine, seed=0):
    """One training step of ``engine`` (on a MagnifierNet) on the fixed batch
    with the stripe masks, the occlusion drawn from ``seed``."""
    images, labels = _batch()
    torch.manual_seed(seed)
    return engine.forward_backward(
        {'img': images, 'pid': labels, 'regions': _stripes(6)})


def test_magnifiernet_step_sums_branch_and_extra_losses():
    model = MagnifierNet(3, backbone='resnet18', pretrained=False)
    engine = _engine(model, weight_sd=2.0, weight_parsing=0.5)
    summary = _magnifiernet_step(engine)
    branches = sum(summary['loss_t{}'.format(s)] + summary['loss_x{}'.format(s)]
                   for s in (1, 2, 3))
    sd, parsing = summary['loss_sd'], summary['loss_parsing']
    # the two extra losses differ, so swapped or dropped weights show
    assert sd > 0 and parsing > 0 and abs(sd - parsing) > 0.1 * max(sd, parsing)
    assert summary['loss'] == pytest.approx(
        branches + 2.0 * sd + 0.5 * parsing, rel=1e-5)
    for wrong in (branches + sd + parsing, branches + 0.5 * sd + 2.0 * parsing):
        assert summary['loss'] != pytest.approx(wrong, rel=1e-3)
    assert {'acc1', 'acc2', 'acc3', 'loss_sd', 'loss_parsing'} <= set(summary)
    images, labels = _batch()
    with pytest.raises(ValueError, match="batch\\['regions'\\]"):
        engine.forward_backward({'img': images, 'pid': labels})


def test_each_constructor_weight_moves_the_total_by_its_own_loss():
    """The same step (same weights, same occlusion draw) with one of
    ``weight_sd`` and ``weight_parsing`` changed: the total moves by exactly
    that change times that loss, and the branch losses stay as they were."""
    model = MagnifierNet(3, backbone='resnet18', pretrained=False)
    base = _magnifiernet_step(_engine(model, weight_sd=2.0, weight_parsing=0.5))
    more_sd = _magnifiernet_step(_engine(model, weight_sd=3.5,
                                         weight_parsing=0.5))
    less_parsing = _magnifiernet_step(_engine(model, weight_sd=2.0,
                                              weight_parsing=0.0))
    for other in (more_sd, less_parsing):  # the same step: only the sum differs
        assert {k: v for k, v in other.items() if k != 'loss'} == \
            {k: v for k, v in base.items() if k != 'loss'}
    assert more_sd['loss'] - base['loss'] == pytest.approx(
        1.5 * base['loss_sd'], abs=1e-4)
    assert base['loss'] - less_parsing['loss'] == pytest.approx(
        0.5 * base['loss_parsing'], abs=1e-4)
    default = _magnifiernet_step(_engine(model))  # both weights default to 1
    assert base['loss'] - default['loss'] == pytest.approx(
        base['loss_sd'] - 0.5 * base['loss_parsing'], abs=1e-4)


def test_fmn_step_sums_its_two_branches():
    model = FMN(3, backbone='resnet18', pretrained=False)
    images, labels = _batch()
    summary = _engine(model).forward_backward({'img': images, 'pid': labels})
    assert summary['loss'] == pytest.approx(sum(
        summary['loss_t{}'.format(s)] + summary['loss_x{}'.format(s)]
        for s in (1, 2)), rel=1e-5)
    assert 'loss_t3' not in summary and 'loss_sd' not in summary


def test_engine_stops_on_a_non_finite_extra_loss():
    engine = _engine(FMN(3, backbone='resnet18', pretrained=False))
    with pytest.raises(FloatingPointError, match='sd loss is not finite'):
        engine.extra_losses({'aux_losses': {'sd': torch.tensor(float('nan'))}},
                            {})


def test_a_non_finite_step_goes_through_the_every_rank_check(monkeypatch):
    """A failing step reaches stop_if_any_failed before the backward pass, as
    in PMMEngine (whose one training step it runs), so under DDP every rank
    stops at that step."""
    import pmm_torchreid.engine.pmm as step_module
    engine = _engine(FMN(3, backbone='resnet18', pretrained=False))
    seen = []

    def record(failure):
        seen.append(failure)
        if failure is not None:
            raise failure
    monkeypatch.setattr(step_module, 'stop_if_any_failed', record)
    monkeypatch.setattr(engine, 'optimizer_step', lambda loss: seen.append(
        'backward'))
    images, labels = _batch()
    engine.forward_backward({'img': images, 'pid': labels})
    assert seen == [None, 'backward']
    seen.clear()
    monkeypatch.setattr(engine, 'extra_losses', lambda outputs, summary:
                        engine.__class__.extra_losses(
                            engine, {'aux_losses': {'sd': torch.tensor(
                                float('nan'))}}, summary))
    with pytest.raises(FloatingPointError, match='sd loss is not finite'):
        engine.forward_backward({'img': images, 'pid': labels})
    assert len(seen) == 1 and isinstance(seen[0], FloatingPointError)


# --------------------------------------------------------------------------
# config checks and the ablation runner's settings
# --------------------------------------------------------------------------
def _setup(*opts):
    from pmm_torchreid import launch
    return launch.setup_config(launch.build_parser().parse_args(
        ['--config-file', os.path.join(ROOT, 'configs', 'pmm_demo.yaml')] +
        list(opts)))


@pytest.mark.parametrize('opts, match', [
    (['-m', 'fmn_resnet18', 'pmm.mix', 'hard_mix'], "pmm.mix = 'hard_mix'"),
    (['-m', 'magnifiernet_resnet18', 'pmm.mix', 'none', 'pmm.vis_freq', '2'],
     'pmm.vis_freq'),
    (['-m', 'magnifiernet_resnet18', 'pmm.mix', 'none',
      'magnifiernet.occluded_regions', '4'], 'magnifiernet.occluded_regions'),
    (['-m', 'magnifiernet_resnet18', 'pmm.mix', 'none',
      'magnifiernet.mask_labels', 'pascal'], 'magnifiernet.mask_labels'),
    (['-m', 'magnifiernet_resnet18', 'pmm.mix', 'none',
      'magnifiernet.occlusion_share', '1.5'], 'magnifiernet.occlusion_share'),
    (['-m', 'magnifiernet_resnet18', 'pmm.mix', 'none',
      'magnifiernet.regions', 'parser'], 'magnifiernet.regions'),
    (['-m', 'magnifiernet_resnet18', 'pmm.mix', 'none',
      'magnifiernet.regions', 'bands', 'magnifiernet.masks_root', 'masks'],
     "magnifiernet.masks_root = 'masks': expected '' with magnifiernet.regions"),
    (['-m', 'fmn_resnet18', 'pmm.mix', 'none', 'loss.name', 'triplet'],
     'loss.name'),
    (['-m', 'fmn_resnet18', 'pmm.mix', 'none', 'train.batch_size', '6',
      'sampler.num_instances', '4'], 'num_instances'),
])
def test_config_checks_refuse_bad_settings(opts, match):
    with pytest.raises(ValueError, match=match):
        _setup(*opts)


def test_config_accepts_the_comparison_models():
    for name in ('fmn_resnet18', 'magnifiernet_osnet_x0_25'):
        cfg = _setup('-m', name, 'pmm.mix', 'none')
        kwargs = C.comparison_engine_kwargs(cfg)
        assert kwargs['mix'] == 'none' and kwargs['data_root'] == 'reid-data'
        assert kwargs['weight_sd'] == 1.0 and kwargs['mask_labels'] == 'lip'
        assert kwargs['band_regions'] is False
    cfg = _setup('-m', 'magnifiernet_resnet18', 'pmm.mix', 'none',
                 'magnifiernet.regions', 'bands')
    assert C.comparison_engine_kwargs(cfg)['band_regions'] is True
    assert engine_class('pmm_resnet18') is PMMEngine
    assert engine_class('bdb', recorded=True).__name__ == 'RecordedPMMEngine'


def _ablation_dry_run(tmp_path, *settings):
    from pmm_torchreid.cli.ablation import main
    return in_process(main, [
        '--config-file', os.path.join(ROOT, 'configs', 'ablation_cuhk01.yaml'),
        '--out', str(tmp_path / 'out'), '--seeds', '1', '--dry-run',
        '--settings'] + list(settings),
        main_script=os.path.join(ROOT, 'scripts', 'main.py'))


def test_ablation_settings_train_them_without_a_mix(tmp_path):
    proc = _ablation_dry_run(
        tmp_path, 'magnifiernet_osnet_x0_25,magnifiernet.occluded_regions=2',
        'fmn_osnet_x0_25:none')
    assert proc.returncode == 0, proc.stderr[-2000:]
    commands = [line.split('main.py', 1)[1].split()
                for line in proc.stdout.splitlines() if 'main.py' in line]
    assert len(commands) == 2
    assert commands[0][2:12] == [
        'model.name', 'magnifiernet_osnet_x0_25', 'loss.name', 'pmm',
        'pmm.mix', 'none', 'magnifiernet.occluded_regions', '2',
        'train.seed', '1']
    assert commands[1][2:8] == [
        'model.name', 'fmn_osnet_x0_25', 'loss.name', 'pmm', 'pmm.mix', 'none']
    assert not (tmp_path / 'out').exists()  # a dry run writes nothing
    with pytest.raises(SystemExit, match='takes no mix'):
        _ablation_dry_run(tmp_path, 'fmn_resnet18:hard_mix')


@pytest.mark.parametrize('model', ['fmn', 'magnifiernet'])
@pytest.mark.parametrize('dataset', ['market1501', 'dukemtmcreid', 'cuhk03'])
def test_dataset_configs_are_pmms_recipe_with_the_comparison_network(
        model, dataset):
    from pmm_torchreid import launch

    def load(name):
        return launch.setup_config(launch.build_parser().parse_args(
            ['--config-file', os.path.join(ROOT, 'configs', name)]))
    cfg = load('{}_{}.yaml'.format(model, dataset))
    pmm = load('pmm_{}.yaml'.format(dataset))
    assert cfg.model.name == model and cfg.model.pretrained is True
    assert MODEL_FACTORY[model].backbone == 'resnet50'
    assert cfg.loss.name == 'pmm' and cfg.pmm.mix == 'none'
    assert cfg.data.save_dir == 'log/{}_{}'.format(model, dataset)
    for key in ('data.sources', 'data.targets', 'data.height', 'data.width',
                'data.transforms', 'data.cutout_size', 'train.batch_size',
                'sampler.num_instances', 'train.optim', 'train.lr',
                'train.weight_decay', 'train.max_epoch', 'train.stepsize',
                'train.warmup_epochs', 'train.warmup_interval',
                'train.warmup_offset', 'test.dist_metric', 'test.eval_freq',
                'cuhk03.labeled_images', 'cuhk03.classic_split',
                'pmm.soft_margin', 'pmm.weight_triplet', 'pmm.weight_ce',
                'pmm.label_smooth'):
        section, name = key.split('.')
        assert cfg[section][name] == pmm[section][name], key
    if model == 'magnifiernet':
        assert cfg.magnifiernet.masks_root == ''  # bands unless given
        assert cfg.magnifiernet.occluded_regions == 1


def test_only_a_training_run_attaches_the_masks(monkeypatch):
    """An evaluation-only run of MagnifierNet needs no masks; a training run
    swaps in the loader that carries them before the first epoch."""
    import pmm_torchreid.engine.comparison as CE
    calls = []
    monkeypatch.setattr(torchreid.engine.Engine, 'run',
                        lambda self, *a, **k: calls.append(('run', k)))

    class Manager(object):
        train_loader = 'plain loader'

    def attach(datamanager, *masks):
        calls.append(('attach', masks))
        datamanager.train_loader = 'loader with masks'
    monkeypatch.setattr(CE, 'attach_region_masks', attach)
    engine = ComparisonEngine.__new__(ComparisonEngine)
    engine.needs_regions, engine.masks = True, ('m', 'r', 'atr')
    engine.datamanager, engine.train_loader = Manager(), 'plain loader'
    engine.run(save_dir='x', test_only=True)
    assert calls == [('run', {'save_dir': 'x', 'test_only': True})]
    engine.run('x', 1)
    assert calls[1:] == [('attach', ('m', 'r', 'atr')), ('run', {})]
    assert engine.train_loader == 'loader with masks'
    engine.needs_regions = False  # FMN: nothing to attach
    del calls[:]
    engine.run()
    assert calls == [('run', {})]
