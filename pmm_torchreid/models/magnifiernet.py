"""MagnifierNet (Lan, Liu, Tian, Zhou, Zhang, Yi and Li, "MagnifierNet:
Towards Semantic Regularization and Fusion for Person Re-identification",
arXiv 2002.10979, 2020; "... Semantic Adversary and Fusion ..." in its later
version), on the plugin's backbones: a comparison system for PMM.

From the paper: a global branch; a semantic regularization (later:
"adversarial") branch that, during training, learns from samples whose
semantic body regions (from human parsing) are randomly chosen per batch and
occluded, which forces detailed features for every region; a semantic fusion
branch that fuses the per-region features in sequence, selectively; and a
Semantic Diversity (SD) loss against overlap between the regions'
representations.  How this module builds it (the choices are listed in the
README, "Comparison systems"):

- **backbone map** ``F`` (stride 16, or 32 on ``resnet50_stride32`` and
  MobileNetV2), as for PMM and BDB;
- **global branch**: ``F`` -> average pooling -> 1x1 conv + BN + ReLU ->
  512-d -> classifier (PMM's stage I head);
- **semantic regularization branch** (SRB): ``P = Bottleneck(F)`` (BDB's part
  trunk); in training, ``occluded_regions`` of the 4 regions (head, upper
  body, lower body, shoes; :mod:`pmm_torchreid.data.parsing`) are drawn per batch
  and, for every sample, the cells of ``P`` that its mask's chosen regions
  cover by at least ``occlusion_share`` (a quarter) are zeroed; -> max
  pooling -> Linear + BN + ReLU -> 512-d -> classifier (BDB's part head).  At
  test time nothing is occluded;
- **parsing head**: ``F`` -> 1x1 conv + BN + ReLU -> 1x1 conv -> 5 classes
  (background + 4 regions) per cell, trained with a cross-entropy against
  each cell's area shares of the regions in the mask (soft targets, so that
  regions smaller than a cell, such as the head or the shoes at 128 x 64,
  are learnt too); its softmax gives the region weights the fusion branch
  pools with, so the network needs no parser at test time (the masks are a
  training input only);
- **semantic fusion branch** (SFB): per region ``r``, the region-weighted
  average of ``F`` (weights: the parsing head's probabilities, detached) ->
  its own Linear + BN + ReLU -> ``region_dim`` (256); the 4 region features,
  head to shoes, go through a gated recurrent cell (a GRU, written out) whose
  gates decide how much of each region enters the fused state; -> Linear +
  BN + ReLU -> 512-d -> classifier.  ``fusion='mean'`` (config
  ``magnifiernet.fusion``) replaces the GRU by the mean of the 4 region
  features (:class:`~pmm_torchreid.models.heads.MeanFusion`, no parameters),
  so the Linear that follows takes ``region_dim`` inputs: the same branch,
  loss, classifier and 512-d embedding without the GRU's parameters (1.18 M
  at the default sizes), to tell the paper's selective fusion from the
  capacity it adds;
- **SD loss** (:func:`semantic_diversity_loss`): the mean squared cosine
  similarity between the region features of a sample, over all pairs of
  different regions (0 exactly when they are orthogonal);
- eval descriptor: global, SRB and SFB embeddings concatenated (1536-d).

It trains with :class:`pmm_torchreid.engine.comparison.ComparisonEngine`:
per branch a label-smoothed cross-entropy plus a batch-hard triplet loss,
plus ``weight_sd`` x SD loss plus ``weight_parsing`` x the parsing loss, all
summed.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from pmm_torchreid.models.heads import MeanFusion, PartHead, Trunk, init_kaiming, pool_regions
from pmm_torchreid.models.regions import NUM_REGIONS, REGION_NAMES

__all__ = ['MagnifierNet', 'GatedFusion', 'FUSIONS', 'semantic_diversity_loss',
           'region_shares', 'downsample_regions', 'occlusion_keep']

#: How the fusion branch fuses the region features (``magnifiernet.fusion``):
#: the paper's gated recurrent cell (the default), or their mean.
FUSIONS = ('gru', 'mean')


def semantic_diversity_loss(features: torch.Tensor,
                            eps: float = 1e-12) -> torch.Tensor:
    """The Semantic Diversity loss on per-region features.

    Args:
        features (Tensor): N x R x D, the R region features of each sample.

    Returns:
        Tensor: scalar, the mean over samples and over the ``R (R - 1)``
        ordered pairs of different regions of the squared cosine similarity.
        0 exactly when every sample's region features are pairwise
        orthogonal (a zero feature counts as orthogonal to all), positive
        otherwise; at most 1.
    """
    if features.dim() != 3:
        raise ValueError('semantic_diversity_loss: features must be N x R x D, '
                         'got shape {}'.format(tuple(features.shape)))
    n, r, _ = features.shape
    if r < 2:
        return features.new_zeros(())
    unit = F.normalize(features, dim=2, eps=eps)
    gram = unit @ unit.transpose(1, 2)
    off = gram - torch.diag_embed(torch.diagonal(gram, dim1=1, dim2=2))
    return off.pow(2).sum(dim=(1, 2)).div(r * (r - 1)).mean()


def region_shares(regions: torch.Tensor, size, num_regions: int =
                  NUM_REGIONS) -> torch.Tensor:
    """Image-size region maps N x H x W (ids 0..R) -> N x (R + 1) x h x w:
    the share of each cell's pixels that each region covers (adaptive
    average pooling, so a cell covers the pixels it is computed from)."""
    regions = regions.long()
    onehot = torch.stack([regions == r for r in range(num_regions + 1)], 1)
    return F.adaptive_avg_pool2d(onehot.float(), tuple(size))


def downsample_regions(regions: torch.Tensor, size, num_regions: int =
                       NUM_REGIONS) -> torch.Tensor:
    """Image-size region maps N x H x W (ids 0..R) -> N x h x w: each cell
    takes the region that covers most of its pixels (ties: the lower id)."""
    return region_shares(regions, size, num_regions).argmax(dim=1)


def occlusion_keep(shares: torch.Tensor, chosen: torch.Tensor,
                   min_share: float = 0.25) -> torch.Tensor:
    """N x 1 x h x w bool: False on the cells whose pixels the ``chosen``
    region ids cover by at least ``min_share`` (``shares``: N x (R + 1) x h
    x w, :func:`region_shares`), True elsewhere."""
    covered = shares.index_select(1, chosen.long()).sum(dim=1, keepdim=True)
    return covered < min_share - 1e-6


class GatedFusion(nn.Module):
    """Fuses a sequence of features selectively: a GRU cell (Cho et al.,
    2014) written out with Linear layers (so it exports to any ONNX
    runtime), run over the sequence from a zero state.

    Input N x T x D -> the last state N x hidden.  ``last_update`` keeps the
    mean update gate per step of the last call (1: the step's feature
    replaced the state; 0: it was ignored)."""

    def __init__(self, input_dim: int, hidden_dim: int):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.gates = nn.Linear(input_dim + hidden_dim, 2 * hidden_dim)
        self.candidate = nn.Linear(input_dim + hidden_dim, hidden_dim)
        self.last_update = None

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        h = seq.new_zeros(seq.shape[0], self.hidden_dim)
        updates = []
        for t in range(seq.shape[1]):
            x = seq[:, t]
            keep, reset = torch.sigmoid(
                self.gates(torch.cat([x, h], dim=1))).chunk(2, dim=1)
            cand = torch.tanh(self.candidate(torch.cat([x, reset * h], dim=1)))
            h = keep * h + (1 - keep) * cand
            updates.append((1 - keep).detach().mean())
        self.last_update = torch.stack(updates) if updates else None
        return h


class MagnifierNet(Trunk):
    """MagnifierNet (Lan et al., 2020).

    Args:
        num_classes, backbone, pretrained, embedding_dim: as for
            :class:`~pmm_torchreid.models.fmn.FMN` (ResNet-50 is the paper's).
        region_dim (int): size of each region feature. Default is 256.
        occluded_regions (int): regions occluded per batch in the semantic
            regularization branch (1 to 3 of the 4). Default is 1.
        occlusion_share (float): a cell is occluded when the chosen regions
            cover at least this share of its pixels. Default is 0.25.
        parsing_hidden (int): channels of the parsing head. Default is 256.
        fusion (str): ``'gru'`` (:class:`GatedFusion`, the paper's selective
            fusion) or ``'mean'`` (the region features averaged, no
            parameters; the reduction after it then takes ``region_dim``
            inputs). Default is ``'gru'``.
        loss (str): accepted for torchreid's factory signature; unused.

    Forward:
        - eval mode: ``model(x)`` -> N x (3 * embedding_dim): global, SRB,
          SFB.
        - train mode: ``model(x, labels=None, regions=R)`` with ``R`` the
          N x H x W region maps of the images (ids 0..4,
          :mod:`pmm_torchreid.data.parsing`) -> dict with ``'logits'`` and
          ``'embeddings'`` (global, SRB, SFB), ``'aux_losses'`` (``'sd'``,
          ``'parsing'``: unweighted scalars), ``'occluded'`` (N x 4 bool, the
          regions occluded in this batch, the same row for every sample),
          ``'keep'`` (N x 1 x h x w, the SRB's occlusion mask) and
          ``'region_features'`` (N x 4 x region_dim).
    """

    num_stages = 3  # branches, for the per-branch curves
    needs_regions = True

    def __init__(self, num_classes: int, backbone: str = 'resnet50',
                 pretrained: bool = True, embedding_dim: int = 512,
                 region_dim: int = 256, occluded_regions: int = 1,
                 occlusion_share: float = 0.25, parsing_hidden: int = 256,
                 fusion: str = 'gru', loss: str = 'pmm'):
        if not 1 <= occluded_regions < NUM_REGIONS:
            raise ValueError(
                'occluded_regions must be 1 to {} (of the {} regions {}), got '
                '{}'.format(NUM_REGIONS - 1, NUM_REGIONS, REGION_NAMES,
                            occluded_regions))
        if not 0 < occlusion_share <= 1:
            raise ValueError('occlusion_share must lie in (0, 1], got '
                             '{}'.format(occlusion_share))
        if fusion not in FUSIONS:
            raise ValueError('fusion must be one of {}, got {!r}'.format(
                FUSIONS, fusion))
        super().__init__(num_classes, backbone, pretrained, embedding_dim)
        channels = self.feature_channels
        self.num_regions = NUM_REGIONS
        self.occluded_regions = int(occluded_regions)
        self.occlusion_share = float(occlusion_share)
        self.srb_head = PartHead(channels, embedding_dim, num_classes)
        hidden = min(parsing_hidden, channels)
        self.parsing_head = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, NUM_REGIONS + 1, 1),
        )
        self.region_heads = nn.ModuleList(
            nn.Sequential(nn.Linear(channels, region_dim),
                          nn.BatchNorm1d(region_dim), nn.ReLU(inplace=True))
            for _ in range(NUM_REGIONS))
        if fusion == 'gru':
            self.fusion = GatedFusion(region_dim, embedding_dim)
            fused_dim = embedding_dim
        else:
            self.fusion = MeanFusion()
            fused_dim = region_dim
        self.sfb_reduction = nn.Sequential(
            nn.Linear(fused_dim, embedding_dim),
            nn.BatchNorm1d(embedding_dim), nn.ReLU(inplace=True))
        self.sfb_classifier = nn.Linear(embedding_dim, num_classes)
        for module in (self.parsing_head, self.region_heads,
                       self.sfb_reduction, self.sfb_classifier):
            module.apply(init_kaiming)
        self.embedding_dim = embedding_dim
        self.feature_dim = 3 * embedding_dim
        self.last_occluded = None  # region ids occluded in the last batch

    # ------------------------------------------------------------------
    def region_probabilities(self, fmap: torch.Tensor) -> torch.Tensor:
        """N x (1 + 4) x h x w: the parsing head's softmax (background
        first), the regions the fusion branch pools."""
        return F.softmax(self.parsing_head(fmap), dim=1)

    def region_features(self, fmap: torch.Tensor,
                        probs: torch.Tensor) -> torch.Tensor:
        """N x 4 x region_dim: each region's weighted average of ``fmap``
        (weights: ``probs``, not back-propagated into), embedded."""
        pooled = pool_regions(fmap, probs[:, 1:].detach())
        return torch.stack([head(pooled[:, r])
                            for r, head in enumerate(self.region_heads)],
                           dim=1)

    def fuse(self, feats: torch.Tensor):
        """Region features -> (SFB logits, SFB embedding)."""
        emb = self.sfb_reduction(self.fusion(feats))
        return self.sfb_classifier(emb), emb

    def choose_regions(self, device=None) -> torch.Tensor:
        """The region ids (1..4) occluded in this batch: ``occluded_regions``
        distinct ids, uniformly, from torch's global generator (saved in the
        checkpoints, so resumed runs draw on exactly)."""
        return (torch.randperm(self.num_regions)[:self.occluded_regions]
                + 1).to(device)

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None,
                regions: Optional[torch.Tensor] = None, mixer=None):
        if mixer is not None:
            raise ValueError('MagnifierNet occludes its own regions and takes '
                             "no mixing rule ({!r}); train it with pmm.mix "
                             "'none'".format(mixer))
        if not self.training and self.descriptor == 'global':
            return self.global_descriptor(x)
        fmap = self.backbone(x)
        g_logits, g_emb = self.global_head(fmap)
        part = self.part_trunk(fmap)
        parse_logits = self.parsing_head(fmap)
        feats = self.region_features(fmap, F.softmax(parse_logits, dim=1))
        f_logits, f_emb = self.fuse(feats)
        if not self.training:
            _, s_emb = self.srb_head(part)
            return torch.cat([g_emb, s_emb, f_emb], dim=1)
        if regions is None:
            raise ValueError(
                'MagnifierNet trains on semantic region masks: call '
                'model(images, labels, regions=R) with R the N x H x W region '
                'maps (pmm_torchreid.data.parsing; the engine attaches them to the '
                'training batches)')
        shares = region_shares(regions.to(x.device), fmap.shape[-2:],
                               self.num_regions)
        chosen = self.choose_regions(x.device)
        self.last_occluded = chosen.tolist()
        keep = occlusion_keep(shares, chosen, self.occlusion_share)
        s_logits, s_emb = self.srb_head(part * keep.to(part.dtype))
        occluded = torch.zeros(x.shape[0], self.num_regions, dtype=torch.bool,
                               device=x.device)
        occluded[:, chosen - 1] = True
        aux = OrderedDict()
        aux['sd'] = semantic_diversity_loss(feats.float())
        aux['parsing'] = F.cross_entropy(parse_logits.float(), shares)
        return {'logits': [g_logits, s_logits, f_logits],
                'embeddings': [g_emb, s_emb, f_emb], 'aux_losses': aux,
                'occluded': occluded, 'keep': keep, 'region_features': feats}
