"""Stage pictures: CAM alignment, overlap metric, the training chain, the
visualize_gradcam.py and plot_curves.py scripts, pictures and curves written
during training."""
import csv
import glob
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ENV, ROOT, in_process, main_args, script
from PIL import Image

from pmm_torchreid.config import get_default_config
from pmm_torchreid.config.checks import check_config
from pmm_torchreid.engine.curves import CurveLog, curve_columns, read_curves
from pmm_torchreid.models import PMM
from pmm_torchreid.models.guidance import Mixed, block_mask, grad_cam
from pmm_torchreid.utils.checkpoint import save_checkpoint
from pmm_torchreid.visualize import (
    cam_cosine,
    chance_iou,
    contact_sheet,
    mask_iou,
    overlay,
    panel_size,
    render_panel,
    stage_overlap,
    stage_views,
    summarize_overlap,
    upsample_cam,
    upsample_mask,
)

FAST = [
    'use_gpu', 'False', 'data.height', '64', 'data.width', '32', 'pmm.block_size', '[1, 1]',
    'pmm.top_k', '2', 'train.batch_size', '16', 'data.workers', '0',
    'train.print_freq', '10', 'test.eval_freq', '1',
]


def _png(path):
    with Image.open(path) as img:
        img.load()
        return img.format, img.mode, img.size  # size is (width, height)


# --------------------------------------------------------------------------
# pixels
# --------------------------------------------------------------------------
def test_one_hot_cam_lands_on_its_own_pixels():
    cam = torch.zeros(2, 8, 4)
    cam[0, 5, 2] = 3.0  # cell (5, 2) of an 8x4 map: pixels 80-95 x 32-47
    cam[1, 2, 1] = 0.5  # cell (2, 1): pixels 32-47 x 16-31
    up = upsample_cam(cam, (128, 64))
    assert up.shape == (2, 128, 64)
    assert float(up.min()) >= 0 and float(up.max()) <= 1
    ys = torch.arange(128.).view(-1, 1)
    xs = torch.arange(64.).view(1, -1)
    for i, (top, left) in enumerate([(80, 32), (32, 16)]):
        heat = up[i]
        # the peak is the cell's four centre pixels; the heat is centred on
        # the cell (a half-cell shift, as align_corners=True gives, fails)
        peak = heat == heat.max()
        assert peak.nonzero().tolist() == [
            [top + 7, left + 7], [top + 7, left + 8], [top + 8, left + 7],
            [top + 8, left + 8]]
        mass = heat.sum()
        assert float((heat * ys).sum() / mass) == pytest.approx(top + 7.5)
        assert float((heat * xs).sum() / mass) == pytest.approx(left + 7.5)
        # every pixel of the cell is hotter than the cell's 16x16 average
        # anywhere else: the heat is the cell's
        pooled = torch.nn.functional.avg_pool2d(heat[None, None], 16)[0, 0]
        assert pooled.argmax().item() == (top // 16) * 4 + left // 16
        inside = heat[top:top + 16, left:left + 16]
        assert float(inside.min()) > 0.25
        assert float(inside.min()) > float(
            pooled.flatten().sort().values[-2])

    black = torch.zeros(2, 3, 128, 64)
    over = overlay(black, up, alpha=0.5)
    assert over.shape == black.shape
    assert float(over.min()) >= 0 and float(over.max()) <= 1
    # jet: the hot cell is red, the cold rest blue; RGB order, not BGR
    r, g, b = over[0, :, 88, 40]
    assert r > 0.3 and g < 0.05 and b < 0.05
    r, g, b = over[0, :, 10, 10]
    assert b > 0.2 and r < 0.05


def test_block_outline_is_drawn_on_the_block_border():
    from pmm_torchreid.visualize.drawing import outline as _outline
    tile = np.zeros((128, 64, 3), np.uint8)
    sel = np.zeros((128, 64), bool)
    sel[32:64, 16:32] = True
    drawn = _outline(tile, sel).any(axis=2)
    border = sel.copy()
    border[33:63, 17:31] = False
    assert np.array_equal(drawn, border)


def test_all_zero_cam_stays_zero_and_masks_upsample_exactly():
    assert float(upsample_cam(torch.zeros(1, 8, 4), (128, 64)).max()) == 0
    cam = torch.zeros(1, 8, 4)
    cam[0, 2:4, 1] = 1.0
    mask = block_mask(cam, (2, 1), 1)  # 0 on rows 2-3, column 1
    px = upsample_mask(mask, (128, 64))[0]
    expected = torch.ones(128, 64)
    expected[32:64, 16:32] = 0
    assert torch.equal(px, expected)


# --------------------------------------------------------------------------
# overlap
# --------------------------------------------------------------------------
def test_overlap_is_one_for_identical_and_zero_for_disjoint():
    a = torch.zeros(3, 8, 4, dtype=torch.bool)
    a[:, :2] = True
    b = torch.zeros_like(a)
    b[:, 4:] = True
    assert torch.equal(mask_iou(a, a), torch.ones(3))
    assert torch.equal(mask_iou(a, b), torch.zeros(3))
    c = torch.zeros_like(a)
    c[:, 1:3] = True  # 4 shared cells of 12 in the union
    assert mask_iou(a, c).tolist() == pytest.approx([1 / 3] * 3)
    empty = torch.zeros_like(a)
    assert torch.equal(mask_iou(empty, empty), torch.ones(3))

    cam = torch.rand(3, 8, 4)
    assert cam_cosine(cam, cam).tolist() == pytest.approx([1.0] * 3)
    assert cam_cosine(a.float(), b.float()).tolist() == [0.0] * 3

    # stage_overlap takes block_mask output: the 0s are the top-K blocks
    masks = [(~a).float().unsqueeze(1), (~a).float().unsqueeze(1),
             (~b).float().unsqueeze(1)]
    per = stage_overlap([a.float(), a.float(), b.float()], masks)
    summary = summarize_overlap(per)
    assert list(summary['mask_iou']) == ['I-II', 'I-III', 'II-III', 'mean']
    assert summary['mask_iou']['I-II'] == 1.0
    assert summary['mask_iou']['I-III'] == 0.0
    assert summary['mask_iou']['mean'] == pytest.approx(1 / 3)
    assert summary['cam_cosine']['I-II'] == pytest.approx(1.0)

    # a stage with an all-zero CAM has no top-K blocks of its own (only the
    # tie-break): its pairs are left out, not counted as overlap
    dead = a.float().clone()
    dead[0] = 0
    per = stage_overlap([a.float(), dead], masks[:2])
    assert torch.isnan(per['mask_iou']['I-II'][0])
    assert per['mask_iou']['I-II'][1:].tolist() == [1.0, 1.0]
    assert summarize_overlap(per)['mask_iou']['I-II'] == 1.0
    from pmm_torchreid.utils.io import json_safe
    all_dead = summarize_overlap(stage_overlap(
        [dead[:1], dead[:1]], [m[:1] for m in masks[:2]]))
    assert np.isnan(all_dead['mask_iou']['I-II'])
    assert json.loads(json.dumps(json_safe(all_dead), allow_nan=False))[
        'mask_iou']['I-II'] is None


def test_chance_iou_matches_a_simulation():
    assert chance_iou(16, 16) == 1.0
    assert chance_iou(16, 1) == pytest.approx(1 / 16)
    rng = np.random.RandomState(0)
    sims = []
    for _ in range(20000):
        x = set(rng.choice(16, 4, replace=False))
        y = set(rng.choice(16, 4, replace=False))
        sims.append(len(x & y) / len(x | y))
    assert chance_iou(16, 4) == pytest.approx(np.mean(sims), abs=0.005)


# --------------------------------------------------------------------------
# the stages' views
# --------------------------------------------------------------------------
def _model():
    torch.manual_seed(0)
    model = PMM(5, backbone='resnet18', pretrained=False)
    model.train()
    return model


def test_stage_views_follow_the_training_chain_and_touch_nothing():
    model = _model()
    n = 3
    images = torch.randn(3 * n, 3, 64, 32)
    labels = torch.tensor([0, 1, 2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    views = stage_views(model, images[:n], labels, (2, 1), 2,
                        partners=[images[n:2 * n], images[2 * n:]])
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():  # BN statistics unchanged
        assert torch.equal(value, before[key]), key
    assert [c.shape for c in views['cams']] == [(n, 4, 2)] * 3
    assert [m.shape for m in views['masks']] == [(n, 1, 4, 2)] * 3
    assert not views['predicted'] and torch.equal(views['labels'], labels)

    # the same chain through the model's own forward_train (eval-mode BN),
    # with partners fixed to the extra images
    seen = []

    def mixer(part, cam_map, cam_logits, lab):
        cam = grad_cam(cam_logits, cam_map, lab)
        mask = block_mask(cam, (2, 1), 2)
        stage = len(seen) + 2
        negatives = torch.arange(3 * n)
        negatives[:n] = torch.arange(n) + (stage - 1) * n
        seen.append(cam)
        mixed = torch.where(mask.bool(), part, part[negatives])
        return Mixed(mixed, mask, negatives, torch.zeros(3 * n))

    model.eval()
    fmap = model.backbone(images).detach().requires_grad_()
    out = model.forward_train(fmap, torch.tensor([0, 1, 2] * 3), mixer)
    assert torch.allclose(seen[0][:n], views['cams'][0], atol=1e-5)
    assert torch.allclose(seen[1][:n], views['mix_cams'][1], atol=1e-5)
    assert torch.equal(out['masks'][0][:n], views['mix_inputs'][0])
    assert torch.equal(out['masks'][1][:n], views['mix_inputs'][1])
    assert torch.equal(views['mix_masks'][1], views['mix_inputs'][1])


@pytest.mark.parametrize('backbone', ['resnet50', 'osnet_x0_25'])
def test_stage_views_work_with_the_other_backbones(backbone):
    from pmm_torchreid.models.backbones import feature_map_size
    torch.manual_seed(0)
    model = PMM(5, backbone=backbone, pretrained=False).eval()
    images = torch.randn(6, 3, 64, 32)
    views = stage_views(model, images[:2], None, (2, 1), 2,
                        partners=[images[2:4], images[4:]])
    size = feature_map_size(backbone, 64, 32)
    assert [tuple(c.shape[1:]) for c in views['cams']] == [size] * 3
    assert [tuple(c.shape[1:]) for c in views['mix_cams']] == [size] * 3
    assert views['predicted'] and all(p.grad is None
                                      for p in model.parameters())


def test_query_images_use_the_predicted_class():
    model = _model().eval()
    images = torch.randn(2, 3, 64, 32)
    views = stage_views(model, images, None, (1, 1), 2)
    with torch.no_grad():
        net_out = model.global_head(model.backbone(images))[0]
        part = model.part_trunk(model.backbone(images))
        total = net_out + sum(h(part)[0] for h in model.part_heads)
    assert views['predicted']
    assert torch.equal(views['labels'], total.argmax(1))
    assert 'mix_cams' not in views


def test_panel_and_sheet_have_the_documented_size():
    model = _model()
    images = torch.randn(9, 3, 64, 32)
    views = stage_views(model, images[:3], None, (1, 1), 2,
                        partners=[images[3:6], images[6:]])
    img01 = images[:3].sigmoid()
    panel = render_panel(0, img01, views, [img01, img01], 'caption')
    # 64x32 tiles are magnified 4x so titles fit: 8 tiles of 256x128
    assert panel_size(64, 32, 3, True) == (4 + 18 + 16 + 256 + 15 + 4,
                                           4 + 8 * (128 + 4))
    assert panel.shape == panel_size(64, 32, 3, True) + (3, )
    assert panel.dtype == np.uint8
    sheet = contact_sheet(img01, views, ['a', 'b', 'c'], columns=2)
    cell_w = 4 * 32 + 3 + 8
    assert sheet.shape == (4 + 18 + 16 + 2 * (16 + 64 + 16) + 4,
                           2 * cell_w + 4, 3)


# --------------------------------------------------------------------------
# curves
# --------------------------------------------------------------------------
def test_curves_append_resume_and_survive_a_cut_line(tmp_path, monkeypatch):
    path = str(tmp_path / 'curves.csv')
    cols = curve_columns(['loss'] + ['{}{}'.format(k, s) for s in (1, 2, 3)
                                     for k in ('loss_t', 'loss_x', 'acc')])
    first = CurveLog(path, cols)
    for e in (1, 2, 3):
        first.write({'kind': 'train', 'epoch': e, 'loss': 10.0 - e})
    first.write({'kind': 'test', 'epoch': 3, 'dataset': 'd', 'mAP': 5.0,
                 'rank1': 6.0})
    first.close()
    with open(path, 'a') as f:
        f.write(first.run + ',train,4,')  # killed while writing
    second = CurveLog(path, cols)
    second.run = 'resumed'
    for e in (3, 4):  # resumed from the epoch-2 checkpoint
        second.write({'kind': 'train', 'epoch': e, 'loss': 1.0})
    with pytest.raises(KeyError, match='loss_t9'):
        second.write({'kind': 'train', 'epoch': 5, 'loss_t9': 1.0})
    second.close()
    rows = read_curves(path)
    assert [(r['kind'], r['epoch'], r['loss']) for r in rows] == [
        ('train', 1, 9.0), ('train', 2, 8.0), ('train', 3, 1.0),
        ('train', 4, 1.0)]
    # another stage count: the old file is kept aside, a new one started
    two = curve_columns(['loss', 'loss_t1', 'loss_t2'])
    CurveLog(path, two).close()
    assert len(glob.glob(str(tmp_path / 'curves-*.csv'))) == 1
    with open(path) as f:
        assert next(csv.reader(f)) == two


def test_vis_keys_are_checked():
    cfg = get_default_config()
    cfg.merge_from_list(['pmm.vis_freq', '-1'])
    with pytest.raises(ValueError, match=r'pmm.vis_freq = -1'):
        check_config(cfg)
    cfg = get_default_config()
    cfg.merge_from_list(['pmm.vis_num', '0'])
    with pytest.raises(ValueError, match=r'pmm.vis_num = 0'):
        check_config(cfg)


# --------------------------------------------------------------------------
# the scripts, end to end on the synthetic dataset
# --------------------------------------------------------------------------
@pytest.mark.slow
def test_visualize_gradcam_script_writes_panels_sheet_and_overlap(
        synthetic_root, tmp_path):
    weights = str(tmp_path / 'untrained.pth.tar')
    save_checkpoint({'state_dict': _model().state_dict()}, weights)
    out = str(tmp_path / 'gradcam')
    cmd = [sys.executable, os.path.join('scripts', 'visualize_gradcam.py'),
           '--config-file', os.path.join('configs', 'pmm_demo.yaml'),
           '--root', synthetic_root, '--num', '3', '--seed', '5',
           '--output', out, '--sheet', '2', '--overlap-num', '40',
           'data.save_dir', str(tmp_path / 'log'), 'model.load_weights',
           weights] + FAST
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'Mean pairwise overlap between stages over 40 images' in proc.stdout
    panels = sorted(glob.glob(os.path.join(out, 'q*.png')))
    assert len(panels) == 3
    height, width = panel_size(64, 32, 3, True)
    for path in panels:
        assert _png(path) == ('PNG', 'RGB', (width, height))
    cell_w = 4 * 32 + 3 + 8
    assert _png(os.path.join(out, 'sheet.png')) == (
        'PNG', 'RGB', (2 * cell_w + 4, 4 + 18 + 16 + 2 * (16 + 64 + 16) + 4))
    umask = os.umask(0)
    os.umask(umask)
    for name in ('sheet.png', 'overlap.json', os.path.basename(panels[0])):
        mode = os.stat(os.path.join(out, name)).st_mode & 0o777
        assert mode == 0o666 & ~umask, name  # not mkstemp's 0600
    with open(os.path.join(out, 'overlap.json')) as f:
        report = json.load(f)
    assert report['overlap']['num_images'] == 40 and len(report['pictured']) == 3
    for key in ('test', 'mixed'):
        for metric in ('mask_iou', 'cam_cosine'):
            values = report['overlap'][key][metric]
            assert set(values) == {'I-II', 'I-III', 'II-III', 'mean'}
            assert all(0 <= v <= 1 for v in values.values())
    # the panels show the chosen query images: the first tile is the image
    name = os.path.basename(panels[0]).split('_', 1)[1]
    src = np.asarray(Image.open(os.path.join(
        synthetic_root, 'pmm_synthetic', 'query', name)).convert('RGB')
        .resize((32, 64), Image.BILINEAR), dtype=np.float32)
    tile = np.asarray(Image.open(panels[0]), dtype=np.float32)[
        4 + 18 + 16:4 + 18 + 16 + 256:4, 4:4 + 128:4]
    assert np.abs(tile - src).mean() < 12  # same picture (resampling aside)
    other = np.asarray(Image.open(os.path.join(
        synthetic_root, 'pmm_synthetic', 'query', '0150_c2_00.png'))
        .convert('RGB').resize((32, 64), Image.BILINEAR), dtype=np.float32)
    assert np.abs(tile - other).mean() > 12


def test_visualize_gradcam_refuses_bad_indices(synthetic_root, tmp_path):
    from pmm_torchreid.cli.pictures import main
    proc = in_process(main, [
        '--config-file', os.path.join(ROOT, 'configs', 'pmm_demo.yaml'),
        '--root', synthetic_root, '--indices', '0', '400',
        '--output', str(tmp_path / 'out'),  # ends the --indices list
        'data.save_dir', str(tmp_path)] + FAST)
    assert proc.returncode != 0
    assert '--indices [400]: the query set of pmm_synthetic has 400' in \
        proc.stderr
    assert not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_training_with_vis_writes_pictures_curves_and_tensorboard(
        synthetic_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    save_dir = str(tmp_path / 'log')
    from pmm_torchreid.cli.train import main
    proc = in_process(main, main_args(  # scripts/main.py's main, in process
        synthetic_root, save_dir, 'train.max_epoch', '1', 'pmm.vis_freq', '1',
        'pmm.vis_num', '3'))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = os.path.join(save_dir, 'gradcam', 'epoch-001')
    panels = sorted(glob.glob(os.path.join(folder, '0*.png')))
    assert len(panels) == 3
    height, width = panel_size(32, 16, 3, True)
    for path in panels:
        assert _png(path) == ('PNG', 'RGB', (width, height))
    assert _png(os.path.join(folder, 'sheet.png'))[0] == 'PNG'
    with open(os.path.join(folder, 'overlap.json')) as f:
        assert 0 <= json.load(f)['mask_iou']['mean'] <= 1

    rows = read_curves(os.path.join(save_dir, 'curves.csv'))
    train = [r for r in rows if r['kind'] == 'train']
    test = [r for r in rows if r['kind'] == 'test']
    assert len(train) == 1 and train[0]['epoch'] == 1
    for s in (1, 2, 3):
        assert train[0]['loss_t{}'.format(s)] > 0
        assert 0 <= train[0]['acc{}'.format(s)] <= 100
    steps = int(proc.stdout.split('epoch: [1/1][1/')[1].split(']')[0])
    assert train[0]['lr'] > 0 and train[0]['step'] == steps
    assert len(test) == 1 and test[0]['dataset'] == 'pmm_synthetic'
    logged = proc.stdout.split('mAP: ')[-1].split('%')[0]
    assert test[0]['mAP'] == pytest.approx(float(logged), abs=0.05)

    events = EventAccumulator(save_dir, size_guidance={'images': 0})
    events.Reload()
    tags = events.Tags()
    assert 'GradCAM/sheet' in tags['images']
    for tag in ('Train/loss_t3', 'Train/acc2', 'Train/lr',
                'Test/pmm_synthetic/mAP', 'Test/pmm_synthetic/rank1',
                'GradCAM/mask_iou/mean'):
        assert tag in tags['scalars'], tag

    # plot_curves renders the CSV
    png = str(tmp_path / 'curves.png')
    script('plot_curves.py', save_dir, '-o', png)
    assert _png(png)[0] == 'PNG' and _png(png)[2] == (1100, 750)


def test_pictures_during_training_leave_training_unchanged(synthetic_root,
                                                           tmp_path):
    """The hook draws from its own generator and keeps BN frozen: every RNG,
    the negative sampler and the weights are as before."""
    import torchreid

    from pmm_torchreid.engine import PMMEngine
    dm = torchreid.data.ImageDataManager(
        root=synthetic_root, sources='pmm_synthetic', height=64, width=32,
        workers=0, batch_size_train=8, train_sampler='RandomIdentitySampler',
        num_instances=2)
    model = PMM(dm.num_train_pids, backbone='resnet18', pretrained=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    engine = PMMEngine(dm, model, opt, use_gpu=False, block_size=(1, 1),
                       top_k=2, vis_freq=1, vis_num=2)
    engine.save_dir = str(tmp_path)
    engine.setup_pictures()
    model.train()
    states = (torch.get_rng_state(), random.getstate(),
              np.random.get_state()[1].copy(), engine.generator.get_state())
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    engine.write_pictures()
    assert torch.equal(states[0], torch.get_rng_state())
    assert states[1] == random.getstate()
    assert np.array_equal(states[2], np.random.get_state()[1])
    assert torch.equal(states[3], engine.generator.get_state())
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert len(glob.glob(str(tmp_path / 'gradcam' / 'epoch-001' / '*.png'))) == 3


@pytest.mark.parametrize('mode', ['hard_mix', 'cutout', 'cutmix', 'a_cutmix',
                                  'batch_drop'])
def test_every_mixing_rule_gets_its_training_chain_pictured(mode):
    """The chain is the model's own forward_train with the rule's partners
    fixed: each mixed stage replaces k blocks, pasted from the partner or
    zeroed as the rule does, and the panel has the documented size."""
    from pmm_torchreid.models.guidance import build_mixer
    model = _model()
    n = 3
    torch.manual_seed(2)
    images = torch.randn(3 * n, 3, 64, 32)
    rule = build_mixer(mode, block=(1, 1), k=2,
                       generator=torch.Generator().manual_seed(5))
    state = rule.generator.get_state()
    views = stage_views(model, images[:n], torch.tensor([0, 1, 2]), (1, 1), 2,
                        partners=[images[n:2 * n], images[2 * n:]], rule=rule,
                        partner_labels=[torch.tensor([3, 4, 3]),
                                        torch.tensor([4, 3, 4])])
    pasted = mode in ('hard_mix', 'cutmix', 'a_cutmix')
    assert views['mix_pasted'] == [pasted, pasted]
    for keep in views['mix_inputs']:
        assert keep.shape == (n, 1, 4, 2)
        assert ((keep == 0).flatten(1).sum(1) == 2).all()  # k blocks each
    if mode == 'batch_drop':  # one draw for the whole batch
        assert all((keep == keep[:1]).all() for keep in views['mix_inputs'])
    if mode in ('hard_mix', 'cutout'):  # the previous stage's top-k blocks
        assert torch.equal(views['mix_inputs'][0], views['masks'][0])
        assert torch.equal(views['mix_inputs'][1], views['mix_masks'][1])
    assert torch.equal(state, rule.generator.get_state())  # untouched
    img01 = images[:n].sigmoid()
    panel = render_panel(0, img01, views, [img01, img01], 'caption')
    assert panel.shape == panel_size(64, 32, 3, True) + (3, )


def test_a_cutmix_chain_pastes_the_partners_own_salient_blocks():
    from pmm_torchreid.models.guidance import ACutMix
    model = _model()
    n = 2
    torch.manual_seed(3)
    images = torch.randn(3 * n, 3, 64, 32)
    partner_labels = [torch.tensor([3, 4]), torch.tensor([4, 3])]
    views = stage_views(model, images[:n], torch.tensor([0, 1]), (1, 1), 2,
                        partners=[images[n:2 * n], images[2 * n:]],
                        rule=ACutMix((1, 1), 2),
                        partner_labels=partner_labels)
    partner = stage_views(model, images[n:2 * n], partner_labels[0], (1, 1), 2)
    # stage II's input: the partner's own stage-I top-k blocks, pasted
    assert torch.equal(views['mix_inputs'][0], partner['masks'][0])
