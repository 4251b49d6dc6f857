"""Mixed precision and the GPU settings of the training step, on the CPU
where the logic allows it (bfloat16/float16 autocast exists on the CPU too)."""

import pytest
import torch
from helpers import ROOT, batch, pmm_engine

from pmm_torchreid import config as C
from pmm_torchreid.engine import RecordedPMMEngine, amp_settings
from pmm_torchreid.engine import pmm as engine_pmm
from pmm_torchreid.models import PMM
from pmm_torchreid.models.guidance import HardMix, grad_cam


def test_amp_settings_per_device(monkeypatch):
    assert amp_settings(False, 'cuda') == (None, False)
    assert amp_settings(False, 'cpu') == (None, False)

    def gpu(native, emulated=True):
        """torch.cuda.is_bf16_supported of a GPU, with its real signature."""
        def is_bf16_supported(including_emulation=True):
            return native or (including_emulation and emulated)
        return is_bf16_supported

    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', gpu(native=True))
    assert amp_settings(True, 'cuda') == (torch.bfloat16, False)  # A100, H100
    # V100 / T4: bfloat16 only emulated (slow): float16 with a scaler
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', gpu(native=False))
    assert amp_settings(True, 'cuda') == (torch.float16, True)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported',
                        gpu(native=False, emulated=False))
    assert amp_settings(True, 'cuda') == (torch.float16, True)

    def old_torch(including_emulation=None):  # no such argument: TypeError
        if including_emulation is not None:
            raise TypeError('unexpected keyword argument')
        return True
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', old_torch)
    for capability, dtype in (((7, 0), torch.float16), ((8, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, 'get_device_capability',
                            lambda *a, c=capability: c)
        assert amp_settings(True, 'cuda')[0] is dtype


_engine, _batch = pmm_engine, batch


def cpu(avx512_bf16, amx):
    """torch.cpu's feature checks of a CPU."""
    return {'_is_avx512_bf16_supported': lambda: avx512_bf16,
            '_is_amx_tile_supported': lambda: amx}


@pytest.mark.parametrize('features, dtype', [
    ((False, False), None),  # AVX2 (Zen 3): bfloat16 emulated, float32
    ((True, False), torch.bfloat16),  # AVX512-BF16 (Zen 4, Cooper Lake)
    ((False, True), torch.bfloat16),  # AMX (Sapphire Rapids)
])
def test_amp_on_the_cpu_is_bfloat16_where_native(monkeypatch, features,
                                                  dtype):
    for name, check in cpu(*features).items():
        monkeypatch.setattr(torch.cpu, name, check)
    assert engine_pmm.native_cpu_bf16() is (dtype is not None)
    assert amp_settings(True, 'cpu') == (dtype, False)  # never a scaler


def test_amp_without_native_bfloat16_trains_in_float32(monkeypatch, capsys):
    for name, check in cpu(False, False).items():
        monkeypatch.setattr(torch.cpu, name, check)
    plain = _engine().forward_backward(_batch())
    amp = _engine(amp=True)
    out = capsys.readouterr().out
    assert 'no native bfloat16' in out and 'training in float32' in out
    assert amp.amp_dtype is None and amp.scaler is None
    assert amp.forward_backward(_batch()) == plain


def test_amp_with_native_bfloat16_autocasts_the_step(monkeypatch, capsys):
    """On a CPU with native bfloat16 the step runs under bfloat16 autocast
    (a convolution's output is bfloat16) and says so; stage I's losses (no
    mix before them) stay near float32's (this untrained net's logits are
    large, so bfloat16's rounding moves its cross-entropy by about 10 %)."""
    for name, check in cpu(True, False).items():
        monkeypatch.setattr(torch.cpu, name, check)
    plain = _engine().forward_backward(_batch())
    amp = _engine(amp=True)
    assert 'bfloat16 autocast on the CPU' in capsys.readouterr().out
    assert amp.amp_dtype is torch.bfloat16 and amp.scaler is None
    seen = []
    amp.model.backbone[0].register_forward_hook(
        lambda module, inputs, output: seen.append(output.dtype))
    summary = amp.forward_backward(_batch())
    assert seen == [torch.bfloat16]
    for key in ('loss_x1', 'loss_t1'):
        assert summary[key] == pytest.approx(plain[key], rel=0.2), key
    assert summary['loss'] != plain['loss']


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_the_autocast_step_trains_and_saves_its_scaler(dtype, tmp_path):
    """The mixed-precision branch of the step, run with the CPU's autocast
    (what a GPU runs with CUDA's): finite losses, every weight moves, and
    with float16 the gradient scaler's state goes into the checkpoint."""
    engine = _engine(cls=RecordedPMMEngine)
    engine.amp_dtype = dtype
    if dtype is torch.float16:  # a low start: few overflowing steps
        engine.scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 8)
    before = {n: p.detach().clone()
              for n, p in engine.model.named_parameters()}
    for step in range(20):  # float16: the scaler skips overflowing steps
        summary = engine.forward_backward(_batch())
        assert all(torch.isfinite(torch.tensor(v)) for v in summary.values())
        moved = [n for n, p in engine.model.named_parameters()
                 if not torch.equal(p, before[n])]
        if moved:
            break
    assert len(moved) == len(before)
    if dtype is torch.float16 and step:  # skipped steps lowered the scale
        assert engine.scaler.get_scale() < 2.0 ** 8
    engine.save_model(0, 0.0, str(tmp_path))
    ckpt = torch.load(tmp_path / 'model' / 'model.pth.tar-1',
                      weights_only=True)
    assert ('grad_scaler' in ckpt) == (dtype is torch.float16)
    if dtype is torch.float16:  # the scaler's own state, as it is now
        assert ckpt['grad_scaler'] == engine.scaler.state_dict()


def test_grad_cam_is_float32_under_autocast():
    torch.manual_seed(0)
    fmap = torch.randn(4, 8, 6, 4, requires_grad=True)
    head = torch.nn.Linear(8, 3)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        logits = head(fmap.amax(dim=(2, 3)))
        cam = grad_cam(logits, fmap, torch.tensor([0, 1, 2, 0]))
    assert logits.dtype == torch.bfloat16 and cam.dtype == torch.float32


def test_bfloat16_masks_agree_with_float32_on_a_fixed_batch():
    """The blocks A-Hard-Mix replaces under bfloat16 autocast are the float32
    ones but for near-ties: the measurement the README states."""
    torch.manual_seed(0)
    model = PMM(50, 'resnet18', pretrained=False).eval()
    images = torch.randn(16, 3, 128, 64)
    labels = torch.arange(8).repeat_interleave(2)
    masks = {}
    for dtype in (None, torch.bfloat16):
        rule = HardMix((1, 1), 3, torch.Generator().manual_seed(1))
        with torch.autocast('cpu', dtype=torch.bfloat16,
                            enabled=dtype is not None):
            out = model.forward_train(model.backbone(images), labels, rule)
        masks[dtype] = torch.stack(out['masks'])
    cells = (masks[None] == masks[torch.bfloat16]).float().mean().item()
    assert cells >= 0.99


def test_channels_last_auto_chooses_per_backbone_and_device():
    cfg = C.get_default_config()
    C.merge_file(cfg, ROOT + '/configs/pmm_market1501.yaml')
    assert cfg.train.channels_last == 'auto'
    cfg.use_gpu = True
    assert C.engine_kwargs(cfg)['channels_last'] is True
    cfg.model.name = 'pmm_osnet_x0_25'
    assert C.engine_kwargs(cfg)['channels_last'] is False
    cfg.model.name = 'resnet50'  # a torchreid model: its own name
    assert C.channels_last(cfg) is True
    cfg.model.name, cfg.use_gpu = 'pmm', False
    assert C.engine_kwargs(cfg)['channels_last'] is False


@pytest.mark.parametrize('value, stored', [
    ('True', 'True'), ('true', 'True'), ('False', 'False'), ('auto', 'auto'),
    ('AUTO', 'auto')])
def test_channels_last_from_the_command_line(value, stored):
    cfg = C.get_default_config()
    C.merge_list(cfg, ['train.channels_last', value])
    assert cfg.train.channels_last == stored
    cfg.use_gpu = False
    assert C.channels_last(cfg) is {'True': True, 'False': False,
                                    'auto': False}[stored]
    # a bool set in a file can be set back to 'auto' (one type per key)
    C.merge_list(cfg, ['train.channels_last', 'auto'])
    assert cfg.train.channels_last == 'auto'


def test_channels_last_from_a_file_and_bad_values(tmp_path):
    path = tmp_path / 'cl.yaml'
    path.write_text('train:\n  channels_last: True\n  max_epoch: 3\n')
    cfg = C.get_default_config()
    C.merge_file(cfg, str(path))
    assert cfg.train.channels_last == 'True' and cfg.train.max_epoch == 3
    cfg.use_gpu = False
    assert C.engine_kwargs(cfg)['channels_last'] is True
    path.write_text('train:\n  channels_last: 1\n')
    with pytest.raises(ValueError, match=r'cl.yaml.*train.channels_last = 1: '
                       r"expected 'auto', True or False"):
        C.merge_file(C.get_default_config(), str(path))
    with pytest.raises(ValueError, match=r"command line: config "
                       r"train.channels_last = 'maybe': expected"):
        C.merge_list(C.get_default_config(), ['train.channels_last', 'maybe'])
    # the dump of a config reads back the same
    cfg = C.get_default_config()
    C.merge_list(cfg, ['train.channels_last', 'False'])
    (tmp_path / 'dump.yaml').write_text(cfg.dump())
    again = C.get_default_config()
    C.merge_file(again, str(tmp_path / 'dump.yaml'))
    assert again.train.channels_last == 'False'


def test_channels_last_step_matches_the_contiguous_step():
    """The model and its input are channels-last, and the step is the
    contiguous one to float tolerance (same weights, batch and partner
    draws)."""
    engines = {fmt: _engine(channels_last=fmt) for fmt in (False, True)}
    conv = engines[True].model.backbone[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert not engines[False].model.backbone[0].weight.is_contiguous(
        memory_format=torch.channels_last)
    fed = {}

    def keep_input(fmt):
        def hook(module, inputs):
            fed.setdefault(fmt, inputs[0])  # returns None: inputs unchanged
        return hook
    for fmt, engine in engines.items():
        engine.model.register_forward_pre_hook(keep_input(fmt))
    summaries = {fmt: e.forward_backward(_batch()) for fmt, e in engines.items()}
    assert fed[True].is_contiguous(memory_format=torch.channels_last)
    assert not fed[True].is_contiguous() and fed[False].is_contiguous()
    torch.testing.assert_close(fed[True], fed[False], rtol=0, atol=0)
    assert summaries[True].keys() == summaries[False].keys()
    for key, value in summaries[False].items():
        assert summaries[True][key] == pytest.approx(value, rel=1e-4,
                                                     abs=1e-5), key
    params = {fmt: dict(e.model.named_parameters()) for fmt, e in engines.items()}
    assert params[True].keys() == params[False].keys()
    for name, p in params[False].items():
        other = params[True][name]
        assert p.grad is not None and other.grad is not None, name
        # to float tolerance of the tensor's own scale (a bias before a
        # batch norm has a gradient of rounding noise only)
        scale = float(p.grad.abs().max())
        assert float((other.grad - p.grad).abs().max()) <= \
            1e-3 * scale + 1e-5, (name, scale)
        # the same SGD step (lr 0.01) from the same weights
        assert float((other - p).abs().max()) <= 0.01 * (1e-3 * scale + 1e-5) \
            + 1e-6, name


def test_the_mixed_target_stays_float32_under_autocast():
    """Under bfloat16 autocast the logits are bfloat16; the soft target of a
    mixed stage is not rounded with them (a bfloat16 row of 0.875 / 0.125
    shares plus smoothing would not sum to 1)."""
    from pmm_torchreid.engine.losses import mixed_cross_entropy, mixed_targets
    torch.manual_seed(0)
    logits = torch.randn(6, 751).bfloat16()
    labels, partners = torch.arange(6), torch.arange(6).flip(0)
    weight = torch.full((6,), 0.125)
    target = mixed_targets(labels, partners, weight, 751, 0.1)
    assert target.dtype == torch.float32
    torch.testing.assert_close(target.sum(1), torch.ones(6), rtol=0, atol=1e-6)
    want = -(target * torch.log_softmax(logits.float(), 1)).sum(1).mean()
    got = mixed_cross_entropy(logits, labels, partners, weight, 0.1)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    rounded = -(target.bfloat16() * torch.log_softmax(logits, 1)).sum(1).mean()
    assert not torch.equal(got, rounded.float())  # what bfloat16 would give


def test_amp_on_several_gpus_in_one_process_is_refused():
    from pmm_torchreid.launch import check_data_parallel_amp
    cfg = C.get_default_config()
    C.merge_file(cfg, ROOT + '/configs/pmm_market1501.yaml')
    cfg.train.amp = True
    check_data_parallel_amp(cfg, 1)  # one GPU: autocast in the engine
    with pytest.raises(ValueError, match=r'train.amp = True with 2 visible GPUs '
                       r'in one process.*torchrun --nproc_per_node 2'):
        check_data_parallel_amp(cfg, 2)
    cfg.train.amp = False
    check_data_parallel_amp(cfg, 4)  # float32 replicas are fine
    cfg.train.amp, cfg.loss.name = True, 'softmax'
    check_data_parallel_amp(cfg, 4)  # torchreid's engines: no autocast at all


def test_amp_with_torchreids_engines_says_it_does_nothing(capsys):
    import types

    from pmm_torchreid.launch import build_engine
    cfg = C.get_default_config()
    C.merge_file(cfg, ROOT + '/configs/pmm_demo.yaml')
    cfg.use_gpu, cfg.train.amp, cfg.loss.name = False, True, 'softmax'
    model = torch.nn.Linear(2, 2)
    fake = types.SimpleNamespace(train_loader=None, test_loader={},
                                 num_train_pids=2)
    build_engine(cfg, fake, model, torch.optim.SGD(model.parameters(), lr=0.1),
                 None)
    assert "train.amp has no effect with loss.name = 'softmax'" in \
        capsys.readouterr().out
    cfg.train.amp = False
    build_engine(cfg, fake, model, torch.optim.SGD(model.parameters(), lr=0.1),
                 None)
    assert 'train.amp' not in capsys.readouterr().out
