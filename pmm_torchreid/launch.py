"""Building a run from a config, as torchreid's ``scripts/main.py`` does:
the command-line parser, the config merge, the model, the engine, and the
``results.json`` record a finished training run leaves.

``scripts/main.py`` is a thin launcher around :func:`main`; the other scripts
(``visualize_gradcam.py``, ``export.py``, ``ablation.py``) and user code reach
the same builders here.

Examples::

    from pmm_torchreid import launch
    cfg = launch.setup_config(launch.build_parser().parse_args(
        ['--config-file', 'configs/pmm_demo.yaml']))
    model = launch.build_model(cfg, num_classes=100)
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import os
import os.path as osp
import sys
import time
from typing import Dict, Optional

import torch
import torch.nn as nn
import torchreid

from pmm_torchreid import config as C
from pmm_torchreid.config import checks
from pmm_torchreid.data.datamanager import build_datamanager
from pmm_torchreid.engine.comparison import RecordedComparisonEngine
from pmm_torchreid.engine.optim import build_lr_scheduler
from pmm_torchreid.engine.pmm import RecordedPMMEngine, precision_name
from pmm_torchreid.engine.records import with_run_records
from pmm_torchreid.models.descriptors import set_descriptor
from pmm_torchreid.models.factory import MODEL_FACTORY
from pmm_torchreid.utils import distributed
from pmm_torchreid.utils.checkpoint import load_pretrained_weights, resume_from_checkpoint, unwrap
from pmm_torchreid.utils.io import atomic_write

__all__ = ['build_parser', 'setup_config', 'build_model', 'build_engine',
           'main', 'write_results', 'read_results', 'import_user_module',
           'names_a_file']

#: when this module was imported; :func:`main` takes an earlier start time
STARTED = time.time()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description='Train and evaluate with torchreid, PMM included.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        '--config-file', type=str, default='', help='path to config file'
    )
    parser.add_argument(
        '-s', '--sources', type=str, nargs='+',
        help='source datasets (delimited by space)'
    )
    parser.add_argument(
        '-t', '--targets', type=str, nargs='+',
        help='target datasets (delimited by space)'
    )
    parser.add_argument(
        '--transforms', type=str, nargs='+', help='data augmentation'
    )
    parser.add_argument(
        '--root', type=str, default='', help='path to data root'
    )
    parser.add_argument(
        '-m', '--model', type=str, default='', help='model name (model.name)'
    )
    parser.add_argument(
        '--register', action='append', default=[], metavar='FILE_OR_MODULE',
        help='a Python file (my_datasets.py) or module to import before the '
        'config is checked, e.g. one that registers your own dataset with '
        'torchreid.data.register_image_dataset (docs/OWN_DATA.md); repeatable'
    )
    parser.add_argument(
        'opts', default=None, nargs=argparse.REMAINDER,
        help='modify config options using the command-line (KEY VALUE pairs)'
    )
    return parser


def adapt_mix_to_model(cfg, args: argparse.Namespace) -> None:
    """A model chosen on the command line (``-m`` or ``model.name``) that
    trains without a mixing rule (BDB, FMN, MagnifierNet) gets ``pmm.mix
    'none'`` when the config file's rule was for PMM and the command line did
    not set ``pmm.mix`` itself (then the check refuses the contradiction)."""
    opts = list(args.opts or [])
    typed = {opts[i] for i in range(0, len(opts) - 1, 2)}
    chosen = bool(args.model) or 'model.name' in typed
    if chosen and 'pmm.mix' not in typed and cfg.pmm.mix != 'none' and \
            C.takes_no_mix(cfg.model.name):
        print('{} trains without a mixing rule: pmm.mix {!r} (the config '
              'file\'s, for PMM) becomes \'none\''.format(cfg.model.name,
                                                          cfg.pmm.mix))
        cfg.pmm.mix = 'none'


def names_a_file(spec: str) -> bool:
    """A ``--register`` value that names a Python file (a path, or a name
    ending in ``.py``) rather than a module."""
    return spec.endswith('.py') or os.sep in spec or '/' in spec


def import_user_module(spec: str):
    """Imports the user's code named by ``--register``: a Python file (a
    path, or a name ending in ``.py``) or an importable module name; returns
    the module.  A file is imported once per process (under a private module
    name made from its absolute path), so a second run in the same process
    does not register its datasets twice.

    Raises:
        FileNotFoundError: the file does not exist.
        ModuleNotFoundError: no module of that name.
    """
    if names_a_file(spec):
        path = osp.abspath(osp.expanduser(spec))
        if not osp.isfile(path):
            raise FileNotFoundError(
                '--register {}: no such file ({})'.format(spec, path))
        name = '_pmm_register_{}_{}'.format(
            osp.splitext(osp.basename(path))[0],
            hashlib.sha1(path.encode()).hexdigest()[:10])
        if name in sys.modules:
            return sys.modules[name]
        module = importlib.util.module_from_spec(
            importlib.util.spec_from_file_location(name, path))
        sys.modules[name] = module
        try:
            module.__spec__.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]  # a failed file can be fixed and re-run
            raise
        return module
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as error:
        if error.name != spec.split('.')[0] and error.name != spec:
            raise  # the module exists; something it imports does not
        raise ModuleNotFoundError(
            '--register {}: no module named {!r} on sys.path; give the path '
            'of a Python file instead (e.g. --register my_datasets.py)'.format(
                spec, error.name), name=error.name) from error


def setup_config(args: argparse.Namespace):
    """--register imports -> defaults -> yaml -> flags -> KEY VALUE pairs ->
    checks -> freeze."""
    for spec in getattr(args, 'register', None) or []:
        import_user_module(spec)
    cfg = C.get_default_config()
    if args.config_file:
        C.merge_file(cfg, args.config_file)
    if args.root:
        cfg.data.root = args.root
    if args.sources:
        cfg.data.sources = args.sources
    if args.targets:
        cfg.data.targets = args.targets
    if args.transforms:
        cfg.data.transforms = args.transforms
    if args.model:
        cfg.model.name = args.model
    if args.opts:
        C.merge_list(cfg, args.opts)
    adapt_mix_to_model(cfg, args)
    checks.check_config(cfg)
    cfg.freeze()
    return cfg


def build_model(cfg, num_classes: int) -> nn.Module:
    kwargs = C.model_kwargs(cfg, num_classes)
    name = kwargs.pop('name')
    if C.uses_pmm_engine(name):
        if name not in MODEL_FACTORY:
            raise KeyError(
                'model.name = {!r} is not a plugin model; expected one of '
                '{}'.format(name, sorted(MODEL_FACTORY))
            )
        model = MODEL_FACTORY[name](**kwargs)
        set_descriptor(model, cfg.test.descriptor, name)
        return model
    set_descriptor(None, cfg.test.descriptor, name)  # 'all' only
    return torchreid.models.build_model(
        name, kwargs['num_classes'], loss=kwargs['loss'],
        pretrained=kwargs['pretrained'], use_gpu=cfg.use_gpu
    )


def check_data_parallel_amp(cfg, num_gpus: int) -> None:
    """Refuses ``train.amp`` on several GPUs in one process.

    ``nn.DataParallel`` runs each replica in a thread of its own, and a thread
    starts outside the engine's autocast. It re-enters autocast without the
    engine's dtype, which on CUDA means float16, and there is no gradient
    scaler for it. Several GPUs train with ``train.amp`` under torchrun.
    """
    if cfg.train.amp and cfg.loss.name == 'pmm' and num_gpus > 1:
        raise ValueError(
            'config train.amp = True with {n} visible GPUs in one process: '
            'nn.DataParallel would run its replicas in float16 without a '
            'gradient scaler. Start one process per GPU instead (torchrun '
            '--nproc_per_node {n} scripts/main.py ...), or use one GPU '
            '(CUDA_VISIBLE_DEVICES=0), or set train.amp False'.format(n=num_gpus))


def build_engine(cfg, datamanager, model, optimizer, scheduler,
                 seed: Optional[int] = None):
    """The engine for ``loss.name`` (with the run records); ``seed`` is the
    PMM partner generator's seed (default ``train.seed``; each rank of a
    distributed run has its own)."""
    if cfg.loss.name == 'pmm' and C.is_comparison_model(cfg.model.name):
        return RecordedComparisonEngine(
            datamanager, model, optimizer, scheduler=scheduler,
            **C.comparison_engine_kwargs(cfg)
        )
    if cfg.loss.name == 'pmm':
        kwargs = C.engine_kwargs(cfg)
        if seed is not None:
            kwargs['seed'] = int(seed)
        return RecordedPMMEngine(
            datamanager, model, optimizer, scheduler=scheduler, **kwargs
        )
    if cfg.train.amp:
        print('** train.amp has no effect with loss.name = {!r}: torchreid\'s '
              'own engines train in float32 (only loss.name \'pmm\' trains '
              'with autocast)'.format(cfg.loss.name))
    if cfg.loss.name == 'softmax':
        engine_cls = with_run_records(torchreid.engine.ImageSoftmaxEngine)
        return engine_cls(
            datamanager, model, optimizer=optimizer, scheduler=scheduler,
            use_gpu=cfg.use_gpu, label_smooth=cfg.loss.softmax.label_smooth
        )
    engine_cls = with_run_records(torchreid.engine.ImageTripletEngine)
    return engine_cls(
        datamanager, model, optimizer=optimizer, margin=cfg.loss.triplet.margin,
        weight_t=cfg.loss.triplet.weight_t, weight_x=cfg.loss.triplet.weight_x,
        scheduler=scheduler, use_gpu=cfg.use_gpu,
        label_smooth=cfg.loss.softmax.label_smooth
    )


def main(argv=None, started: Optional[float] = None):
    """Parses ``argv`` (default: ``sys.argv[1:]``) like torchreid's
    ``scripts/main.py`` and trains and/or evaluates; returns the engine.
    ``started`` is the process's start time, for the wall time in
    ``results.json`` (default: when this module was imported).

    Started by ``torchrun`` with several processes, it trains with
    DistributedDataParallel (:mod:`pmm_torchreid.utils.distributed`): rank 0 writes
    the log and every file, the others print nothing.  Under torchrun a
    failure's message is also handed to torchrun, whose summary then names
    it as the root cause."""
    if os.environ.get('TORCHELASTIC_ERROR_FILE'):  # set by torchrun
        # lazy: torch.distributed.elastic is needed only under torchrun
        from torch.distributed.elastic.multiprocessing.errors import record
        return record(_main)(argv, started)
    return _main(argv, started)


def _main(argv, started):
    args = build_parser().parse_args(argv)
    cfg = setup_config(args)
    launched = distributed.launch_info()  # torchrun with several processes
    if launched:
        distributed.check_world_config(cfg, launched.world_size)
    checks.check_paths(cfg)  # datasets and weight files exist, before any work
    if launched:
        distributed.init(cfg, launched)
    built = {}  # the engine, once there is one (where a failed run stopped)
    try:
        engine = _run(cfg, started, built)
    except Exception as error:
        if distributed.is_active() and distributed.is_comm_error(error):
            raise distributed.lost_contact_error(
                error, built.get('engine')) from error
        raise
    distributed.finish()
    return engine


def _run(cfg, started, built):
    # each rank of a distributed run draws its own numbers (train.seed + rank)
    torchreid.utils.set_random_seed(distributed.rank_seed(cfg.train.seed))

    if distributed.is_main():
        log_name = 'test.log' if cfg.test.evaluate else 'train.log'
        log_name += time.strftime('-%Y-%m-%d-%H-%M-%S')
        sys.stdout = torchreid.utils.Logger(
            osp.join(cfg.data.save_dir, log_name))
    else:  # rank 0 logs; errors still reach every rank's stderr
        sys.stdout = open(os.devnull, 'w')

    print('Show configuration\n{}\n'.format(cfg))
    if distributed.is_main():  # what only rank 0's log shows
        print('Collecting env info ...')
        print('** System info **\n{}\n'.format(
            torchreid.utils.collect_env_info()))

    if cfg.use_gpu:
        torch.backends.cudnn.benchmark = True

    datamanager = build_datamanager(**C.imagedata_kwargs(cfg))
    checks.check_ranks(cfg, datamanager.test_dataset)  # before any training
    if distributed.is_active() and not cfg.test.evaluate:
        distributed.use_distributed_train_loader(datamanager, cfg)
    if not cfg.test.evaluate and len(datamanager.train_loader) == 0:
        raise ValueError(
            'the training data give no batch: {} identities with {} images '
            'cannot fill a batch of train.batch_size = {} with '
            'sampler.num_instances = {} images per identity'.format(
                datamanager.num_train_pids,
                len(datamanager.train_loader.dataset), cfg.train.batch_size,
                cfg.sampler.num_instances
            )
        )

    print('Building model: {}'.format(cfg.model.name))
    model = build_model(cfg, datamanager.num_train_pids)
    if distributed.is_main():  # an eval-mode forward pass; no state changes
        num_params, flops = torchreid.utils.compute_model_complexity(
            model, (1, 3, cfg.data.height, cfg.data.width)
        )
        print('Model complexity: params={:,} flops={:,}'.format(num_params,
                                                              flops))

    if cfg.model.load_weights:
        load_pretrained_weights(model, cfg.model.load_weights)

    if C.channels_last(cfg):  # every engine (torchreid's too): before DDP
        print('train.channels_last: channels-last memory layout')
        model = model.to(memory_format=torch.channels_last)
    if distributed.is_active():
        if cfg.use_gpu:
            model = model.cuda()  # this rank's GPU (set by distributed.init)
        model = distributed.wrap_model(model, cfg)
    else:
        if cfg.train.sync_bn:
            print('** train.sync_bn has no effect in a single process')
        if cfg.use_gpu:
            check_data_parallel_amp(cfg, torch.cuda.device_count())
            model = nn.DataParallel(model).cuda()

    # the network itself: torchreid finds staged_lr's layers on it
    optimizer = torchreid.optim.build_optimizer(unwrap(model),
                                                **C.optimizer_kwargs(cfg))
    scheduler = build_lr_scheduler(optimizer, **C.lr_scheduler_kwargs(cfg))

    print('Building {}-engine for {}-reid'.format(cfg.loss.name, cfg.data.type))
    engine = build_engine(cfg, datamanager, model, optimizer, scheduler,
                          seed=distributed.rank_seed(cfg.train.seed))

    start_epoch = cfg.train.start_epoch
    if cfg.model.resume:  # last: it restores the random-number states
        start_epoch = resume_from_checkpoint(
            cfg.model.resume, model, optimizer=optimizer, scheduler=scheduler,
            engine=engine)
    run_kwargs = C.engine_run_kwargs(cfg)
    run_kwargs['start_epoch'] = start_epoch
    run_started = time.time()
    built['engine'] = engine
    engine.run(**run_kwargs)
    if not cfg.test.evaluate and distributed.is_main():
        write_results(cfg, engine, time.time() - run_started,
                      started or STARTED)
    return engine


def write_results(cfg, engine, run_seconds: float,
                  started: float = STARTED) -> str:
    """Writes ``<save_dir>/results.json`` (atomically) once training ended:
    the setting, the last evaluation of every target and the times (training
    epochs only; ``engine.run`` with its evaluations; the whole process).
    Its presence marks a finished run (``scripts/ablation.py`` relies on
    it)."""
    path = osp.join(cfg.data.save_dir, 'results.json')
    record = {
        'model': cfg.model.name,
        'loss': cfg.loss.name,
        'mix': cfg.pmm.mix if C.uses_pmm_engine(cfg.model.name) else None,
        'pretrained': bool(cfg.model.pretrained),
        'seed': int(cfg.train.seed),
        'split_id': int(cfg.data.split_id),
        'sources': list(cfg.data.sources),
        'max_epoch': int(cfg.train.max_epoch),
        'height': int(cfg.data.height),
        'width': int(cfg.data.width),
        'batch_size': int(cfg.train.batch_size),  # global (all ranks)
        'world_size': distributed.world_size(),
        # what the results are measured on: the test split, or identities
        # held out of the training set (data.val_ids)
        'evaluated_on': 'validation' if cfg.data.val_ids else 'test',
        'val_ids': int(cfg.data.val_ids),
        # how the steps computed (train.amp, train.channels_last)
        'precision': precision_name(getattr(engine, 'amp_dtype', None)),
        'channels_last': C.channels_last(cfg),
        # what the evaluation compared (test.descriptor)
        'descriptor': cfg.test.descriptor,
        'results': {name: dict(res) for name, res in engine.results.items()},
        'train_seconds': round(float(engine.train_seconds), 2),
        'run_seconds': round(float(run_seconds), 2),
        'wall_seconds': round(time.time() - started, 2),
        'finished': time.strftime('%Y-%m-%d %H:%M:%S'),
    }
    with atomic_write(path, 'w') as f:
        json.dump(record, f, indent=1, allow_nan=False)
    print('Results saved to "{}"'.format(path))
    return path




def read_results(save_dir: str) -> Optional[Dict]:
    """The ``results.json`` of a finished training run in ``save_dir``, or
    None if the run has not finished (the file is written last, atomically).

    Raises:
        ValueError: the file exists but is not a results record (naming it).
    """
    path = osp.join(save_dir, 'results.json')
    if not osp.isfile(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        record['results']
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError('"{}" is not a results record of scripts/main.py '
                         '({}: {})'.format(path, type(error).__name__, error))
    return record
