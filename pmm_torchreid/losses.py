"""Losses of PMM: batch-hard triplet (soft or hard margin) and label-smoothed CE."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ['batch_hard_triplet', 'smoothed_cross_entropy']


def batch_hard_triplet(
    embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.0,
    soft_margin: bool = True
) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al., 2017) on Euclidean distances.

    For each anchor, the farthest positive and the closest negative in the
    batch are used.

    Args:
        embeddings (Tensor): N x D.
        labels (Tensor): N identity labels; every anchor needs a positive and
            a negative in the batch (an identity sampler gives that).
        margin (float): margin of the hinge, used when ``soft_margin`` is
            False. Default is 0.
        soft_margin (bool): use ``softplus(d_ap - d_an)`` (the PMM/BDB
            reference default) instead of ``relu(d_ap - d_an + margin)``.
            Default is True.

    Returns:
        Tensor: scalar mean over anchors.
    """
    dist = torch.cdist(embeddings, embeddings).clamp_min(1e-12)
    same = labels.view(-1, 1) == labels.view(1, -1)
    d_ap = dist.masked_fill(~same, float('-inf')).max(dim=1).values
    d_an = dist.masked_fill(same, float('inf')).min(dim=1).values
    if soft_margin:
        return F.softplus(d_ap - d_an).mean()
    return F.relu(d_ap - d_an + margin).mean()


def smoothed_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, epsilon: float = 0.1
) -> torch.Tensor:
    """Cross-entropy with label smoothing (Szegedy et al., 2016).

    The target is ``(1 - epsilon) * one_hot + epsilon / num_classes``, as in
    torchreid's ``CrossEntropyLoss(label_smooth=True)``.
    """
    return F.cross_entropy(logits, labels, label_smoothing=epsilon)
