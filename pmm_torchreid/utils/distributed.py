"""Training on several processes: ``torchrun`` and DistributedDataParallel.

``torchrun --nproc_per_node=N scripts/main.py --config-file CONFIG`` starts N
processes (ranks); :func:`pmm_torchreid.launch.main` recognises them by
torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``; see
:func:`launch_info`) and trains one model with
``torch.nn.parallel.DistributedDataParallel`` (NCCL on GPUs, one GPU per
local rank; gloo on the CPU).  Without those variables, or with one process,
nothing here is used and a run is exactly the single-process run.

What a distributed run does differently:

- **Batches.** ``train.batch_size`` is the *global* batch, split evenly:
  every rank trains on ``batch_size / world_size`` images, whole identities
  of ``sampler.num_instances`` images each
  (:class:`DistributedIdentitySampler`; torchreid's ``RandomSampler``
  becomes torch's ``DistributedSampler``).  The
  ranks' identities are disjoint in every step, every rank runs the same
  number of steps, and the draw is seeded by ``train.seed`` and the epoch.
  A config means the same optimisation whatever the number of processes, so
  the learning rate needs no change.
- **Mixing and mining** (PMM's partners, the batch-hard triplet) happen
  within each rank's share of the batch, as within each replica's share
  under ``nn.DataParallel``; gradients are averaged over the ranks.
- **Random numbers.** Rank ``r`` seeds Python, NumPy, torch and the partner
  generator with ``train.seed + r`` (:func:`rank_seed`), so the ranks'
  augmentations and partners differ; every rank's states are saved in the
  checkpoints (rank 0 gathers them), so a resumed run continues exactly.
- **Files.** Only rank 0 writes: the log, TensorBoard, checkpoints,
  ``curves.csv``, pictures and ``results.json``.  Rank 0 alone evaluates,
  with the plain network, so the numbers are a single process's; the others
  wait for it (up to ``test.dist_eval_timeout`` seconds).
- **Failures.** A non-finite loss on any rank stops every rank at the same
  step, naming the rank (:func:`stop_if_any_failed`).  A rank that dies or
  hangs makes the others stop within ``train.dist_timeout`` seconds (at once
  when the dead rank's connections close) with :class:`LostRankError`.

Examples::

    torchrun --nproc_per_node=4 scripts/main.py \\
        --config-file configs/pmm_market1501.yaml --root reid-data
"""
from __future__ import annotations

import datetime
import os
import warnings
from typing import Any, Iterator, List, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Sampler

from pmm_torchreid.utils.errors import fail

__all__ = [
    'LaunchInfo', 'LostRankError', 'launch_info', 'per_rank_batch',
    'check_world_config', 'init', 'finish', 'is_active', 'rank', 'world_size',
    'is_main', 'rank_seed', 'DistributedIdentitySampler',
    'use_distributed_train_loader', 'with_sync_bn', 'wrap_model',
    'stop_if_any_failed', 'gather_objects', 'wait_for_main',
    'broadcast_buffers', 'average', 'is_comm_error', 'lost_contact_error'
]

#: torchrun's variables that make a run distributed
ENV_KEYS = ('WORLD_SIZE', 'RANK', 'LOCAL_RANK')


class LaunchInfo(NamedTuple):
    """Where this process stands in a torchrun launch."""
    world_size: int
    rank: int
    local_rank: int


class LostRankError(RuntimeError):
    """This rank stopped because another one died, was killed or hangs."""


# the state of this process's distributed run (empty: a plain run)
_STATE = {}


def launch_info(environ=None) -> Optional[LaunchInfo]:
    """The launch from torchrun's environment variables, or None for a plain
    run (none of them set, or ``WORLD_SIZE`` 1: one process is a plain run).

    Raises:
        ValueError: some of the variables are set and others are missing, or
            they are not numbers that fit (naming them).

    Examples::

        >>> launch_info({'WORLD_SIZE': '2', 'RANK': '1', 'LOCAL_RANK': '1'})
        LaunchInfo(world_size=2, rank=1, local_rank=1)
        >>> launch_info({}) is None
        True
    """
    environ = os.environ if environ is None else environ
    present = [key for key in ENV_KEYS if key in environ]
    if not present:
        return None
    if len(present) < len(ENV_KEYS):
        raise ValueError(
            'environment: {} set but {} missing; a distributed run needs all '
            'of {} (torchrun sets them), a plain run none'.format(
                present, [k for k in ENV_KEYS if k not in present],
                list(ENV_KEYS)))
    try:
        info = LaunchInfo(*(int(environ[key]) for key in ENV_KEYS))
    except ValueError:
        raise ValueError(
            'environment: {} must be whole numbers, got {}'.format(
                list(ENV_KEYS), {k: environ[k] for k in ENV_KEYS})) from None
    if info.world_size < 1 or not 0 <= info.rank < info.world_size or \
            info.local_rank < 0:
        raise ValueError(
            'environment: WORLD_SIZE = {}, RANK = {}, LOCAL_RANK = {}: '
            'expected WORLD_SIZE >= 1, 0 <= RANK < WORLD_SIZE and LOCAL_RANK '
            '>= 0'.format(*info))
    return info if info.world_size > 1 else None


def per_rank_batch(batch_size: int, world: int) -> int:
    """Images per rank and step for the global ``train.batch_size``."""
    return batch_size // world


def check_world_config(cfg, world: int) -> None:
    """Checks what a run on ``world`` processes needs of the config: a global
    batch that splits evenly, a per-rank batch of whole identities (at least
    two for PMM and the triplet loss), a sampler that has a distributed
    version, and SyncBatchNorm only on GPUs.

    Raises:
        ValueError: naming the key, the value and what was expected.
    """
    n, k = cfg.train.batch_size, cfg.sampler.num_instances
    if n % world:
        fail('train.batch_size', n, 'a multiple of the {} processes: it is '
             'the global batch, split evenly between the ranks (e.g. '
             '{})'.format(
                 world, world * max(1, n // world)))
    per_rank = per_rank_batch(n, world)
    sampler = cfg.sampler.train_sampler
    if sampler == 'RandomIdentitySampler':
        ids = 2 if cfg.loss.name in ('pmm', 'triplet') else 1
        if per_rank % k or per_rank // k < ids:
            fail('train.batch_size / sampler.num_instances', (n, k),
                 'a global batch whose share on each of the {} processes ({} '
                 'images) holds whole identities of num_instances images, at '
                 'least {} of them (e.g. train.batch_size {})'.format(
                     world, per_rank, ids, world * ids * k))
    elif sampler != 'RandomSampler':
        fail('sampler.train_sampler', sampler, "'RandomIdentitySampler' or "
             "'RandomSampler' in a distributed run (they have distributed "
             'versions)')
    if cfg.train.sync_bn and not (cfg.use_gpu and torch.cuda.is_available()):
        fail('train.sync_bn', True, 'False on the CPU: torch has no CPU '
             'SyncBatchNorm (each rank normalises with its own share)')


def __getattr__(name: str):
    # 0.2.0 called check_world_config check_config, like the config check
    # (pmm_torchreid.config.check_config); the old name still works, warned
    if name == 'check_config':
        warnings.warn('pmm_torchreid.utils.distributed.check_config is now '
                      'check_world_config (pmm_torchreid 0.3)',
                      DeprecationWarning, stacklevel=2)
        return check_world_config
    raise AttributeError('module {!r} has no attribute {!r}'.format(
        __name__, name))


def init(cfg, info: LaunchInfo) -> None:
    """Joins the process group (``env://``, as torchrun sets it up): NCCL with
    one GPU per local rank when ``cfg.use_gpu``, gloo on the CPU; collectives
    wait ``train.dist_timeout`` seconds.  A second gloo group, whose waits
    last ``test.dist_eval_timeout`` seconds, carries the waits for rank 0's
    evaluation and the small CPU exchanges.

    Raises:
        ValueError: ``LOCAL_RANK`` names no GPU of this machine.
    """
    use_gpu = bool(cfg.use_gpu) and torch.cuda.is_available()
    if use_gpu:
        count = torch.cuda.device_count()
        if info.local_rank >= count:
            raise ValueError(
                'environment: LOCAL_RANK = {} but this machine has {} GPU(s); '
                'start at most {} processes per node (torchrun '
                '--nproc_per_node)'.format(info.local_rank, count, count))
        torch.cuda.set_device(info.local_rank)
    backend = 'nccl' if use_gpu else 'gloo'
    timeout = datetime.timedelta(seconds=float(cfg.train.dist_timeout))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout,
                                world_size=info.world_size, rank=info.rank)
    wait_group = dist.new_group(backend='gloo', timeout=datetime.timedelta(
        seconds=float(cfg.test.dist_eval_timeout)))
    _STATE.clear()
    _STATE.update(
        info=info, backend=backend, wait_group=wait_group,
        device=torch.device('cuda', info.local_rank) if use_gpu else
        torch.device('cpu'),
        timeout=float(cfg.train.dist_timeout),
        eval_timeout=float(cfg.test.dist_eval_timeout))


def finish() -> None:
    """Leaves the process group after a run that ended well."""
    if _STATE and dist.is_initialized():
        dist.destroy_process_group()
    _STATE.clear()


def is_active() -> bool:
    """Whether this process is one rank of a distributed run."""
    return bool(_STATE)


def rank() -> int:
    """This process's rank (0 in a plain run)."""
    return _STATE['info'].rank if _STATE else 0


def world_size() -> int:
    """The number of processes (1 in a plain run)."""
    return _STATE['info'].world_size if _STATE else 1


def is_main() -> bool:
    """Whether this process writes the run's files (rank 0, or a plain run)."""
    return rank() == 0


def rank_seed(seed: int) -> int:
    """The seed of this rank's random numbers: ``seed + rank`` (``seed`` in a
    plain run and on rank 0)."""
    return int(seed) + rank()


def _where() -> str:
    return 'rank {} of {}'.format(rank(), world_size())


# --------------------------------------------------------------------------
# the training batches
# --------------------------------------------------------------------------
class DistributedIdentitySampler(Sampler):
    """Batches of whole identities for every rank: in each step the ranks
    train on disjoint identities, ``num_instances`` images each.

    A batch sampler (``DataLoader(batch_sampler=...)``): it yields this
    rank's list of dataset indices per step.  The plan of an epoch is drawn
    from ``seed`` and the epoch alone (its own generator; the global ones are
    not touched), so every rank computes the same plan without talking to the
    others.  As torchreid's ``RandomIdentitySampler`` does, an identity's
    images are shuffled and cut into chunks of ``num_instances`` (an identity
    with fewer images is filled up by drawing with replacement, a remainder
    is left out); each step then draws ``world_size x ids_per_rank`` distinct
    identities among those with chunks left, one chunk each, and rank ``r``
    gets the ``r``-th group of ``ids_per_rank``.  The epoch ends when too few
    identities are left, at the same step on every rank.

    Args:
        data_source (list): ``(path, pid, camid, ...)`` items (torchreid's
            ``dataset.train``).
        batch_size (int): the global batch (all ranks together).
        num_instances (int): images per identity in a batch.
        num_replicas (int): number of ranks.
        rank (int): this rank.
        seed (int, optional): seed of the draw (``train.seed``). Default is 1.

    Raises:
        ValueError: the batch does not split into whole identities per rank,
            or the data hold fewer identities than one step needs.

    Examples::

        >>> sampler = DistributedIdentitySampler(dataset.train, 64, 4,
        ...                                      num_replicas=2, rank=0)
        >>> sampler.set_epoch(3)      # the engine calls it every epoch
        >>> batches = list(sampler)   # 32 indices (8 identities) per step
    """

    def __init__(self, data_source: Sequence, batch_size: int,
                 num_instances: int, num_replicas: int, rank: int,
                 seed: int = 1):
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError('DistributedIdentitySampler: rank {} of {} '
                             'replicas does not exist'.format(rank,
                                                              num_replicas))
        per_rank = batch_size // num_replicas
        if num_instances < 1 or batch_size % num_replicas or \
                per_rank % num_instances or per_rank < num_instances:
            raise ValueError(
                'DistributedIdentitySampler: a global batch of {} over {} '
                'ranks gives {} images per rank, which is not a positive '
                'multiple of num_instances = {}'.format(
                    batch_size, num_replicas, batch_size / num_replicas,
                    num_instances))
        self.num_instances = int(num_instances)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.seed = int(seed)
        self.ids_per_rank = per_rank // self.num_instances
        self.ids_per_step = self.ids_per_rank * self.num_replicas
        index = {}
        for i, item in enumerate(data_source):
            index.setdefault(int(item[1]), []).append(i)
        self.index = {pid: index[pid] for pid in sorted(index)}
        if len(self.index) < self.ids_per_step:
            raise ValueError(
                'DistributedIdentitySampler: {} identities cannot fill one '
                'step of {} ranks x {} identities'.format(
                    len(self.index), self.num_replicas, self.ids_per_rank))
        self.epoch = 0
        self._plan = None

    def set_epoch(self, epoch: int) -> None:
        """Draws the next epoch's plan from ``seed`` and ``epoch``."""
        self.epoch = int(epoch)
        self._plan = None

    def plan(self) -> List[List[int]]:
        """The epoch's identities, step by step: ``world_size x
        ids_per_rank`` per step, rank ``r``'s from position
        ``r x ids_per_rank`` (the same on every rank)."""
        if self._plan is not None:
            return self._plan[0]
        gen = np.random.default_rng([self.seed, self.epoch])
        chunks = {}
        for pid, idxs in self.index.items():
            idxs = list(idxs)
            if len(idxs) < self.num_instances:
                idxs = gen.choice(idxs, self.num_instances).tolist()
            idxs = [idxs[j] for j in gen.permutation(len(idxs))]
            chunks[pid] = [idxs[j:j + self.num_instances] for j in range(
                0, len(idxs) - self.num_instances + 1, self.num_instances)]
        available = list(chunks)
        steps, batches = [], []
        while len(available) >= self.ids_per_step:
            picks = gen.choice(len(available), self.ids_per_step,
                               replace=False)
            chosen = [available[j] for j in picks]
            steps.append(chosen)
            batches.append([chunks[pid].pop(0) for pid in chosen])
            available = [pid for pid in available if chunks[pid]]
        self._plan = (steps, batches)
        return steps

    def __iter__(self) -> Iterator[List[int]]:
        self.plan()
        lo = self.rank * self.ids_per_rank
        for chunks in self._plan[1]:
            yield [i for chunk in chunks[lo:lo + self.ids_per_rank]
                   for i in chunk]

    def __len__(self) -> int:
        return len(self.plan())


def use_distributed_train_loader(datamanager, cfg) -> DataLoader:
    """Replaces ``datamanager.train_loader`` by this rank's loader: the same
    dataset and transforms, with :class:`DistributedIdentitySampler` (or
    torch's ``DistributedSampler`` for ``RandomSampler``) and
    ``train.batch_size / world_size`` images per step.  Call it before the
    engine is built (the engine keeps the loader)."""
    old = datamanager.train_loader
    dataset, world, me = old.dataset, world_size(), rank()
    per_rank = per_rank_batch(cfg.train.batch_size, world)
    common = dict(num_workers=cfg.data.workers, pin_memory=old.pin_memory)
    if cfg.sampler.train_sampler == 'RandomIdentitySampler':
        loader = DataLoader(dataset, batch_sampler=DistributedIdentitySampler(
            dataset.train, cfg.train.batch_size, cfg.sampler.num_instances,
            world, me, seed=cfg.train.seed), **common)
    else:
        sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=world, rank=me, shuffle=True,
            seed=cfg.train.seed, drop_last=True)
        loader = DataLoader(dataset, sampler=sampler, batch_size=per_rank,
                            drop_last=True, **common)
    datamanager.train_loader = loader
    print('=> {} processes: {} of the global batch of {} images per rank '
          '({}), {} steps per epoch'.format(
              world, per_rank, cfg.train.batch_size,
              cfg.sampler.train_sampler, len(loader)))
    return loader


def with_sync_bn(model: nn.Module) -> nn.Module:
    """``model`` with every BatchNorm layer turned into a SyncBatchNorm
    (``train.sync_bn``): in training its statistics are taken over the
    whole global batch, all ranks' shares together, instead of each rank's.
    The weights and running statistics are kept; the state_dict keys do not
    change, so the checkpoints load into the plain network.  Torch runs it
    on GPUs only.

    Examples::

        >>> net = with_sync_bn(PMM(751, backbone='resnet18',
        ...                        pretrained=False))  # doctest: +ELLIPSIS
        BatchNorm layers synchronised across the ... ranks (train.sync_bn)
        >>> any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
        False
    """
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    print('BatchNorm layers synchronised across the {} ranks '
          '(train.sync_bn)'.format(world_size()))
    return model


def wrap_model(model: nn.Module, cfg) -> nn.Module:
    """``DistributedDataParallel(model)`` on this rank's device (which the
    model must be on), after :func:`with_sync_bn` with ``train.sync_bn``.
    Rank 0's weights and buffers are copied to every rank here."""
    if cfg.train.sync_bn:
        model = with_sync_bn(model)
    device = _STATE['device']
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == 'cuda' else None,
        # layers frozen for train.fixbase_epoch take no part in the backward
        find_unused_parameters=cfg.train.fixbase_epoch > 0)


# --------------------------------------------------------------------------
# exchanges between the ranks
# --------------------------------------------------------------------------
def stop_if_any_failed(failure: Optional[BaseException]) -> None:
    """Every rank says whether its step went well (one small all-reduce); if
    any failed, every rank raises a ``FloatingPointError`` naming the failed
    ranks and their errors, so all stop at the same step and none waits for
    the others forever.  In a plain run it just raises ``failure``.

    Args:
        failure (Exception or None): this rank's error (a non-finite loss),
            or None.
    """
    if not _STATE:
        if failure is not None:
            raise failure
        return
    flag = torch.tensor([0.0 if failure is not None else 1.0],
                        device=_STATE['device'])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if float(flag.item()) == 1.0:
        return
    reports = gather_objects(None if failure is None else str(failure))
    failed = [(r, text) for r, text in enumerate(reports) if text is not None]
    first, text = failed[0]
    raise FloatingPointError('rank {} of {}: {}{} (every rank stops)'.format(
        first, world_size(), text, '; rank(s) {} failed too'.format(
            [r for r, _ in failed[1:]]) if len(failed) > 1 else '')) \
        from failure


def gather_objects(obj: Any) -> List[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank
    (``[obj]`` in a plain run).  Goes through the gloo group on the CPU."""
    if not _STATE:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj, group=_STATE['wait_group'])
    return out


def wait_for_main(what: str) -> None:
    """Every rank waits until all got here (a barrier), up to
    ``test.dist_eval_timeout`` seconds: the other ranks wait for ``what``
    rank 0 does alone (evaluation, pictures).

    Raises:
        LostRankError: a rank died, was killed or did not come in time.
    """
    if not _STATE:
        return
    try:
        dist.barrier(group=_STATE['wait_group'])
    except Exception as error:
        if not is_comm_error(error):
            raise
        raise LostRankError(
            '{} stopped while the ranks waited for {}: another rank died, '
            'was killed or took longer than test.dist_eval_timeout = {:g} s '
            '({})'.format(_where(), what, _STATE['eval_timeout'],
                          _first_line(error))) from error


def broadcast_buffers(model: nn.Module) -> None:
    """Copies rank 0's buffers (BatchNorm running statistics) to every rank,
    so that all ranks hold the same state_dict (DistributedDataParallel does
    it before each forward, not after the last one)."""
    if not _STATE:
        return
    for buf in model.buffers():
        dist.broadcast(buf, src=0)


def average(values: Sequence[float]) -> List[float]:
    """The mean over the ranks of each of ``values`` (the same length on
    every rank; the values themselves in a plain run)."""
    if not _STATE:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64)
    dist.all_reduce(tensor, group=_STATE['wait_group'])
    return (tensor / world_size()).tolist()


# --------------------------------------------------------------------------
# a rank that died or hangs
# --------------------------------------------------------------------------
_COMM_WORDS = ('gloo', 'nccl', 'connection reset', 'connection closed',
               'connection refused', 'broken pipe', 'timed out', 'timeout',
               'processgroup', 'socket')


def is_comm_error(error: BaseException) -> bool:
    """Whether ``error`` comes from talking to the other ranks (a closed
    connection, a timeout) rather than from this rank's own work."""
    if isinstance(error, LostRankError):
        return True
    kinds = tuple(getattr(dist, name) for name in ('DistError', )
                  if hasattr(dist, name))
    if kinds and isinstance(error, kinds):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        word in text for word in _COMM_WORDS)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return '{}: {}'.format(type(error).__name__,
                           text.splitlines()[0] if text else '')


def lost_contact_error(error: BaseException, engine=None) -> LostRankError:
    """The error of a rank that lost contact with another one in training,
    naming this rank, the epoch and iteration, the timeout and the last
    checkpoint."""
    if isinstance(error, LostRankError):
        return error
    where = ''
    if engine is not None:
        where = ' at epoch {}, iteration {}'.format(
            getattr(engine, 'epoch', 0) + 1,
            getattr(engine, 'batch_idx', -1) + 1)
    last = getattr(engine, 'last_checkpoint', None)
    return LostRankError(
        '{} stopped{}: it lost contact with another rank, which died, was '
        'killed or did not answer within train.dist_timeout = {:g} s; the '
        'last checkpoint is {} ({})'.format(
            _where(), where, _STATE.get('timeout', 0.0),
            '"{}"'.format(last) if last else 'none (none was saved yet)',
            _first_line(error)))
