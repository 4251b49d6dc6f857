"""Every ``configs/*.yaml`` parses, builds, and the paper configs hold the paper's recipe.

Each config goes through ``scripts/main.py``'s own ``setup_config`` (so an
unknown or mistyped key fails here, as it would for a user), then its data
settings build a data manager (on the embedded ``pmm_synthetic`` dataset, so no
download is needed), its model, optimizer, scheduler and engine are built as
``main()`` builds them, and one training batch is drawn.  The paper configs
(and the MSMT17 one, which applies the same recipe) are then checked against
the values of Zhang et al., ICASSP 2021 (see ``shared/docs/PMM_SPEC.md``).
"""
import glob
import os.path as osp

import pytest
import torch
import torch.nn as nn
import torchreid
import yaml

import pmm_torchreid  # noqa: F401  (registers the models and pmm_synthetic)
from pmm_torchreid import config as C
from pmm_torchreid import launch
from pmm_torchreid.data import Cutout, build_datamanager
from pmm_torchreid.engine import PMMEngine
from pmm_torchreid.engine.optim import build_lr_scheduler
from pmm_torchreid.models import BDB
from pmm_torchreid.models.guidance import check_block_grid

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = sorted(glob.glob(osp.join(REPO, 'configs', '*.yaml')))

# config file -> (dataset, top-K blocks replaced per sample in the paper)
PAPER = {
    # K: the released code's 3 on every dataset (README, "How much to mix")
    'pmm_market1501.yaml': ('market1501', 3),
    'pmm_dukemtmcreid.yaml': ('dukemtmcreid', 3),
    'pmm_cuhk03.yaml': ('cuhk03', 3),
    # the paper reports no MSMT17 numbers: its recipe, unchanged
    'pmm_msmt17.yaml': ('msmt17', 3),
}


main_script = launch


def setup_config(*argv):
    """``scripts/main.py``'s parser and ``setup_config`` on ``argv``."""
    return main_script.setup_config(main_script.build_parser().parse_args(list(argv)))


def _leaves(tree, prefix=''):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, prefix + key + '.')
        else:
            yield prefix + key, value


def _get(cfg, dotted):
    for key in dotted.split('.'):
        cfg = cfg[key]
    return cfg


def reference_lr(e):
    """The reference code's rate (main_reid.py, ``adjust_lr``) for the 1-based
    epoch ``e``: it is called as ``adjust_lr(optimizer, epoch + 1)``."""
    if e < 50:
        return 1e-4 * (e // 5 + 1)
    if e < 200:
        return 1e-3
    if e < 300:
        return 1e-4
    return 1e-5


def paper_lr(epoch):
    """The paper's rate at torchreid's 0-based ``epoch``."""
    return reference_lr(epoch + 1)


@pytest.fixture(scope='module')
def synthetic_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp('reid-data'))


def test_configs_folder_holds_the_paper_configs():
    names = {osp.basename(path) for path in CONFIGS}
    assert set(PAPER) <= names, 'missing paper configs: {}'.format(
        sorted(set(PAPER) - names))


@pytest.mark.parametrize('path', CONFIGS, ids=osp.basename)
def test_config_parses_and_every_yaml_value_arrives(path):
    cfg = setup_config('--config-file', path)
    assert cfg.is_frozen()
    with open(path) as f:
        tree = yaml.safe_load(f)
    for key, value in _leaves(tree):
        got = _get(cfg, key)
        if isinstance(got, tuple):
            got = list(got)
        assert got == value, '{}: yaml says {!r}, config holds {!r}'.format(
            key, value, got)


def test_unknown_or_mistyped_keys_are_refused(tmp_path):
    base = osp.join(REPO, 'configs', 'pmm_market1501.yaml')
    with open(base) as f:
        tree = yaml.safe_load(f)
    tree['pmm']['top_kk'] = 3  # a typo must not be silently ignored
    bad = tmp_path / 'typo.yaml'
    bad.write_text(yaml.safe_dump(tree))
    with pytest.raises(KeyError, match='top_kk'):
        setup_config('--config-file', str(bad))
    # yacs's merge_from_list refuses with an AssertionError, not a KeyError
    with pytest.raises((KeyError, AssertionError), match='no_such_key'):
        setup_config('--config-file', base, 'pmm.no_such_key', '1')


@pytest.mark.parametrize('path', CONFIGS, ids=osp.basename)
def test_config_builds_data_model_optimizer_scheduler_engine(
    path, synthetic_root, tmp_path
):
    # the config's own data, model and training settings; only the dataset
    # (no download here), the ImageNet weights (none offline), the workers and
    # the device are replaced
    cfg = setup_config(
        '--config-file', path, '-s', 'pmm_synthetic', '-t', 'pmm_synthetic',
        '--root', synthetic_root,  # not last of the flags: -t takes nargs='+'
        'model.pretrained', 'False', 'data.workers', '0', 'use_gpu', 'False',
        'data.save_dir', str(tmp_path / 'log')
    )
    datamanager = build_datamanager(**C.imagedata_kwargs(cfg))
    assert datamanager.num_train_pids == 100  # pmm_synthetic's training ids
    assert (datamanager.height, datamanager.width) == (cfg.data.height,
                                                       cfg.data.width)

    cutouts = [t for t in datamanager.transform_tr.transforms
               if isinstance(t, Cutout)]
    if 'cutout' in [t.lower() for t in cfg.data.transforms]:
        assert len(cutouts) == 1
        assert (cutouts[0].size, cutouts[0].p) == (cfg.data.cutout_size,
                                                   cfg.data.cutout_prob)
        # after normalisation, as in the recipe
        assert isinstance(datamanager.transform_tr.transforms[-2],
                          torchreid.data.transforms.Normalize)
        assert datamanager.transform_tr.transforms[-1] is cutouts[0]
    else:
        assert not cutouts

    # one training batch: P identities x K instances at the configured size
    batch = next(iter(datamanager.train_loader))
    imgs, pids = batch['img'], batch['pid']
    n, k = cfg.train.batch_size, cfg.sampler.num_instances
    assert imgs.shape == (n, 3, cfg.data.height, cfg.data.width)
    if cfg.sampler.train_sampler == 'RandomIdentitySampler':
        counts = torch.bincount(pids)
        counts = counts[counts > 0]
        assert len(counts) == n // k and bool((counts == k).all())

    model = main_script.build_model(cfg, datamanager.num_train_pids)
    optimizer = torchreid.optim.build_optimizer(model,
                                                **C.optimizer_kwargs(cfg))
    scheduler = build_lr_scheduler(optimizer, **C.lr_scheduler_kwargs(cfg))
    engine = main_script.build_engine(cfg, datamanager, model, optimizer,
                                      scheduler)
    assert engine.model is model and engine.optimizer is optimizer
    assert engine.scheduler is scheduler
    # the scheduler owns the rate from epoch 0 on (warm-up included)
    assert optimizer.param_groups[0]['initial_lr'] == pytest.approx(
        cfg.train.lr)
    assert optimizer.param_groups[0]['lr'] == pytest.approx(
        scheduler.get_last_lr()[0])

    if C.is_bdb_model(cfg.model.name):
        assert isinstance(engine, PMMEngine) and engine.mixer is None
        assert isinstance(model, BDB)
        model.eval()
        with torch.no_grad():
            feats = model(torch.randn(1, 3, cfg.data.height, cfg.data.width))
        assert feats.shape == (1, 1536)
        return
    if not C.is_pmm_model(cfg.model.name):
        return
    assert isinstance(engine, PMMEngine)
    if cfg.pmm.mix == 'none':
        assert engine.mixer is None
    else:
        assert engine.mixer.name == cfg.pmm.mix
        assert engine.mixer.block == tuple(cfg.pmm.block_size)
        assert engine.mixer.k == cfg.pmm.top_k
    assert len(model.part_heads) == cfg.pmm.num_stages - 1
    assert model.global_head.classifier.out_features == 100

    # the configured input gives a feature map the block grid tiles, and the
    # eval descriptor is the concatenation of the stage embeddings
    maps = []
    model.backbone.register_forward_hook(lambda m, i, out: maps.append(out))
    model.eval()
    with torch.no_grad():  # one image: a resnet50 forward costs seconds here
        feats = model(torch.randn(1, 3, cfg.data.height, cfg.data.width))
    assert maps[0].shape[-2:] == (cfg.data.height // 16, cfg.data.width // 16)
    check_block_grid(maps[0].shape[-2], maps[0].shape[-1],
                     cfg.pmm.block_size, cfg.pmm.top_k)
    assert feats.shape == (1, cfg.pmm.embedding_dim * cfg.pmm.num_stages)


@pytest.mark.parametrize('name', sorted(PAPER))
def test_paper_config_holds_the_paper_recipe(name):
    dataset, top_k = PAPER[name]
    cfg = setup_config('--config-file', osp.join(REPO, 'configs', name))

    assert list(cfg.data.sources) == [dataset]
    assert list(cfg.data.targets) == [dataset]

    # network: ResNet-50 PMM, ImageNet-initialised, 3 stages of 512-d
    assert cfg.model.name in ('pmm', 'pmm_resnet50')
    assert main_script.MODEL_FACTORY[cfg.model.name] \
        is pmm_torchreid.models.MODEL_FACTORY['pmm_resnet50']
    assert cfg.model.pretrained is True
    assert (cfg.pmm.num_stages, cfg.pmm.embedding_dim) == (3, 512)
    assert cfg.loss.name == 'pmm'

    # A-Hard-Mix of the top-K 3x2 blocks on the 24x8 map
    assert cfg.pmm.mix == 'hard_mix'
    assert list(cfg.pmm.block_size) == [3, 2]
    assert cfg.pmm.top_k == top_k
    assert C.engine_kwargs(cfg)['top_k'] == top_k
    assert check_block_grid(cfg.data.height // 16, cfg.data.width // 16,
                            cfg.pmm.block_size, cfg.pmm.top_k) == (8, 4)

    # losses: soft-margin triplet + label-smoothed CE per stage, equal weights
    assert cfg.pmm.soft_margin is True
    assert cfg.pmm.weight_triplet == cfg.pmm.weight_ce == 1.0
    assert cfg.pmm.label_smooth > 0

    # data: 384x128, flip + Cutout 64x64 (p 0.5), batch 64 = 16 ids x 4
    assert (cfg.data.height, cfg.data.width) == (384, 128)
    transforms = [t.lower() for t in cfg.data.transforms]
    assert 'random_flip' in transforms and 'cutout' in transforms
    assert (cfg.data.cutout_size, cfg.data.cutout_prob) == (64, 0.5)
    assert cfg.train.batch_size == 64
    assert cfg.sampler.train_sampler == 'RandomIdentitySampler'
    assert cfg.sampler.num_instances == 4
    assert not cfg.data.combineall

    # evaluation: Euclidean on the raw descriptor, no re-ranking
    assert cfg.test.dist_metric == 'euclidean'
    assert cfg.test.normalize_feature is False
    assert cfg.test.rerank is False
    if dataset == 'cuhk03':  # detected images, new 767/700 protocol
        assert cfg.cuhk03.labeled_images is False
        assert cfg.cuhk03.classic_split is False
        assert cfg.cuhk03.use_metric_cuhk03 is False
        kwargs = C.imagedata_kwargs(cfg)
        assert kwargs['cuhk03_labeled'] is False
        assert kwargs['cuhk03_classic_split'] is False

    # optimiser: Adam, weight decay 5e-4, 400 epochs
    assert cfg.train.max_epoch == 400
    optimizer = torchreid.optim.build_optimizer(nn.Linear(4, 2),
                                                **C.optimizer_kwargs(cfg))
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.param_groups[0]['weight_decay'] == pytest.approx(5e-4)
    assert len(optimizer.param_groups) == 1  # no staged lr

    # schedule, stepped once per epoch as torchreid's engine does
    scheduler = build_lr_scheduler(optimizer, **C.lr_scheduler_kwargs(cfg))
    rates = []
    for _ in range(cfg.train.max_epoch):
        rates.append(optimizer.param_groups[0]['lr'])
        optimizer.step()  # no gradients: a no-op that keeps torch quiet
        scheduler.step()
    assert rates == pytest.approx([paper_lr(e) for e in range(400)],
                                  rel=1e-9)
    # the reference's 1-based count: the first step lasts 4 epochs, the
    # drops come at the 200th and 300th epoch (0-based 199 and 299)
    assert rates[0] == rates[3] == pytest.approx(1e-4)
    assert rates[4] == rates[8] == pytest.approx(2e-4)
    assert rates[48] == rates[198] == pytest.approx(1e-3)
    assert rates[43] == pytest.approx(9e-4) and rates[44] == pytest.approx(1e-3)
    assert rates[199] == rates[298] == pytest.approx(1e-4)
    assert rates[299] == rates[399] == pytest.approx(1e-5)


@pytest.mark.parametrize('dataset', ['market1501', 'dukemtmcreid', 'cuhk03'])
def test_bdb_config_is_the_pmm_recipe_with_bdbs_batch(dataset):
    bdb = setup_config('--config-file', osp.join(
        REPO, 'configs', 'bdb_{}.yaml'.format(dataset)))
    pmm = setup_config('--config-file', osp.join(
        REPO, 'configs', 'pmm_{}.yaml'.format(dataset)))
    assert bdb.model.name == 'bdb' and bdb.loss.name == 'pmm'
    assert bdb.pmm.mix == 'none'
    assert bdb.train.batch_size == 128  # BDB's own paper
    for key in ('data.height', 'data.width', 'data.transforms', 'train.lr',
                'train.max_epoch', 'train.stepsize', 'train.warmup_epochs',
                'train.warmup_interval', 'train.warmup_offset', 'train.optim',
                'data.sources', 'data.targets'):
        assert _get(bdb, key) == _get(pmm, key), key
    if dataset == 'cuhk03':
        assert not bdb.cuhk03.labeled_images


def test_bdb_refuses_a_mixing_rule_and_a_wrong_loss():
    base = osp.join(REPO, 'configs', 'bdb_market1501.yaml')
    with pytest.raises(ValueError, match="pmm.mix = 'cutmix'.*'none' for a "
                       "BDB model"):
        setup_config('--config-file', base, 'pmm.mix', 'cutmix')
    with pytest.raises(ValueError, match="loss.name = 'triplet'.*PMM or BDB"):
        setup_config('--config-file', base, 'loss.name', 'triplet')
    with pytest.raises(ValueError, match='pmm.vis_freq = 2.*BDB'):
        setup_config('--config-file', base, 'pmm.vis_freq', '2')


@pytest.mark.parametrize('mix', ['cutout', 'cutmix', 'a_cutmix',
                                 'batch_drop'])
def test_ablation_mixes_are_accepted_and_checked_like_hard_mix(mix):
    base = osp.join(REPO, 'configs', 'pmm_market1501.yaml')
    assert setup_config('--config-file', base, 'pmm.mix', mix).pmm.mix == mix
    with pytest.raises(ValueError, match='pmm.block_size'):
        setup_config('--config-file', base, 'pmm.mix', mix,
                     'pmm.block_size', '[5, 2]')
    # every rule's training chain can be pictured
    assert setup_config('--config-file', base, 'pmm.mix', mix,
                        'pmm.vis_freq', '5').pmm.vis_freq == 5


def test_cutout_inside_must_fit_the_input():
    base = osp.join(REPO, 'configs', 'pmm_demo.yaml')  # 128x64
    cfg = setup_config('--config-file', base, 'data.transforms',
                       "['random_flip', 'cutout']", 'data.cutout_size', '64')
    assert cfg.data.cutout_inside is True
    with pytest.raises(ValueError, match='data.cutout_size = 65: expected a '
                       'square that fits inside the 128x64 input'):
        setup_config('--config-file', base, 'data.transforms',
                     "['random_flip', 'cutout']", 'data.cutout_size', '65')
    setup_config('--config-file', base, 'data.transforms',
                 "['random_flip', 'cutout']", 'data.cutout_size', '65',
                 'data.cutout_inside', 'False')


def test_recipe_differences_ignore_keys_added_since_at_their_defaults():
    cfg = C.get_default_config()
    now = cfg.dump()
    # an older dump without a key that the plugin added since
    older = now.replace("  regions: auto\n", '')
    assert older != now and C.dump_differences(older, now) == []
    cfg.magnifiernet.regions = 'bands'  # the added key, not at its default
    assert C.dump_differences(older, cfg.dump()) == ['magnifiernet.regions']
    cfg.magnifiernet.regions = 'auto'
    cfg.train.lr = 0.01  # a changed value
    assert C.dump_differences(now, cfg.dump()) == ['train.lr']
    # a key the plugin no longer has always differs
    assert C.dump_differences(now, older) == ['magnifiernet.regions']


@pytest.mark.parametrize('model', ['bdb_resnet18', 'fmn_resnet18',
                                   'magnifiernet_resnet18'])
@pytest.mark.parametrize('how', ['-m', 'model.name'])
def test_a_model_chosen_on_the_command_line_gets_the_mix_it_needs(
        model, how, capsys):
    """The demo config's ``hard_mix`` is PMM's: another family chosen on the
    command line trains with 'none' and says so in one line; a mix the user
    typed is theirs, so a contradiction is still refused."""
    demo = osp.join(REPO, 'configs', 'pmm_demo.yaml')
    chosen = ['-m', model] if how == '-m' else ['model.name', model]
    cfg = setup_config('--config-file', demo, *chosen)
    assert cfg.model.name == model and cfg.pmm.mix == 'none'
    out = capsys.readouterr().out
    assert "{} trains without a mixing rule: pmm.mix 'hard_mix' (the config " \
        "file's, for PMM) becomes 'none'".format(model) in out
    with pytest.raises(ValueError, match=r"config pmm.mix = 'hard_mix': "
                       r"expected 'none' for"):
        setup_config('--config-file', demo, *chosen, 'pmm.mix', 'hard_mix')
    # PMM models keep the file's rule, and nothing is said
    capsys.readouterr()
    assert setup_config('--config-file', demo, '-m',
                        'pmm_osnet_x0_25').pmm.mix == 'hard_mix'
    assert 'trains without a mixing rule' not in capsys.readouterr().out
