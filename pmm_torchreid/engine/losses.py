"""Losses of PMM: batch-hard triplet (soft or hard margin) and label-smoothed
cross-entropy, also on targets mixed between two labels (CutMix variants)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    'batch_hard_triplet', 'smoothed_cross_entropy', 'mixed_targets',
    'mixed_cross_entropy'
]


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


def mixed_targets(
    labels: torch.Tensor, partner_labels: torch.Tensor,
    partner_weight: torch.Tensor, num_classes: int, epsilon: float = 0.1
) -> torch.Tensor:
    """Soft targets ``(1 - w) * y + w * y_partner``, then label-smoothed.

    Args:
        labels (Tensor): N own labels.
        partner_labels (Tensor): N labels of the pasted-in samples.
        partner_weight (Tensor): N shares ``w`` in [0, 1] of the partner label.
        num_classes (int): number of classes.
        epsilon (float): label smoothing. Default is 0.1.

    Returns:
        Tensor: N x num_classes; every row sums to 1.
    """
    w = partner_weight.to(torch.float32).view(-1, 1)
    target = torch.zeros(labels.shape[0], num_classes, device=labels.device)
    target.scatter_add_(1, labels.view(-1, 1).long(), 1.0 - w)
    target.scatter_add_(1, partner_labels.view(-1, 1).long(), w)
    return (1.0 - epsilon) * target + epsilon / num_classes


def mixed_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor,
    partner_labels: torch.Tensor, partner_weight: torch.Tensor,
    epsilon: float = 0.1
) -> torch.Tensor:
    """Label-smoothed cross-entropy on :func:`mixed_targets` (mean over N).

    With ``partner_weight`` all 0 it equals :func:`smoothed_cross_entropy`.
    """
    # in float32 whatever autocast made of the logits: a bfloat16 target's
    # rows would not sum to 1 (1.0009 for a 12.5 % share)
    target = mixed_targets(labels, partner_labels, partner_weight,
                           logits.shape[1], epsilon)
    return -(target * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()
