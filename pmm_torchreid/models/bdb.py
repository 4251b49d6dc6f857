"""The paper's baseline BDB (Batch DropBlock, Dai et al., ICCV 2019), and
its optional band branch (``bdb.bands``): the fixed horizontal bands that
MagnifierNet's regions are on data without masks, as a branch of their own."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from pmm_torchreid.models.heads import MeanFusion, PartHead, Trunk, init_kaiming, pool_regions
from pmm_torchreid.models.regions import BANDS, band_shares

__all__ = ['BDB', 'BatchDropBlock', 'BandBranch', 'BAND_CHOICES']

#: ``bdb.bands``: 0 (no band branch, the paper's BDB) or the number of
#: :data:`~pmm_torchreid.models.regions.BANDS`
BAND_CHOICES = (0, len(BANDS))


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


class BandBranch(nn.Module):
    """The fixed horizontal bands of :data:`~pmm_torchreid.models.regions.
    BANDS` as a branch: MagnifierNet's fusion branch with the bands for
    regions and the mean for fusion.

    Per band, the band-weighted average of the backbone map (the weights of
    a map row: the share of its pixels the band covers,
    :func:`~pmm_torchreid.models.regions.band_shares`, the targets
    MagnifierNet's parsing head learns on the bands) -> its own Linear + BN
    + ReLU -> ``band_dim``; the mean over the bands
    (:class:`~pmm_torchreid.models.heads.MeanFusion`) -> Linear + BN + ReLU
    -> ``dim`` -> classifier.

    Input: the backbone map and the image height; output ``(logits,
    embedding)`` like the other heads."""

    def __init__(self, in_channels: int, band_dim: int, dim: int,
                 num_classes: int):
        super().__init__()
        self.band_heads = nn.ModuleList(
            nn.Sequential(nn.Linear(in_channels, band_dim),
                          nn.BatchNorm1d(band_dim), nn.ReLU(inplace=True))
            for _ in BANDS)
        self.fusion = MeanFusion()
        self.reduction = nn.Sequential(
            nn.Linear(band_dim, dim), nn.BatchNorm1d(dim),
            nn.ReLU(inplace=True))
        self.classifier = nn.Linear(dim, num_classes)
        self.apply(init_kaiming)

    def band_features(self, fmap: torch.Tensor,
                      image_height: int) -> torch.Tensor:
        """N x len(BANDS) x band_dim: each band's pooled, embedded feature."""
        n, _, height, width = fmap.shape
        shares = band_shares(image_height, height).to(fmap.device, fmap.dtype)
        weights = shares[None, :, :, None].expand(n, -1, height, width)
        pooled = pool_regions(fmap, weights)
        return torch.stack([head(pooled[:, b])
                            for b, head in enumerate(self.band_heads)], dim=1)

    def forward(self, fmap: torch.Tensor, image_height: int):
        emb = self.reduction(self.fusion(self.band_features(fmap,
                                                            image_height)))
        return self.classifier(emb), emb


class BDB(Trunk):
    """Batch DropBlock network (Dai et al., ICCV 2019), the paper's baseline.

    A global branch (average pooling, 1x1 conv + BN + ReLU to 512-d) and a
    part branch (a Bottleneck on the backbone map, Batch DropBlock in
    training, max pooling, Linear + BN + ReLU to 1024-d), each with its
    classifier; the descriptor is their concatenation (1536-d).  It is
    trained by :class:`pmm_torchreid.engine.PMMEngine` with ``pmm.mix
    'none'``: batch-hard triplet + label-smoothed CE on both branches.

    With ``bands`` 4 (config ``bdb.bands``) a third branch,
    :class:`BandBranch`, pools the backbone map over the fixed horizontal
    bands that MagnifierNet's regions are without masks, embeds each band,
    averages them and reduces to ``global_dim``: a stripe feature with its
    own classifier and the same losses, the descriptor growing to global ‖
    part ‖ bands (2048-d).  It reads the backbone map, not the part map, so
    that it sees what MagnifierNet's fusion branch sees: no Batch DropBlock
    (whose dropped rows would blank whole bands) and no share of the part
    trunk.

    Args:
        num_classes (int): number of training identities.
        backbone (str): as for :class:`PMM`. Default is ``'resnet50'``.
        pretrained (bool): ImageNet weights for the backbone. Default is True.
        global_dim (int): global embedding size. Default is 512.
        part_dim (int): part embedding size. Default is 1024.
        drop_height_ratio (float): Default is 0.33.
        drop_width_ratio (float): Default is 1.0.
        bands (int): 0 (no band branch) or 4 (:class:`BandBranch` on the
            4 bands). Default is 0.
        band_dim (int): size of each band's feature in the band branch
            (MagnifierNet's ``region_dim``). Default is 256.

    Forward:
        - eval mode: ``model(x)`` -> N x (global_dim + part_dim [+
          global_dim with bands]).
        - train mode: ``model(x, labels=None)`` -> dict with ``'logits'`` and
          ``'embeddings'`` (global, part [, bands]), like :class:`PMM`
          without a mixer.
    """

    num_stages = 2  # branches, for the engine's per-branch curves

    def __init__(self, num_classes: int, backbone: str = 'resnet50',
                 pretrained: bool = True, global_dim: int = 512,
                 part_dim: int = 1024, drop_height_ratio: float = 0.33,
                 drop_width_ratio: float = 1.0, bands: int = 0,
                 band_dim: int = 256, loss: str = 'pmm'):
        if bands not in BAND_CHOICES:
            raise ValueError(
                'bands must be 0 (no band branch) or {} (the fixed bands {}), '
                'got {!r}'.format(len(BANDS), BANDS, bands))
        if band_dim < 1:
            raise ValueError('band_dim must be >= 1, got {}'.format(band_dim))
        super().__init__(num_classes, backbone, pretrained, global_dim)
        self.batch_drop = BatchDropBlock(drop_height_ratio, drop_width_ratio)
        self.part_head = PartHead(self.feature_channels, part_dim, num_classes)
        self.feature_dim = global_dim + part_dim
        self.bands = int(bands)
        if self.bands:  # built last: the default's seeded weights stay as they were
            self.band_branch = BandBranch(self.feature_channels, band_dim,
                                          global_dim, num_classes)
            self.feature_dim += global_dim
            self.num_stages = 3

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
        logits, embeddings = [g_logits, p_logits], [g_emb, p_emb]
        if self.bands:
            b_logits, b_emb = self.band_branch(fmap, x.shape[-2])
            logits.append(b_logits)
            embeddings.append(b_emb)
        if not self.training:
            return torch.cat(embeddings, dim=1)
        return {'logits': logits, 'embeddings': embeddings}
