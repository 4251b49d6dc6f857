"""Checks of a merged config, before any heavy work: every value the run
depends on (:func:`check_config`) and every file it will read
(:func:`check_paths`).  Errors name the key, the value and what was expected.

The requirements that are PMM's own (the identity sampler, the batch layout,
the block grid) are :meth:`pmm_torchreid.engine.PMMEngine.check_cfg`, which
:func:`check_config` calls for the plugin's models.
"""
from __future__ import annotations

import difflib
import os.path as osp

from yacs.config import CfgNode as CN

from .config import uses_pmm_engine

__all__ = ['check_config', 'check_paths', 'DATASET_LAYOUTS', 'fail']


#: What torchreid reads under ``data.root`` for the common datasets: a list
#: of alternative layouts, each a list of paths relative to the root.
DATASET_LAYOUTS = {
    'market1501': [
        ['market1501/Market-1501-v15.09.15/' + d
         for d in ('bounding_box_train', 'query', 'bounding_box_test')],
        ['market1501/' + d
         for d in ('bounding_box_train', 'query', 'bounding_box_test')],
    ],
    'dukemtmcreid': [
        ['dukemtmc-reid/DukeMTMC-reID/' + d
         for d in ('bounding_box_train', 'query', 'bounding_box_test')],
    ],
    'cuhk03': [[
        'cuhk03/cuhk03_release/cuhk-03.mat',
        'cuhk03/cuhk03_new_protocol_config_detected.mat',
        'cuhk03/cuhk03_new_protocol_config_labeled.mat',
    ]],
    'cuhk01': [['cuhk01/campus'], ['cuhk01/CUHK01.zip']],
    'msmt17': [
        ['msmt17/MSMT17_V1/train', 'msmt17/MSMT17_V1/test'],
        ['msmt17/MSMT17_V2/mask_train_v2', 'msmt17/MSMT17_V2/mask_test_v2'],
    ],
}

#: Datasets that the plugin generates itself under ``data.root``.
GENERATED_DATASETS = ('pmm_synthetic', )

TRANSFORMS = ('random_flip', 'random_crop', 'random_patch', 'color_jitter',
              'random_erase', 'cutout')
OPTIMIZERS = ('adam', 'amsgrad', 'sgd', 'rmsprop', 'radam')
LR_SCHEDULERS = ('single_step', 'multi_step', 'cosine', 'warmup_multi_step')


def fail(key: str, value, expected: str):
    """Raises the error of a bad config value: ``config KEY = VALUE: expected
    WHAT``."""
    raise ValueError('config {} = {!r}: expected {}'.format(key, value, expected))


def _registered(kind: str) -> dict:
    import torchreid
    from .registry import _table
    if kind == 'model':
        return _table(torchreid.models, '__model_factory')
    return _table(torchreid.data.datasets, '__image_datasets')


def check_config(cfg: CN) -> None:
    """Checks every value the run depends on, before any data is read.

    Raises:
        ValueError: naming the key, the value and what was expected.
    """
    if cfg.data.type != 'image':
        fail('data.type', cfg.data.type, "'image' (video reID is not supported)")
    models = _registered('model')
    if cfg.model.name not in models:
        close = difflib.get_close_matches(cfg.model.name, list(models), n=3)
        from .models import MODEL_FACTORY
        fail('model.name', cfg.model.name, 'a registered model{}: the PMM '
             'models {} or one of torchreid\'s (see torchreid.models.'
             'show_avai_models())'.format(
                 ' (closest: {})'.format(close) if close else '',
                 sorted(MODEL_FACTORY)))
    datasets = _registered('dataset')
    for key in ('sources', 'targets'):
        names = list(cfg.data[key])
        if not names:
            fail('data.' + key, names, 'at least one dataset')
        for name in names:
            if name not in datasets:
                fail('data.' + key, names, 'image datasets registered with '
                     'torchreid; {!r} is not one of {}'.format(
                         name, sorted(datasets)))
    for key in ('height', 'width'):
        if cfg.data[key] < 16:
            fail('data.' + key, cfg.data[key], 'at least 16 pixels')
    unknown = [t for t in cfg.data.transforms if t.lower() not in TRANSFORMS]
    if unknown:
        fail('data.transforms', list(cfg.data.transforms),
             'names among {} ({} unknown)'.format(list(TRANSFORMS), unknown))
    for key in ('norm_mean', 'norm_std'):
        if len(cfg.data[key]) != 3:
            fail('data.' + key, list(cfg.data[key]), '3 values (R, G, B)')
    if min(cfg.data.norm_std) <= 0:
        fail('data.norm_std', list(cfg.data.norm_std), 'positive values')
    if cfg.data.workers < 0:
        fail('data.workers', cfg.data.workers, '>= 0')
    if cfg.data.cutout_size < 1:
        fail('data.cutout_size', cfg.data.cutout_size, '>= 1 pixel')
    if not 0 <= cfg.data.cutout_prob <= 1:
        fail('data.cutout_prob', cfg.data.cutout_prob, 'a probability in [0, 1]')
    if 'cutout' in [t.lower() for t in cfg.data.transforms] and \
            cfg.data.cutout_inside and cfg.data.cutout_size > min(
                cfg.data.height, cfg.data.width):
        fail('data.cutout_size', cfg.data.cutout_size, 'a square that fits '
             'inside the {}x{} input (data.cutout_inside is True)'.format(
                 cfg.data.height, cfg.data.width))
    if cfg.data.val_ids < 0:
        fail('data.val_ids', cfg.data.val_ids, 'a number of identities >= 0')
    if cfg.data.val_ids and (len(cfg.data.sources) != 1 or list(
            cfg.data.sources) != list(cfg.data.targets)):
        fail('data.sources / data.targets', (list(cfg.data.sources),
                                             list(cfg.data.targets)),
             'one dataset, the same for both, when data.val_ids = {} holds '
             'identities of its training set out for validation'.format(
                 cfg.data.val_ids))
    if cfg.data.val_ids and cfg.data.combineall:
        fail('data.combineall', True, 'False when data.val_ids > 0 (the '
             'validation identities come from the training set)')
    if cfg.train.optim not in OPTIMIZERS:
        fail('train.optim', cfg.train.optim, 'one of {}'.format(list(OPTIMIZERS)))
    if cfg.train.lr_scheduler not in LR_SCHEDULERS:
        fail('train.lr_scheduler', cfg.train.lr_scheduler,
             'one of {}'.format(list(LR_SCHEDULERS)))
    if not cfg.train.lr > 0:
        fail('train.lr', cfg.train.lr, 'a positive learning rate')
    if cfg.train.weight_decay < 0:
        fail('train.weight_decay', cfg.train.weight_decay, '>= 0')
    if cfg.train.max_epoch < 1:
        fail('train.max_epoch', cfg.train.max_epoch, '>= 1')
    if not 0 <= cfg.train.start_epoch <= cfg.train.max_epoch:
        fail('train.start_epoch', cfg.train.start_epoch,
             '0 <= start_epoch <= train.max_epoch ({})'.format(
                 cfg.train.max_epoch))
    if cfg.train.batch_size < 1 or cfg.test.batch_size < 1:
        fail('train.batch_size / test.batch_size',
             (cfg.train.batch_size, cfg.test.batch_size), 'positive sizes')
    if cfg.train.lr_scheduler in ('multi_step', 'warmup_multi_step') and \
            sorted(cfg.train.stepsize) != list(cfg.train.stepsize):
        fail('train.stepsize', list(cfg.train.stepsize),
             'increasing epochs for {}'.format(cfg.train.lr_scheduler))
    if not cfg.train.gamma > 0:
        fail('train.gamma', cfg.train.gamma, 'a positive factor')
    if cfg.train.warmup_epochs < 0 or cfg.train.warmup_interval < 1:
        fail('train.warmup_epochs / train.warmup_interval',
             (cfg.train.warmup_epochs, cfg.train.warmup_interval),
             'warmup_epochs >= 0 and warmup_interval >= 1')
    if cfg.train.warmup_offset < 0:
        fail('train.warmup_offset', cfg.train.warmup_offset, '>= 0')
    for key, value in (('train.dist_timeout', cfg.train.dist_timeout),
                       ('test.dist_eval_timeout', cfg.test.dist_eval_timeout)):
        if not value >= 1:
            fail(key, value, 'a number of seconds >= 1 (how long a rank of a '
                 'distributed run waits for the others)')
    if cfg.test.eval_freq == 0 or cfg.test.eval_freq < -1:
        fail('test.eval_freq', cfg.test.eval_freq,
             'a number of epochs >= 1, or -1 (only at the end)')
    if cfg.test.dist_metric not in ('euclidean', 'cosine'):
        fail('test.dist_metric', cfg.test.dist_metric, "'euclidean' or 'cosine'")
    if cfg.test.visrank and not cfg.test.evaluate:
        fail('test.visrank', True, 'test.evaluate True as well (torchreid '
             'draws ranked results only in evaluation-only runs)')
    if cfg.loss.name not in ('pmm', 'softmax', 'triplet'):
        fail('loss.name', cfg.loss.name, "'pmm', 'softmax' or 'triplet'")
    plugin_model = uses_pmm_engine(cfg.model.name)
    if plugin_model != (cfg.loss.name == 'pmm'):
        fail('loss.name', cfg.loss.name,
             "'pmm' exactly when model.name is a PMM or BDB model or a "
             "comparison system, FMN or MagnifierNet (model.name"
             " = {!r})".format(cfg.model.name))
    if plugin_model:
        from .comparison_engine import engine_class
        engine_class(cfg.model.name).check_cfg(cfg)


def _layout_text(name: str, root: str) -> str:
    layouts = DATASET_LAYOUTS[name]
    return ' or '.join(
        '[{}]'.format(', '.join(osp.join(root, p) for p in layout))
        for layout in layouts
    )


def check_paths(cfg: CN) -> None:
    """Checks that the files the run will read exist (datasets, weights).

    Raises:
        FileNotFoundError: naming the key, the path and the expected layout.
    """
    root = osp.abspath(osp.expanduser(cfg.data.root))
    for key in ('model.load_weights', 'model.resume'):
        section, name = key.split('.')
        path = cfg[section][name]
        if path and not osp.isfile(path):
            raise FileNotFoundError(
                'config {} = {!r}: no such file'.format(key, path)
            )
    datasets = _registered('dataset')
    names = list(cfg.data.targets) if cfg.test.evaluate else \
        list(cfg.data.sources) + list(cfg.data.targets)
    for name in dict.fromkeys(names):
        if name in GENERATED_DATASETS:
            continue
        if name in DATASET_LAYOUTS:
            layouts = DATASET_LAYOUTS[name]
            if any(all(osp.exists(osp.join(root, p)) for p in layout)
                   for layout in layouts):
                continue
            missing = [osp.join(root, p) for p in layouts[0]
                       if not osp.exists(osp.join(root, p))]
            raise FileNotFoundError(
                'dataset {!r} not found under data.root = {!r} ({}): expected '
                '{}; missing {}{}'.format(
                    name, cfg.data.root, root, _layout_text(name, root),
                    missing[0], '' if osp.isdir(root) else
                    ' (the root folder itself does not exist)'
                )
            )
        folder = osp.join(root, getattr(datasets[name], 'dataset_dir', name))
        if not osp.exists(folder):
            raise FileNotFoundError(
                'dataset {!r} not found under data.root = {!r}: expected the '
                'folder {} (see torchreid\'s dataset documentation)'.format(
                    name, cfg.data.root, folder
                )
            )
