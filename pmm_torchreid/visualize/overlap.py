"""How much the stages overlap: top-K mask IoU and Grad-CAM cosine between
stages, their summaries, and what chance would give.  PMM's claim is that the
stages attend to different, complementary regions, so the overlap should be
low."""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pmm_torchreid.visualize.drawing import stage_name

__all__ = ['mask_iou', 'cam_cosine', 'pairwise', 'stage_overlap',
           'summarize_overlap', 'chance_iou']

# --------------------------------------------------------------------------
# overlap between stages
# --------------------------------------------------------------------------
def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample IoU of two sets of selected regions.

    Args:
        a, b (Tensor): N x ... of 0/1 or bool, 1 where selected (for
            :func:`~pmm_torchreid.models.guidance.block_mask` output, pass
            ``mask == 0``: its top-K blocks are the 0s).

    Returns:
        Tensor: N values in [0, 1]; 1 for identical selections (two empty
        selections included), 0 for disjoint ones.
    """
    a = a.bool().flatten(1)
    b = b.bool().flatten(1)
    inter = (a & b).sum(1).float()
    union = (a | b).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1),
                       torch.ones_like(union))


def cam_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity of two CAMs (N x h x w); 0 if one is all
    zero.  CAMs are non-negative, so the value is in [0, 1]."""
    return F.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(),
                               dim=1, eps=1e-12)


def pairwise(items: Sequence[torch.Tensor], fn) -> 'OrderedDict[str, torch.Tensor]':
    """``fn`` on every pair of stages: ``{'I-II': ..., 'I-III': ..., ...}``."""
    out = OrderedDict()
    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            key = '{}-{}'.format(stage_name(i + 1), stage_name(j + 1))
            out[key] = fn(items[i], items[j])
    return out


def stage_overlap(cams: Sequence[torch.Tensor],
                  masks: Sequence[torch.Tensor]) -> Dict[str, 'OrderedDict']:
    """Per-sample pairwise overlaps: ``{'mask_iou': {pair: N}, 'cam_cosine':
    {pair: N}}`` for the top-K masks (0 = selected) and the CAMs.

    A pair in which one stage's CAM is all zero (no positive evidence, so
    its "top-K blocks" are only the tie-break) gets NaN, and
    :func:`summarize_overlap` leaves it out.
    """
    alive = [c.flatten(1).max(1).values > 0 for c in cams]

    def masked(fn, items):
        out = pairwise(list(items), fn)
        valid = pairwise(alive, lambda a, b: a & b)
        for pair in out:
            out[pair] = torch.where(valid[pair], out[pair].float(),
                                    torch.full_like(out[pair].float(),
                                                    float('nan')))
        return out

    return {
        'mask_iou': masked(mask_iou, [m == 0 for m in masks]),
        'cam_cosine': masked(cam_cosine, cams),
    }


def summarize_overlap(per_sample: Dict[str, 'OrderedDict']) -> Dict:
    """Means over samples of :func:`stage_overlap` (lists of batches allowed),
    NaNs left out, plus ``'mean'``: the mean over the stage pairs."""
    out = {}
    for metric, pairs in per_sample.items():
        means = OrderedDict()
        for pair, values in pairs.items():
            if isinstance(values, (list, tuple)):
                values = torch.cat([v.flatten().cpu() for v in values])
            values = values.float()
            values = values[~torch.isnan(values)]
            means[pair] = float(values.mean()) if values.numel() else \
                float('nan')
        if means:
            means['mean'] = float(np.mean(list(means.values())))
        out[metric] = means
    return out


def chance_iou(blocks: int, k: int) -> float:
    """Expected IoU of two independent uniformly random sets of ``k`` out of
    ``blocks`` blocks (the hypergeometric law of their intersection)."""
    if k == 0:
        return 1.0
    total = 0.0
    for j in range(max(0, 2 * k - blocks), k + 1):
        p = math.comb(k, j) * math.comb(blocks - k, k - j) / math.comb(blocks, k)
        total += p * j / (2 * k - j)
    return total


