"""The learning-rate schedule of the PMM/BDB recipe (staircase warm-up, then steps)."""
from __future__ import annotations

from typing import Sequence

import torch
import torchreid

__all__ = ['WarmupMultiStepLR', 'build_lr_scheduler']


class WarmupMultiStepLR(torch.optim.lr_scheduler.LRScheduler):
    """Staircase warm-up followed by step decay, stepped once per epoch.

    ``epoch`` is torchreid's 0-based epoch index.  During the first
    ``warmup_epochs`` epochs the rate is ``base_lr * min(1, ((epoch +
    warmup_offset) // warmup_interval + 1) * warmup_interval /
    warmup_epochs)``; afterwards it is ``base_lr * gamma ** (number of
    milestones <= epoch)``.

    The PMM/BDB reference code sets the rate from the 1-based epoch
    ``e = epoch + 1``: ``1e-4 * (e // 5 + 1)`` while ``e < 50``, 1e-3 while
    ``e < 200``, 1e-4 while ``e < 300``, then 1e-5.  That is
    ``base_lr=1e-3, warmup_epochs=50, warmup_interval=5, warmup_offset=1,
    milestones=[199, 299], gamma=0.1`` here (the paper configs).

    Args:
        optimizer (Optimizer): wrapped optimizer.
        milestones (sequence of int): epochs (0-based) at which the rate
            drops by ``gamma``.
        gamma (float): decay factor. Default is 0.1.
        warmup_epochs (int): length of the warm-up. Default is 0 (none).
        warmup_interval (int): the warm-up raises the rate every this many
            epochs. Default is 1.
        warmup_offset (int): the staircase counts epochs from this number
            (1: the reference code's count, whose first step is one epoch
            shorter). Default is 0.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        milestones: Sequence[int],
        gamma: float = 0.1,
        warmup_epochs: int = 0,
        warmup_interval: int = 1,
        warmup_offset: int = 0,
        last_epoch: int = -1
    ):
        if warmup_epochs < 0 or warmup_interval < 1 or warmup_offset < 0:
            raise ValueError(
                'warm-up needs warmup_epochs >= 0, warmup_interval >= 1 and '
                'warmup_offset >= 0, got {}, {} and {}'.format(
                    warmup_epochs, warmup_interval, warmup_offset)
            )
        if list(milestones) != sorted(milestones):
            raise ValueError(
                'milestones must increase, got {}'.format(list(milestones))
            )
        self.milestones = [int(m) for m in milestones]
        self.gamma = float(gamma)
        self.warmup_epochs = int(warmup_epochs)
        self.warmup_interval = int(warmup_interval)
        self.warmup_offset = int(warmup_offset)
        super().__init__(optimizer, last_epoch)

    def factor(self, epoch: int) -> float:
        """The multiplier of the base rate at ``epoch`` (0-based)."""
        if epoch < self.warmup_epochs:
            steps = (epoch + self.warmup_offset) // self.warmup_interval + 1
            return min(1.0, steps * self.warmup_interval / self.warmup_epochs)
        drops = sum(1 for m in self.milestones if m <= epoch)
        return self.gamma**drops

    def get_lr(self):
        f = self.factor(self.last_epoch)
        return [base * f for base in self.base_lrs]


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    lr_scheduler: str = 'single_step',
    stepsize=1,
    gamma: float = 0.1,
    max_epoch: int = 1,
    warmup_epochs: int = 0,
    warmup_interval: int = 1,
    warmup_offset: int = 0
):
    """torchreid's ``build_lr_scheduler`` plus ``'warmup_multi_step'``."""
    if lr_scheduler == 'warmup_multi_step':
        milestones = stepsize if isinstance(stepsize, (list, tuple)) \
            else [stepsize]
        return WarmupMultiStepLR(
            optimizer, milestones, gamma=gamma, warmup_epochs=warmup_epochs,
            warmup_interval=warmup_interval, warmup_offset=warmup_offset
        )
    if warmup_epochs:
        raise ValueError(
            'train.warmup_epochs = {} needs train.lr_scheduler '
            '"warmup_multi_step", got {!r}'.format(warmup_epochs, lr_scheduler)
        )
    return torchreid.optim.build_lr_scheduler(
        optimizer, lr_scheduler=lr_scheduler, stepsize=stepsize, gamma=gamma,
        max_epoch=max_epoch
    )
