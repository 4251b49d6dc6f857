"""What a training run leaves besides its weights, for any torchreid engine.

:class:`RunRecordsMixin` sits in front of a torchreid engine class
(:func:`with_run_records` builds the subclass; ``scripts/main.py`` uses it for
:class:`~pmm_torchreid.engine.PMMEngine` and for torchreid's own softmax and
triplet engines alike) and adds:

- **safe checkpoints**: torchreid's file names and keys, plain numbers (its
  NumPy rank-1 breaks ``torch.load(weights_only=True)``), atomic writes, and
  the random-number states, so a resumed run repeats an uninterrupted one;
- **periodic checkpoints** (``run(checkpoint_freq=N)``, ``train.checkpoint_freq``):
  after every N-th epoch that torchreid would not save after (it saves only
  after an evaluation and at the end), so that a killed run resumes near where
  it was; each replaces the one before it (:func:`periodic_checkpoint_due`);
- **results**: the latest Rank-1/mAP of every target, and the time spent in
  training epochs (``results.json`` is written from them);
- **curves**: ``<save_dir>/curves.csv``, per epoch the mean of every number
  the training step reports, the learning rate and the epoch's time, and a row
  per evaluation (:mod:`pmm_torchreid.engine.curves`);
- **pictures**: an engine with ``vis_freq > 0`` and the two hooks
  ``setup_pictures()``/``write_pictures()`` gets them every ``vis_freq``
  epochs and after the last one;
- **fast ranking**: evaluations rank with
  :func:`pmm_torchreid.metrics.evaluate_rank` (torchreid's CMC and mAP, tens
  of times faster than its Python path) instead of torchreid's own; features
  and distances stay torchreid's;
- **a stop on a non-finite loss**, naming the epoch, the iteration and the
  last good checkpoint;
- **several processes** (torchrun, :mod:`pmm_torchreid.utils.distributed`): the
  sampler's epoch is set every epoch; only rank 0 writes (TensorBoard,
  checkpoints, ``curves.csv``, pictures) and evaluates, with the plain network
  while the other ranks wait; checkpoints hold every rank's random-number
  states; a non-finite loss on any rank stops all of them; the epoch means in
  ``curves.csv`` are over all ranks, and the BatchNorm statistics are rank
  0's on every rank after each epoch.
"""
from __future__ import annotations

import inspect
import math
import os
import os.path as osp
import shutil
import time
from collections import OrderedDict
from typing import Dict

import torchreid

from pmm_torchreid.engine.curves import CurveLog, curve_columns
from pmm_torchreid.metrics.rank import evaluate_rank
from pmm_torchreid.utils import distributed
from pmm_torchreid.utils.checkpoint import (
    capture_rng_state,
    restore_rng_state,
    save_checkpoint,
    unwrap,
)
from pmm_torchreid.utils.io import atomic_write
from pmm_torchreid.utils.torchreid_internals import engine_metrics_swapped

__all__ = ['RunRecordsMixin', 'with_run_records', 'fast_ranking',
           'periodic_checkpoint_due']

#: the arguments of torchreid's ``Engine.run`` (to read ``save_dir``,
#: ``test_only``, ... however they were passed)
RUN_SIGNATURE = inspect.signature(torchreid.engine.Engine.run)


def _evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50,
                   use_metric_cuhk03=False, use_cython=True):
    # torchreid's signature (use_cython is meaningless here)
    return evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids,
                         max_rank=max_rank,
                         use_metric_cuhk03=use_metric_cuhk03)


def fast_ranking():
    """A context in which torchreid's engines rank with
    :func:`pmm_torchreid.metrics.evaluate_rank` (torchreid's engine module
    sees a view of its ``metrics`` package with that one function swapped;
    restored afterwards)."""
    return engine_metrics_swapped(_evaluate_rank)


def periodic_checkpoint_due(epoch: int, checkpoint_freq: int, max_epoch: int,
                            eval_freq: int, start_eval: int = 0) -> bool:
    """Whether a periodic checkpoint is written after ``epoch`` (1-based, the
    epochs trained so far): every ``checkpoint_freq`` epochs (0: never),
    except where torchreid's ``run`` saves anyway, after an evaluation
    (``eval_freq``, ``start_eval``) and after the last epoch.

        >>> [e for e in range(1, 11) if periodic_checkpoint_due(e, 2, 10, 4)]
        [2, 6]
    """
    if checkpoint_freq <= 0 or epoch % checkpoint_freq or epoch >= max_epoch:
        return False
    evaluated = epoch >= start_eval and eval_freq > 0 and epoch % eval_freq == 0
    return not evaluated


class _NullWriter(object):
    """Stands in for TensorBoard's writer on the ranks that write nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


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
    checkpoint_freq = 0  # periodic checkpoints every N epochs (0: none)
    # the periodic checkpoint that the next checkpoint replaces (it is
    # deleted once that one is written), also the one a run resumed from
    replaceable_checkpoint = None
    _run_args = None
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
    def run(self, *args, checkpoint_freq=None, **kwargs):
        """torchreid's ``Engine.run``, plus ``checkpoint_freq`` (default: the
        ``checkpoint_freq`` attribute, 0): a checkpoint after every that many
        epochs besides torchreid's own (:func:`periodic_checkpoint_due`)."""
        bound = RUN_SIGNATURE.bind(self, *args, **kwargs)
        bound.apply_defaults()
        if checkpoint_freq is not None:
            if isinstance(checkpoint_freq, bool) or \
                    not isinstance(checkpoint_freq, int) or checkpoint_freq < 0:
                raise ValueError('checkpoint_freq = {!r}: expected a number of '
                                 'epochs >= 0 (0: no periodic checkpoints)'
                                 .format(checkpoint_freq))
            self.checkpoint_freq = checkpoint_freq
        self._run_args = bound.arguments
        self.save_dir = bound.arguments['save_dir']
        training = not bound.arguments['test_only']
        if training and self.vis_freq > 0:
            if not hasattr(self, 'setup_pictures'):
                raise TypeError('{} has vis_freq > 0 but draws no pictures '
                                '(no setup_pictures/write_pictures)'.format(
                                    type(self).__name__))
            if distributed.is_main():
                self.setup_pictures()
        if not distributed.is_main():  # rank 0 writes TensorBoard's files
            self.writer = _NullWriter()
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
        for sampler in (getattr(self.train_loader, 'batch_sampler', None),
                        getattr(self.train_loader, 'sampler', None)):
            if hasattr(sampler, 'set_epoch'):  # distributed samplers
                sampler.set_epoch(self.epoch)
        try:
            result = super(RunRecordsMixin, self).train(*args, **kwargs)
        finally:
            sums, self._epoch_sums = self._epoch_sums, None
            self.train_seconds += time.time() - start
        n = sums.pop('_n', 0)
        if distributed.is_active():
            # the same state on every rank, and the epoch means over all
            distributed.broadcast_buffers(unwrap(self.model))
            sums = OrderedDict(zip(sums, distributed.average(
                list(sums.values()))))
        if n and hasattr(self, 'save_dir') and distributed.is_main():
            row = OrderedDict((key, value / n) for key, value in sums.items())
            row.update(kind='train', epoch=self.epoch + 1,
                       step=(self.epoch + 1) * self.num_batches, lr=float(lr),
                       seconds=round(time.time() - start, 2))
            self._curve_log(list(sums)).write(row)
        if self.vis_freq > 0 and (
                (self.epoch + 1) % self.vis_freq == 0
                or self.epoch + 1 == getattr(self, 'max_epoch', -1)):
            if distributed.is_main():
                self.write_pictures()
            distributed.wait_for_main('the training pictures')
        args = self._run_args
        if args is not None and periodic_checkpoint_due(
                self.epoch + 1, self.checkpoint_freq, args['max_epoch'],
                args['eval_freq'], args['start_eval']):
            self.save_model(self.epoch, None, args['save_dir'], periodic=True)
        return result

    def forward_backward(self, data):
        try:
            summary = super(RunRecordsMixin, self).forward_backward(data)
            loss = summary.get('loss') if isinstance(summary, dict) else None
            failure = None
            if loss is not None and not math.isfinite(float(loss)):
                failure = FloatingPointError(
                    'loss is not finite ({})'.format(loss))
            if getattr(self, 'checks_loss_on_every_rank', False):
                if failure is not None:
                    raise failure
            else:  # every rank stops when one sees a non-finite loss
                distributed.stop_if_any_failed(failure)
        except FloatingPointError as error:
            raise self.non_finite_error(str(error)) from None
        if self._epoch_sums is not None and isinstance(summary, dict):
            for key, value in summary.items():
                self._epoch_sums[key] = self._epoch_sums.get(key, 0.0) + \
                    float(value)
            self._epoch_sums['_n'] = self._epoch_sums.get('_n', 0) + 1
        return summary

    def test(self, *args, **kwargs):
        """torchreid's evaluation of every target; with several processes,
        rank 0 alone evaluates (the others wait for it and get 0.0 as
        rank-1), so the numbers are those of a single process."""
        if not distributed.is_active():
            return super(RunRecordsMixin, self).test(*args, **kwargs)
        rank1 = 0.0
        if distributed.is_main():
            rank1 = super(RunRecordsMixin, self).test(*args, **kwargs)
        distributed.wait_for_main('the evaluation on rank 0')
        return rank1

    def extract_features(self, input):
        if distributed.is_active():  # the plain network: rank 0 runs alone
            return unwrap(self.model)(input)
        return super(RunRecordsMixin, self).extract_features(input)

    def two_stepped_transfer_learning(self, epoch, fixbase_epoch, open_layers,
                                      model=None):
        # torchreid looks the open layers up on the network itself, which it
        # finds inside nn.DataParallel but not inside DistributedDataParallel
        return super(RunRecordsMixin, self).two_stepped_transfer_learning(
            epoch, fixbase_epoch, open_layers,
            unwrap(self.model) if model is None else model)

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
            self._curves = CurveLog(osp.join(self.save_dir, 'curves.csv'),
                                    curve_columns(keys))
        return self._curves

    # ------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------
    def save_model(self, epoch, rank1, save_dir, is_best=False, periodic=False):
        """Writes ``<save_dir>/<name>/model.pth.tar-<epoch + 1>`` (the
        network's own keys, without a ``module.`` prefix).  With several
        processes every rank calls it (the random-number states of all are
        gathered) and rank 0 writes.

        ``rank1`` None (a checkpoint without an evaluation) leaves out the
        ``rank1`` entry.  A ``periodic`` checkpoint has ``'periodic': True``
        and is deleted when the next checkpoint of the run (in the same
        folder) has been written."""
        extra = self.extra_checkpoint_state()
        for name in self.get_model_names():
            fpath = osp.join(
                save_dir, name, 'model.pth.tar-{}'.format(int(epoch) + 1)
            )
            if not distributed.is_main():  # rank 0 writes it
                self.last_checkpoint = fpath
                continue
            scheduler = self._scheds[name]
            state = {
                'state_dict': unwrap(self._models[name]).state_dict(),
                'epoch': int(epoch) + 1,
                'optimizer': self._optims[name].state_dict(),
                'scheduler': scheduler.state_dict()
                if scheduler is not None else None,
            }
            if rank1 is not None:
                state['rank1'] = float(rank1)
            if periodic:
                state['periodic'] = True
            state.update(extra)
            save_checkpoint(state, fpath)
            self.last_checkpoint = fpath
            print('{} saved to "{}"'.format(
                'Periodic checkpoint' if periodic else 'Checkpoint', fpath))
            self._replace_periodic(fpath, periodic)
            if is_best:
                best = osp.join(save_dir, name, 'model-best.pth.tar')
                with open(fpath, 'rb') as src, atomic_write(best) as dst:
                    shutil.copyfileobj(src, dst)

    def _replace_periodic(self, fpath: str, periodic: bool) -> None:
        """Deletes the periodic checkpoint that ``fpath`` (just written)
        replaces: the run's previous one, in the same folder."""
        old = self.replaceable_checkpoint
        if old and osp.abspath(old) != osp.abspath(fpath) and \
                osp.dirname(osp.abspath(old)) == osp.dirname(osp.abspath(fpath)):
            try:
                os.remove(old)
            except FileNotFoundError:
                pass
        self.replaceable_checkpoint = fpath if periodic else None

    def extra_checkpoint_state(self) -> Dict:
        """More checkpoint entries (plain values or tensors): the random-number
        states, plus the engine's own (its ``extra_checkpoint_state``).

        With several processes every rank must call it: the entries are rank
        0's, and ``'rank_states'`` holds every rank's (in rank order, gathered
        here) with ``'world_size'``."""
        state = {'rng_state': capture_rng_state()}
        own = getattr(super(RunRecordsMixin, self), 'extra_checkpoint_state',
                      None)
        if own is not None:
            state.update(own())
        if distributed.is_active():
            ranks = distributed.gather_objects(state)
            state = dict(ranks[0], rank_states=ranks, world_size=len(ranks))
        return state

    def restore_checkpoint_state(self, checkpoint: Dict) -> None:
        """Restores what :meth:`extra_checkpoint_state` saved (if present):
        with several processes, each rank its own states."""
        checkpoint = self._own_rank_states(checkpoint)
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

    @staticmethod
    def _own_rank_states(checkpoint: Dict) -> Dict:
        """The checkpoint with this rank's random-number states in place of
        rank 0's, when it was saved by as many processes as run now."""
        ranks = checkpoint.get('rank_states')
        world, rank = distributed.world_size(), distributed.rank()
        if ranks is not None and len(ranks) == world:
            if world > 1:
                print('Restoring the random-number states of each of the {} '
                      'ranks'.format(world))
            return dict(checkpoint, **ranks[rank])
        saved = len(ranks) if ranks is not None else 1
        if saved == world:
            return checkpoint
        print('** The checkpoint was saved by {} process(es) and is resumed '
              'by {}: rank 0 gets the saved random-number states of rank 0, '
              'other ranks keep fresh ones, so the resumed run will not repeat '
              'an uninterrupted one exactly'.format(saved, world))
        if rank == 0:
            return checkpoint
        return {key: value for key, value in checkpoint.items()
                if key not in ('rng_state', 'pmm_generator', 'grad_scaler')}

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
