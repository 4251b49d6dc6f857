"""The PMM network: a backbone, a part trunk and three sequential heads.

Stage I pools the backbone map ``F`` (average); stages II and III pool the part
map ``P = part_trunk(F)`` (max), each possibly mixed by the rule the engine
passes in (see :mod:`pmm_torchreid.guidance`).  In eval mode the model returns
one tensor, the concatenation of the stage embeddings, so torchreid's
``Engine.test``, ``FeatureExtractor`` and visrank work unchanged.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torchvision
from torchvision.models.resnet import Bottleneck

__all__ = [
    'PMM', 'build_backbone', 'BACKBONES', 'pmm_resnet50', 'pmm_resnet18',
    'pmm_osnet_x0_25', 'MODEL_FACTORY'
]


# --------------------------------------------------------------------------
# backbones
# --------------------------------------------------------------------------
def _checkpoint_hint(path: str, url: str, error: Exception) -> RuntimeError:
    return RuntimeError(
        'could not obtain ImageNet weights ({}: {}). Download {} yourself and '
        'place it at {} (the folder comes from $TORCH_HOME), or build the '
        'model with pretrained=False (config: model.pretrained False)'.format(
            type(error).__name__, error, url, path
        )
    )


def _load_torchvision_weights(model: nn.Module, weights) -> None:
    url = weights.url
    path = os.path.join(
        torch.hub.get_dir(), 'checkpoints', os.path.basename(url)
    )
    try:
        state = torch.hub.load_state_dict_from_url(
            url, progress=True, check_hash=True, weights_only=True
        )
    except Exception as error:  # no network, bad hash, ...
        raise _checkpoint_hint(path, url, error) from error
    model.load_state_dict(state)


def _resnet(arch: str, pretrained: bool) -> Tuple[nn.Module, int]:
    builder = getattr(torchvision.models, arch)
    net = builder(weights=None)
    if pretrained:
        weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
        _load_torchvision_weights(net, weights)
    # layer4 with stride 1 (the spec: a 384x128 input gives a 24x8 map)
    for m in net.layer4[0].modules():
        if isinstance(m, nn.Conv2d) and m.stride == (2, 2):
            m.stride = (1, 1)
    body = nn.Sequential(
        net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2,
        net.layer3, net.layer4
    )
    channels = net.fc.in_features
    return body, channels


def _osnet_x0_25(pretrained: bool) -> Tuple[nn.Module, int]:
    import torchreid
    torch_home = os.path.expanduser(
        os.getenv('TORCH_HOME', os.path.join(
            os.getenv('XDG_CACHE_HOME', '~/.cache'), 'torch'))
    )
    path = os.path.join(torch_home, 'checkpoints', 'osnet_x0_25_imagenet.pth')
    try:
        net = torchreid.models.osnet.osnet_x0_25(
            num_classes=1, pretrained=pretrained, loss='softmax'
        )
    except Exception as error:  # gdown cannot reach Google Drive, ...
        raise _checkpoint_hint(
            path, 'torchreid\'s osnet_x0_25 ImageNet weights', error
        ) from error
    body = nn.Sequential(
        net.conv1, net.maxpool, net.conv2, net.conv3, net.conv4, net.conv5
    )
    return body, net.conv5.conv.out_channels


#: name -> function(pretrained) returning (module, output channels).  The
#: module maps N x 3 x H x W images to an N x C x H/16 x W/16 map.
BACKBONES: Dict[str, Callable[[bool], Tuple[nn.Module, int]]] = {
    'resnet50': lambda pretrained: _resnet('resnet50', pretrained),
    'resnet18': lambda pretrained: _resnet('resnet18', pretrained),
    'osnet_x0_25': _osnet_x0_25,
}


def build_backbone(name: str, pretrained: bool = True) -> Tuple[nn.Module, int]:
    """Builds a backbone by name; returns it and its output channel count."""
    if name not in BACKBONES:
        raise KeyError(
            'unknown backbone {!r}; expected one of {}'.format(
                name, sorted(BACKBONES)
            )
        )
    return BACKBONES[name](pretrained)


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
# the network
# --------------------------------------------------------------------------
class PMM(nn.Module):
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
          mixer is given, ``'masks'`` (N x 1 x H x W) and ``'negatives'`` (N)
          for each mixed stage.  ``labels`` is a tensor so that
          ``nn.DataParallel`` hands every replica its share.

    Examples::

        >>> model = PMM(num_classes=751, backbone='resnet18', pretrained=False)
        >>> model.eval(); model(torch.randn(2, 3, 384, 128)).shape
        torch.Size([2, 1536])
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = 'resnet50',
        pretrained: bool = True,
        embedding_dim: int = 512,
        num_stages: int = 3,
        loss: str = 'pmm',
        **kwargs
    ):
        super().__init__()
        if num_stages < 1:
            raise ValueError(
                'num_stages must be >= 1, got {}'.format(num_stages)
            )
        self.backbone_name = backbone
        self.backbone, channels = build_backbone(backbone, pretrained)
        self.feature_channels = channels
        self.embedding_dim = embedding_dim
        self.num_stages = num_stages
        self.part_trunk = Bottleneck(channels, channels // Bottleneck.expansion)
        self.part_trunk.apply(_init_kaiming)
        self.global_head = GlobalHead(channels, embedding_dim, num_classes)
        self.part_heads = nn.ModuleList(
            PartHead(channels, embedding_dim, num_classes)
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
            out['masks'], out['negatives'] = [], []
        if not self.part_heads:
            return out
        part = self.part_trunk(fmap)
        cam_map, cam_logits = fmap, logits
        for head in self.part_heads:
            stage_in = part
            if mixer is not None:
                stage_in, mask, negatives = mixer(
                    part, cam_map, cam_logits, labels
                )
                out['masks'].append(mask)
                out['negatives'].append(negatives)
            logits, emb = head(stage_in)
            out['logits'].append(logits)
            out['embeddings'].append(emb)
            cam_map, cam_logits = stage_in, logits
        return out


# --------------------------------------------------------------------------
# factories (torchreid's signature)
# --------------------------------------------------------------------------
def _factory(backbone: str) -> Callable[..., PMM]:

    def build(num_classes, loss='pmm', pretrained=True, **kwargs):
        kwargs.pop('use_gpu', None)  # torchreid 1.4 passes use_gpu,
        kwargs.pop('device', None)  # newer torchreid passes device
        return PMM(
            num_classes,
            backbone=backbone,
            pretrained=pretrained,
            loss=loss,
            **kwargs
        )

    build.__name__ = build.__qualname__ = 'pmm_' + backbone
    build.__doc__ = (
        'PMM with a {} backbone; torchreid factory signature '
        '(num_classes, loss, pretrained, **kwargs).'.format(backbone)
    )
    return build


pmm_resnet50 = _factory('resnet50')
pmm_resnet18 = _factory('resnet18')
pmm_osnet_x0_25 = _factory('osnet_x0_25')

#: Names under which :func:`pmm_torchreid.register` adds the models to torchreid.
MODEL_FACTORY = {
    'pmm': pmm_resnet50,
    'pmm_resnet50': pmm_resnet50,
    'pmm_resnet18': pmm_resnet18,
    'pmm_osnet_x0_25': pmm_osnet_x0_25,
}
