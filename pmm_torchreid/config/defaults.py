"""The default config: torchreid's keys (so its yaml files and overrides work
unchanged) plus the plugin's ``pmm.*``, ``bdb.*``, ``fmn.*`` and
``magnifiernet.*``.

Merge order (as in Dassl/detectron2): :func:`get_default_config` ->
yaml file -> command-line flags -> trailing ``KEY VALUE`` pairs
(:mod:`pmm_torchreid.config.files`) -> :func:`pmm_torchreid.config.checks.check_config`
-> freeze.  Models never see ``cfg``: the adapters of
:mod:`pmm_torchreid.config.kwargs` turn it into constructor arguments.
"""
from __future__ import annotations

import torch
from yacs.config import CfgNode as CN

from pmm_torchreid.models.guidance import DEFAULT_TOP_K

__all__ = ['get_default_config', 'add_pmm_config', 'add_comparison_config']


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
    # the plugin's networks: 'all' (every stage's embedding, concatenated) or
    # 'global' (stage I's alone; pmm_torchreid.models.descriptors)
    cfg.test.descriptor = 'all'
    cfg.test.visrank = False  # save ranked results (needs test.evaluate)
    cfg.test.visrank_topk = 10  # gallery images per ranked result
    return cfg


def add_pmm_config(cfg: CN) -> CN:
    """Adds the plugin's keys to a torchreid config (in place) and returns it."""
    cfg.pmm = CN()
    # 'hard_mix' (the paper), 'none' (no guidance; BDB models) or an ablation
    # variant: 'random_mix' (random blocks, label kept), 'cutout', 'cutmix',
    # 'a_cutmix', 'batch_drop'
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
    cfg.bdb = CN()
    # the baseline BDB's band branch: 0 (none, the paper's BDB) or 4 (the
    # fixed horizontal bands of MagnifierNet's maskless regions, pooled from
    # the backbone map, each embedded, averaged, 512-d, its own classifier)
    cfg.bdb.bands = 0
    cfg.bdb.band_dim = 256  # size of each band's feature (before the mean)

    cfg.train.warmup_epochs = 0  # staircase warm-up length ('warmup_multi_step')
    cfg.train.warmup_interval = 1  # the warm-up raises the lr every N epochs
    # the warm-up staircase counts epochs from this number (1: the reference
    # code's 1-based count, so its first step lasts interval - 1 epochs)
    cfg.train.warmup_offset = 0
    # mixed precision: bfloat16 autocast where the device has it natively (GPUs
    # of compute capability >= 8.0; CPUs with AVX512-BF16 or AMX), float16 +
    # gradient scaler on older GPUs (V100, T4), float32 on other CPUs;
    # Grad-CAMs, block choices and mixed targets stay float32
    cfg.train.amp = False
    # channels-last (NHWC) memory layout of the model and the images: True,
    # False or 'auto' (ResNets on a GPU; never on the CPU, where True trains
    # 1.4-1.5x faster but did not pass the accuracy check: docs/SPEED.md)
    cfg.train.channels_last = 'auto'
    # runs on several processes (torchrun; pmm_torchreid/distributed.py):
    # BatchNorm statistics over every rank's share (SyncBatchNorm; GPUs only)
    cfg.train.sync_bn = False
    # seconds a rank waits for the others in a collective (the gradients, a
    # step's loss check) before it stops with an error naming itself
    cfg.train.dist_timeout = 1800
    # seconds the other ranks wait while rank 0 alone evaluates (or draws the
    # training pictures) before they stop with an error
    cfg.test.dist_eval_timeout = 7200
    # a checkpoint after every N epochs besides those torchreid writes after
    # an evaluation and at the end (0: none), so that a killed run resumes
    # near where it stopped; each replaces the one before it
    cfg.train.checkpoint_freq = 0

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
    # how the fusion branch fuses the 4 region features: 'gru' (the paper's
    # gated recurrent cell) or 'mean' (their mean: no fusion parameters)
    cfg.magnifiernet.fusion = 'gru'
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
