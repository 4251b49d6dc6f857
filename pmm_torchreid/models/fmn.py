"""FMN, the Feature Mask Network (Ding, Khan, Tang and Porikli, "Let Features
Decide for Themselves: Feature Mask Network for Person Re-identification",
arXiv 1711.07155, 2017), on the plugin's backbones: a comparison system for
PMM.

From the paper: a ResNet-50 whose high-level features predict a spatial
feature-map mask that is imposed on lower-level features, re-weighting the
body parts (an attention mechanism); the masked low-level branch and the
global branch make the descriptor; training is multi-task (identification
plus a retrieval term).  How this module builds it (the choices are listed in
the README, "Comparison systems"):

- the backbone is split after its stride-16 stage: the **low-level map**
  ``L`` is ResNet's ``layer3`` output (the paper's res4; 1024 channels on
  ResNet-50, 256 on ResNet-18), OSNet's ``conv3`` output (96 channels on
  OSNet-x0.25) or, on torchreid's other networks, the output of their last
  stage at stride 16 (:mod:`pmm_torchreid.models.torchreid_backbones`); the
  **high-level map** ``H`` is the full backbone's output (``layer4`` at stride
  1, or ``conv5``), the same map PMM and BDB use;
- **mask**: ``M = sigmoid(conv1x1(relu(bn(conv1x1(H)))))``, N x 1 x h x w in
  [0, 1], resized (bilinear) to ``L``'s size when the two differ (they do
  not on the stride-16 backbones; on ``resnet50_stride32`` and MobileNetV2
  ``H`` has half ``L``'s size);
- **masked branch**: ``L * M`` -> average pooling -> 1x1 conv + BN + ReLU ->
  512-d -> classifier; **global branch**: ``H`` -> the same head (PMM's
  stage I, :class:`~pmm_torchreid.models.GlobalHead`, from OSNet's pretrained
  embedding when there is one);
- eval descriptor: the two embeddings concatenated (1024-d).

It trains with :class:`pmm_torchreid.engine.comparison.ComparisonEngine`:
per branch a label-smoothed cross-entropy (identification) plus a batch-hard
triplet loss (the retrieval term), summed.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from pmm_torchreid.models.backbones import build_backbone
from pmm_torchreid.models.descriptors import Descriptors
from pmm_torchreid.models.heads import GlobalHead, init_kaiming, start_from_embedding
from pmm_torchreid.models.torchreid_backbones import TORCHREID_BACKBONES

__all__ = ['FMN', 'FeatureMask', 'LOW_LEVEL_SPLIT', 'split_backbone']

#: backbone -> how many modules of its ``body`` (an ``nn.Sequential``) give
#: the low-level map: ResNet's conv1 .. layer3, OSNet's conv1 .. conv3, and
#: the stride-16 stage of torchreid's networks
#: (:data:`~pmm_torchreid.models.torchreid_backbones.TORCHREID_BACKBONES`).
LOW_LEVEL_SPLIT = {'resnet50': 7, 'resnet18': 7, 'osnet_x0_25': 4,
                   **{name: spec.low_level
                      for name, spec in TORCHREID_BACKBONES.items()}}


def split_backbone(name: str, body: nn.Sequential):
    """``(low, high, low_channels)``: the two halves of a backbone body (views
    on the same modules) and the channels of the low-level map."""
    if name not in LOW_LEVEL_SPLIT:
        raise KeyError('FMN has no low-level split for backbone {!r}; '
                       'expected one of {}'.format(name, sorted(LOW_LEVEL_SPLIT)))
    k = LOW_LEVEL_SPLIT[name]
    low, high = body[:k], body[k:]
    norms = [m for m in low.modules() if isinstance(m, nn.BatchNorm2d)]
    return low, high, norms[-1].num_features


class FeatureMask(nn.Module):
    """High-level map N x C x h x w -> spatial mask N x 1 x h x w in [0, 1]:
    1x1 conv + BN + ReLU, 1x1 conv, sigmoid (it starts at 0.5 everywhere)."""

    def __init__(self, in_channels: int, hidden: int = 256):
        super().__init__()
        hidden = min(hidden, in_channels)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 1, 1),
        )
        self.apply(init_kaiming)

    def forward(self, high: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.body(high))


class FMN(Descriptors, nn.Module):
    """Feature Mask Network (Ding et al., 2017).

    Args:
        num_classes (int): number of training identities.
        backbone (str): ``'resnet50'`` (the paper), ``'resnet18'``,
            ``'osnet_x0_25'`` or one of torchreid's networks
            (:data:`~pmm_torchreid.models.backbones.BACKBONES`). Default is
            ``'resnet50'``.
        pretrained (bool): ImageNet weights for the backbone. Default is True.
        embedding_dim (int): size of each branch's embedding. Default is 512.
        mask_hidden (int): channels of the mask predictor. Default is 256.
        loss (str): accepted for torchreid's factory signature; unused.

    Forward:
        - eval mode: ``model(x)`` -> N x (2 * embedding_dim): global, masked.
        - train mode: ``model(x, labels=None, regions=None)`` -> dict with
          ``'logits'`` and ``'embeddings'`` (global, masked branch) and
          ``'mask'`` (N x 1 x h x w in [0, 1], on the low-level map).

    Examples::

        >>> model = FMN(num_classes=751, backbone='resnet18', pretrained=False)
        >>> model = model.eval()
        >>> model(torch.randn(2, 3, 256, 128)).shape
        torch.Size([2, 1024])
    """

    num_stages = 2  # branches, for the per-branch curves

    def __init__(self, num_classes: int, backbone: str = 'resnet50',
                 pretrained: bool = True, embedding_dim: int = 512,
                 mask_hidden: int = 256, loss: str = 'pmm'):
        super().__init__()
        self.backbone_name = backbone
        built = build_backbone(backbone, pretrained)
        self.backbone = built.body
        self.feature_channels = built.channels
        _, _, self.low_channels = split_backbone(backbone, self.backbone)
        self.split = LOW_LEVEL_SPLIT[backbone]
        self.mask_head = FeatureMask(built.channels, mask_hidden)
        self.global_head = GlobalHead(built.channels, embedding_dim, num_classes)
        start_from_embedding(self.global_head, built, type(self).__name__)
        self.masked_head = GlobalHead(self.low_channels, embedding_dim,
                                      num_classes)
        self.embedding_dim = embedding_dim
        self.feature_dim = 2 * embedding_dim

    def maps(self, x: torch.Tensor):
        """``(low, high, mask)`` of an image batch."""
        low = self.backbone[:self.split](x)
        high = self.backbone[self.split:](low)
        mask = self.mask_head(high)
        if mask.shape[-2:] != low.shape[-2:]:
            mask = F.interpolate(mask, size=low.shape[-2:], mode='bilinear',
                                 align_corners=False)
        return low, high, mask

    def feature_mask(self, x: torch.Tensor) -> torch.Tensor:
        """The mask FMN imposes on the low-level map: N x 1 x h x w."""
        return self.maps(x)[2]

    def forward(self, x: torch.Tensor, labels=None, regions=None,
                mixer=None):
        if mixer is not None:
            raise ValueError('FMN takes no mixing rule ({!r}); train it with '
                             "pmm.mix 'none'".format(mixer))
        if not self.training and self.descriptor == 'global':
            return self.global_descriptor(x)
        low, high, mask = self.maps(x)
        g_logits, g_emb = self.global_head(high)
        m_logits, m_emb = self.masked_head(low * mask)
        if not self.training:
            return torch.cat([g_emb, m_emb], dim=1)
        out: Dict = {'logits': [g_logits, m_logits],
                     'embeddings': [g_emb, m_emb], 'mask': mask}
        return out
