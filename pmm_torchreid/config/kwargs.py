"""Adapters from a config to the arguments of the builders (data manager,
model, optimiser, scheduler, engine, ``Engine.run``), and the block count a
PMM run mixes."""
from __future__ import annotations

from typing import Tuple

from yacs.config import CfgNode as CN

from pmm_torchreid.models.backbones import feature_map_size
from pmm_torchreid.models.factory import MODEL_FACTORY, model_backbone
from pmm_torchreid.models.families import family_of
from pmm_torchreid.models.guidance import BlockChoice, check_block_grid

__all__ = ['resolved_top_k', 'mixed_blocks', 'imagedata_kwargs', 'model_kwargs',
           'optimizer_kwargs', 'lr_scheduler_kwargs', 'engine_kwargs',
           'comparison_engine_kwargs', 'engine_run_kwargs', 'channels_last']


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
    family = family_of(cfg.model.name)
    if family is not None and family.options:
        kwargs.update(_same_names(cfg[family.options], family.option_keys))
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
    """Arguments of :func:`pmm_torchreid.engine.optim.build_lr_scheduler`."""
    return _same_names(cfg.train, 'lr_scheduler stepsize gamma max_epoch '
                       'warmup_epochs warmup_interval warmup_offset')


def engine_kwargs(cfg: CN) -> dict:
    """Arguments of :class:`pmm_torchreid.engine.PMMEngine`."""
    kwargs = _same_names(
        cfg.pmm, 'mix top_k mix_start_epoch soft_margin triplet_margin '
        'weight_triplet weight_ce label_smooth vis_freq vis_num')
    kwargs.update(use_gpu=cfg.use_gpu, seed=cfg.train.seed,
                  block_size=tuple(cfg.pmm.block_size),
                  mix_ratio=cfg.pmm.mix_ratio or None, amp=cfg.train.amp,
                  channels_last=channels_last(cfg))
    return kwargs


def channels_last(cfg: CN) -> bool:
    """Whether the run trains in the channels-last memory layout:
    ``train.channels_last`` when True or False; for ``'auto'`` on a GPU, for
    ResNet backbones (faster convolutions with tensor cores); on the CPU
    never: channels-last trains the CPU recipe 1.4-1.5x faster, but BDB lost
    validation mAP in all five seeds of the accuracy check, so it is opt-in
    (``train.channels_last True``; docs/SPEED.md)."""
    value = cfg.train.channels_last
    if value != 'auto':
        return value == 'True'
    if not cfg.use_gpu:
        return False
    name = cfg.model.name
    backbone = model_backbone(name) if name in MODEL_FACTORY else name
    return backbone.startswith('resnet')


def comparison_engine_kwargs(cfg: CN) -> dict:
    """Arguments of :class:`pmm_torchreid.engine.comparison.ComparisonEngine`:
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
                         'open_layers print_freq checkpoint_freq')
    kwargs.update(_same_names(cfg.test, 'start_eval eval_freq dist_metric '
                              'normalize_feature visrank visrank_topk '
                              'ranks rerank'))
    kwargs.update(save_dir=cfg.data.save_dir, test_only=cfg.test.evaluate,
                  use_metric_cuhk03=cfg.cuhk03.use_metric_cuhk03)
    return kwargs
