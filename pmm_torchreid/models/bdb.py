"""The paper's baseline BDB (Batch DropBlock, Dai et al., ICCV 2019)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from pmm_torchreid.models.heads import PartHead, Trunk

__all__ = ['BDB', 'BatchDropBlock']


class BatchDropBlock(nn.Module):
    """Zeroes one region, the same for every sample of the batch, in training.

    The region is ``round(height_ratio * H)`` rows by ``round(width_ratio *
    W)`` columns at a random place (drawn from torch's global generator, so
    checkpoints that save the RNG state resume exactly).  In eval mode the
    input passes unchanged.

    Args:
        height_ratio (float): region height over map height. Default is 0.33.
        width_ratio (float): region width over map width. Default is 1.0.
    """

    def __init__(self, height_ratio: float = 0.33, width_ratio: float = 1.0):
        super().__init__()
        if not (0 < height_ratio <= 1 and 0 < width_ratio <= 1):
            raise ValueError(
                'BatchDropBlock ratios must lie in (0, 1], got height {} and '
                'width {}'.format(height_ratio, width_ratio))
        self.height_ratio = float(height_ratio)
        self.width_ratio = float(width_ratio)
        self.last_region = None  # (top, left, rows, cols) of the last drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        height, width = x.shape[2], x.shape[3]
        rows = min(height, max(1, int(round(self.height_ratio * height))))
        cols = min(width, max(1, int(round(self.width_ratio * width))))
        top = int(torch.randint(0, height - rows + 1, (1, )))
        left = int(torch.randint(0, width - cols + 1, (1, )))
        mask = x.new_ones(1, 1, height, width)
        mask[:, :, top:top + rows, left:left + cols] = 0
        self.last_region = (top, left, rows, cols)
        return x * mask


class BDB(Trunk):
    """Batch DropBlock network (Dai et al., ICCV 2019), the paper's baseline.

    A global branch (average pooling, 1x1 conv + BN + ReLU to 512-d) and a
    part branch (a Bottleneck on the backbone map, Batch DropBlock in
    training, max pooling, Linear + BN + ReLU to 1024-d), each with its
    classifier; the descriptor is their concatenation (1536-d).  It is
    trained by :class:`pmm_torchreid.engine.PMMEngine` with ``pmm.mix
    'none'``: batch-hard triplet + label-smoothed CE on both branches.

    Args:
        num_classes (int): number of training identities.
        backbone (str): as for :class:`PMM`. Default is ``'resnet50'``.
        pretrained (bool): ImageNet weights for the backbone. Default is True.
        global_dim (int): global embedding size. Default is 512.
        part_dim (int): part embedding size. Default is 1024.
        drop_height_ratio (float): Default is 0.33.
        drop_width_ratio (float): Default is 1.0.

    Forward:
        - eval mode: ``model(x)`` -> N x (global_dim + part_dim).
        - train mode: ``model(x, labels=None)`` -> dict with ``'logits'`` and
          ``'embeddings'`` (global, part), like :class:`PMM` without a mixer.
    """

    num_stages = 2  # branches, for the engine's per-branch curves

    def __init__(self, num_classes: int, backbone: str = 'resnet50',
                 pretrained: bool = True, global_dim: int = 512,
                 part_dim: int = 1024, drop_height_ratio: float = 0.33,
                 drop_width_ratio: float = 1.0, loss: str = 'pmm'):
        super().__init__(num_classes, backbone, pretrained, global_dim)
        self.batch_drop = BatchDropBlock(drop_height_ratio, drop_width_ratio)
        self.part_head = PartHead(self.feature_channels, part_dim, num_classes)
        self.feature_dim = global_dim + part_dim

    def forward(
        self,
        x: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        mixer: Optional[Callable] = None
    ):
        if mixer is not None:
            raise ValueError(
                'BDB drops its own block in the part branch and takes no '
                'mixing rule ({!r}); train it with pmm.mix \'none\''.format(
                    mixer))
        if not self.training and self.descriptor == 'global':
            return self.global_descriptor(x)
        fmap = self.backbone(x)
        g_logits, g_emb = self.global_head(fmap)
        p_logits, p_emb = self.part_head(self.batch_drop(self.part_trunk(fmap)))
        if not self.training:
            return torch.cat([g_emb, p_emb], dim=1)
        return {'logits': [g_logits, p_logits], 'embeddings': [g_emb, p_emb]}
