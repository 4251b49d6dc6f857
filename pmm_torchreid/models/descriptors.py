"""Which descriptor an eval-mode network returns: ``'all'`` (every stage or
branch embedding, concatenated: the papers' descriptor and the default) or
``'global'`` (stage I's embedding alone, the global head on the backbone map:
a third of PMM's 1,536 dimensions, and no part trunk to run).

The choice is a plain attribute, not a tensor: it is not saved in checkpoints,
so one trained model serves both (``test.descriptor``,
``scripts/export.py --descriptor``).
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ['DESCRIPTORS', 'Descriptors', 'set_descriptor']

#: the descriptor choices, the default first
DESCRIPTORS = ('all', 'global')


class Descriptors(object):
    """Mixin of the plugin's networks: every one has a global head on the
    backbone map (``self.global_head``, giving ``(logits, embedding)``) whose
    embedding leads its full descriptor (``self.feature_dim`` wide)."""

    #: the eval-mode output: one of :data:`DESCRIPTORS`
    descriptor = 'all'

    def set_descriptor(self, name: str) -> 'Descriptors':
        """Chooses what the eval-mode forward returns; returns the network.

        Raises:
            ValueError: ``name`` is not one of :data:`DESCRIPTORS`.
        """
        if name not in DESCRIPTORS:
            raise ValueError('descriptor {!r} of {}: expected one of {}'.format(
                name, type(self).__name__, DESCRIPTORS))
        self.descriptor = name
        return self

    @property
    def descriptor_dim(self) -> int:
        """Width of the eval-mode output under the current choice."""
        if self.descriptor == 'global':
            return int(self.global_head.classifier.in_features)
        return int(self.feature_dim)

    def global_descriptor(self, x: torch.Tensor) -> torch.Tensor:
        """Stage I's embedding of an image batch (what ``'global'`` returns)."""
        return self.global_head(self.backbone(x))[1]


def set_descriptor(model: nn.Module, name: str, model_name: str = '') -> None:
    """Sets ``name`` on a plugin network (unwrapped or not); ``'all'`` is
    accepted for any model (it is what every model returns).

    Raises:
        ValueError: another choice for a network without the choice
            (torchreid's own models), naming the model.
    """
    net = getattr(model, 'module', model)
    if isinstance(net, Descriptors):
        net.set_descriptor(name)
    elif name != DESCRIPTORS[0]:
        raise ValueError(
            'test.descriptor = {!r}: model {!r} has one descriptor only; '
            "'global' is for the plugin's networks (PMM, BDB, FMN, "
            "MagnifierNet), expected 'all'".format(
                name, model_name or type(net).__name__))
