"""The torchreid model table of the plugin: every network on every backbone,
built with torchreid's factory signature ``(num_classes, loss, pretrained,
**kwargs)``.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch.nn as nn

from pmm_torchreid.models.backbones import BACKBONES
from pmm_torchreid.models.families import FAMILIES
from pmm_torchreid.models.torchreid_backbones import TORCHREID_BACKBONES

__all__ = ['NETWORKS', 'DEFAULT_BACKBONE', 'MODEL_FACTORY', 'model_backbone']


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



#: The plugin's networks by name prefix; each comes on every backbone of
#: :data:`~pmm_torchreid.models.backbones.BACKBONES` (the plugin's own and
#: torchreid's networks, :mod:`pmm_torchreid.models.torchreid_backbones`) as
#: ``<prefix>_<backbone>``, and as plain ``<prefix>`` on
#: :data:`DEFAULT_BACKBONE` (the papers' ResNet-50).
#: FMN and MagnifierNet are comparison systems (:mod:`pmm_torchreid.models.fmn`,
#: :mod:`pmm_torchreid.models.magnifiernet`).
NETWORKS = {name: family.network for name, family in FAMILIES.items()}
DEFAULT_BACKBONE = 'resnet50'


def _model_factory() -> Dict[str, Callable[..., nn.Module]]:
    # importing torchreid_backbones added its backbones to BACKBONES
    assert set(TORCHREID_BACKBONES) <= set(BACKBONES)
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
