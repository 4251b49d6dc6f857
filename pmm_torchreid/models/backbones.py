"""Backbones: ImageNet ResNets (layer4 at stride 1) and torchreid's OSNet-x0.25,
each cut before its pooling, so that an N x 3 x H x W image batch gives an
N x C x H/16 x W/16 map; and the map size a backbone gives at an input size.
:mod:`pmm_torchreid.models.torchreid_backbones` adds torchreid's other
networks to :data:`BACKBONES` (their maps have stride 16 or 32).

Weights are fetched on first use and verified: torchvision's ResNet weights
by their published hash, OSNet-x0.25's by :data:`OSNET_X0_25_SHA256`.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torchreid
import torchvision

from pmm_torchreid.utils.checkpoint import load_checkpoint
from pmm_torchreid.utils.io import sha256

__all__ = ['Backbone', 'BACKBONES', 'build_backbone', 'feature_map_size',
           'fetch_osnet_x0_25_weights', 'gdown_weights']


class Backbone(NamedTuple):
    """What a backbone builder gives.

    Attributes:
        body (nn.Module): images N x 3 x H x W -> map N x C x H/s x W/s, with
            s the backbone's stride (16 here; 32 for some of torchreid's
            networks): :func:`feature_map_size` gives the exact size.
        channels (int): C.
        embedding (nn.Module or None): a pretrained embedding layer that the
            network had on top of the average-pooled map (OSNet's ``fc``:
            Linear, BatchNorm1d, ReLU), for stage I to start from; None when
            there is none (ResNet's ``fc`` is the ImageNet classifier) or the
            backbone is not pretrained.
    """
    body: nn.Module
    channels: int
    embedding: Optional[nn.Module] = None


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


def _resnet(arch: str, pretrained: bool) -> Backbone:
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
    return Backbone(body, net.fc.in_features)


#: torchreid's ImageNet OSNet-x0.25 weights: where torchreid downloads them
#: from, and the SHA-256 of that file (torchreid publishes none; this is the
#: hash of the file it serves, recorded here so a changed file is refused).
OSNET_X0_25_URL = \
    'https://drive.google.com/uc?id=1rb8UN5ZzPKRc_xvtHlyDh-cSz88YX9hs'
OSNET_X0_25_SHA256 = \
    'f54941a66bad4ddd07f2907f498c810ce639ce7a1abeaf2a151f8da118d84693'


def _torch_home() -> str:
    return os.path.expanduser(
        os.getenv('TORCH_HOME', os.path.join(
            os.getenv('XDG_CACHE_HOME', '~/.cache'), 'torch'))
    )


def gdown_weights(url: str, path: str, verify: Callable[[str], None]) -> None:
    """Downloads ``url`` to ``path`` with ``gdown`` (as torchreid does),
    through a temporary file that ``verify(tmp)`` must accept (it raises
    otherwise) before it becomes ``path``; nothing is left behind on failure.

    Raises:
        RuntimeError: naming the file, the folder and the URL
            (:func:`_checkpoint_hint`).
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + '.download'
    try:
        import gdown  # lazy: needed only to download weights
        gdown.download(url, tmp, quiet=False)
        if not os.path.isfile(tmp):
            raise RuntimeError('gdown wrote no file')
        verify(tmp)
        os.replace(tmp, path)
    except Exception as error:  # no network, bad hash, not weights, ...
        raise _checkpoint_hint(path, url, error) from error
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _check_osnet_x0_25_hash(tmp: str) -> None:
    actual = sha256(tmp)
    if actual != OSNET_X0_25_SHA256:
        raise RuntimeError('downloaded file has SHA-256 {}, expected '
                           '{}'.format(actual, OSNET_X0_25_SHA256))


def fetch_osnet_x0_25_weights() -> str:
    """Path of the verified ImageNet OSNet-x0.25 weights, downloading them
    (with ``gdown``, as torchreid does) only when they are not cached.

    Raises:
        RuntimeError: the download failed, or the file's SHA-256 differs from
            :data:`OSNET_X0_25_SHA256` (the file is then left untouched, or
            a fresh download is deleted).
    """
    path = os.path.join(_torch_home(), 'checkpoints', 'osnet_x0_25_imagenet.pth')
    if not os.path.isfile(path):
        gdown_weights(OSNET_X0_25_URL, path, _check_osnet_x0_25_hash)
    actual = sha256(path)
    if actual != OSNET_X0_25_SHA256:
        raise RuntimeError(
            'refusing "{}": its SHA-256 is {}, but torchreid\'s OSNet-x0.25 '
            'ImageNet weights have {}; delete the file to download it '
            'again'.format(path, actual, OSNET_X0_25_SHA256)
        )
    return path


def _osnet_x0_25(pretrained: bool) -> Backbone:
    net = torchreid.models.osnet.osnet_x0_25(
        num_classes=1, pretrained=False, loss='softmax'
    )
    if pretrained:
        state = load_checkpoint(fetch_osnet_x0_25_weights(), 'cpu')
        own = net.state_dict()
        matched = {k: v for k, v in state.items()
                   if k in own and own[k].shape == v.shape}
        own.update(matched)
        net.load_state_dict(own)
        print('Loaded ImageNet weights into osnet_x0_25 ({} of {} '
              'tensors)'.format(len(matched), len(own)))
    body = nn.Sequential(
        net.conv1, net.maxpool, net.conv2, net.conv3, net.conv4, net.conv5
    )
    return Backbone(body, net.conv5.conv.out_channels,
                    net.fc if pretrained else None)


#: name -> function(pretrained) returning a :class:`Backbone`; importing
#: :mod:`pmm_torchreid.models` also adds torchreid's networks
#: (:data:`~pmm_torchreid.models.torchreid_backbones.TORCHREID_BACKBONES`).
BACKBONES: Dict[str, Callable[[bool], Backbone]] = {
    'resnet50': lambda pretrained: _resnet('resnet50', pretrained),
    'resnet18': lambda pretrained: _resnet('resnet18', pretrained),
    'osnet_x0_25': _osnet_x0_25,
}


def build_backbone(name: str, pretrained: bool = True) -> Backbone:
    """Builds a backbone by name: its body, its output channel count and its
    pretrained embedding layer, if any (:class:`Backbone`)."""
    if name not in BACKBONES:
        raise KeyError(
            'unknown backbone {!r}; expected one of {}'.format(
                name, sorted(BACKBONES)
            )
        )
    return BACKBONES[name](pretrained)


@functools.lru_cache(maxsize=64)
def feature_map_size(name: str, height: int, width: int) -> Tuple[int, int]:
    """Height and width of the backbone's map for a ``height x width`` input.

    Computed exactly (padding and rounding included) by running the backbone
    on PyTorch's ``meta`` device: no weights are allocated, no data is read.
    """
    if name not in BACKBONES:
        raise KeyError(
            'unknown backbone {!r}; expected one of {}'.format(
                name, sorted(BACKBONES)
            )
        )
    with torch.device('meta'):
        body = BACKBONES[name](False).body
        out = body(torch.empty(1, 3, int(height), int(width)))
    return int(out.shape[2]), int(out.shape[3])
