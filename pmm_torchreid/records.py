"""What a training run leaves besides its weights, for any torchreid engine.

:class:`RunRecordsMixin` sits in front of a torchreid engine class
(:func:`with_run_records` builds the subclass; ``scripts/main.py`` uses it for
:class:`~pmm_torchreid.engine.PMMEngine` and for torchreid's own softmax and
triplet engines alike) and adds:

- **safe checkpoints**: torchreid's file names and keys, plain numbers (its
  NumPy rank-1 breaks ``torch.load(weights_only=True)``), atomic writes, and
  the random-number states, so a resumed run repeats an uninterrupted one;
- **results**: the latest Rank-1/mAP of every target, and the time spent in
  training epochs (``results.json`` is written from them);
- **curves**: ``<save_dir>/curves.csv``, per epoch the mean of every number
  the training step reports, the learning rate and the epoch's time, and a row
  per evaluation (:mod:`pmm_torchreid.curves`);
- **pictures**: an engine with ``vis_freq > 0`` and the two hooks
  ``setup_pictures()``/``write_pictures()`` gets them every ``vis_freq``
  epochs and after the last one;
- **fast ranking**: evaluations rank with
  :func:`pmm_torchreid.metrics.evaluate_rank` (torchreid's CMC and mAP, tens
  of times faster than its Python path) instead of torchreid's own; features
  and distances stay torchreid's;
- **a stop on a non-finite loss**, naming the epoch, the iteration and the
  last good checkpoint.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import os.path as osp
import shutil
import sys
import time
from collections import OrderedDict
from typing import Dict, Iterator

import torchreid

from .checkpoint import (atomic_write, capture_rng_state, restore_rng_state,
                         save_checkpoint)

__all__ = ['RunRecordsMixin', 'with_run_records', 'fast_ranking']


class _MetricsWithFastRanking(object):
    """torchreid's ``metrics`` package with :func:`evaluate_rank` swapped."""

    def __init__(self, metrics):
        self._metrics = metrics

    def __getattr__(self, name):
        if name == 'evaluate_rank':
            return _evaluate_rank
        return getattr(self._metrics, name)


def _evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50,
                   use_metric_cuhk03=False, use_cython=True):
    # torchreid's signature (use_cython is meaningless here)
    from .metrics import evaluate_rank
    return evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids,
                         max_rank=max_rank,
                         use_metric_cuhk03=use_metric_cuhk03)


@contextlib.contextmanager
def fast_ranking() -> Iterator[None]:
    """Within the block, torchreid's engines rank with
    :func:`pmm_torchreid.metrics.evaluate_rank`.  Only the name ``metrics``
    in torchreid's engine module is replaced (by a view of the same package),
    so nothing else of torchreid changes, and it is restored afterwards."""
    module = sys.modules[torchreid.engine.Engine.__module__]
    original = module.metrics
    module.metrics = _MetricsWithFastRanking(original)
    try:
        yield
    finally:
        module.metrics = original


class RunRecordsMixin(object):
    """Run records for a torchreid engine (see the module docstring).

    Hooks an engine class may define: ``extra_checkpoint_state()`` and
    ``restore_checkpoint_state(checkpoint)`` for its own state (they are
    chained with the random-number states here), ``setup_pictures()`` and
    ``write_pictures()`` with a ``vis_freq`` attribute.

    Examples::

        Engine = with_run_records(torchreid.engine.ImageTripletEngine)
        engine = Engine(datamanager, model, optimizer=optimizer)
        engine.run(save_dir='log/osnet', max_epoch=60)
        engine.results   # {'market1501': {'epoch': 60, 'rank1': .., 'mAP': ..}}
    """

    last_checkpoint = None  # path of the newest checkpoint this run wrote
    train_seconds = 0.0  # time spent in training epochs (not evaluation)
    vis_freq = 0
    _curves = None
    _epoch_sums = None

    @property
    def results(self) -> Dict:
        """``{dataset: {'epoch', 'rank1', 'mAP'}}`` (percent) of the latest
        evaluation of each target dataset."""
        if '_results' not in self.__dict__:
            self._results = OrderedDict()
        return self._results

    # ------------------------------------------------------------------
    # the run, its epochs and steps
    # ------------------------------------------------------------------
    def run(self, *args, **kwargs):
        bound = inspect.signature(torchreid.engine.Engine.run).bind(
            self, *args, **kwargs)
        bound.apply_defaults()
        self.save_dir = bound.arguments['save_dir']
        training = not bound.arguments['test_only']
        if training and self.vis_freq > 0:
            if not hasattr(self, 'setup_pictures'):
                raise TypeError('{} has vis_freq > 0 but draws no pictures '
                                '(no setup_pictures/write_pictures)'.format(
                                    type(self).__name__))
            self.setup_pictures()
        try:
            return super(RunRecordsMixin, self).run(*args, **kwargs)
        finally:
            if self._curves is not None:
                self._curves.close()
                self._curves = None

    def train(self, *args, **kwargs):
        lr = self.get_current_lr()
        start = time.time()
        self._epoch_sums = {}
        try:
            result = super(RunRecordsMixin, self).train(*args, **kwargs)
        finally:
            sums, self._epoch_sums = self._epoch_sums, None
            self.train_seconds += time.time() - start
        n = sums.pop('_n', 0)
        if n and hasattr(self, 'save_dir'):
            row = OrderedDict((key, value / n) for key, value in sums.items())
            row.update(kind='train', epoch=self.epoch + 1,
                       step=(self.epoch + 1) * self.num_batches, lr=float(lr),
                       seconds=round(time.time() - start, 2))
            self._curve_log(list(sums)).write(row)
        if self.vis_freq > 0 and (
                (self.epoch + 1) % self.vis_freq == 0
                or self.epoch + 1 == getattr(self, 'max_epoch', -1)):
            self.write_pictures()
        return result

    def forward_backward(self, data):
        try:
            summary = super(RunRecordsMixin, self).forward_backward(data)
        except FloatingPointError as error:
            raise self.non_finite_error(str(error)) from None
        loss = summary.get('loss') if isinstance(summary, dict) else None
        if loss is not None and not math.isfinite(float(loss)):
            raise self.non_finite_error('loss is not finite ({})'.format(loss))
        if self._epoch_sums is not None and isinstance(summary, dict):
            for key, value in summary.items():
                self._epoch_sums[key] = self._epoch_sums.get(key, 0.0) + \
                    float(value)
            self._epoch_sums['_n'] = self._epoch_sums.get('_n', 0) + 1
        return summary

    def _evaluate(self, *args, **kwargs):
        with fast_ranking():
            rank1, mAP = super(RunRecordsMixin, self)._evaluate(*args,
                                                                **kwargs)
        name = kwargs.get('dataset_name', args[0] if args else '')
        epoch = int(getattr(self, 'epoch', 0)) + 1
        self.results[name] = OrderedDict(
            epoch=epoch, rank1=float(rank1) * 100, mAP=float(mAP) * 100)
        if self._curves is not None:
            self._curves.write({'kind': 'test', 'epoch': epoch,
                                'dataset': name, 'mAP': float(mAP) * 100,
                                'rank1': float(rank1) * 100})
        return rank1, mAP

    def _curve_log(self, keys):
        """The open ``curves.csv``; its columns are the step's numbers."""
        if self._curves is None:
            from .curves import CurveLog, curve_columns
            self._curves = CurveLog(osp.join(self.save_dir, 'curves.csv'),
                                    curve_columns(keys))
        return self._curves

    # ------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------
    def save_model(self, epoch, rank1, save_dir, is_best=False):
        for name in self.get_model_names():
            scheduler = self._scheds[name]
            state = {
                'state_dict': self._models[name].state_dict(),
                'epoch': int(epoch) + 1,
                'rank1': float(rank1),
                'optimizer': self._optims[name].state_dict(),
                'scheduler': scheduler.state_dict()
                if scheduler is not None else None,
            }
            state.update(self.extra_checkpoint_state())
            fpath = osp.join(
                save_dir, name, 'model.pth.tar-{}'.format(int(epoch) + 1)
            )
            save_checkpoint(state, fpath)
            self.last_checkpoint = fpath
            print('Checkpoint saved to "{}"'.format(fpath))
            if is_best:
                best = osp.join(save_dir, name, 'model-best.pth.tar')
                with open(fpath, 'rb') as src, atomic_write(best) as dst:
                    shutil.copyfileobj(src, dst)

    def extra_checkpoint_state(self) -> Dict:
        """More checkpoint entries (plain values or tensors): the random-number
        states, plus the engine's own (its ``extra_checkpoint_state``)."""
        state = {'rng_state': capture_rng_state()}
        own = getattr(super(RunRecordsMixin, self), 'extra_checkpoint_state',
                      None)
        if own is not None:
            state.update(own())
        return state

    def restore_checkpoint_state(self, checkpoint: Dict) -> None:
        """Restores what :meth:`extra_checkpoint_state` saved (if present)."""
        if checkpoint.get('rng_state') is not None:
            restore_rng_state(checkpoint['rng_state'])
            print('Restored the random-number states')
        else:
            print('** The checkpoint holds no random-number states: the '
                  'resumed run will not repeat an uninterrupted one exactly')
        own = getattr(super(RunRecordsMixin, self), 'restore_checkpoint_state',
                      None)
        if own is not None:
            own(checkpoint)

    def non_finite_error(self, what: str) -> FloatingPointError:
        """The error that stops a run whose loss is not finite."""
        return FloatingPointError(
            '{}; training stopped, the last good checkpoint is {}'.format(
                what, '"{}"'.format(self.last_checkpoint)
                if self.last_checkpoint
                else 'none (none was saved in this run yet)'
            )
        )


def with_run_records(engine_cls):
    """A subclass of a torchreid engine class with :class:`RunRecordsMixin`.

    Examples::

        >>> Engine = with_run_records(torchreid.engine.ImageSoftmaxEngine)
        >>> Engine.__name__
        'RecordedImageSoftmaxEngine'
    """
    if issubclass(engine_cls, RunRecordsMixin):
        return engine_cls
    return type('Recorded' + engine_cls.__name__,
                (RunRecordsMixin, engine_cls), {})
