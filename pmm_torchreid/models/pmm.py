"""The PMM network: a backbone, a part trunk and three sequential heads.

Stage I pools the backbone map ``F`` (average); stages II and III pool the part
map ``P = part_trunk(F)`` (max), each possibly mixed by the rule the engine
passes in (see :mod:`pmm_torchreid.models.guidance`).  In eval mode the model
returns one tensor, the concatenation of the stage embeddings, so torchreid's
``Engine.test``, ``FeatureExtractor`` and visrank work unchanged.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from pmm_torchreid.models.heads import PartHead, Trunk

__all__ = ['PMM']


class PMM(Trunk):
    """Progressive Multi-stage Feature Mix (Zhang et al., ICASSP 2021).

    Args:
        num_classes (int): number of training identities.
        backbone (str): ``'resnet50'`` (the paper), ``'resnet18'``,
            ``'osnet_x0_25'`` or one of torchreid's networks
            (:data:`~pmm_torchreid.models.backbones.BACKBONES`). Default is
            ``'resnet50'``.
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
          see :class:`pmm_torchreid.models.guidance.Mixed`).  ``labels`` is a tensor
          so that ``nn.DataParallel`` hands every replica its share.

    Everything a mixed stage's loss needs is computed inside the call, as
    per-sample tensors.  A rule's partner *indices* point into the batch that
    the call saw -- one replica's share under ``nn.DataParallel``, which
    gathers outputs unchanged -- so they are turned into partner *labels*
    here, with the labels of that same share; gathered along dim 0, the
    outputs of several replicas stay right.

    Examples::

        >>> model = PMM(num_classes=751, backbone='resnet18', pretrained=False)
        >>> model = model.eval()
        >>> model(torch.randn(2, 3, 384, 128)).shape
        torch.Size([2, 1536])
    """

    def __init__(self, num_classes: int, backbone: str = 'resnet50',
                 pretrained: bool = True, embedding_dim: int = 512,
                 num_stages: int = 3, loss: str = 'pmm'):
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
        if num_stages == 1:
            # stage I alone uses no part map: a part trunk would be parameters
            # that never get a gradient, which DistributedDataParallel refuses
            # ("Expected to have finished reduction ..."). It was built (the
            # seeded initialisation of the heads is what it always was) and
            # is dropped here.
            self.part_trunk = None
        self.feature_dim = embedding_dim * num_stages

    def forward(
        self,
        x: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        mixer: Optional[Callable] = None
    ):
        if not self.training:
            if self.descriptor == 'global':
                return self.global_descriptor(x)
            fmap, part = self.forward_features(x)
            return torch.cat([emb for _, emb in self.stage_outputs(fmap, part)],
                             dim=1)
        return self.forward_train(self.backbone(x), labels, mixer)

    # the stage protocol (what the pictures use; see
    # pmm_torchreid.visualize.gradcam.STAGE_PROTOCOL)
    def forward_features(
        self, x: torch.Tensor, parts: bool = True
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(F, P)``: the backbone map and the part map (None without part
        stages, or with ``parts=False``), the maps the stages see at test
        time."""
        fmap = self.backbone(x)
        part = self.part_trunk(fmap) if parts and self.part_heads else None
        return fmap, part

    def stage_outputs(
        self, fmap: torch.Tensor, part: Optional[torch.Tensor]
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Each stage's ``(logits, embedding)`` on the clean maps: stage I on
        ``F``, the part stages on ``P``."""
        return [head(fmap if s == 0 else part)
                for s, head in enumerate(self.stage_heads)]

    @property
    def stage_heads(self) -> List[nn.Module]:
        """The stages' heads in order: the global head, then the part heads."""
        return [self.global_head] + list(self.part_heads)

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
