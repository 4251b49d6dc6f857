"""Configuration: torchreid's default keys plus the plugin's, and adapters.

Merge order (as in Dassl/detectron2): :func:`get_default_config` (torchreid's
keys and :func:`add_pmm_config`) -> yaml file -> command-line flags -> trailing
``KEY VALUE`` pairs -> :func:`check_config` -> freeze.  Models and engines never
see ``cfg``: the ``*_kwargs`` adapters turn it into constructor arguments.
"""
from __future__ import annotations

import difflib
import os.path as osp
from typing import List, Sequence

import torch
import yaml
from yacs.config import CfgNode as CN

__all__ = [
    'get_default_config', 'add_pmm_config', 'check_config', 'is_pmm_model',
    'is_bdb_model', 'uses_pmm_engine', 'resolved_top_k',
    'merge_file', 'merge_list', 'check_paths', 'DATASET_LAYOUTS',
    'imagedata_kwargs', 'model_kwargs', 'optimizer_kwargs',
    'lr_scheduler_kwargs', 'engine_kwargs', 'engine_run_kwargs'
]


def _torchreid_defaults() -> CN:
    # The keys of torchreid's scripts/default_config.py (deep-person-reid 1.4),
    # so that its yaml files and command-line overrides work here unchanged.
    cfg = CN()
    cfg.use_gpu = torch.cuda.is_available()  # train and test on a GPU

    cfg.model = CN()
    cfg.model.name = 'pmm'  # model name (torchreid's or the plugin's)
    cfg.model.pretrained = True  # load ImageNet weights into the backbone
    cfg.model.load_weights = ''  # path to model weights
    cfg.model.resume = ''  # path to a checkpoint to resume training from

    cfg.data = CN()
    cfg.data.type = 'image'  # only image reID is supported by the plugin
    cfg.data.root = 'reid-data'  # folder that holds the datasets
    cfg.data.sources = ['pmm_synthetic']  # training dataset(s)
    cfg.data.targets = ['pmm_synthetic']  # evaluation dataset(s)
    cfg.data.workers = 4  # number of data-loading processes
    cfg.data.split_id = 0  # split index (datasets with several splits)
    cfg.data.height = 256  # image height
    cfg.data.width = 128  # image width
    cfg.data.combineall = False  # train on train + query + gallery
    cfg.data.transforms = ['random_flip']  # training augmentation (+ 'cutout')
    cfg.data.k_tfm = 1  # times an image is augmented independently
    cfg.data.norm_mean = [0.485, 0.456, 0.406]  # ImageNet mean
    cfg.data.norm_std = [0.229, 0.224, 0.225]  # ImageNet std
    cfg.data.save_dir = 'log'  # where logs and checkpoints go
    cfg.data.load_train_targets = False  # also load the targets' train set

    cfg.market1501 = CN()
    cfg.market1501.use_500k_distractors = False  # add 500k gallery distractors
    cfg.cuhk03 = CN()
    cfg.cuhk03.labeled_images = False  # labeled (True) or detected images
    cfg.cuhk03.classic_split = False  # classic 20 splits instead of 767/700
    cfg.cuhk03.use_metric_cuhk03 = False  # CUHK03 single-shot metric

    cfg.sampler = CN()
    cfg.sampler.train_sampler = 'RandomIdentitySampler'  # batch sampler
    cfg.sampler.train_sampler_t = 'RandomSampler'  # target train sampler
    cfg.sampler.num_instances = 4  # images per identity in a batch
    cfg.sampler.num_cams = 1  # cameras per batch (RandomDomainSampler)
    cfg.sampler.num_datasets = 1  # datasets per batch (RandomDatasetSampler)

    cfg.video = CN()  # kept for torchreid's yaml files; unused by the plugin
    cfg.video.seq_len = 15  # images sampled from a tracklet
    cfg.video.sample_method = 'evenly'  # how tracklet images are sampled
    cfg.video.pooling_method = 'avg'  # how tracklet features are pooled

    cfg.train = CN()
    cfg.train.optim = 'adam'  # optimizer
    cfg.train.lr = 0.0003  # base learning rate
    cfg.train.weight_decay = 5e-4  # weight decay
    cfg.train.max_epoch = 60  # number of epochs
    cfg.train.start_epoch = 0  # first epoch (set by model.resume)
    cfg.train.batch_size = 32  # images per training batch
    cfg.train.fixbase_epoch = 0  # epochs training only open_layers
    cfg.train.open_layers = ['classifier']  # layers trained during fixbase
    cfg.train.staged_lr = False  # different lr for new and base layers
    cfg.train.new_layers = ['classifier']  # new layers (staged_lr)
    cfg.train.base_lr_mult = 0.1  # lr multiplier of base layers (staged_lr)
    cfg.train.lr_scheduler = 'single_step'  # lr schedule
    cfg.train.stepsize = [20]  # epochs at which the lr drops
    cfg.train.gamma = 0.1  # lr drop factor
    cfg.train.print_freq = 20  # iterations between log lines
    cfg.train.seed = 1  # seed of Python, NumPy and torch RNGs

    cfg.sgd = CN()
    cfg.sgd.momentum = 0.9  # momentum (sgd, rmsprop)
    cfg.sgd.dampening = 0.  # dampening for momentum
    cfg.sgd.nesterov = False  # Nesterov momentum
    cfg.rmsprop = CN()
    cfg.rmsprop.alpha = 0.99  # smoothing constant
    cfg.adam = CN()
    cfg.adam.beta1 = 0.9  # decay of the first moment
    cfg.adam.beta2 = 0.999  # decay of the second moment

    cfg.loss = CN()
    cfg.loss.name = 'pmm'  # 'pmm' (PMMEngine), 'softmax' or 'triplet'
    cfg.loss.softmax = CN()
    cfg.loss.softmax.label_smooth = True  # label smoothing (torchreid engines)
    cfg.loss.triplet = CN()
    cfg.loss.triplet.margin = 0.3  # margin (torchreid's triplet engine)
    cfg.loss.triplet.weight_t = 1.  # triplet weight (torchreid's engine)
    cfg.loss.triplet.weight_x = 0.  # cross-entropy weight (torchreid's engine)

    cfg.test = CN()
    cfg.test.batch_size = 100  # images per evaluation batch
    cfg.test.dist_metric = 'euclidean'  # 'euclidean' or 'cosine'
    cfg.test.normalize_feature = False  # L2-normalise features first
    cfg.test.ranks = [1, 5, 10, 20]  # CMC ranks to print
    cfg.test.evaluate = False  # evaluate only, no training
    cfg.test.eval_freq = -1  # evaluate every N epochs (-1: at the end)
    cfg.test.start_eval = 0  # first epoch that may be evaluated
    cfg.test.rerank = False  # k-reciprocal re-ranking (test only)
    cfg.test.visrank = False  # save ranked results (needs test.evaluate)
    cfg.test.visrank_topk = 10  # gallery images per ranked result
    return cfg


def add_pmm_config(cfg: CN) -> CN:
    """Adds the plugin's keys to a torchreid config (in place) and returns it."""
    cfg.pmm = CN()
    # 'hard_mix' (the paper), 'none' (no guidance; BDB models) or an ablation
    # variant: 'cutout', 'cutmix', 'a_cutmix', 'batch_drop'
    cfg.pmm.mix = 'hard_mix'
    cfg.pmm.block_size = [3, 2]  # block height, width on the feature map
    cfg.pmm.top_k = 8  # blocks replaced per sample (3 Market, 6 Duke, 8 CUHK03)
    # share of the map's blocks to replace, rounded to whole blocks; > 0
    # overrides top_k, so one value fits every input size and block grid
    cfg.pmm.mix_ratio = 0.0
    cfg.pmm.mix_start_epoch = 0  # epochs trained unmixed before mixing starts
    cfg.pmm.num_stages = 3  # stage I + (num_stages - 1) mixed part stages
    cfg.pmm.embedding_dim = 512  # size of each stage's embedding
    cfg.pmm.soft_margin = True  # soft-margin triplet (softplus) as in the paper
    cfg.pmm.triplet_margin = 0.3  # hinge margin when soft_margin is False
    cfg.pmm.weight_triplet = 1.0  # weight of every stage's triplet loss
    cfg.pmm.weight_ce = 1.0  # weight of every stage's cross-entropy loss
    cfg.pmm.label_smooth = 0.1  # label-smoothing epsilon of the cross-entropy
    cfg.pmm.vis_freq = 0  # Grad-CAM pictures every N epochs in training (0: off)
    cfg.pmm.vis_num = 8  # training images in those pictures (fixed, seeded)

    cfg.train.warmup_epochs = 0  # staircase warm-up length ('warmup_multi_step')
    cfg.train.warmup_interval = 1  # the warm-up raises the lr every N epochs
    # the warm-up staircase counts epochs from this number (1: the reference
    # code's 1-based count, so its first step lasts interval - 1 epochs)
    cfg.train.warmup_offset = 0

    cfg.data.cutout_size = 64  # side of the Cutout square (transform 'cutout')
    cfg.data.cutout_prob = 0.5  # probability of Cutout per image
    # the whole square inside the image (the reference code); False: centre
    # anywhere, clipped at the border (DeVries and Taylor's original)
    cfg.data.cutout_inside = True
    # hold out N training identities as a validation query/gallery, evaluated
    # instead of the test split (0: off; for choices that must not see test)
    cfg.data.val_ids = 0
    cfg.data.val_seed = 0  # seed of that draw (the same for every setting)
    cfg.data.check_images = True  # decode every image once before training
    cfg.data.skip_bad_images = False  # leave unreadable images out (else stop)
    return cfg


def get_default_config() -> CN:
    """A fresh default config (never a shared module-level object)."""
    return add_pmm_config(_torchreid_defaults())


def is_pmm_model(name: str) -> bool:
    return name == 'pmm' or name.startswith('pmm_')


def is_bdb_model(name: str) -> bool:
    return name == 'bdb' or name.startswith('bdb_')


def uses_pmm_engine(name: str) -> bool:
    """The plugin's models (PMM and its baseline BDB) train with
    ``loss.name 'pmm'`` (:class:`~pmm_torchreid.engine.PMMEngine`)."""
    return is_pmm_model(name) or is_bdb_model(name)


# --------------------------------------------------------------------------
# merging with errors that name the file, the key and the value
# --------------------------------------------------------------------------
def _all_keys(cfg: CN, prefix: str = '') -> List[str]:
    keys = []
    for key, value in cfg.items():
        full = prefix + key
        keys += _all_keys(value, full + '.') if isinstance(value, CN) else [full]
    return keys


class ConfigKeyError(KeyError):
    """An unknown config key (``str`` gives the message without quotes)."""

    def __str__(self):
        return str(self.args[0]) if self.args else ''


def _explain(error: Exception, cfg: CN, where: str) -> Exception:
    message = str(error).strip('"\'')
    if 'Non-existent' in message and ':' in message:  # yacs: file / list
        key = message.split(':', 1)[1].strip()
        close = difflib.get_close_matches(key, _all_keys(cfg), n=3)
        return ConfigKeyError(
            '{}: unknown config key {!r}{}'.format(
                where, key, '; did you mean {}?'.format(
                    ' or '.join(repr(c) for c in close)) if close else
                ' (no key of that name exists; see pmm_torchreid/config.py)'
            )
        )
    return type(error)('{}: {}'.format(where, message))


def merge_file(cfg: CN, path: str) -> CN:
    """``cfg.merge_from_file(path)`` with errors naming the file and the key.

    Raises:
        FileNotFoundError: no such file.
        KeyError: an unknown key (with the closest existing keys).
        ValueError: a value of the wrong type, or a file that is not yaml.
    """
    if not osp.isfile(path):
        raise FileNotFoundError('config file "{}" does not exist'.format(path))
    where = 'config file "{}"'.format(path)
    try:
        cfg.merge_from_file(path)
    except yaml.YAMLError as error:
        raise ValueError('{} is not valid yaml: {}'.format(where, error)) \
            from None
    except (KeyError, ValueError, AssertionError, AttributeError) as error:
        raise _explain(error, cfg, where) from None
    return cfg


def merge_list(cfg: CN, opts: Sequence[str]) -> CN:
    """``cfg.merge_from_list(opts)`` with errors naming the key and value."""
    opts = list(opts)
    if len(opts) % 2:
        raise ValueError(
            'command-line overrides come as KEY VALUE pairs; got an odd '
            'number of items: {}'.format(opts)
        )
    try:
        cfg.merge_from_list(opts)
    except (KeyError, ValueError, AssertionError, AttributeError) as error:
        raise _explain(error, cfg, 'command line') from None
    return cfg


# --------------------------------------------------------------------------
# checks (before any heavy work)
# --------------------------------------------------------------------------
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


def _fail(key, value, expected):
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
    from .guidance import MIX_MODES

    fail = _fail
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
             "'pmm' exactly when model.name is a PMM or BDB model (model.name"
             " = {!r})".format(cfg.model.name))
    if not plugin_model:
        return
    if is_bdb_model(cfg.model.name):
        if cfg.pmm.mix != 'none':
            fail('pmm.mix', cfg.pmm.mix, "'none' for a BDB model ({!r} drops "
                 'its own block in the part branch)'.format(cfg.model.name))
        if cfg.pmm.vis_freq:
            fail('pmm.vis_freq', cfg.pmm.vis_freq, '0 for a BDB model (the '
                 'Grad-CAM pictures are drawn for PMM models)')
    _check_pmm(cfg, MIX_MODES)


def _check_pmm(cfg: CN, mix_modes) -> None:
    fail = _fail
    if cfg.pmm.mix not in mix_modes:
        fail('pmm.mix', cfg.pmm.mix, 'one of {}'.format(list(mix_modes)))
    if len(cfg.pmm.block_size) != 2 or min(cfg.pmm.block_size) < 1:
        fail('pmm.block_size', list(cfg.pmm.block_size), '[height, width] >= 1')
    if cfg.pmm.top_k < 0:
        fail('pmm.top_k', cfg.pmm.top_k, 'a number of blocks >= 0')
    if not 0 <= cfg.pmm.mix_ratio < 1:
        fail('pmm.mix_ratio', cfg.pmm.mix_ratio, 'a share of the map in (0, '
             '1), or 0 to use pmm.top_k')
    if cfg.pmm.mix_start_epoch < 0:
        fail('pmm.mix_start_epoch', cfg.pmm.mix_start_epoch, 'an epoch >= 0')
    if cfg.pmm.num_stages < 1:
        fail('pmm.num_stages', cfg.pmm.num_stages, '>= 1')
    if cfg.pmm.embedding_dim < 1:
        fail('pmm.embedding_dim', cfg.pmm.embedding_dim, '>= 1')
    if not 0 <= cfg.pmm.label_smooth < 1:
        fail('pmm.label_smooth', cfg.pmm.label_smooth, 'an epsilon in [0, 1)')
    for key in ('weight_triplet', 'weight_ce', 'triplet_margin'):
        if cfg.pmm[key] < 0:
            fail('pmm.' + key, cfg.pmm[key], '>= 0')
    if cfg.pmm.vis_freq < 0:
        fail('pmm.vis_freq', cfg.pmm.vis_freq,
             'a number of epochs >= 1, or 0 for no pictures')
    if cfg.pmm.vis_freq > 0 and cfg.pmm.mix not in ('hard_mix', 'none'):
        fail('pmm.vis_freq', cfg.pmm.vis_freq, "0 with pmm.mix = {!r}: the "
             "training pictures draw the A-Hard-Mix chain ('hard_mix' or "
             "'none')".format(cfg.pmm.mix))
    if cfg.pmm.vis_num < 1:
        fail('pmm.vis_num', cfg.pmm.vis_num, 'a number of images >= 1')
    if cfg.test.evaluate:
        return
    if cfg.sampler.train_sampler != 'RandomIdentitySampler':
        fail('sampler.train_sampler', cfg.sampler.train_sampler,
             "'RandomIdentitySampler': PMM needs every batch to hold several "
             'identities with several images each, so that every sample has '
             'a partner of another identity to mix with')
    n, k = cfg.train.batch_size, cfg.sampler.num_instances
    if k < 2 or n % k != 0 or n // k < 2:
        fail('train.batch_size / sampler.num_instances', (n, k),
             'num_instances >= 2 and a batch size that is a multiple of it '
             'with at least 2 identities per batch (e.g. {} or {})'.format(
                 (max(2, k) * 2, max(2, k)), (max(2, k) * 8, max(2, k))))
    if cfg.pmm.mix == 'none':
        return
    # the block grid on the map the backbone gives at the configured size
    resolved_top_k(cfg)


def resolved_top_k(cfg: CN) -> int:
    """The blocks a PMM run replaces per sample: ``pmm.top_k``, or
    ``pmm.mix_ratio`` of the block grid that ``pmm.block_size`` cuts from the
    backbone's map at ``data.height x data.width``.

    Raises:
        ValueError: the blocks do not tile the map, or the share rounds to no
            block or to every block.
    """
    from .guidance import blocks_for_ratio, check_block_grid
    from .backbones import feature_map_size
    from .models import model_backbone
    backbone = model_backbone(cfg.model.name)
    height, width = feature_map_size(backbone, cfg.data.height, cfg.data.width)
    ratio = cfg.pmm.mix_ratio
    try:
        rows, cols = check_block_grid(height, width, cfg.pmm.block_size,
                                      None if ratio else cfg.pmm.top_k)
        return blocks_for_ratio(rows * cols, ratio) if ratio else \
            int(cfg.pmm.top_k)
    except ValueError as error:
        raise ValueError(
            'config pmm.block_size = {} / {}: at input {}x{} '
            '(data.height x data.width) the {} backbone gives a {}x{} feature '
            'map, and {}'.format(
                list(cfg.pmm.block_size), 'pmm.mix_ratio = {}'.format(ratio)
                if ratio else 'pmm.top_k = {}'.format(cfg.pmm.top_k),
                cfg.data.height, cfg.data.width, backbone, height, width, error
            )
        ) from None


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


def imagedata_kwargs(cfg: CN) -> dict:
    return {
        'root': cfg.data.root,
        'sources': cfg.data.sources,
        'targets': cfg.data.targets,
        'height': cfg.data.height,
        'width': cfg.data.width,
        'transforms': cfg.data.transforms,
        'k_tfm': cfg.data.k_tfm,
        'norm_mean': cfg.data.norm_mean,
        'norm_std': cfg.data.norm_std,
        'use_gpu': cfg.use_gpu,
        'split_id': cfg.data.split_id,
        'combineall': cfg.data.combineall,
        'load_train_targets': cfg.data.load_train_targets,
        'batch_size_train': cfg.train.batch_size,
        'batch_size_test': cfg.test.batch_size,
        'workers': cfg.data.workers,
        'num_instances': cfg.sampler.num_instances,
        'num_cams': cfg.sampler.num_cams,
        'num_datasets': cfg.sampler.num_datasets,
        'train_sampler': cfg.sampler.train_sampler,
        'train_sampler_t': cfg.sampler.train_sampler_t,
        'cuhk03_labeled': cfg.cuhk03.labeled_images,
        'cuhk03_classic_split': cfg.cuhk03.classic_split,
        'market1501_500k': cfg.market1501.use_500k_distractors,
        'cutout_size': cfg.data.cutout_size,
        'cutout_prob': cfg.data.cutout_prob,
        'cutout_inside': cfg.data.cutout_inside,
        'val_ids': cfg.data.val_ids,
        'val_seed': cfg.data.val_seed,
        'check_images': cfg.data.check_images,
        'skip_bad_images': cfg.data.skip_bad_images,
    }


def model_kwargs(cfg: CN, num_classes: int) -> dict:
    kwargs = {
        'name': cfg.model.name,
        'num_classes': num_classes,
        'loss': cfg.loss.name,
        'pretrained': cfg.model.pretrained,
    }
    if is_pmm_model(cfg.model.name):
        kwargs.update(
            embedding_dim=cfg.pmm.embedding_dim,
            num_stages=cfg.pmm.num_stages
        )
    return kwargs


def optimizer_kwargs(cfg: CN) -> dict:
    return {
        'optim': cfg.train.optim,
        'lr': cfg.train.lr,
        'weight_decay': cfg.train.weight_decay,
        'momentum': cfg.sgd.momentum,
        'sgd_dampening': cfg.sgd.dampening,
        'sgd_nesterov': cfg.sgd.nesterov,
        'rmsprop_alpha': cfg.rmsprop.alpha,
        'adam_beta1': cfg.adam.beta1,
        'adam_beta2': cfg.adam.beta2,
        'staged_lr': cfg.train.staged_lr,
        'new_layers': cfg.train.new_layers,
        'base_lr_mult': cfg.train.base_lr_mult,
    }


def lr_scheduler_kwargs(cfg: CN) -> dict:
    return {
        'lr_scheduler': cfg.train.lr_scheduler,
        'stepsize': cfg.train.stepsize,
        'gamma': cfg.train.gamma,
        'max_epoch': cfg.train.max_epoch,
        'warmup_epochs': cfg.train.warmup_epochs,
        'warmup_interval': cfg.train.warmup_interval,
        'warmup_offset': cfg.train.warmup_offset,
    }


def engine_kwargs(cfg: CN) -> dict:
    """Arguments of :class:`pmm_torchreid.engine.PMMEngine`."""
    return {
        'use_gpu': cfg.use_gpu,
        'mix': cfg.pmm.mix,
        'block_size': tuple(cfg.pmm.block_size),
        'top_k': cfg.pmm.top_k,
        'mix_ratio': cfg.pmm.mix_ratio or None,
        'mix_start_epoch': cfg.pmm.mix_start_epoch,
        'seed': cfg.train.seed,
        'soft_margin': cfg.pmm.soft_margin,
        'triplet_margin': cfg.pmm.triplet_margin,
        'weight_triplet': cfg.pmm.weight_triplet,
        'weight_ce': cfg.pmm.weight_ce,
        'label_smooth': cfg.pmm.label_smooth,
        'vis_freq': cfg.pmm.vis_freq,
        'vis_num': cfg.pmm.vis_num,
    }


def engine_run_kwargs(cfg: CN) -> dict:
    return {
        'save_dir': cfg.data.save_dir,
        'max_epoch': cfg.train.max_epoch,
        'start_epoch': cfg.train.start_epoch,
        'fixbase_epoch': cfg.train.fixbase_epoch,
        'open_layers': cfg.train.open_layers,
        'start_eval': cfg.test.start_eval,
        'eval_freq': cfg.test.eval_freq,
        'test_only': cfg.test.evaluate,
        'print_freq': cfg.train.print_freq,
        'dist_metric': cfg.test.dist_metric,
        'normalize_feature': cfg.test.normalize_feature,
        'visrank': cfg.test.visrank,
        'visrank_topk': cfg.test.visrank_topk,
        'use_metric_cuhk03': cfg.cuhk03.use_metric_cuhk03,
        'ranks': cfg.test.ranks,
        'rerank': cfg.test.rerank,
    }
