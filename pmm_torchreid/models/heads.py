"""The pieces the plugin's networks share: the heads (stage I's global head,
the part heads of the later stages), the trunk that PMM, BDB and MagnifierNet
build on, their weight initialisation, and the region pooling and mean
fusion that MagnifierNet's fusion branch and BDB's band branch share.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
from torchvision.models.resnet import Bottleneck

from pmm_torchreid.models.backbones import Backbone, build_backbone
from pmm_torchreid.models.descriptors import Descriptors

__all__ = ['init_kaiming', 'GlobalHead', 'PartHead', 'Trunk',
           'start_from_embedding', 'pool_regions', 'MeanFusion']


def init_kaiming(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.kaiming_normal_(m.weight, a=0, mode='fan_out')
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, a=0, mode='fan_in')
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class GlobalHead(nn.Module):
    """Stage I: average pooling, 1x1 conv + BN + ReLU, classifier."""

    def __init__(self, in_channels: int, dim: int, num_classes: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduction = nn.Sequential(
            nn.Conv2d(in_channels, dim, 1, bias=False),
            nn.BatchNorm2d(dim),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(dim, num_classes)
        self.apply(init_kaiming)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """N x C x H x W -> (logits N x num_classes, embedding N x dim)."""
        emb = self.reduction(self.pool(x)).flatten(1)
        return self.classifier(emb), emb

    def load_embedding(self, fc: nn.Module) -> bool:
        """Starts the reduction from a pretrained ``Linear -> BatchNorm1d
        (-> ReLU)`` embedding on the average-pooled map (OSNet's ``fc``).

        The 1x1 conv takes the Linear's weights and the BatchNorm its affine
        parameters and running statistics.  The conv has no bias: the Linear's
        bias is folded into the running mean (``mean - bias``), which gives
        the same output in eval mode and the same normalised values in
        training mode (batch statistics remove a constant shift), so the head
        computes exactly what the pretrained layer computed.

        Returns:
            bool: False (nothing copied) when the shapes differ, e.g. another
            ``embedding_dim`` than the pretrained layer's.
        """
        linear, bn = fc[0], fc[1]
        conv, bn2 = self.reduction[0], self.reduction[1]
        if not (isinstance(linear, nn.Linear) and isinstance(
                bn, nn.BatchNorm1d)) or linear.weight.shape != \
                conv.weight.shape[:2]:
            return False
        with torch.no_grad():
            conv.weight.copy_(linear.weight.view_as(conv.weight))
            bn2.weight.copy_(bn.weight)
            bn2.bias.copy_(bn.bias)
            bias = linear.bias if linear.bias is not None else 0.0
            bn2.running_mean.copy_(bn.running_mean - bias)
            bn2.running_var.copy_(bn.running_var)
            bn2.num_batches_tracked.copy_(bn.num_batches_tracked)
        bn2.eps, bn2.momentum = bn.eps, bn.momentum
        return True


def start_from_embedding(head: GlobalHead, backbone: Backbone,
                          name: str) -> None:
    if backbone.embedding is None:
        return
    if head.load_embedding(backbone.embedding):
        print('{}: the global head starts from the pretrained embedding '
              'layer'.format(name))
    else:
        print('** {}: the pretrained embedding layer does not fit the global '
              'head (its size differs), which starts from scratch'.format(name))


class PartHead(nn.Module):
    """Stages II and III: max pooling, Linear + BN + ReLU, classifier."""

    def __init__(self, in_channels: int, dim: int, num_classes: int):
        super().__init__()
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.reduction = nn.Sequential(
            nn.Linear(in_channels, dim),
            nn.BatchNorm1d(dim),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(dim, num_classes)
        self.apply(init_kaiming)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """N x C x H x W -> (logits N x num_classes, embedding N x dim)."""
        emb = self.reduction(self.pool(x).flatten(1))
        return self.classifier(emb), emb


def pool_regions(fmap: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """N x R x C: each region's weighted average of ``fmap`` (N x C x h x
    w), with ``weights`` N x R x h x w (a region's weights need not sum to
    1; a region with no weight gives 0)."""
    return torch.einsum('nrhw,nchw->nrc', weights, fmap) / (
        weights.sum(dim=(2, 3)).unsqueeze(-1) + 1e-6)


class MeanFusion(nn.Module):
    """Fuses a sequence of features by their mean: N x T x D -> N x D.

    No parameters, no order and no gate: the counterpart of
    :class:`~pmm_torchreid.models.magnifiernet.GatedFusion` that keeps a
    fusion branch's shape (one D-wide feature from the T region features)
    without its recurrent cell.  Which region a feature came from is still
    known to the per-region heads that make the features."""

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        return seq.mean(dim=1)


# --------------------------------------------------------------------------


class Trunk(Descriptors, nn.Module):
    """What PMM and BDB share: the backbone, stage I (the global head, from
    the backbone's pretrained embedding when it has one) and the part trunk
    (a fresh Bottleneck on the backbone map)."""

    def __init__(self, num_classes: int, backbone: str, pretrained: bool,
                 global_dim: int):
        super().__init__()
        self.backbone_name = backbone
        built = build_backbone(backbone, pretrained)
        self.backbone, channels = built.body, built.channels
        self.feature_channels = channels
        self.part_trunk = Bottleneck(channels, channels // Bottleneck.expansion)
        self.part_trunk.apply(init_kaiming)
        self.global_head = GlobalHead(channels, global_dim, num_classes)
        start_from_embedding(self.global_head, built, type(self).__name__)
