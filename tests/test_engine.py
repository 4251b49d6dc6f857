"""PMMEngine's training step, its losses, checkpoints, schedule and Cutout."""
import os
import types

import numpy as np
import pytest
import torch
from helpers import batch, pmm_engine

from pmm_torchreid.data import Cutout
from pmm_torchreid.engine import PMMEngine, RecordedPMMEngine
from pmm_torchreid.engine.losses import batch_hard_triplet, smoothed_cross_entropy
from pmm_torchreid.engine.optim import WarmupMultiStepLR
from pmm_torchreid.engine.records import periodic_checkpoint_due
from pmm_torchreid.utils.checkpoint import load_checkpoint, save_checkpoint


def _engine(mix='hard_mix', seed=1, recorded=False, **kwargs):
    return pmm_engine(RecordedPMMEngine if recorded else PMMEngine,
                      optimizer=lambda p: torch.optim.Adam(p, lr=1e-4),
                      mix=mix, seed=seed, **kwargs)


_data = batch


def test_step_sums_the_stage_losses_and_reports_each_stage():
    engine = _engine()
    data = _data()
    summary = engine.forward_backward(data)
    for s in (1, 2, 3):
        for key in ('loss_t{}', 'loss_x{}', 'acc{}'):
            assert key.format(s) in summary
        assert 0 <= summary['acc{}'.format(s)] <= 100
    total = sum(summary['loss_t{}'.format(s)] + summary['loss_x{}'.format(s)]
                for s in (1, 2, 3))
    assert summary['loss'] == pytest.approx(total, rel=1e-5)


def test_loss_weights_apply_to_every_stage():
    base = _engine().forward_backward(_data())
    weighted = _engine(weight_triplet=2.0, weight_ce=0.5).forward_backward(
        _data())
    expected = sum(2 * base['loss_t{}'.format(s)]
                   + 0.5 * base['loss_x{}'.format(s)] for s in (1, 2, 3))
    assert weighted['loss'] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize('recorded', [False, True])
def test_non_finite_loss_names_stage_and_iteration(recorded):
    engine = _engine(recorded=recorded)
    engine.epoch, engine.batch_idx = 2, 6
    with torch.no_grad():
        engine.model.part_heads[0].classifier.weight.fill_(float('nan'))
    with pytest.raises(FloatingPointError,
                       match=r'stage 2 .*epoch 3, iteration 7') as info:
        engine.forward_backward(_data())
    # the run records add where the last good weights are
    assert ('last good checkpoint is none' in str(info.value)) == recorded


def test_partners_are_reproducible_from_the_seed():
    draws = []
    for _ in range(2):
        engine = _engine(seed=7)
        out = engine.model(_data()['img'], _data()['pid'], mixer=engine.mixer)
        draws.append(torch.stack(out['partner_labels']))
    assert torch.equal(draws[0], draws[1])
    assert bool((draws[0] != _data()['pid']).all())  # another identity
    other = _engine(seed=8)
    out = other.model(_data()['img'], _data()['pid'], mixer=other.mixer)
    assert not torch.equal(draws[0], torch.stack(out['partner_labels']))


def _probed_step(engine):
    """One step of ``engine`` with probes: ``(summary, seen)``, ``seen``
    holding the model's ``mixer`` argument, its output, the part map and
    what each part stage's head was fed, and whether the generator of the
    partner draws moved."""
    model, seen = engine.model, {'fed': []}
    state = engine.generator.get_state()

    def keep_mixer(module, args, kwargs):
        seen['mixer'] = kwargs.get('mixer', 'not passed')
    hooks = [
        model.register_forward_pre_hook(keep_mixer, with_kwargs=True),
        model.register_forward_hook(
            lambda m, i, out: seen.__setitem__('out', out)),
        model.part_trunk.register_forward_hook(
            lambda m, i, out: seen.__setitem__('part', out.detach())),
    ] + [head.register_forward_pre_hook(
        lambda m, inputs: seen['fed'].append(inputs[0].detach()))
        for head in model.part_heads]
    summary = engine.forward_backward(_data())
    for hook in hooks:
        hook.remove()
    seen['generator_moved'] = not torch.equal(state,
                                              engine.generator.get_state())
    return summary, seen


def test_mix_none_trains_without_guidance(monkeypatch):
    """mix='none': the model gets no mixing rule, no Grad-CAM is taken, no
    partner is drawn (the generator stays as seeded), both part stages see
    the clean part map, the outputs carry no masks or partners, the loss is
    the plain sum of the stage losses, and the step moves every weight.  The
    same probes on a hard_mix step see all of that happen."""
    import pmm_torchreid.models.guidance as guidance
    real_grad_cam, cams = guidance.grad_cam, []
    monkeypatch.setattr(guidance, 'grad_cam', lambda *a, **k: cams.append(1)
                        or real_grad_cam(*a, **k))
    engine = _engine(mix='none')
    assert engine.mixer is None
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    summary, seen = _probed_step(engine)
    assert seen['mixer'] is None and cams == []
    assert not seen['generator_moved']
    assert len(seen['fed']) == 2
    for fed in seen['fed']:
        assert torch.equal(fed, seen['part'])
    assert not {'masks', 'partner_labels', 'partner_weights'} & set(seen['out'])
    assert summary['loss'] == pytest.approx(sum(
        summary['loss_{}{}'.format(kind, s)] for kind in 'tx' for s in (1, 2, 3)),
        rel=1e-5)
    assert np.isfinite(summary['loss'])
    unmoved = [n for n, p in engine.model.named_parameters()
               if torch.equal(p, before[n])]
    assert unmoved == []
    # the probes see guidance where there is some
    _, mixed = _probed_step(_engine(mix='hard_mix'))
    assert mixed['mixer'] is not None and len(cams) == 2
    assert mixed['generator_moved'] and len(mixed['out']['masks']) == 2
    assert all(not torch.equal(fed, mixed['part']) for fed in mixed['fed'])


def test_triplet_soft_and_hard_margin():
    emb = torch.tensor([[0., 0.], [0., 1.], [3., 0.], [3., 2.]])
    labels = torch.tensor([0, 0, 1, 1])
    # hardest positive / negative per anchor: d_ap = 1, 1, 2, 2;
    # d_an = 3, sqrt(10), 3, sqrt(10)
    d_ap = torch.tensor([1., 1., 2., 2.])
    d_an = torch.tensor([3., 10**0.5, 3., 10**0.5])
    soft = batch_hard_triplet(emb, labels)
    assert soft.item() == pytest.approx(
        torch.nn.functional.softplus(d_ap - d_an).mean().item(), rel=1e-5)
    hard = batch_hard_triplet(emb, labels, margin=1.5, soft_margin=False)
    assert hard.item() == pytest.approx(
        torch.relu(d_ap - d_an + 1.5).mean().item(), rel=1e-5)


def test_label_smoothing_matches_the_formula():
    logits = torch.tensor([[2., 0., -1.]])
    eps = 0.1
    target = torch.tensor([[1 - eps + eps / 3, eps / 3, eps / 3]])
    expected = -(target * logits.log_softmax(1)).sum()
    got = smoothed_cross_entropy(logits, torch.tensor([0]), eps)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_save_model_writes_plain_safe_checkpoints(tmp_path):
    engine = _engine(recorded=True)
    engine.save_model(epoch=4, rank1=np.float64(0.25), save_dir=str(tmp_path),
                      is_best=True)
    fpath = tmp_path / 'model' / 'model.pth.tar-5'
    ckpt = torch.load(fpath, weights_only=True)  # torch's safe loader accepts it
    assert ckpt['epoch'] == 5 and type(ckpt['rank1']) is float
    assert ckpt['rank1'] == 0.25
    assert (tmp_path / 'model' / 'model-best.pth.tar').is_file()
    assert sorted(os.listdir(tmp_path / 'model')) == [
        'model-best.pth.tar', 'model.pth.tar-5']  # no temporary left over
    assert set(load_checkpoint(str(fpath))) >= {
        'state_dict', 'optimizer', 'scheduler', 'pmm_generator', 'rng_state'}


def test_periodic_checkpoints_fall_between_torchreids_own():
    # torchreid saves after each evaluation and after the last epoch
    def due(freq, max_epoch, eval_freq, start_eval=0):
        return [e for e in range(1, max_epoch + 1) if periodic_checkpoint_due(
            e, freq, max_epoch, eval_freq, start_eval)]
    assert due(1, 5, -1) == [1, 2, 3, 4]  # evaluated only at the end
    assert due(2, 10, 4) == [2, 6]  # 4 and 8 evaluate, 10 is the last
    assert due(2, 10, 4, start_eval=6) == [2, 4, 6]  # 4 is before start_eval
    assert due(3, 9, 1) == []  # every epoch evaluates and saves
    assert due(0, 9, -1) == []


def test_periodic_checkpoints_replace_each_other_and_keep_the_evaluated(
        tmp_path):
    engine = _engine(recorded=True)
    folder = tmp_path / 'model'

    def files():
        return sorted(os.listdir(folder))
    engine.save_model(0, None, str(tmp_path), periodic=True)
    first = load_checkpoint(str(folder / 'model.pth.tar-1'))
    assert first['periodic'] is True and 'rank1' not in first
    engine.save_model(1, None, str(tmp_path), periodic=True)
    assert files() == ['model.pth.tar-2']  # tar-1 is replaced
    engine.save_model(2, 0.5, str(tmp_path))  # after an evaluation
    assert files() == ['model.pth.tar-3']
    evaluated = load_checkpoint(str(folder / 'model.pth.tar-3'))
    assert evaluated['rank1'] == 0.5 and 'periodic' not in evaluated
    engine.save_model(3, None, str(tmp_path), periodic=True)
    engine.save_model(4, 0.6, str(tmp_path))
    assert files() == ['model.pth.tar-3', 'model.pth.tar-5']
    # a periodic checkpoint the run resumed from goes when the next is
    # written, but only from the run's own folder
    other = tmp_path / 'elsewhere.pth.tar-5'
    other.write_bytes(b'x')
    engine.replaceable_checkpoint = str(other)
    engine.save_model(5, None, str(tmp_path), periodic=True)
    assert other.exists()
    assert files() == ['model.pth.tar-3', 'model.pth.tar-5', 'model.pth.tar-6']


@pytest.mark.parametrize('freq', [-1, 2.5, True])
def test_run_refuses_a_checkpoint_freq_that_is_no_count(freq, tmp_path):
    engine = _engine(recorded=True)
    with pytest.raises(ValueError, match='checkpoint_freq = .*>= 0'):
        engine.run(save_dir=str(tmp_path), max_epoch=1, checkpoint_freq=freq)
    assert not os.listdir(tmp_path)  # refused before any training


def test_save_checkpoint_replaces_atomically(tmp_path, monkeypatch):
    fpath = str(tmp_path / 'ckpt.pth')
    save_checkpoint({'epoch': 1}, fpath)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b'partial')
        raise KeyboardInterrupt  # killed in the middle of writing

    monkeypatch.setattr(torch, 'save', broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({'epoch': 2}, fpath)
    monkeypatch.undo()
    assert load_checkpoint(fpath)['epoch'] == 1  # the old file is intact
    assert os.listdir(tmp_path) == ['ckpt.pth']
    # the usual mode for a new file (not mkstemp's private 0600)
    mask = os.umask(0o022)
    os.umask(mask)
    assert os.stat(fpath).st_mode & 0o777 == 0o666 & ~mask


def test_load_checkpoint_refuses_arbitrary_pickles(tmp_path):
    flag = tmp_path / 'pwned'

    class Evil:
        def __reduce__(self):
            return (open, (str(flag), 'w'))

    fpath = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'x': Evil()}, fpath)
    with pytest.raises(RuntimeError, match='refused to load'):
        load_checkpoint(str(fpath))
    assert not flag.exists()


def _rates(sched, opt, epochs):
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]['lr'])
        opt.step()
        sched.step()
    return lrs


def test_warmup_schedule_counts_from_zero_by_default():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([param], lr=1e-3)
    sched = WarmupMultiStepLR(opt, [200, 300], gamma=0.1, warmup_epochs=50,
                              warmup_interval=5)
    lrs = _rates(sched, opt, 400)
    for epoch in range(50):
        assert lrs[epoch] == pytest.approx(1e-4 * (epoch // 5 + 1))
    assert lrs[50] == pytest.approx(1e-3) and lrs[199] == pytest.approx(1e-3)
    assert lrs[200] == pytest.approx(1e-4) and lrs[299] == pytest.approx(1e-4)
    assert lrs[300] == pytest.approx(1e-5) and lrs[399] == pytest.approx(1e-5)


def reference_lr(e):
    """The PMM/BDB reference code's rate for the 1-based epoch ``e`` (its
    main_reid.py calls ``adjust_lr(optimizer, epoch + 1)``)."""
    if e < 50:
        return 1e-4 * (e // 5 + 1)
    if e < 200:
        return 1e-3
    if e < 300:
        return 1e-4
    return 1e-5


def test_warmup_offset_gives_the_reference_codes_rates():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([param], lr=1e-3)
    sched = WarmupMultiStepLR(opt, [199, 299], gamma=0.1, warmup_epochs=50,
                              warmup_interval=5, warmup_offset=1)
    lrs = _rates(sched, opt, 400)
    assert lrs == pytest.approx([reference_lr(i + 1) for i in range(400)],
                                rel=1e-9)
    # and the unshifted schedule is one epoch late at every step and drop
    late = WarmupMultiStepLR(torch.optim.Adam([param], lr=1e-3), [200, 300],
                             warmup_epochs=50, warmup_interval=5)
    late_lrs = _rates(late, late.optimizer, 400)
    changes = [i for i in range(1, 400) if lrs[i] != pytest.approx(lrs[i - 1])]
    assert [i + 1 for i in changes] == [
        i for i in range(1, 400)
        if late_lrs[i] != pytest.approx(late_lrs[i - 1])]
    with pytest.raises(ValueError, match='warmup_offset'):
        WarmupMultiStepLR(opt, [10], warmup_epochs=5, warmup_offset=-1)


def test_cutout_clipped_at_the_border_without_inside():
    torch.manual_seed(0)
    import random
    random.seed(3)
    img = torch.rand(3, 96, 48) + 1  # no zeros to start with
    assert torch.equal(Cutout(16, p=0.0, inside=False)(img), img)
    areas = []
    for _ in range(40):
        out = Cutout(16, p=1.0, inside=False)(img)
        zero = (out == 0).all(0)
        rows, cols = zero.any(1).nonzero(), zero.any(0).nonzero()
        assert 1 <= len(rows) <= 16 and 1 <= len(cols) <= 16
        # the zeroed area is exactly a rectangle
        assert int(zero.sum()) == len(rows) * len(cols)
        assert torch.equal(out[:, ~zero], img[:, ~zero])
        areas.append(int(zero.sum()))
    assert min(areas) < 16 * 16  # some squares were clipped
    with pytest.raises(ValueError, match='size'):
        Cutout(0)


def reference_cutout(img, size, p):
    """The reference code's Cutout (utils/random_erasing.py), restated: skip
    when ``uniform(0, 1) > p``; else the top row is ``randint(0, H - size)``,
    then the left column ``randint(0, W - size)``, and the square is set to 0
    (its mean after normalisation)."""
    import random
    if random.uniform(0, 1) > p:
        return img
    height, width = img.shape[1:]
    top = random.randint(0, height - size)
    left = random.randint(0, width - size)
    img = img.clone()
    img[:, top:top + size, left:left + size] = 0
    return img


def test_cutout_keeps_the_whole_square_inside_as_the_reference_does():
    import random
    img = torch.rand(3, 384, 128) + 1
    cutout = Cutout(64, p=0.5)  # inside=True is the default
    applied = 0
    for seed in range(60):
        random.seed(seed)
        ours = cutout(img)
        random.seed(seed)
        theirs = reference_cutout(img, 64, 0.5)
        assert torch.equal(ours, theirs), seed
        zeroed = int((ours == 0).all(0).sum())
        assert zeroed in (0, 64 * 64)  # never clipped
        applied += zeroed > 0
    assert 15 < applied < 45  # p = 0.5
    # a square larger than the image is an error, not a silent no-op
    with pytest.raises(ValueError, match='does not fit inside a 128x48'):
        Cutout(64, p=1.0)(torch.rand(3, 128, 48))


@pytest.mark.parametrize('mix', ['cutmix', 'a_cutmix', 'hard_mix', 'cutout',
                                 'batch_drop'])
def test_mixed_stages_take_mixed_targets_and_triplet_the_anchor_label(mix):
    from pmm_torchreid.engine.losses import mixed_cross_entropy
    engine = _engine(mix=mix)
    data = _data()
    pids = data['pid']
    out = engine.model(data['img'], pids, mixer=engine.mixer)
    _, summary = engine.stage_losses(out, pids)
    for s in (2, 3):
        logits, emb = out['logits'][s - 1], out['embeddings'][s - 1]
        partner, weight = (out['partner_labels'][s - 2],
                           out['partner_weights'][s - 2])
        own = smoothed_cross_entropy(logits, pids, 0.1).item()
        if mix in ('cutmix', 'a_cutmix'):
            # 2 blocks of 2 x 1 on the 4 x 2 map: half of the label
            assert torch.allclose(weight, torch.full((8, ), 0.5))
            assert bool((partner != pids).all())
            want = mixed_cross_entropy(logits, pids, partner, weight,
                                       0.1).item()
            assert abs(want - own) > 1e-4  # the mix changes the loss
        else:
            assert torch.equal(weight, torch.zeros(8))
            want = own
        assert summary['loss_x{}'.format(s)] == pytest.approx(want, rel=1e-6)
        assert summary['loss_t{}'.format(s)] == pytest.approx(
            batch_hard_triplet(emb, pids).item(), rel=1e-6)
        assert summary['acc{}'.format(s)] == pytest.approx(
            (logits.argmax(1) == pids).float().mean().item() * 100)


def test_resuming_with_fewer_gpus_restores_those_there_are(monkeypatch):
    """A checkpoint saved on 2 GPUs, resumed with 1 visible: the first GPU's
    state is restored, with a warning that the run is not exact (it used to
    stop with an IndexError)."""
    import warnings

    from pmm_torchreid.utils import checkpoint
    state = checkpoint.capture_rng_state()
    state['cuda'] = [torch.full((16,), 1, dtype=torch.uint8),
                     torch.full((16,), 2, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'set_rng_state',
                        lambda s, device: restored.append((int(s[0]), device)))
    for visible, want in ((1, [(1, 0)]), (2, [(1, 0), (2, 1)]),
                          (3, [(1, 0), (2, 1)])):
        restored.clear()
        monkeypatch.setattr(torch.cuda, 'device_count', lambda v=visible: v)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            checkpoint.restore_rng_state(state)
        assert restored == want
        messages = [str(w.message) for w in caught]
        if visible == 2:
            assert messages == []
        else:
            assert len(messages) == 1 and 'states of 2 GPU(s), {} are visible'.format(
                visible) in messages[0]


@pytest.mark.parametrize('stages', [1, 2, 3])
def test_every_parameter_gets_a_gradient_in_a_step(stages):
    """What DistributedDataParallel needs of a model: no parameter without a
    gradient (with pmm.num_stages 1, the unused part trunk once stopped a
    2-process run with "Expected to have finished reduction")."""
    from pmm_torchreid.models import PMM
    torch.manual_seed(0)
    model = PMM(4, backbone='resnet18', pretrained=False, num_stages=stages)
    assert (model.part_trunk is None) == (stages == 1)
    engine = PMMEngine(types.SimpleNamespace(train_loader=None, test_loader={}),
                       model, torch.optim.SGD(model.parameters(), lr=0.0),
                       use_gpu=False, block_size=(2, 1), top_k=2, seed=1)
    model.train()
    engine.forward_backward(batch())
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    model.eval()
    assert model(batch()['img']).shape == (8, 512 * stages)
