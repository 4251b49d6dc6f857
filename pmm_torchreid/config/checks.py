"""Checks of a merged config, before any heavy work: every value the run
depends on (:func:`check_config`) and every file it will read
(:func:`check_paths`).  Errors name the key, the value and what was expected.

The requirements that are the plugin models' own (the identity sampler, the
batch layout, the block grid, the comparison systems' keys) are
:func:`check_pmm_config` and :func:`check_comparison_config`, which
:func:`check_config` calls for the plugin's models and which the engines'
``check_cfg`` (Dassl's name) call too.
"""
from __future__ import annotations

import difflib
import os.path as osp
import warnings
from collections import Counter

from yacs.config import CfgNode as CN

from pmm_torchreid.config.kwargs import mixed_blocks
from pmm_torchreid.data.parsing import LABEL_SETS
from pmm_torchreid.models.bdb import BAND_CHOICES
from pmm_torchreid.models.descriptors import DESCRIPTORS
from pmm_torchreid.models.factory import MODEL_FACTORY
from pmm_torchreid.models.families import family_of, is_bdb_model, is_magnifiernet_model
from pmm_torchreid.models.guidance import MIX_MODES
from pmm_torchreid.models.magnifiernet import FUSIONS
from pmm_torchreid.models.regions import NUM_REGIONS
from pmm_torchreid.utils.errors import fail
from pmm_torchreid.utils.torchreid_internals import dataset_table, model_table

__all__ = ['check_config', 'check_paths', 'check_ranks', 'check_pmm_config',
           'check_comparison_config', 'DATASET_LAYOUTS', 'MAX_QUIET_SHARE',
           'fail']

#: Above this share of the part map's blocks, a mixing rule that feeds a later
#: stage warns (CUHK01 validation: 37.5 % collapsed, 25 % trailed 12.5 %).
MAX_QUIET_SHARE = 0.25


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
    # torchreid reads the four lists even with data.combineall False
    'msmt17': [
        ['msmt17/MSMT17_V1/' + p for p in (
            'train', 'test', 'list_train.txt', 'list_val.txt',
            'list_query.txt', 'list_gallery.txt')],
        ['msmt17/MSMT17_V2/' + p for p in (
            'mask_train_v2', 'mask_test_v2', 'list_train.txt', 'list_val.txt',
            'list_query.txt', 'list_gallery.txt')],
    ],
}

#: Datasets that the plugin generates itself under ``data.root``.
GENERATED_DATASETS = ('pmm_synthetic', )

TRANSFORMS = ('random_flip', 'random_crop', 'random_patch', 'color_jitter',
              'random_erase', 'cutout')
OPTIMIZERS = ('adam', 'amsgrad', 'sgd', 'rmsprop', 'radam')
LR_SCHEDULERS = ('single_step', 'multi_step', 'cosine', 'warmup_multi_step')


def _registered(kind: str) -> dict:
    return model_table() if kind == 'model' else dataset_table()


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
                     'torchreid; {!r} is not one of {} (your own dataset: '
                     'register it in a file given with --register, '
                     'docs/OWN_DATA.md)'.format(name, sorted(datasets)))
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
    if cfg.train.checkpoint_freq < 0:
        fail('train.checkpoint_freq', cfg.train.checkpoint_freq,
             'a number of epochs >= 1, or 0 (no periodic checkpoints)')
    if cfg.test.eval_freq == 0 or cfg.test.eval_freq < -1:
        fail('test.eval_freq', cfg.test.eval_freq,
             'a number of epochs >= 1, or -1 (only at the end)')
    if cfg.test.dist_metric not in ('euclidean', 'cosine'):
        fail('test.dist_metric', cfg.test.dist_metric, "'euclidean' or 'cosine'")
    if cfg.test.descriptor not in DESCRIPTORS:
        fail('test.descriptor', cfg.test.descriptor, ' or '.join(
            repr(d) for d in DESCRIPTORS))
    if cfg.test.descriptor != DESCRIPTORS[0] and \
            family_of(cfg.model.name) is None:
        fail('test.descriptor', cfg.test.descriptor,
             "'all' for torchreid's own model {!r} (it has one descriptor; "
             "'global' is for the plugin's networks)".format(cfg.model.name))
    if cfg.test.visrank and not cfg.test.evaluate:
        fail('test.visrank', True, 'test.evaluate True as well (torchreid '
             'draws ranked results only in evaluation-only runs)')
    if cfg.loss.name not in ('pmm', 'softmax', 'triplet'):
        fail('loss.name', cfg.loss.name, "'pmm', 'softmax' or 'triplet'")
    family = family_of(cfg.model.name)
    plugin_model = family is not None
    if plugin_model != (cfg.loss.name == 'pmm'):
        fail('loss.name', cfg.loss.name,
             "'pmm' exactly when model.name is a PMM or BDB model or a "
             "comparison system, FMN or MagnifierNet (model.name"
             " = {!r})".format(cfg.model.name))
    _check_network_options(cfg)
    if family is not None and family.engine == 'comparison':
        check_comparison_config(cfg)
    elif family is not None:
        check_pmm_config(cfg)


def _check_network_options(cfg: CN) -> None:
    """The keys that change one family's network (``bdb.bands``,
    ``magnifiernet.fusion``) stay at their default for the other models,
    which have no such part (so that a run's label cannot claim a network
    it did not train).  Their values are checked by
    :func:`check_pmm_config` and :func:`check_comparison_config`."""
    name = cfg.model.name
    if cfg.bdb.bands and not is_bdb_model(name):
        fail('bdb.bands', cfg.bdb.bands, '0 for model.name = {!r} (the band '
             'branch is BDB\'s)'.format(name))
    if cfg.magnifiernet.fusion != FUSIONS[0] and \
            not is_magnifiernet_model(name):
        fail('magnifiernet.fusion', cfg.magnifiernet.fusion,
             '{!r} for model.name = {!r} (the fusion is MagnifierNet\'s)'
             .format(FUSIONS[0], name))


def check_pmm_config(cfg: CN) -> None:
    """Checks what PMM and BDB need of a config (Dassl's ``check_cfg``):
    the ``pmm.*`` and ``bdb.*`` values, a BDB model without a mixing rule,
    an identity sampler with at least 2 identities of at least 2 images per
    batch
    (every sample needs a partner of another identity, and the triplet
    loss a positive), and a block grid that tiles the feature map.

    Raises:
        ValueError: naming the key, the value and what was expected.

    Warns:
        UserWarning: a mixing rule replaces more than
            ``MAX_QUIET_SHARE`` of the map's blocks (and there is a later
            stage to feed).
    """
    if cfg.bdb.bands not in BAND_CHOICES:
        fail('bdb.bands', cfg.bdb.bands, '0 (no band branch) or {} (the '
             'fixed horizontal bands of pmm_torchreid.models.regions.BANDS)'
             .format(BAND_CHOICES[1]))
    if cfg.bdb.band_dim < 1:
        fail('bdb.band_dim', cfg.bdb.band_dim, '>= 1')
    if is_bdb_model(cfg.model.name):
        if cfg.pmm.mix != 'none':
            fail('pmm.mix', cfg.pmm.mix, "'none' for a BDB model ({!r} "
                 'drops its own block in the part branch)'.format(
                     cfg.model.name))
        if cfg.pmm.vis_freq:
            fail('pmm.vis_freq', cfg.pmm.vis_freq, '0 for a BDB model (the '
                 'Grad-CAM pictures are drawn for PMM models)')
    if cfg.pmm.mix not in MIX_MODES:
        fail('pmm.mix', cfg.pmm.mix, 'one of {}'.format(list(MIX_MODES)))
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
    k, blocks = mixed_blocks(cfg)
    if cfg.pmm.num_stages > 1 and k > MAX_QUIET_SHARE * blocks:
        warnings.warn(
            'pmm.top_k / pmm.mix_ratio: this run replaces {} of {} blocks '
            '({:.1f} %) of the part map in every sample. On CUHK01 '
            'validation a 37.5 % share kept stages II and III from learning '
            '(2 % training accuracy after 10 epochs) and 25 % was behind '
            '12.5 % on every split. The share that wins depends on the data: '
            'choose it on your validation identities with scripts/choose.py '
            '(docs/METHOD.md, "Choosing the share on your own data")'.format(
                k, blocks, 100.0 * k / blocks), UserWarning)


def check_comparison_config(cfg: CN) -> None:
    """PMMEngine's checks (identity batches, loss values), plus: no
    mixing rule, no Grad-CAM pictures, sane ``fmn.*`` and
    ``magnifiernet.*``.

    Raises:
        ValueError: naming the key, the value and what was expected.
    """
    name = cfg.model.name
    if cfg.pmm.mix != 'none':
        fail('pmm.mix', cfg.pmm.mix, "'none' for {!r} (a comparison "
             'system trains without PMM\'s mixing)'.format(name))
    if cfg.pmm.vis_freq:
        fail('pmm.vis_freq', cfg.pmm.vis_freq, '0 for {!r} (the training '
             'Grad-CAM pictures are drawn for PMM models; see '
             'scripts/visualize_gradcam.py for the masks)'.format(name))
    for key in ('embedding_dim', 'region_dim'):
        if cfg.magnifiernet[key] < 1:
            fail('magnifiernet.' + key, cfg.magnifiernet[key], '>= 1')
    if cfg.fmn.embedding_dim < 1:
        fail('fmn.embedding_dim', cfg.fmn.embedding_dim, '>= 1')
    if not 1 <= cfg.magnifiernet.occluded_regions < NUM_REGIONS:
        fail('magnifiernet.occluded_regions',
             cfg.magnifiernet.occluded_regions,
             '1 to {} of the {} regions'.format(NUM_REGIONS - 1,
                                                 NUM_REGIONS))
    if not 0 < cfg.magnifiernet.occlusion_share <= 1:
        fail('magnifiernet.occlusion_share',
             cfg.magnifiernet.occlusion_share, 'a share of a cell in (0, 1]')
    for key in ('weight_sd', 'weight_parsing'):
        if cfg.magnifiernet[key] < 0:
            fail('magnifiernet.' + key, cfg.magnifiernet[key], '>= 0')
    if cfg.magnifiernet.mask_labels not in LABEL_SETS:
        fail('magnifiernet.mask_labels', cfg.magnifiernet.mask_labels,
             'one of {}'.format(sorted(LABEL_SETS)))
    if cfg.magnifiernet.fusion not in FUSIONS:
        fail('magnifiernet.fusion', cfg.magnifiernet.fusion,
             "'gru' (the paper's gated recurrent cell) or 'mean' (the "
             'region features averaged, no fusion parameters)')
    if cfg.magnifiernet.regions not in ('auto', 'bands'):
        fail('magnifiernet.regions', cfg.magnifiernet.regions,
             "'auto' (synthetic masks, then masks_root, then bands) or "
             "'bands' (the fixed bands for every image)")
    if cfg.magnifiernet.regions == 'bands' and cfg.magnifiernet.masks_root:
        fail('magnifiernet.masks_root', cfg.magnifiernet.masks_root,
             "'' with magnifiernet.regions 'bands' (the bands ignore "
             'masks)')
    if cfg.data.k_tfm != 1 and is_magnifiernet_model(name):
        fail('data.k_tfm', cfg.data.k_tfm, '1 for MagnifierNet (the '
             'region masks follow one augmentation per image)')
    check_pmm_config(cfg)


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


#: the length of the CMC curve torchreid's engine asks for
CMC_LENGTH = 50


def check_ranks(cfg: CN, test_dataset: dict) -> None:
    """Checks, once the data are listed and before training, that torchreid's
    evaluation will work on every target's query and gallery
    (``test_dataset``: a data manager's ``{name: {'query': [...],
    'gallery': [...]}}``).

    torchreid's CMC curve is 50 long, or as long as the gallery without the
    query's own-camera images of its identity if that is shorter; it fails
    when those lengths differ between queries, and when ``test.ranks`` asks
    for a rank beyond the curve (after the evaluation, possibly hours into
    training).  Only small galleries (a few dozen images) run into this.

    Raises:
        ValueError: naming the dataset, its gallery and what to change.
    """
    if cfg.cuhk03.use_metric_cuhk03:
        return  # one gallery image per identity: a curve of its own
    for name, sets in test_dataset.items():
        gallery = sets['gallery']
        per_id = Counter(item[1] for item in gallery)
        own_camera = Counter((item[1], item[2]) for item in gallery)
        longest = min(CMC_LENGTH, len(gallery))
        lengths = {min(longest, len(gallery) - own_camera[item[1], item[2]])
                   for item in sets['query']
                   if per_id[item[1]] > own_camera[item[1], item[2]]}
        if len(lengths) > 1:
            raise ValueError(
                'the gallery of {!r} is too small for torchreid\'s evaluation: '
                '{} images, and without each query\'s own-camera images of its '
                'identity {} to {} remain, so the CMC curves (50 long at most) '
                'differ in length and torchreid cannot average them; give it '
                'more gallery images (at least 50 beyond the own-camera '
                'images of any identity; docs/OWN_DATA.md)'.format(
                    name, len(gallery), min(lengths), max(lengths)))
        length = lengths.pop() if lengths else longest
        if max(cfg.test.ranks) > length:
            fail('test.ranks', list(cfg.test.ranks), 'ranks up to {}: the '
                 'gallery of {!r} gives a CMC curve of {} (torchreid would '
                 'fail printing the results); e.g. test.ranks "[{}]"'.format(
                     length, name, length, ', '.join(
                         str(r) for r in cfg.test.ranks if r <= length) or 1))
