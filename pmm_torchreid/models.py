"""The PMM network (a backbone, a part trunk and three sequential heads) and
its baseline BDB (Batch DropBlock).

Stage I pools the backbone map ``F`` (average); stages II and III pool the part
map ``P = part_trunk(F)`` (max), each possibly mixed by the rule the engine
passes in (see :mod:`pmm_torchreid.guidance`).  In eval mode the model returns
one tensor, the concatenation of the stage embeddings, so torchreid's
``Engine.test``, ``FeatureExtractor`` and visrank work unchanged.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torchvision.models.resnet import Bottleneck

from .backbones import BACKBONES, Backbone, build_backbone

__all__ = ['PMM', 'BDB', 'BatchDropBlock', 'GlobalHead', 'PartHead',
           'MODEL_FACTORY', 'model_backbone']


# --------------------------------------------------------------------------
# heads
# --------------------------------------------------------------------------
def _init_kaiming(m: nn.Module) -> None:
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
        self.apply(_init_kaiming)

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


def _start_from_embedding(head: GlobalHead, backbone: Backbone,
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
        self.apply(_init_kaiming)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """N x C x H x W -> (logits N x num_classes, embedding N x dim)."""
        emb = self.reduction(self.pool(x).flatten(1))
        return self.classifier(emb), emb


# --------------------------------------------------------------------------
# the networks
# --------------------------------------------------------------------------
class _Trunk(nn.Module):
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
        self.part_trunk.apply(_init_kaiming)
        self.global_head = GlobalHead(channels, global_dim, num_classes)
        _start_from_embedding(self.global_head, built, type(self).__name__)


class PMM(_Trunk):
    """Progressive Multi-stage Feature Mix (Zhang et al., ICASSP 2021).

    Args:
        num_classes (int): number of training identities.
        backbone (str): ``'resnet50'`` (the paper), ``'resnet18'`` or
            ``'osnet_x0_25'``. Default is ``'resnet50'``.
        pretrained (bool): load ImageNet weights into the backbone. Default
            is True.
        embedding_dim (int): size of each stage's embedding. Default is 512.
        num_stages (int): stage I plus ``num_stages - 1`` part stages.
            Default is 3.
        loss (str): accepted for torchreid's factory signature; unused.

    Forward:
        - eval mode: ``model(x)`` -> N x (num_stages * embedding_dim).
        - train mode: ``model(x, labels, mixer=None)`` -> dict with
          ``'logits'`` and ``'embeddings'`` (one tensor per stage) and, when a
          mixer is given, for each mixed stage ``'masks'`` (N x 1 x H x W),
          ``'partner_labels'`` (N, the label of the sample whose features
          were pasted in; None when nothing was pasted) and
          ``'partner_weights'`` (N, the partner label's share of the target;
          see :class:`pmm_torchreid.guidance.Mixed`).  ``labels`` is a tensor
          so that ``nn.DataParallel`` hands every replica its share.

    Everything a mixed stage's loss needs is computed inside the call, as
    per-sample tensors.  A rule's partner *indices* point into the batch that
    the call saw -- one replica's share under ``nn.DataParallel``, which
    gathers outputs unchanged -- so they are turned into partner *labels*
    here, with the labels of that same share; gathered along dim 0, the
    outputs of several replicas stay right.

    Examples::

        >>> model = PMM(num_classes=751, backbone='resnet18', pretrained=False)
        >>> model.eval(); model(torch.randn(2, 3, 384, 128)).shape
        torch.Size([2, 1536])
    """

    def __init__(self, num_classes: int, backbone: str = 'resnet50',
                 pretrained: bool = True, embedding_dim: int = 512,
                 num_stages: int = 3, loss: str = 'pmm', **kwargs):
        if num_stages < 1:
            raise ValueError(
                'num_stages must be >= 1, got {}'.format(num_stages)
            )
        super().__init__(num_classes, backbone, pretrained, embedding_dim)
        self.embedding_dim = embedding_dim
        self.num_stages = num_stages
        self.part_heads = nn.ModuleList(
            PartHead(self.feature_channels, embedding_dim, num_classes)
            for _ in range(num_stages - 1)
        )
        self.feature_dim = embedding_dim * num_stages

    def forward(
        self,
        x: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        mixer: Optional[Callable] = None
    ):
        fmap = self.backbone(x)
        if not self.training:
            _, emb = self.global_head(fmap)
            embeddings = [emb]
            if self.part_heads:
                part = self.part_trunk(fmap)
                embeddings += [head(part)[1] for head in self.part_heads]
            return torch.cat(embeddings, dim=1)
        return self.forward_train(fmap, labels, mixer)

    def forward_train(
        self,
        fmap: torch.Tensor,
        labels: Optional[torch.Tensor],
        mixer: Optional[Callable]
    ) -> Dict[str, List[torch.Tensor]]:
        """Runs the stages in sequence on the backbone map ``fmap``."""
        if mixer is not None:
            if labels is None:
                raise ValueError(
                    'PMM needs the labels in training mode to guide the mix: '
                    'call model(images, labels, mixer=...)'
                )
            if not fmap.requires_grad:  # frozen backbone: still need dz/dF
                fmap.requires_grad_()
        logits, emb = self.global_head(fmap)
        out = {'logits': [logits], 'embeddings': [emb]}
        if mixer is not None:
            out['masks'], out['partner_labels'] = [], []
            out['partner_weights'] = []
        if not self.part_heads:
            return out
        part = self.part_trunk(fmap)
        cam_map, cam_logits = fmap, logits
        for head in self.part_heads:
            stage_in = part
            if mixer is not None:
                mixed = mixer(part, cam_map, cam_logits, labels)
                stage_in = mixed.features
                out['masks'].append(mixed.mask)
                out['partner_labels'].append(
                    None if mixed.negatives is None else
                    labels.index_select(0, mixed.negatives.to(labels.device)))
                out['partner_weights'].append(mixed.partner_weight)
            logits, emb = head(stage_in)
            out['logits'].append(logits)
            out['embeddings'].append(emb)
            cam_map, cam_logits = stage_in, logits
        return out


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


class BDB(_Trunk):
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
                 drop_width_ratio: float = 1.0, loss: str = 'pmm', **kwargs):
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
        fmap = self.backbone(x)
        g_logits, g_emb = self.global_head(fmap)
        p_logits, p_emb = self.part_head(self.batch_drop(self.part_trunk(fmap)))
        if not self.training:
            return torch.cat([g_emb, p_emb], dim=1)
        return {'logits': [g_logits, p_logits], 'embeddings': [g_emb, p_emb]}


# --------------------------------------------------------------------------
# factories (torchreid's signature)
# --------------------------------------------------------------------------
def _factory(network: type, backbone: str, name: str) -> Callable[..., nn.Module]:
    def build(num_classes, loss='pmm', pretrained=True, **kwargs):
        kwargs.pop('use_gpu', None)  # torchreid 1.4 passes use_gpu,
        kwargs.pop('device', None)  # newer torchreid passes device
        return network(num_classes, backbone=backbone, pretrained=pretrained,
                       loss=loss, **kwargs)

    build.backbone = backbone
    build.__name__ = build.__qualname__ = name
    build.__doc__ = (
        '{} with a {} backbone; torchreid factory signature '
        '(num_classes, loss, pretrained, **kwargs).'.format(
            network.__name__, backbone)
    )
    return build


# the comparison systems build on the heads above (import order: this module
# is always imported first, by the package)
from .fmn import FMN  # noqa: E402
from .magnifiernet import MagnifierNet  # noqa: E402

#: The plugin's networks by name prefix; each comes on every backbone of
#: :data:`~pmm_torchreid.backbones.BACKBONES` as ``<prefix>_<backbone>``, and
#: as plain ``<prefix>`` on :data:`DEFAULT_BACKBONE` (the papers' ResNet-50).
#: FMN and MagnifierNet are comparison systems (:mod:`pmm_torchreid.fmn`,
#: :mod:`pmm_torchreid.magnifiernet`).
NETWORKS = {'pmm': PMM, 'bdb': BDB, 'fmn': FMN, 'magnifiernet': MagnifierNet}
DEFAULT_BACKBONE = 'resnet50'


def _model_factory() -> Dict[str, Callable[..., nn.Module]]:
    table = {}
    for prefix, network in NETWORKS.items():
        for backbone in BACKBONES:
            name = '{}_{}'.format(prefix, backbone)
            table[name] = _factory(network, backbone, name)
        table[prefix] = table['{}_{}'.format(prefix, DEFAULT_BACKBONE)]
    return table


#: Names under which :func:`pmm_torchreid.register` adds the models to torchreid.
MODEL_FACTORY = _model_factory()


def model_backbone(name: str) -> str:
    """The backbone of a plugin model name (``'pmm'`` -> ``'resnet50'``)."""
    if name not in MODEL_FACTORY:
        raise KeyError(
            'model.name = {!r} is not a plugin model; expected one of '
            '{}'.format(name, sorted(MODEL_FACTORY))
        )
    return MODEL_FACTORY[name].backbone
