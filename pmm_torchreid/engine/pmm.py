"""``PMMEngine``: torchreid's engine with PMM's guided, stage-wise training
step, the one training step of every plugin engine.  What a run records
besides (safe checkpoints, curves, results, pictures on schedule) is
:mod:`pmm_torchreid.engine.records`, shared with torchreid's own engines."""
from __future__ import annotations

import json
import os.path as osp
from collections import OrderedDict
from typing import Dict, Sequence

import torch
import torchreid

from pmm_torchreid.config.checks import MAX_QUIET_SHARE, check_pmm_config
from pmm_torchreid.engine.losses import (
    batch_hard_triplet,
    mixed_cross_entropy,
    smoothed_cross_entropy,
)
from pmm_torchreid.engine.records import with_run_records
from pmm_torchreid.models.backbones import feature_map_size
from pmm_torchreid.models.guidance import DEFAULT_TOP_K, BlockChoice, build_mixer
from pmm_torchreid.utils.checkpoint import unwrap
from pmm_torchreid.utils.distributed import stop_if_any_failed
from pmm_torchreid.utils.io import atomic_write, json_safe
from pmm_torchreid.visualize.gradcam import StagePictures, draw_partners

__all__ = ['PMMEngine', 'RecordedPMMEngine', 'amp_settings']

__all__ += ['MAX_QUIET_SHARE']  # defined with the config checks


def native_cuda_bf16() -> bool:
    """Whether the current GPU computes in bfloat16 natively (compute
    capability 8.0 or later: A100, H100, RTX 30xx and later).

    ``torch.cuda.is_bf16_supported()`` alone also counts emulation, which
    runs bfloat16 slowly on V100s and T4s; those train in float16 with a
    gradient scaler instead.
    """
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # a torch without the argument: ask the hardware
        return torch.cuda.get_device_capability() >= (8, 0)


def native_cpu_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX,
    as oneDNN needs for its bfloat16 convolutions and matmuls).

    Elsewhere (AVX2 CPUs, e.g. AMD Zen 3) torch emulates bfloat16 on the CPU:
    a PMM training step then runs about 9x SLOWER than in float32 (measured
    on a Zen 3 EPYC, docs/SPEED.md), so ``train.amp`` trains in float32.
    """
    cpu = getattr(torch, 'cpu', None)
    checks = ('_is_avx512_bf16_supported', '_is_amx_tile_supported')
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def amp_settings(amp: bool, device_type: str):
    """``(autocast dtype or None, use a gradient scaler)`` for ``train.amp``
    on ``device_type``: on a GPU bfloat16 where it is native, else float16
    with a scaler; on the CPU bfloat16 where it is native (no scaler: the
    exponent range is float32's), else nothing (float32).

    Examples::

        >>> amp_settings(False, 'cpu')
        (None, False)
    """
    if not amp:
        return None, False
    if device_type == 'cpu':
        return (torch.bfloat16, False) if native_cpu_bf16() else (None, False)
    if device_type != 'cuda':
        return None, False
    if native_cuda_bf16():
        return torch.bfloat16, False
    return torch.float16, True


def precision_name(amp_dtype) -> str:
    """What a step computes in: ``'float32'``, ``'bfloat16 autocast'`` or
    ``'float16 autocast'`` (for logs and results.json)."""
    if amp_dtype is None:
        return 'float32'
    return '{} autocast'.format(str(amp_dtype).replace('torch.', ''))


class PMMEngine(torchreid.engine.Engine):
    r"""Training engine of PMM (Zhang et al., ICASSP 2021).

    Each step runs the stages in sequence; between stages the Grad-CAM of the
    previous stage (a gradient with respect to that stage's input only) picks
    the ``top_k`` most salient blocks, which are replaced by the same blocks
    of a random sample of another identity (A-Hard-Mix).  Every stage gets a
    batch-hard triplet loss and a label-smoothed cross-entropy; the stage
    losses are SUMMED (torchreid's ``compute_loss`` would average them).

    Args:
        datamanager (DataManager): ``torchreid.data.ImageDataManager`` with an
            identity sampler (every batch needs >= 2 identities).
        model (nn.Module): a :class:`pmm_torchreid.models.PMM` or
            :class:`~pmm_torchreid.models.BDB` (optionally in
            ``nn.DataParallel`` or ``DistributedDataParallel``; with several
            processes every rank mixes within its own batch, see
            :mod:`pmm_torchreid.utils.distributed`).
        optimizer (Optimizer): optimizer.
        scheduler (LRScheduler, optional): stepped once per epoch. Default is
            None.
        use_gpu (bool, optional): use a GPU when available. Default is True.
        mix (str, optional): ``'hard_mix'`` (the paper), ``'none'`` (the same
            network without guidance; also the setting for a
            :class:`~pmm_torchreid.models.BDB` model, which drops its own
            block) or an ablation variant, ``'random_mix'``, ``'cutout'``,
            ``'cutmix'``, ``'a_cutmix'`` or ``'batch_drop'`` (see
            :mod:`pmm_torchreid.models.guidance`). For the variants that mix labels,
            the mixed stages' cross-entropy takes the mixed targets; the
            triplet loss always uses the anchor's label. Default is
            ``'hard_mix'``.
        block_size (sequence of int, optional): block height and width on the
            feature map. Default is (3, 2).
        top_k (int, optional): blocks replaced per sample. Default is
            :data:`~pmm_torchreid.models.guidance.DEFAULT_TOP_K` (3).
        mix_ratio (float, optional): the share of the map's blocks to
            replace, instead of ``top_k`` (rounded to whole blocks of the map
            the model gives; see :func:`pmm_torchreid.models.guidance.blocks_for_ratio`).
            Default is None.
        mix_start_epoch (int, optional): the first epoch (0-based) whose
            steps mix; before it the part stages see the clean part map, as
            with ``mix='none'``. Default is 0.
        seed (int, optional): seed of the negative-partner generator. Default
            is 1.
        soft_margin (bool, optional): soft-margin triplet loss. Default is True.
        triplet_margin (float, optional): margin when ``soft_margin`` is False.
            Default is 0.3.
        weight_triplet (float, optional): weight of each triplet loss. Default
            is 1.
        weight_ce (float, optional): weight of each cross-entropy loss.
            Default is 1.
        label_smooth (float, optional): label-smoothing epsilon. Default is 0.1.
        vis_freq (int, optional): every ``vis_freq`` epochs (and after the
            last one) write Grad-CAM pictures of ``vis_num`` fixed training
            images to ``<save_dir>/gradcam/epoch-XXX/`` and TensorBoard, with
            the stage overlap. Default is 0 (off).
        vis_num (int, optional): number of training images pictured.
            Default is 8.
        amp (bool, optional): mixed precision (:func:`amp_settings`):
            bfloat16 autocast on a GPU or CPU that has it natively, float16
            with a gradient scaler on older GPUs, float32 on CPUs without
            native bfloat16. The Grad-CAMs and block choices are still
            computed in float32 (:func:`~pmm_torchreid.models.guidance.
            grad_cam`), and so are the mixed targets. Default is False.
        channels_last (bool, optional): channels-last memory format for the
            model and the images (``train.channels_last``; see
            :func:`pmm_torchreid.config.channels_last`). Default is False.

    This class is the method; :data:`RecordedPMMEngine` (what
    ``scripts/main.py`` builds) adds the run records of
    :mod:`pmm_torchreid.engine.records`: safe, resumable checkpoints,
    ``<save_dir>/curves.csv`` (per epoch the mean stage losses and accuracies
    and the learning rate, and mAP/Rank-1 at every evaluation), the results
    and, with ``vis_freq``, the training-time pictures.

    Examples::

        import torchreid, pmm_torchreid
        from pmm_torchreid.engine import PMMEngine
        datamanager = torchreid.data.ImageDataManager(
            root='reid-data', sources='market1501', height=384, width=128,
            batch_size_train=64, train_sampler='RandomIdentitySampler',
            num_instances=4
        )
        model = torchreid.models.build_model(
            'pmm', num_classes=datamanager.num_train_pids
        )
        optimizer = torchreid.optim.build_optimizer(model, optim='adam',
                                                    lr=1e-3)
        engine = RecordedPMMEngine(datamanager, model, optimizer, top_k=3)
        engine.run(save_dir='log/pmm', max_epoch=400, eval_freq=50)
    """

    #: the step checks its loss on every rank before the backward pass (the
    #: run records need not check again after it)
    checks_loss_on_every_rank = True

    def __init__(
        self,
        datamanager,
        model,
        optimizer,
        scheduler=None,
        use_gpu: bool = True,
        mix: str = 'hard_mix',
        block_size: Sequence[int] = (3, 2),
        top_k: int = DEFAULT_TOP_K,
        mix_ratio=None,
        mix_start_epoch: int = 0,
        seed: int = 1,
        soft_margin: bool = True,
        triplet_margin: float = 0.3,
        weight_triplet: float = 1.0,
        weight_ce: float = 1.0,
        label_smooth: float = 0.1,
        vis_freq: int = 0,
        vis_num: int = 8,
        amp: bool = False,
        channels_last: bool = False
    ):
        super(PMMEngine, self).__init__(datamanager, use_gpu)
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.register_model('model', model, optimizer, scheduler)
        self.generator = torch.Generator().manual_seed(int(seed))
        #: how much of the map is replaced (the one owner of top-k)
        self.choice = BlockChoice(tuple(int(b) for b in block_size),
                                  int(top_k), mix_ratio)
        self.mixer = build_mixer(
            mix, block=self.choice.block, k=self.choice.k,
            generator=self.generator, ratio=self.choice.ratio
        )
        self.mix_start_epoch = int(mix_start_epoch)
        self.soft_margin = soft_margin
        self.triplet_margin = triplet_margin
        self.weight_triplet = weight_triplet
        self.weight_ce = weight_ce
        self.label_smooth = label_smooth
        self.vis_freq = int(vis_freq)
        self.vis_num = int(vis_num)
        self.seed = int(seed)
        self._pictures = None
        self.device_type = 'cuda' if self.use_gpu else 'cpu'
        self.amp_dtype, use_scaler = amp_settings(amp, self.device_type)
        if amp and self.amp_dtype is None:
            print('** train.amp: this CPU has no native bfloat16 (neither '
                  'AVX512-BF16 nor AMX, and emulated bfloat16 is about 9x '
                  'slower than float32): training in float32')
        elif amp:
            print('train.amp: {} on the {}{}, Grad-CAMs and block choices in '
                  'float32'.format(precision_name(self.amp_dtype),
                                   'GPU' if self.device_type == 'cuda' else
                                   'CPU', ' with a gradient scaler'
                                   if use_scaler else ''))
        self.scaler = torch.amp.GradScaler(self.device_type) \
            if use_scaler else None
        self.channels_last = bool(channels_last)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)

    @staticmethod
    def check_cfg(cfg) -> None:
        """Checks what PMM and BDB need of a config (Dassl's ``check_cfg``):
        :func:`pmm_torchreid.config.checks.check_pmm_config`."""
        check_pmm_config(cfg)

    def stage_losses(self, outputs: Dict, pids: torch.Tensor):
        """Step 7: the sum over stages of batch-hard triplet (the anchor's own
        label) + label-smoothed cross-entropy (mixed targets for the rules
        that mix labels), and the per-stage summary.

        Raises:
            FloatingPointError: naming the stage, epoch and iteration when a
                loss is not finite.
        """
        total = 0.0
        summary = OrderedDict()
        stages = zip(outputs['logits'], outputs['embeddings'])
        # stage s >= 2 was fed by a mix: its partners' labels and their
        # shares, per sample (from the model, so that under nn.DataParallel
        # every replica's partners come from its own share of the batch)
        mixes = dict(enumerate(zip(outputs.get('partner_labels', []),
                                   outputs.get('partner_weights', [])), 2))
        for s, (logits, emb) in enumerate(stages, 1):
            # triplet: always the anchor's own label
            loss_t = batch_hard_triplet(
                emb, pids, self.triplet_margin, self.soft_margin
            )
            partner_labels, weight = mixes.get(s, (None, None))
            if partner_labels is not None and bool((weight > 0).any()):
                loss_x = mixed_cross_entropy(
                    logits, pids, partner_labels, weight, self.label_smooth)
            else:
                loss_x = smoothed_cross_entropy(logits, pids,
                                                self.label_smooth)
            loss = self.weight_triplet * loss_t + self.weight_ce * loss_x
            if not bool(torch.isfinite(loss)):
                raise FloatingPointError(
                    'stage {} loss is not finite (triplet {}, cross-entropy '
                    '{}) at epoch {}, iteration {}'.format(
                        s, loss_t.item(), loss_x.item(),
                        getattr(self, 'epoch', 0) + 1,
                        getattr(self, 'batch_idx', 0) + 1))
            total = total + loss
            summary['loss_t{}'.format(s)] = loss_t.item()
            summary['loss_x{}'.format(s)] = loss_x.item()
            summary['acc{}'.format(s)] = (
                logits.argmax(1) == pids
            ).float().mean().item() * 100
        return total, summary

    def mixing(self) -> bool:
        """Whether the steps of the current epoch mix."""
        return self.mixer is not None and \
            getattr(self, 'epoch', 0) >= self.mix_start_epoch

    def forward_backward(self, data):
        """One training step, the same for every plugin engine (the spec's
        steps 1-7 for PMM).

        1-6 happen in the model: the backbone map ``F`` feeds stage I; the
        part map ``P`` feeds stages II and III, and between two stages the
        mixing rule takes the previous stage's Grad-CAM, ranks the blocks and
        replaces the top-k with a partner's (A-Hard-Mix).  7: the summed
        losses, one backward pass, one optimiser step.  Subclasses change
        what the model gets (:meth:`model_inputs`) and what is summed
        (:meth:`losses`), not the step.
        """
        imgs, pids = self.parse_data_for_train(data)
        inputs = self.model_inputs(data)
        if self.use_gpu:  # pinned batches (torchreid's loaders): async copies
            imgs = imgs.cuda(non_blocking=True)
            pids = pids.cuda(non_blocking=True)
            inputs = {k: v.cuda(non_blocking=True)
                      if isinstance(v, torch.Tensor) else v
                      for k, v in inputs.items()}
        if self.channels_last:
            imgs = imgs.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device_type, dtype=self.amp_dtype,
                            enabled=self.amp_dtype is not None):
            outputs = self.model(imgs, pids, **inputs)
            try:
                loss, summary = self.losses(outputs, pids)
                failure = None
            except FloatingPointError as error:
                failure = error
            # before the backward pass: with several processes every rank
            # learns that one failed, and all stop here (none waits forever
            # for the gradients of a rank that stopped)
            stop_if_any_failed(failure)
        self.optimizer_step(loss)
        summary['loss'] = loss.item()
        return summary

    def model_inputs(self, data: Dict) -> Dict:
        """The model's keyword arguments besides the images and labels:
        PMM's mixing rule (None before ``mix_start_epoch`` and without one).
        Tensors among them go to the GPU with the batch."""
        return {'mixer': self.mixer if self.mixing() else None}

    def losses(self, outputs: Dict, pids: torch.Tensor):
        """``(loss, summary)`` of one step: :meth:`stage_losses`."""
        return self.stage_losses(outputs, pids)

    def optimizer_step(self, loss: torch.Tensor) -> None:
        """One backward pass and one optimiser step (through the gradient
        scaler with float16 mixed precision, against underflow)."""
        self.optimizer.zero_grad()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()

    def train(self, *args, **kwargs):
        if self.mixer is not None and self.mix_start_epoch and \
                self.epoch == self.mix_start_epoch:
            print('** Mixing ({!r}) starts with this epoch ({}); the epochs '
                  'before trained without it'.format(self.mixer,
                                                     self.epoch + 1))
        return super(PMMEngine, self).train(*args, **kwargs)

    # ------------------------------------------------------------------
    # Grad-CAM pictures during training (scheduled by the run records)
    # ------------------------------------------------------------------
    def setup_pictures(self):
        """Picks the fixed training images (and their partners) once."""
        train = list(self.train_loader.dataset.train)
        if not 1 <= self.vis_num <= len(train):
            raise ValueError(
                'config pmm.vis_num = {}: expected 1 to {} (the training set '
                'size)'.format(self.vis_num, len(train)))
        gen = torch.Generator().manual_seed(self.seed)
        picks = torch.randperm(len(train), generator=gen)[:self.vis_num]
        items = [train[i] for i in sorted(picks.tolist())]
        pool_pids = [int(it[1]) for it in train]
        num_stages = getattr(unwrap(self.model), 'num_stages', 3)
        partners = []  # without a mixing rule: test-time CAMs only
        if self.mixer is not None:
            partners = [[train[j] for j in draw_partners(
                [it[1] for it in items], pool_pids, gen)]
                for _ in range(num_stages - 1)]
        device = 'cuda' if self.use_gpu else 'cpu'
        self._pictures = {
            'maker': StagePictures(self.model, self.datamanager.transform_te,
                                   self.choice.block, self.blocks(), device,
                                   use_labels=True, rule=self.mixer),
            'items': items, 'partners': partners,
        }

    def write_pictures(self) -> Dict:
        """Writes the pictures of the current epoch; returns the overlap."""
        pics = self._pictures
        folder = osp.join(self.save_dir, 'gradcam',
                          'epoch-{:03d}'.format(self.epoch + 1))
        prefixes = ['{:02d}'.format(i) for i in range(len(pics['items']))]
        res = pics['maker'].write(
            pics['items'], pics['partners'], folder, columns=4,
            title='epoch {}: Grad-CAM per stage at the true class, top-{} '
            'blocks outlined (IoU: mean top-K IoU between stages); chain: '
            '{}'.format(self.epoch + 1, self.blocks(), self.mixer),
            prefixes=prefixes)
        overlap = res['overlap']
        with atomic_write(osp.join(folder, 'overlap.json'), 'w') as f:
            json.dump(json_safe(overlap), f, indent=1, allow_nan=False)
        print('Grad-CAM pictures of {} training images saved to "{}" (top-K '
              'IoU between stages: {})'.format(
                  len(pics['items']), folder, ', '.join(
                      '{} {:.3f}'.format(p, v)
                      for p, v in overlap['mask_iou'].items())))
        if self.writer is not None:
            step = self.epoch + 1
            self.writer.add_image('GradCAM/sheet', res['sheet_array'], step,
                                  dataformats='HWC')
            for metric, pairs in overlap.items():
                for pair, value in pairs.items():
                    self.writer.add_scalar(
                        'GradCAM/{}/{}'.format(metric, pair), value, step)
        return overlap

    def blocks(self) -> int:
        """The blocks replaced per sample at the data manager's image size
        (``top_k``, or what ``mix_ratio`` gives)."""
        height, width = feature_map_size(unwrap(self.model).backbone_name,
                                         self.datamanager.height,
                                         self.datamanager.width)
        return self.choice.count(height, width)

    def extra_checkpoint_state(self) -> Dict:
        """The partner generator's state, so a resumed run draws on (and the
        gradient scaler's, with float16 mixed precision)."""
        state = {'pmm_generator': self.generator.get_state()}
        if self.scaler is not None:
            state['grad_scaler'] = self.scaler.state_dict()
        return state

    def restore_checkpoint_state(self, checkpoint: Dict) -> None:
        if checkpoint.get('pmm_generator') is not None:
            self.generator.set_state(checkpoint['pmm_generator'])
        if self.scaler is not None and checkpoint.get('grad_scaler'):
            self.scaler.load_state_dict(checkpoint['grad_scaler'])


#: :class:`PMMEngine` with the run records of :mod:`pmm_torchreid.engine.records`
#: (what ``scripts/main.py`` trains with).
RecordedPMMEngine = with_run_records(PMMEngine)
