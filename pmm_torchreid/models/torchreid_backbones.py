"""Backbones made of torchreid's own image networks, so that PMM, BDB, FMN and
MagnifierNet run on them (``pmm_osnet_x1_0``, ``bdb_mobilenetv2_x1_0``, ...).

A backbone's body is what the network's ``featuremaps(x)`` computes: its
stages, in the same order, as an ``nn.Sequential`` over the very modules of
torchreid's network.  The global pooling, the embedding layer (``fc``) and the
classifier are not part of it, so a plugin network built on it has no
parameter that never gets a gradient (DistributedDataParallel refuses those).
The map keeps the network's own stride: 16 for OSNet, OSNet-AIN and
``resnet50_fc512``; 32 for ``resnet50_stride32`` (torchreid's ``resnet50``) and
MobileNetV2, whose 256x128 input gives an 8x4 map.  PMM's block grid follows
the real map size (:func:`~pmm_torchreid.models.backbones.feature_map_size`).

ImageNet weights are found where torchreid keeps them, under the same file
names, so a file torchreid has downloaded is used as it is:

- OSNet and OSNet-AIN: ``$TORCH_HOME/checkpoints/<model>_imagenet.pth``,
  downloaded with ``gdown`` from torchreid's Google Drive links when missing;
  their pretrained ``fc`` (Linear + BatchNorm1d + ReLU to 512-d) is handed on
  as the backbone's embedding, which stage I starts from.
- ``resnet50_stride32`` and ``resnet50_fc512``: torchvision's
  ``resnet50-19c8e357.pth`` in ``$TORCH_HOME/hub/checkpoints`` (torch.hub's
  folder, as torchreid's ``model_zoo.load_url``), verified by the hash in its
  name when it is downloaded.  torchreid's 512-d ``fc`` of ``resnet50_fc512``
  is not in that file (it would start from random numbers), so it is not
  handed on: stage I's own 512-d head takes its place.
- MobileNetV2: torchreid downloads nothing (its weights lie on mega.nz); put
  the file at ``$TORCH_HOME/checkpoints/<model>_imagenet.pth``.

Weights are taken as torchreid takes them (tensors matched by name and
shape, a ``module.`` prefix dropped), but every tensor of the body, and of
the embedding when one is handed on, must be found in the file: a file that
leaves some out is refused, naming it.  When a file is missing and cannot be
downloaded, the error names the file and the folder to put it in.

Unlike OSNet-x0.25's file (``OSNET_X0_25_SHA256`` in
:mod:`pmm_torchreid.models.backbones`), the Google Drive and mega.nz files
are not hash-verified: torchreid publishes no hashes, and none is recorded
here.

Another torchreid network whose ``featuremaps`` is a plain chain of its
children can be added with one entry in :data:`TORCHREID_BACKBONES`.
"""
from __future__ import annotations

import functools
import os
from typing import Dict, NamedTuple, Tuple

import torch
import torch.nn as nn
import torchreid

from pmm_torchreid.models.backbones import (
    BACKBONES,
    Backbone,
    _checkpoint_hint,
    _torch_home,
    gdown_weights,
)
from pmm_torchreid.utils.checkpoint import load_checkpoint

__all__ = ['TorchreidBackbone', 'TORCHREID_BACKBONES', 'torchreid_network',
           'torchreid_weights_location', 'build_torchreid_backbone']


class TorchreidBackbone(NamedTuple):
    """How a backbone is cut from one of torchreid's networks.

    Attributes:
        model (str): the network's name in torchreid's model table.
        module (str): the module of ``torchreid.models`` that holds the URL
            of its ImageNet weights (``pretrained_urls`` or ``model_urls``).
        stages (tuple): the names of the children that ``featuremaps`` runs,
            in order; the body is these, nothing else.
        low_level (int): how many of the stages give the stride-16 map (FMN's
            low-level map, :data:`pmm_torchreid.models.fmn.LOW_LEVEL_SPLIT`).
        weights (str): ``'gdrive'`` (torchreid downloads
            ``<model>_imagenet.pth`` with gdown), ``'hub'`` (torchreid loads a
            torchvision file through torch.hub) or ``'manual'`` (torchreid
            downloads nothing).
        embedding (bool): the network's ``fc`` is pretrained with it and is
            handed on as :attr:`Backbone.embedding`.
        url_key (str): the key of its URL in that module's table; the model
            name when empty.
    """
    model: str
    module: str
    stages: Tuple[str, ...]
    low_level: int
    weights: str
    embedding: bool
    url_key: str = ''


_OSNET = ('conv1', 'maxpool', 'conv2', 'conv3', 'conv4', 'conv5')
_OSNET_AIN = ('conv1', 'maxpool', 'conv2', 'pool2', 'conv3', 'pool3', 'conv4',
              'conv5')
_RESNET = ('conv1', 'bn1', 'relu', 'maxpool', 'layer1', 'layer2', 'layer3',
           'layer4')
_MOBILENETV2 = tuple('conv{}'.format(i) for i in range(1, 10))


def _osnet(model: str) -> TorchreidBackbone:
    return TorchreidBackbone(model, 'osnet', _OSNET, 4, 'gdrive', True)


def _osnet_ain(model: str) -> TorchreidBackbone:
    return TorchreidBackbone(model, 'osnet_ain', _OSNET_AIN, 6, 'gdrive', True)


def _mobilenetv2(model: str) -> TorchreidBackbone:
    return TorchreidBackbone(model, 'mobilenetv2', _MOBILENETV2, 6, 'manual',
                             False)


#: backbone name -> how it is cut from torchreid's network.  The names are
#: torchreid's, except ``resnet50_stride32``: torchreid's ``resnet50`` (layer4
#: at stride 2), kept apart from the plugin's ``resnet50`` (torchvision's
#: ResNet-50 with layer4 at stride 1, the paper's backbone).
#: ``osnet_x0_25`` stays the plugin's own, hash-verified one
#: (:mod:`pmm_torchreid.models.backbones`).
TORCHREID_BACKBONES: Dict[str, TorchreidBackbone] = {
    'osnet_x1_0': _osnet('osnet_x1_0'),
    'osnet_x0_75': _osnet('osnet_x0_75'),
    'osnet_x0_5': _osnet('osnet_x0_5'),
    'osnet_ibn_x1_0': _osnet('osnet_ibn_x1_0'),
    'osnet_ain_x1_0': _osnet_ain('osnet_ain_x1_0'),
    'osnet_ain_x0_75': _osnet_ain('osnet_ain_x0_75'),
    'osnet_ain_x0_5': _osnet_ain('osnet_ain_x0_5'),
    'osnet_ain_x0_25': _osnet_ain('osnet_ain_x0_25'),
    'resnet50_fc512': TorchreidBackbone('resnet50_fc512', 'resnet', _RESNET, 7,
                                        'hub', False, 'resnet50'),
    'resnet50_stride32': TorchreidBackbone('resnet50', 'resnet', _RESNET, 7,
                                           'hub', False, 'resnet50'),
    'mobilenetv2_x1_0': _mobilenetv2('mobilenetv2_x1_0'),
    'mobilenetv2_x1_4': _mobilenetv2('mobilenetv2_x1_4'),
}

#: the children of torchreid's networks that ``featuremaps`` does not run
_HEAD = frozenset(('global_avgpool', 'fc', 'classifier'))


def _spec(name: str) -> TorchreidBackbone:
    if name not in TORCHREID_BACKBONES:
        raise KeyError('{!r} is not one of the torchreid backbones {}'.format(
            name, sorted(TORCHREID_BACKBONES)))
    return TORCHREID_BACKBONES[name]


def torchreid_network(name: str) -> nn.Module:
    """torchreid's whole network behind backbone ``name``, built by
    ``torchreid.models.build_model`` without weights."""
    return torchreid.models.build_model(
        _spec(name).model, num_classes=1, loss='softmax', pretrained=False,
        use_gpu=False)


def torchreid_weights_location(name: str) -> Tuple[str, str]:
    """``(path, url)``: where the ImageNet weights of backbone ``name`` are
    kept (torchreid's folder and file name; it reads ``$TORCH_HOME`` now) and
    where they come from."""
    spec = _spec(name)
    module = getattr(torchreid.models, spec.module)
    key = spec.url_key or spec.model
    if spec.weights == 'gdrive':
        url = module.pretrained_urls[key]
    else:
        url = module.model_urls[key]
    if spec.weights == 'hub':
        folder = os.path.join(torch.hub.get_dir(), 'checkpoints')
        filename = os.path.basename(url)
    else:
        folder = os.path.join(_torch_home(), 'checkpoints')
        filename = spec.model + '_imagenet.pth'
    return os.path.join(folder, filename), url


def _gdown(url: str, path: str) -> None:
    """Downloads ``url`` to ``path`` (torchreid's way, with gdown), keeping
    the file only when it loads as plain weights (an HTML page, e.g. a quota
    notice, is refused)."""
    gdown_weights(url, path, load_checkpoint)


def _imagenet_state(name: str) -> Tuple[dict, str]:
    """The ImageNet state dict of backbone ``name`` and the file it came
    from, downloaded first where torchreid downloads it."""
    spec = _spec(name)
    path, url = torchreid_weights_location(name)
    if spec.weights == 'hub':
        try:
            state = torch.hub.load_state_dict_from_url(
                url, map_location='cpu', progress=True, check_hash=True,
                weights_only=True)
        except Exception as error:  # no network, bad hash, ...
            raise _checkpoint_hint(path, url, error) from error
        return state, path
    if not os.path.isfile(path):
        if spec.weights == 'manual':
            raise _checkpoint_hint(path, url, FileNotFoundError(
                'torchreid has no download of the ImageNet weights of '
                '{}'.format(spec.model)))
        _gdown(url, path)
    return load_checkpoint(path), path


def _load_imagenet_weights(net: nn.Module, name: str) -> None:
    """Loads the ImageNet weights into torchreid's network ``net`` as
    torchreid does (by name and shape), requiring every tensor of the body
    (and of ``fc`` when it is handed on as the embedding)."""
    spec = _spec(name)
    state, path = _imagenet_state(name)
    state = state.get('state_dict', state)
    own = net.state_dict()
    matched = {}
    for key, value in state.items():
        key = key[len('module.'):] if key.startswith('module.') else key
        if key in own and own[key].shape == value.shape:
            matched[key] = value
    needed = set(spec.stages) | ({'fc'} if spec.embedding else set())
    missing = [k for k in own if k.split('.')[0] in needed
               and not k.endswith('num_batches_tracked') and k not in matched]
    if missing:
        raise RuntimeError(
            'refusing "{}" as the ImageNet weights of {}: {} of its tensors '
            'are missing or have another shape (e.g. {}); delete the file to '
            'download it again, or build the model with pretrained=False '
            '(config: model.pretrained False)'.format(
                path, spec.model, len(missing), ', '.join(missing[:3])))
    own.update(matched)
    net.load_state_dict(own)
    print('Loaded ImageNet weights into {} from "{}" ({} of {} tensors)'.format(
        spec.model, path, len(matched), len(own)))


def _map_channels(body: nn.Sequential) -> int:
    """The channels of the body's map: those of its last normalisation
    (every network here ends in a convolution, its BatchNorm and maybe an
    activation; tests/test_torchreid_backbones.py checks each against the
    real map)."""
    for module in reversed(list(body.modules())):
        if isinstance(module, nn.BatchNorm2d):
            return int(module.num_features)
    raise RuntimeError('found no BatchNorm2d in the body')


def build_torchreid_backbone(name: str, pretrained: bool) -> Backbone:
    """The :class:`~pmm_torchreid.models.backbones.Backbone` cut from
    torchreid's network behind ``name`` (:data:`TORCHREID_BACKBONES`).

    Raises:
        RuntimeError: the weights are missing and cannot be downloaded (naming
            the file and its folder), the file lacks tensors of the body, or
            this torchreid's network has children that are neither stages
            nor its head (a layout this module does not know).
    """
    spec = _spec(name)
    net = torchreid_network(name)
    unknown = [child for child, _ in net.named_children()
               if child not in spec.stages and child not in _HEAD]
    if unknown or not all(hasattr(net, s) for s in spec.stages):
        raise RuntimeError(
            "torchreid's {} is not laid out as pmm_torchreid expects: stages "
            '{}, then {}; it has the children {}'.format(
                spec.model, list(spec.stages), sorted(_HEAD),
                [child for child, _ in net.named_children()]))
    if pretrained:
        _load_imagenet_weights(net, name)
    body = nn.Sequential(*[getattr(net, stage) for stage in spec.stages])
    embedding = net.fc if pretrained and spec.embedding else None
    return Backbone(body, _map_channels(body), embedding)


def _register(table: Dict) -> None:
    """Adds every backbone of :data:`TORCHREID_BACKBONES` to ``table``
    (:data:`~pmm_torchreid.models.backbones.BACKBONES`), never replacing one
    that is not from this module (a reload of it replaces its own)."""
    for name in TORCHREID_BACKBONES:
        present = table.get(name)
        func = getattr(present, 'func', None)
        if present is not None and getattr(func, '__module__', None) != __name__:
            raise RuntimeError('backbone {!r} is already defined by {!r}; '
                               'pmm_torchreid will not replace it'.format(
                                   name, present))
        table[name] = functools.partial(build_torchreid_backbone, name)


_register(BACKBONES)
