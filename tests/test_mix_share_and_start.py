"""How much of the map is mixed (``pmm.mix_ratio``) and from which epoch on
(``pmm.mix_start_epoch``)."""
import os.path as osp
import warnings

import pytest
import torch
from helpers import ROOT, assert_same_checkpoints, batch, in_process, main_args, pmm_engine

from pmm_torchreid import config as C
from pmm_torchreid.config import checks
from pmm_torchreid.models.guidance import HardMix, blocks_for_ratio, build_mixer, check_block_grid
from pmm_torchreid.utils.checkpoint import load_checkpoint


# --------------------------------------------------------------------------
# the share -> whole blocks
# --------------------------------------------------------------------------
@pytest.mark.parametrize('blocks, ratio, k', [
    (32, 0.094, 3),      # the released code: 3 of 32
    (32, 3 / 32, 3),
    (32, 0.0625, 2),
    (16, 0.0625, 1),
    (16, 0.094, 2),      # 1.504 blocks round up
    (16, 0.09, 1),       # 1.44 round down
    (16, 1.5 / 16, 2),   # exactly half a block: up
    (32, 0.25, 8),       # the paper text's K = 8 on CUHK03
    (4, 0.7, 3),
])
def test_blocks_for_ratio_rounds_to_the_nearest_block(blocks, ratio, k):
    assert blocks_for_ratio(blocks, ratio) == k


def test_blocks_for_ratio_refuses_no_block_and_every_block():
    with pytest.raises(ValueError, match='rounds to 0 blocks.*at least '
                       '0.0156'):
        blocks_for_ratio(32, 0.01)
    with pytest.raises(ValueError, match='rounds to all 4 blocks'):
        blocks_for_ratio(4, 0.9)


def test_a_ratio_gives_the_same_share_on_every_map_size():
    torch.manual_seed(0)
    rule = HardMix(block=(1, 1), ratio=0.125,
                   generator=torch.Generator().manual_seed(0))
    for height, width in ((8, 4), (16, 8), (24, 8)):
        assert rule.blocks(height, width) == height * width // 8
        part = torch.randn(4, 3, height, width, requires_grad=True)
        logits = part.mean(dim=(2, 3)) @ torch.randn(3, 5)
        mixed = rule(part, part, logits, torch.tensor([0, 0, 1, 1]))
        replaced = (mixed.mask == 0).flatten(1).sum(1)
        assert replaced.tolist() == [height * width // 8] * 4


def test_a_ratio_overrides_top_k_and_is_checked_in_the_config():
    cfg = C.get_default_config()
    C.merge_file(cfg, osp.join(ROOT, 'configs', 'pmm_demo.yaml'))
    C.merge_list(cfg, ['pmm.block_size', '[1, 1]', 'pmm.top_k', '4',
                       'pmm.mix_ratio', '0.094'])
    checks.check_config(cfg)
    assert C.resolved_top_k(cfg) == 3  # 0.094 of the 8x4 = 32 blocks
    assert C.engine_kwargs(cfg)['mix_ratio'] == pytest.approx(0.094)
    cfg.pmm.mix_ratio = 0.0
    assert C.resolved_top_k(cfg) == 4
    assert C.engine_kwargs(cfg)['mix_ratio'] is None
    for ratio, message in (('0.01', 'rounds to 0 blocks'),
                           ('0.99', 'rounds to all 32 blocks'),
                           ('1.5', r'pmm.mix_ratio = 1.5: expected a share')):
        bad = C.get_default_config()
        C.merge_file(bad, osp.join(ROOT, 'configs', 'pmm_demo.yaml'))
        C.merge_list(bad, ['pmm.block_size', '[1, 1]', 'pmm.mix_ratio', ratio])
        with pytest.raises(ValueError, match=message):
            checks.check_config(bad)


def _share_warnings(cfg):
    """The share warnings that ``check_config`` gives for ``cfg``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        checks.check_config(cfg)
    return [str(w.message) for w in caught
            if 'of the part map in every sample' in str(w.message)]


def _demo_cfg(*opts):
    cfg = C.get_default_config()
    C.merge_file(cfg, osp.join(ROOT, 'configs', 'pmm_demo.yaml'))
    C.merge_list(cfg, list(opts))
    return cfg


@pytest.mark.parametrize('opts, k', [
    (('pmm.mix_ratio', '0.375'), 12),   # collapsed on CUHK01 validation
    (('pmm.mix_ratio', '0.28'), 9),
    (('pmm.top_k', '9'), 9),            # the same share given as blocks
    (('pmm.mix_ratio', '0.25'), None),  # the limit itself is quiet
    (('pmm.top_k', '8'), None),
    (('pmm.mix_ratio', '0.125'), None),  # the CUHK01 recipe's share
])
def test_a_share_above_a_quarter_of_the_map_draws_a_warning(opts, k):
    cfg = _demo_cfg('pmm.block_size', '[1, 1]', *opts)
    assert C.mixed_blocks(cfg)[1] == 32  # the 8x4 map of a 128x64 input
    found = _share_warnings(cfg)
    if k is None:
        assert found == []
    else:
        assert C.mixed_blocks(cfg)[0] == k
        assert len(found) == 1
        assert 'replaces {} of 32 blocks ({:.1f} %)'.format(
            k, 100.0 * k / 32) in found[0]


@pytest.mark.parametrize('opts', [
    ('pmm.mix', 'none'),              # nothing is mixed
    ('pmm.num_stages', '1'),          # no later stage to feed
    ('test.evaluate', 'True'),        # no training
])
def test_no_share_warning_where_nothing_is_mixed(opts):
    cfg = _demo_cfg('pmm.block_size', '[1, 1]', 'pmm.mix_ratio', '0.5', *opts)
    assert _share_warnings(cfg) == []


@pytest.mark.parametrize('name', ['pmm_demo.yaml', 'pmm_cuhk01.yaml',
                                  'pmm_cuhk03.yaml', 'pmm_market1501.yaml',
                                  'pmm_dukemtmcreid.yaml',
                                  'ablation_cuhk01.yaml'])
def test_the_shipped_pmm_configs_draw_no_share_warning(name):
    cfg = C.get_default_config()
    C.merge_file(cfg, osp.join(ROOT, 'configs', name))
    k, blocks = C.mixed_blocks(cfg)
    assert 0 < k <= 0.25 * blocks
    assert _share_warnings(cfg) == []


def test_build_mixer_passes_the_ratio_on():
    rule = build_mixer('cutmix', block=(2, 1), k=5, ratio=0.25)
    assert rule.blocks(8, 4) == 4 and 'ratio=0.25' in repr(rule)
    assert build_mixer('cutmix', block=(2, 1), k=5).blocks(8, 4) == 5
    assert check_block_grid(8, 4, (2, 1)) == (4, 4)


# --------------------------------------------------------------------------
# the start epoch
# --------------------------------------------------------------------------
def _engine(mix, start):
    return pmm_engine(optimizer=lambda p: torch.optim.SGD(p, lr=0.0),
                      mix=mix, seed=3, mix_start_epoch=start)  # weights stay


def _step(engine, epoch):
    engine.epoch = epoch
    state = engine.generator.get_state()
    summary = engine.forward_backward(batch())
    return summary, not torch.equal(state, engine.generator.get_state())


def test_no_mixing_before_the_start_epoch_and_mixing_from_it():
    late = _engine('hard_mix', start=2)
    plain = _engine('none', start=0)
    mixing = _engine('hard_mix', start=0)
    for epoch in (0, 1):
        assert not late.mixing()
        ours, drew = _step(late, epoch)
        assert not drew  # no partner drawn, no generator state used
        assert ours == pytest.approx(_step(plain, epoch)[0], rel=1e-6)
    late.epoch = 2
    assert late.mixing()
    ours, drew = _step(late, 2)
    assert drew
    assert ours == pytest.approx(_step(mixing, 2)[0], rel=1e-6)
    assert ours['loss_x2'] != pytest.approx(_step(plain, 2)[0]['loss_x2'],
                                            rel=1e-3)


def test_start_epoch_is_checked():
    cfg = C.get_default_config()
    C.merge_file(cfg, osp.join(ROOT, 'configs', 'pmm_demo.yaml'))
    C.merge_list(cfg, ['pmm.mix_start_epoch', '-1'])
    with pytest.raises(ValueError, match='pmm.mix_start_epoch = -1'):
        checks.check_config(cfg)


@pytest.mark.slow
def test_resume_across_the_start_epoch_equals_the_straight_run(
        synthetic_root, tmp_path):
    """Epoch 1 unmixed, epoch 2 mixed: resuming at the switch from the
    epoch-1 checkpoint gives the straight run's epoch-2 checkpoint exactly."""
    straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
    extra = ['train.max_epoch', '2', 'pmm.mix_start_epoch', '1']

    def run(save_dir, *more):  # scripts/main.py's main, in this process
        from pmm_torchreid.cli.train import main
        proc = in_process(main, main_args(synthetic_root, save_dir, *extra) +
                          list(more))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc.stdout

    out = run(straight)
    assert 'Mixing (HardMix(block=(1, 1), k=1)) starts with this epoch (2)' \
        in out
    first = load_checkpoint(osp.join(straight, 'model', 'model.pth.tar-1'))
    # epoch 1 drew no partner: the generator is where the seed put it
    assert torch.equal(first['pmm_generator'],
                       torch.Generator().manual_seed(1).get_state())
    out = run(resumed, 'model.resume',
              osp.join(straight, 'model', 'model.pth.tar-1'))
    assert 'Restored the random-number states' in out
    assert_same_checkpoints(
        load_checkpoint(osp.join(resumed, 'model', 'model.pth.tar-2')),
        load_checkpoint(osp.join(straight, 'model', 'model.pth.tar-2')))
