"""Checkpoints that torchreid can read back: atomic writes, safe loads.

torchreid's engine saves rank-1 as a NumPy scalar, which ``torch.load`` refuses
under ``weights_only=True`` (the default since torch 2.6), and its
``load_checkpoint`` would unpickle arbitrary objects on older torch.  These
helpers save plain Python numbers, write through a temporary file and an atomic
rename, and always load with ``weights_only=True``.
"""
from __future__ import annotations

import os
import random
import warnings
from collections import OrderedDict
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from pmm_torchreid.utils.io import atomic_write, to_plain

__all__ = [
    'to_plain', 'atomic_write', 'save_checkpoint', 'load_checkpoint',
    'resume_from_checkpoint', 'load_pretrained_weights', 'capture_rng_state',
    'restore_rng_state', 'unwrap', 'strip_module'
]


def save_checkpoint(state: dict, fpath: str) -> str:
    """Writes ``state`` to ``fpath`` atomically (see :func:`atomic_write`).

    A process killed at any moment leaves either the old file or the new one,
    never a truncated one.
    """
    with atomic_write(fpath) as f:
        torch.save(to_plain(state), f)
    return fpath


def load_checkpoint(fpath: str, map_location: Optional[str] = 'cpu') -> dict:
    """Loads a checkpoint with ``torch.load(weights_only=True)``, to the CPU
    by default: ``load_state_dict`` copies to the parameters' devices, and
    no process (e.g. a rank of a distributed run) allocates on the GPU that
    saved the file.

    Raises:
        FileNotFoundError: naming the path.
        RuntimeError: naming the file when it needs arbitrary unpickling
            (it is refused, not executed) or is not a torch file.
    """
    if not fpath:
        raise ValueError('checkpoint path is empty')
    fpath = os.path.abspath(os.path.expanduser(fpath))
    if not os.path.isfile(fpath):
        raise FileNotFoundError('no checkpoint file at "{}"'.format(fpath))
    try:
        return torch.load(fpath, map_location=map_location, weights_only=True)
    except Exception as error:
        raise RuntimeError(
            'refused to load "{}": it is not a plain weights/checkpoint file '
            'that torch.load(weights_only=True) accepts, and arbitrary '
            'unpickling could run code from it ({}: {})'.format(
                fpath, type(error).__name__, str(error).splitlines()[0]
                if str(error) else ''
            )
        ) from error


def capture_rng_state() -> dict:
    """The states of Python's, NumPy's and torch's global generators (and
    CUDA's when it is in use), as plain values and tensors.

    torchreid's samplers draw from Python's ``random`` and NumPy, its
    augmentations from torch; DataLoader workers are seeded from torch's.
    """
    state = {
        'python': random.getstate(),
        'numpy': to_plain(np.random.get_state()),
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Sets the global generators back to :func:`capture_rng_state`'s values."""
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state(
        (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)
    )
    torch.set_rng_state(state['torch'])
    if state.get('cuda') is not None and torch.cuda.is_available():
        saved, visible = list(state['cuda']), torch.cuda.device_count()
        if len(saved) != visible:
            warnings.warn(
                'the checkpoint holds the random-number states of {} GPU(s), '
                '{} are visible: restoring those of the first {}; the resumed '
                'run is not an exact continuation'.format(
                    len(saved), visible, min(len(saved), visible)))
        for device, gpu_state in enumerate(saved[:visible]):
            torch.cuda.set_rng_state(gpu_state, device)


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside ``nn.DataParallel`` or ``DistributedDataParallel``
    (the model itself otherwise)."""
    parallel = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    return model.module if isinstance(model, parallel) else model


def strip_module(state_dict: dict) -> dict:
    """``state_dict`` with the ``module.`` prefix that ``nn.DataParallel`` and
    ``DistributedDataParallel`` add taken off its keys."""
    return OrderedDict(
        (k[len('module.'):] if k.startswith('module.') else k, v)
        for k, v in state_dict.items()
    )


_strip_module = strip_module  # the old private name


def resume_from_checkpoint(
    fpath: str, model: nn.Module, optimizer=None, scheduler=None, engine=None,
    map_location: Optional[str] = 'cpu'
) -> int:
    """Restores model, optimizer and scheduler; returns the epoch to start from.

    With ``engine`` (a :class:`pmm_torchreid.engine.records.RunRecordsMixin`
    engine), the random-number states saved with the checkpoint are restored
    too, so that the resumed run continues exactly as the uninterrupted one
    (call it last, right before ``engine.run``), and a periodic checkpoint
    (``train.checkpoint_freq``) is deleted once the run has written its next
    checkpoint in the same folder.  ``map_location`` is
    :func:`load_checkpoint`'s.
    """
    print('Loading checkpoint from "{}"'.format(fpath))
    checkpoint = load_checkpoint(fpath, map_location=map_location)
    for key in ('state_dict', 'epoch'):
        if key not in checkpoint:
            raise KeyError(
                'checkpoint "{}" has no "{}" entry; it is not a training '
                'checkpoint (use model.load_weights for weights only)'.format(
                    fpath, key
                )
            )
    unwrap(model).load_state_dict(_strip_module(checkpoint['state_dict']))
    print('Loaded model weights')
    if optimizer is not None and checkpoint.get('optimizer') is not None:
        optimizer.load_state_dict(checkpoint['optimizer'])
        print('Loaded optimizer')
    if scheduler is not None and checkpoint.get('scheduler') is not None:
        scheduler.load_state_dict(checkpoint['scheduler'])
        print('Loaded scheduler')
    if engine is not None:
        engine.restore_checkpoint_state(checkpoint)
        if checkpoint.get('periodic'):  # the run's next checkpoint replaces it
            engine.replaceable_checkpoint = fpath
    start_epoch = int(checkpoint['epoch'])
    print('Last epoch = {}'.format(start_epoch))
    if checkpoint.get('rank1') is not None:
        print('Last rank1 = {:.1%}'.format(float(checkpoint['rank1'])))
    return start_epoch


def load_pretrained_weights(model: nn.Module, weight_path: str) -> None:
    """Loads matching weights (same name and shape) like torchreid's, safely.

    Layers whose name or shape differ (e.g. a classifier for another number of
    identities) are skipped and listed.
    """
    checkpoint = load_checkpoint(weight_path)
    state = checkpoint.get('state_dict', checkpoint) \
        if isinstance(checkpoint, dict) else checkpoint
    state = _strip_module(state)
    target = unwrap(model)
    own = target.state_dict()
    matched = {k: v for k, v in state.items()
               if k in own and own[k].shape == v.shape}
    if not matched:
        raise RuntimeError(
            'no layer of "{}" matches the model (names or shapes differ)'.format(
                weight_path
            )
        )
    own.update(matched)
    target.load_state_dict(own)
    print('Loaded pretrained weights from "{}"'.format(weight_path))
    skipped = sorted(set(state) - set(matched))
    if skipped:
        print('** Skipped layers (unmatched name or size): {}'.format(skipped))
