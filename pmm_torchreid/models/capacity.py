"""What a network spends at test time: the parameters its eval-mode forward
uses to make the descriptor, and the descriptor's width.

A comparison of re-identification networks is only fair between networks of
similar capacity, and the capacity that matters is the one the descriptor is
computed with: not the classifiers (their size is the number of training
identities, and the descriptor does not use them) nor heads that only train.
:func:`inference_capacity` measures it on the network itself, so it holds for
every network, the plugin's and torchreid's, without a list of module names.

A parameter counts when the eval-mode output depends on it:

1. one eval-mode forward of a small random batch, with forward hooks on
   every module, finds the modules that run;
2. the gradient of the output's sum marks the parameters on the output's
   autograd graph (a module that runs but whose output is thrown away, such
   as a classifier whose logits the eval forward computes anyway, is not on
   it);
3. a parameter of a module that ran but is not on the graph still counts if
   changing it changes the output: that finds the parameters that act
   through a detached path (MagnifierNet's parsing head, whose detached
   softmax weights the region pooling at test time).

Each parameter counts once, however often it is used (shared weights).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, NamedTuple

import torch
import torch.nn as nn

__all__ = ['InferenceCapacity', 'inference_capacity']


class InferenceCapacity(NamedTuple):
    #: parameters (numbers, not tensors) the eval-mode descriptor depends on
    parameters: int
    #: width of the eval-mode output
    descriptor_dim: int
    #: ``parameters`` by top-level child module (``''``: the model's own)
    by_child: Dict[str, int]
    #: all parameters of the model, used or not
    total: int


def _forward(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    out = model(images)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise TypeError(
            'inference_capacity: the eval-mode {} must return one N x D '
            'tensor, got {}'.format(type(model).__name__, type(out).__name__
                                     if not isinstance(out, torch.Tensor)
                                     else 'shape {}'.format(tuple(out.shape))))
    return out


def _changes_output(model: nn.Module, params: List[nn.Parameter],
                    images: torch.Tensor, reference: torch.Tensor,
                    generator: torch.Generator) -> bool:
    """Whether moving ``params`` (well away from their values) changes the
    output; the values are restored."""
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p in params:
                scale = float(p.abs().max()) + 1.0
                p.add_(scale * torch.randn(p.shape, generator=generator,
                                           dtype=p.dtype).to(p.device))
            return not torch.equal(_forward(model, images), reference)
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)


def inference_capacity(model: nn.Module, height: int, width: int,
                       batch_size: int = 2) -> InferenceCapacity:
    """The parameters the eval-mode descriptor of ``model`` depends on, and
    its width (see the module docstring for how they are found).

    Args:
        model (nn.Module): any network whose eval-mode ``model(images)``
            returns one N x D tensor.  Its mode, weights, ``requires_grad``
            flags and torch's global random state are as they were
            afterwards.
        height (int), width (int): the input size (the band branch of BDB
            and anything else shape-dependent sees the real geometry).
        batch_size (int): images in the random batch. Default is 2.

    Returns:
        InferenceCapacity: ``(parameters, descriptor_dim, by_child, total)``.

    Examples::

        >>> from pmm_torchreid.models.bdb import BDB
        >>> cap = inference_capacity(BDB(10, backbone='osnet_x0_25',
        ...                              pretrained=False), 128, 64)
        >>> cap.descriptor_dim
        1536
    """
    was_training = model.training
    named = OrderedDict(model.named_parameters())  # shared ones once
    flags = {name: p.requires_grad for name, p in named.items()}
    ran = []
    hooks = [m.register_forward_hook(lambda mod, args, out: ran.append(mod))
             for m in model.modules()]
    try:
        model.eval()
        for p in named.values():
            p.requires_grad_(True)
        generator = torch.Generator().manual_seed(0)
        device = next(iter(named.values())).device if named else 'cpu'
        images = torch.randn(batch_size, 3, height, width,
                             generator=generator).to(device)
        with torch.enable_grad():
            out = _forward(model, images)
        for hook in hooks:
            hook.remove()
        hooks = []
        params = list(named.values())
        grads = torch.autograd.grad(out.sum(), params, allow_unused=True) \
            if out.requires_grad else [None] * len(params)
        used = {id(p) for p, g in zip(params, grads) if g is not None}
        reference = out.detach()
        seen = set()
        for module in ran:  # ran, off the graph: does moving them matter?
            if id(module) in seen:
                continue
            seen.add(id(module))
            rest = [p for p in module.parameters(recurse=False)
                    if id(p) not in used]
            if rest and _changes_output(model, rest, images, reference,
                                        generator):
                used.update(id(p) for p in rest)
    finally:
        for hook in hooks:
            hook.remove()
        for name, p in named.items():
            p.requires_grad_(flags[name])
        model.train(was_training)
    by_child = OrderedDict()
    for name, p in named.items():
        if id(p) in used:
            child = name.split('.', 1)[0] if '.' in name else ''
            by_child[child] = by_child.get(child, 0) + p.numel()
    return InferenceCapacity(
        parameters=sum(p.numel() for p in named.values() if id(p) in used),
        descriptor_dim=int(out.shape[1]), by_child=dict(by_child),
        total=sum(p.numel() for p in named.values()))
