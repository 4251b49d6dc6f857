"""``ComparisonEngine``: the training step of the comparison systems FMN
(:mod:`pmm_torchreid.models.fmn`) and MagnifierNet
(:mod:`pmm_torchreid.models.magnifiernet`),
in PMM's engine family.

It is :class:`~pmm_torchreid.engine.PMMEngine` without a mixing rule (``pmm.mix
'none'``, as for BDB): every branch the model returns gets PMM's per-stage loss
(batch-hard triplet + label-smoothed cross-entropy, weighted by
``pmm.weight_triplet`` and ``pmm.weight_ce``), and the model's extra losses
(MagnifierNet: the Semantic Diversity loss and the parsing loss) are added with
their weights; everything is summed and back-propagated once.  For a model that
needs semantic regions (MagnifierNet), a training run first makes the data
manager's training batches carry them
(:func:`pmm_torchreid.data.parsing.attach_region_masks`); an evaluation-only run
needs no masks.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from pmm_torchreid.config.checks import check_comparison_config
from pmm_torchreid.data.parsing import attach_region_masks
from pmm_torchreid.engine.pmm import PMMEngine, RecordedPMMEngine
from pmm_torchreid.engine.records import RUN_SIGNATURE, with_run_records
from pmm_torchreid.models.families import is_comparison_model
from pmm_torchreid.utils.checkpoint import unwrap

__all__ = ['ComparisonEngine', 'RecordedComparisonEngine', 'engine_class']



class ComparisonEngine(PMMEngine):
    """Trains FMN or MagnifierNet (see the module docstring).

    Args:
        datamanager, model, optimizer, scheduler, use_gpu: as for
            :class:`~pmm_torchreid.engine.PMMEngine`.
        weight_sd (float, optional): weight of MagnifierNet's Semantic
            Diversity loss. Default is 1.
        weight_parsing (float, optional): weight of MagnifierNet's parsing
            loss. Default is 1.
        masks_root (str, optional): folder of label PNGs mirroring
            ``data_root`` (:mod:`pmm_torchreid.data.parsing`). Default is ''.
        data_root (str, optional): the images' root. Default is ''.
        mask_labels (str, optional): their label set (``'lip'``, ``'cihp'``,
            ``'atr'``). Default is ``'lip'``.
        band_regions (bool, optional): the fixed bands for every image,
            whatever masks exist (config ``magnifiernet.regions 'bands'``).
            Default is False.
        **kwargs: the other arguments of
            :class:`~pmm_torchreid.engine.PMMEngine` (``mix`` must be
            ``'none'``; ``vis_freq`` 0).

    The per-step summary holds ``loss_t<s>``, ``loss_x<s>`` and ``acc<s>``
    per branch (FMN: 1 global, 2 masked; MagnifierNet: 1 global, 2 semantic
    regularization, 3 semantic fusion), ``loss_<name>`` per extra loss
    (``loss_sd``, ``loss_parsing``) and ``loss``.
    """

    def __init__(self, datamanager, model, optimizer, scheduler=None,
                 use_gpu: bool = True, weight_sd: float = 1.0,
                 weight_parsing: float = 1.0, masks_root: str = '',
                 data_root: str = '', mask_labels: str = 'lip',
                 band_regions: bool = False, **kwargs):
        if kwargs.get('mix', 'none') != 'none':
            raise ValueError('{} takes no mixing rule (mix {!r}); use '
                             "'none'".format(type(unwrap(model)).__name__,
                                             kwargs['mix']))
        kwargs['mix'] = 'none'
        super(ComparisonEngine, self).__init__(
            datamanager, model, optimizer, scheduler=scheduler,
            use_gpu=use_gpu, **kwargs)
        self.needs_regions = bool(getattr(unwrap(model), 'needs_regions',
                                          False))
        self.masks = (masks_root, data_root, mask_labels, band_regions)
        self.aux_weights = {'sd': float(weight_sd),
                            'parsing': float(weight_parsing)}

    def attach_regions(self) -> None:
        """Makes the training batches carry the region masks (a model that
        needs them only; idempotent): :func:`pmm_torchreid.data.parsing.
        attach_region_masks` on the data manager, whose new training loader
        the engine then trains on."""
        if not self.needs_regions:
            return
        attach_region_masks(self.datamanager, *self.masks)
        self.train_loader = self.datamanager.train_loader

    def run(self, *args, **kwargs):
        """torchreid's ``run``; a training run first attaches the region
        masks (an evaluation-only run needs none)."""
        bound = RUN_SIGNATURE.bind(self, *args, **kwargs)
        if not bound.arguments.get('test_only', False):
            self.attach_regions()
        return super(ComparisonEngine, self).run(*args, **kwargs)

    @staticmethod
    def check_cfg(cfg) -> None:
        """PMMEngine's checks plus the comparison systems' own:
        :func:`pmm_torchreid.config.checks.check_comparison_config`."""
        check_comparison_config(cfg)

    def model_inputs(self, data: Dict) -> Dict:
        """The batch's region masks, for the models that need them (no mixing
        rule: the comparison systems train without one)."""
        if not self.needs_regions:
            return {}
        regions = data.get('regions')
        if regions is None:
            raise ValueError('the training batch has no region masks '
                             "(batch['regions']); call engine.attach_regions() "
                             '(engine.run does) before training')
        return {'regions': regions}

    def losses(self, outputs: Dict, pids: torch.Tensor):
        """The branches' losses plus the model's extra losses
        (:meth:`extra_losses`)."""
        loss, summary = self.stage_losses(outputs, pids)
        loss = loss + self.extra_losses(outputs, summary)
        return loss, summary

    def extra_losses(self, outputs: Dict, summary: Dict):
        """The weighted sum of the model's ``'aux_losses'`` (each averaged
        over ``nn.DataParallel`` replicas); records each in ``summary``."""
        total = 0.0
        for name, value in outputs.get('aux_losses', {}).items():
            value = value.float().mean()
            if not bool(torch.isfinite(value)):
                raise FloatingPointError(
                    '{} loss is not finite ({}) at epoch {}, iteration '
                    '{}'.format(name, value.item(),
                                getattr(self, 'epoch', 0) + 1,
                                getattr(self, 'batch_idx', 0) + 1))
            total = total + self.aux_weights.get(name, 1.0) * value
            summary['loss_' + name] = value.item()
        return total


#: :class:`ComparisonEngine` with the run records (what ``scripts/main.py``
#: trains FMN and MagnifierNet with).
RecordedComparisonEngine = with_run_records(ComparisonEngine)


def engine_class(model_name: str, recorded: bool = False) -> Optional[type]:
    """The plugin engine class that trains ``model_name``:
    :class:`ComparisonEngine` for the comparison systems,
    :class:`~pmm_torchreid.engine.PMMEngine` for PMM and BDB (their
    ``Recorded`` versions with ``recorded``)."""
    if is_comparison_model(model_name):
        return RecordedComparisonEngine if recorded else ComparisonEngine
    return RecordedPMMEngine if recorded else PMMEngine
