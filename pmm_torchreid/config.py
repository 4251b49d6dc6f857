"""Configuration: torchreid's default keys plus the plugin's, merging with
errors that name the file and the key, and the adapters.

Merge order (as in Dassl/detectron2): :func:`get_default_config` (torchreid's
keys and :func:`add_pmm_config`) -> yaml file -> command-line flags -> trailing
``KEY VALUE`` pairs -> :func:`pmm_torchreid.checks.check_config` -> freeze.
Models never see ``cfg``: the ``*_kwargs`` adapters turn it into constructor
arguments.
"""
from __future__ import annotations

import difflib
import os.path as osp
from typing import List, Sequence, Tuple

import torch
import yaml
from yacs.config import CfgNode as CN

from .guidance import DEFAULT_TOP_K

__all__ = [
    'get_default_config', 'add_pmm_config', 'add_comparison_config',
    'is_pmm_model', 'is_bdb_model', 'is_fmn_model', 'is_magnifiernet_model',
    'is_comparison_model', 'takes_no_mix', 'uses_pmm_engine', 'resolved_top_k',
    'mixed_blocks', 'merge_file', 'merge_list',
    'imagedata_kwargs', 'model_kwargs', 'optimizer_kwargs',
    'lr_scheduler_kwargs', 'engine_kwargs', 'comparison_engine_kwargs',
    'engine_run_kwargs', 'dump_differences'
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
    cfg.pmm.top_k = DEFAULT_TOP_K  # blocks replaced per sample (guidance.py)
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
    # mixed precision on a GPU: bfloat16 autocast (float16 + gradient scaler
    # where bfloat16 is missing); Grad-CAMs stay float32; no effect on a CPU
    cfg.train.amp = False
    # runs on several processes (torchrun; pmm_torchreid/distributed.py):
    # BatchNorm statistics over every rank's share (SyncBatchNorm; GPUs only)
    cfg.train.sync_bn = False
    # seconds a rank waits for the others in a collective (the gradients, a
    # step's loss check) before it stops with an error naming itself
    cfg.train.dist_timeout = 1800
    # seconds the other ranks wait while rank 0 alone evaluates (or draws the
    # training pictures) before they stop with an error
    cfg.test.dist_eval_timeout = 7200

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


def add_comparison_config(cfg: CN) -> CN:
    """Adds the keys of the comparison systems FMN and MagnifierNet (in
    place) and returns the config.  They train in PMM's engine family
    (``loss.name 'pmm'``, ``pmm.mix 'none'``) and share its loss keys
    (``pmm.weight_triplet``, ``pmm.weight_ce``, ``pmm.label_smooth``,
    ``pmm.soft_margin``, ``pmm.triplet_margin``)."""
    cfg.fmn = CN()
    cfg.fmn.embedding_dim = 512  # size of each branch's embedding (global, masked)
    cfg.magnifiernet = CN()
    cfg.magnifiernet.embedding_dim = 512  # size of each branch's embedding
    cfg.magnifiernet.region_dim = 256  # size of each region's feature (fusion input)
    cfg.magnifiernet.occluded_regions = 1  # regions occluded per batch (1 to 3 of 4)
    # a feature cell is occluded when the chosen regions cover this share of it
    cfg.magnifiernet.occlusion_share = 0.25
    cfg.magnifiernet.weight_sd = 1.0  # weight of the Semantic Diversity loss
    cfg.magnifiernet.weight_parsing = 1.0  # weight of the parsing head's loss
    # label PNGs of a human parser in a folder that mirrors data.root ('':
    # none; pmm_synthetic has its own exact masks, others fall back to bands)
    cfg.magnifiernet.masks_root = ''
    cfg.magnifiernet.mask_labels = 'lip'  # their label set: 'lip', 'cihp' or 'atr'
    # 'auto': the order above; 'bands': the fixed bands for every image, even
    # where exact masks exist (an ablation of the semantic masks)
    cfg.magnifiernet.regions = 'auto'
    return cfg


def get_default_config() -> CN:
    """A fresh default config (never a shared module-level object)."""
    return add_comparison_config(add_pmm_config(_torchreid_defaults()))


def is_pmm_model(name: str) -> bool:
    return name == 'pmm' or name.startswith('pmm_')


def is_bdb_model(name: str) -> bool:
    return name == 'bdb' or name.startswith('bdb_')


def is_fmn_model(name: str) -> bool:
    return name == 'fmn' or name.startswith('fmn_')


def is_magnifiernet_model(name: str) -> bool:
    return name == 'magnifiernet' or name.startswith('magnifiernet_')


def is_comparison_model(name: str) -> bool:
    """The comparison systems FMN and MagnifierNet
    (:class:`~pmm_torchreid.comparison_engine.ComparisonEngine`)."""
    return is_fmn_model(name) or is_magnifiernet_model(name)


def takes_no_mix(name: str) -> bool:
    """The plugin's models that train with ``pmm.mix 'none'`` only (BDB drops
    its own block; FMN and MagnifierNet have their own mechanisms)."""
    return is_bdb_model(name) or is_comparison_model(name)


def uses_pmm_engine(name: str) -> bool:
    """The plugin's models (PMM, its baseline BDB and the comparison systems
    FMN and MagnifierNet) train with ``loss.name 'pmm'``
    (:class:`~pmm_torchreid.engine.PMMEngine` and its subclass
    :class:`~pmm_torchreid.comparison_engine.ComparisonEngine`)."""
    return is_pmm_model(name) or is_bdb_model(name) or \
        is_comparison_model(name)


# --------------------------------------------------------------------------
# merging with errors that name the file, the key and the value
# --------------------------------------------------------------------------
def _all_keys(cfg: CN, prefix: str = '') -> List[str]:
    keys = []
    for key, value in cfg.items():
        full = prefix + key
        keys += _all_keys(value, full + '.') if isinstance(value, CN) else [full]
    return keys


def _flat(tree: dict, prefix: str = '') -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, prefix + key + '.'))
        else:
            flat[prefix + key] = value
    return flat


def dump_differences(old: str, new: str) -> List[str]:
    """The keys whose values differ between two config dumps (``cfg.dump()``
    YAML), sorted.  A key only ``new`` has counts as the same when its value
    there is the current default: a key added to the plugin later, whose
    default keeps the old behaviour, does not make an older recipe another
    one.  A key only ``old`` has (one removed since) always differs."""
    old_flat = _flat(yaml.safe_load(old) or {})
    new_flat = _flat(yaml.safe_load(new) or {})
    defaults = _flat(yaml.safe_load(get_default_config().dump()))
    missing = object()
    differ = []
    for key in set(old_flat) | set(new_flat):
        before = old_flat.get(key, missing)
        after = new_flat.get(key, missing)
        if before is missing and after == defaults.get(key, missing):
            continue
        if before != after:
            differ.append(key)
    return sorted(differ)


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


def resolved_top_k(cfg: CN) -> int:
    """The blocks a PMM run replaces per sample: ``pmm.top_k``, or
    ``pmm.mix_ratio`` of the block grid that ``pmm.block_size`` cuts from the
    backbone's map at ``data.height x data.width``.

    Raises:
        ValueError: the blocks do not tile the map, or the share rounds to no
            block or to every block.
    """
    return mixed_blocks(cfg)[0]


def mixed_blocks(cfg: CN) -> Tuple[int, int]:
    """``(k, blocks)``: the blocks a PMM run replaces per sample
    (:func:`resolved_top_k`) and the blocks of the whole grid, so that
    ``k / blocks`` is the mixed share.

    Raises:
        ValueError: as :func:`resolved_top_k`.
    """
    from .backbones import feature_map_size
    from .guidance import BlockChoice, check_block_grid
    from .models import model_backbone
    backbone = model_backbone(cfg.model.name)
    height, width = feature_map_size(backbone, cfg.data.height, cfg.data.width)
    ratio = cfg.pmm.mix_ratio
    block = tuple(cfg.pmm.block_size)
    try:
        k = BlockChoice(block, int(cfg.pmm.top_k), ratio or None).count(
            height, width)
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
    rows, cols = check_block_grid(height, width, block)
    return k, rows * cols


def _same_names(section: CN, names: str) -> dict:
    """``{name: section[name]}`` for the space-separated ``names``: the
    constructor arguments that are spelled like their config keys."""
    return {name: section[name] for name in names.split()}


def imagedata_kwargs(cfg: CN) -> dict:
    """Arguments of :func:`pmm_torchreid.data.build_datamanager` (torchreid's
    ``ImageDataManager`` plus the plugin's)."""
    kwargs = _same_names(
        cfg.data, 'root sources targets height width transforms k_tfm '
        'norm_mean norm_std split_id combineall load_train_targets workers '
        'cutout_size cutout_prob cutout_inside val_ids val_seed check_images '
        'skip_bad_images')
    kwargs.update(_same_names(
        cfg.sampler, 'num_instances num_cams num_datasets train_sampler '
        'train_sampler_t'))
    kwargs.update(
        use_gpu=cfg.use_gpu, batch_size_train=cfg.train.batch_size,
        batch_size_test=cfg.test.batch_size,
        cuhk03_labeled=cfg.cuhk03.labeled_images,
        cuhk03_classic_split=cfg.cuhk03.classic_split,
        market1501_500k=cfg.market1501.use_500k_distractors)
    return kwargs


def model_kwargs(cfg: CN, num_classes: int) -> dict:
    kwargs = {'name': cfg.model.name, 'num_classes': num_classes,
              'loss': cfg.loss.name, 'pretrained': cfg.model.pretrained}
    if is_pmm_model(cfg.model.name):
        kwargs.update(_same_names(cfg.pmm, 'embedding_dim num_stages'))
    elif is_fmn_model(cfg.model.name):
        kwargs.update(_same_names(cfg.fmn, 'embedding_dim'))
    elif is_magnifiernet_model(cfg.model.name):
        kwargs.update(_same_names(cfg.magnifiernet, 'embedding_dim region_dim '
                                  'occluded_regions occlusion_share'))
    return kwargs


def optimizer_kwargs(cfg: CN) -> dict:
    """Arguments of torchreid's ``build_optimizer``."""
    kwargs = _same_names(cfg.train, 'optim lr weight_decay staged_lr '
                         'new_layers base_lr_mult')
    kwargs.update(
        momentum=cfg.sgd.momentum, sgd_dampening=cfg.sgd.dampening,
        sgd_nesterov=cfg.sgd.nesterov, rmsprop_alpha=cfg.rmsprop.alpha,
        adam_beta1=cfg.adam.beta1, adam_beta2=cfg.adam.beta2)
    return kwargs


def lr_scheduler_kwargs(cfg: CN) -> dict:
    """Arguments of :func:`pmm_torchreid.optim.build_lr_scheduler`."""
    return _same_names(cfg.train, 'lr_scheduler stepsize gamma max_epoch '
                       'warmup_epochs warmup_interval warmup_offset')


def engine_kwargs(cfg: CN) -> dict:
    """Arguments of :class:`pmm_torchreid.engine.PMMEngine`."""
    kwargs = _same_names(
        cfg.pmm, 'mix top_k mix_start_epoch soft_margin triplet_margin '
        'weight_triplet weight_ce label_smooth vis_freq vis_num')
    from .models import model_backbone
    kwargs.update(use_gpu=cfg.use_gpu, seed=cfg.train.seed,
                  block_size=tuple(cfg.pmm.block_size),
                  mix_ratio=cfg.pmm.mix_ratio or None, amp=cfg.train.amp,
                  # channels-last convolutions pay off for ResNets on GPUs
                  channels_last=bool(cfg.use_gpu) and model_backbone(
                      cfg.model.name).startswith('resnet'))
    return kwargs


def comparison_engine_kwargs(cfg: CN) -> dict:
    """Arguments of :class:`pmm_torchreid.comparison_engine.ComparisonEngine`:
    :func:`engine_kwargs` plus MagnifierNet's loss weights and masks."""
    kwargs = engine_kwargs(cfg)
    kwargs.update(_same_names(cfg.magnifiernet, 'weight_sd weight_parsing '
                              'masks_root mask_labels'))
    kwargs['band_regions'] = cfg.magnifiernet.regions == 'bands'
    kwargs['data_root'] = cfg.data.root
    return kwargs


def engine_run_kwargs(cfg: CN) -> dict:
    """Arguments of torchreid's ``Engine.run``."""
    kwargs = _same_names(cfg.train, 'max_epoch start_epoch fixbase_epoch '
                         'open_layers print_freq')
    kwargs.update(_same_names(cfg.test, 'start_eval eval_freq dist_metric '
                              'normalize_feature visrank visrank_topk '
                              'ranks rerank'))
    kwargs.update(save_dir=cfg.data.save_dir, test_only=cfg.test.evaluate,
                  use_metric_cuhk03=cfg.cuhk03.use_metric_cuhk03)
    return kwargs
