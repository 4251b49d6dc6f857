"""Pictures of what each PMM stage looks at: Grad-CAMs, top-K blocks, the mix.

The pieces, smallest first:

- :func:`stage_views` runs a trained :class:`~pmm_torchreid.models.PMM` on a
  batch with BatchNorm in eval mode (no running statistics change, no
  parameter ``.grad`` is written) and returns, for every stage, its Grad-CAM
  and top-K block mask, twice: at test time (every stage sees the clean maps)
  and along the training chain (stage ``s + 1`` sees the part map with stage
  ``s``'s top-K blocks taken from a partner of another identity, exactly the
  rule of :class:`~pmm_torchreid.guidance.HardMix`).
- :func:`upsample_cam`, :func:`upsample_mask`, :func:`overlay` and
  :func:`denormalize` map those feature-level maps onto the image pixels.
- :func:`render_panel` draws one image's panel, :func:`contact_sheet` many
  images in a grid; :func:`save_png` writes a picture atomically.
- :func:`mask_iou`, :func:`cam_cosine` and :func:`stage_overlap` measure how
  much the stages overlap: PMM's claim is that they attend to different,
  complementary regions, so the overlap should be low.

Every backbone works (the part map has stride 16 for all of them), on CPU or
GPU.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import atomic_write, unwrap
from .guidance import (DEFAULT_TOP_K, HardMix, MixRule, block_mask, grad_cam,
                       with_partners)

__all__ = [
    'stage_views', 'test_time_views', 'StagePictures', 'render_panel',
    'contact_sheet', 'panel_size', 'overlay', 'upsample_cam', 'upsample_mask',
    'stage_overlap', 'summarize_overlap', 'mask_iou', 'cam_cosine',
    'chance_iou', 'format_overlap', 'draw_partners', 'json_safe'
]

STAGE_NAMES = ('I', 'II', 'III', 'IV', 'V', 'VI', 'VII', 'VIII')


def stage_name(s: int) -> str:
    """Roman numeral of stage ``s`` (1-based), as in the paper."""
    return STAGE_NAMES[s - 1] if 1 <= s <= len(STAGE_NAMES) else str(s)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The PMM network inside ``nn.DataParallel``/``DistributedDataParallel``."""
    net = unwrap(model)
    for name in ('backbone', 'global_head', 'part_trunk', 'part_heads'):
        if not hasattr(net, name):
            raise TypeError(
                'stage pictures need a PMM model (with backbone, global_head, '
                'part_trunk and part_heads); got {}'.format(type(net).__name__)
            )
    return net


def normalization_of(transform) -> tuple:
    """``(mean, std)`` of the ``Normalize`` inside a torchvision ``Compose``."""
    for t in getattr(transform, 'transforms', [transform]):
        if type(t).__name__ == 'Normalize':
            return list(t.mean), list(t.std)
    raise ValueError(
        'the test transform {!r} holds no Normalize; cannot undo the '
        'normalisation for pictures'.format(transform)
    )


# --------------------------------------------------------------------------
# from feature maps to pixels
# --------------------------------------------------------------------------
def denormalize(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Undoes ``Normalize(mean, std)``: N x 3 x H x W, clipped to [0, 1]."""
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device)
    return (images * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)).clamp(0, 1)


def upsample_cam(cam: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """N x h x w CAMs -> N x H x W in [0, 1], aligned with the image.

    Each CAM is divided by its maximum (an all-zero CAM stays zero), then
    resized bilinearly with ``align_corners=False``: a feature cell covers the
    pixels it was computed from (cell ``(r, c)`` of an ``h x w`` map on an
    ``H x W`` image covers rows ``r*H/h`` to ``(r+1)*H/h``), so a single hot
    cell is above 0.5 exactly on its own pixels when ``H/h`` is an integer.
    """
    if cam.dim() != 3:
        raise ValueError(
            'upsample_cam: cam must be N x h x w, got shape {}'.format(
                tuple(cam.shape)
            )
        )
    cam = cam.detach().float().clamp(min=0)
    peak = cam.flatten(1).max(dim=1).values.clamp(min=1e-12).view(-1, 1, 1)
    cam = cam / peak
    up = F.interpolate(
        cam.unsqueeze(1), size=tuple(size), mode='bilinear',
        align_corners=False
    )
    return up.squeeze(1).clamp(0, 1)


def upsample_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """N x 1 x h x w (or N x h x w) block mask -> N x H x W, nearest, exact."""
    if mask.dim() == 4:
        mask = mask[:, 0]
    return F.interpolate(
        mask.unsqueeze(1).float(), size=tuple(size), mode='nearest'
    ).squeeze(1)


def colorize(cam: torch.Tensor, cmap: str = 'jet') -> torch.Tensor:
    """N x H x W values in [0, 1] -> N x 3 x H x W RGB in [0, 1] (matplotlib)."""
    import matplotlib
    table = torch.as_tensor(
        matplotlib.colormaps[cmap](np.linspace(0, 1, 256))[:, :3],
        dtype=torch.float32
    )
    idx = (cam.detach().float().clamp(0, 1) * 255).round().long().cpu()
    return table[idx].permute(0, 3, 1, 2).to(cam.device)


def overlay(
    images: torch.Tensor, cam: torch.Tensor, alpha: float = 0.5,
    cmap: str = 'jet'
) -> torch.Tensor:
    """Heat map over the image: ``(1 - alpha) * image + alpha * cmap(cam)``.

    Args:
        images (Tensor): N x 3 x H x W RGB in [0, 1] (see :func:`denormalize`).
        cam (Tensor): N x H x W in [0, 1] (see :func:`upsample_cam`).

    Returns:
        Tensor: N x 3 x H x W in [0, 1].
    """
    if images.shape[0] != cam.shape[0] or images.shape[2:] != cam.shape[1:]:
        raise ValueError(
            'overlay: images {} and CAMs {} differ in size'.format(
                tuple(images.shape), tuple(cam.shape)
            )
        )
    heat = colorize(cam, cmap).to(images.dtype)
    return ((1 - alpha) * images + alpha * heat).clamp(0, 1)


# --------------------------------------------------------------------------
# the stages' CAMs and masks
# --------------------------------------------------------------------------
def test_time_views(
    net: nn.Module, images: torch.Tensor, labels: Optional[torch.Tensor],
    block: Sequence[int], k: int
) -> Dict:
    """Every stage's Grad-CAM and top-K mask on the clean maps (test time).

    ``net`` is an unwrapped PMM in eval mode; ``labels`` (N classes, or None
    for the class the stages' summed logits predict).  Returns ``'labels'``,
    ``'predicted'``, ``'cams'`` (N x h x w per stage) and ``'masks'``.
    """
    with torch.no_grad():
        fmap = net.backbone(images)
        part = net.part_trunk(fmap) if net.part_heads else None
    fmap = fmap.detach().requires_grad_()
    if part is not None:
        part = part.detach().requires_grad_()
    with torch.enable_grad():
        logits = [net.global_head(fmap)[0]]
        logits += [head(part)[0] for head in net.part_heads]
        predicted = labels is None
        if predicted:
            labels = torch.stack([z.detach() for z in logits]).sum(0).argmax(1)
        labels = labels.to(images.device).long()
        cams = [grad_cam(logits[0], fmap, labels)]
        cams += [grad_cam(z, part, labels) for z in logits[1:]]
    return {'labels': labels.detach(), 'predicted': predicted, 'cams': cams,
            'masks': [block_mask(c, block, k) for c in cams]}


def stage_views(
    model: nn.Module,
    images: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    block: Sequence[int] = (3, 2),
    k: int = 8,
    partners: Optional[Sequence[torch.Tensor]] = None,
    rule: Optional[MixRule] = None,
    partner_labels: Optional[Sequence[torch.Tensor]] = None
) -> Dict:
    """Every stage's Grad-CAM and top-K mask for a batch, without training.

    BatchNorm runs in eval mode (running statistics are not updated) and the
    Grad-CAMs are gradients with respect to each stage's input only
    (:func:`~pmm_torchreid.guidance.grad_cam`): no parameter ``.grad`` is
    written.  The model's train/eval mode is restored afterwards.

    The training chain is the model's own
    :meth:`~pmm_torchreid.models.PMM.forward_train`, run with ``rule`` (any
    mixing rule) whose partners are fixed to the given images
    (:func:`~pmm_torchreid.guidance.with_partners`); random blocks come from
    a generator seeded 0, so the training generator is untouched.

    Args:
        model (nn.Module): a PMM model (optionally wrapped in DataParallel).
        images (Tensor): N x 3 x H x W, normalised like the model's input.
        labels (Tensor, optional): N training-class indices to take the
            Grad-CAM at. Default is None: the class with the largest summed
            test-time logits of all stages (needed for query images, whose
            identities the classifier has never seen).
        block (sequence of int): block height and width on the feature map.
        k (int): top-K blocks per stage.
        partners (list of Tensor, optional): for each mixed stage (2, 3, ...),
            N x 3 x H x W images of another identity, the partners of the
            chain. Default is None: no training chain.
        rule (MixRule, optional): the mixing rule of the chain. Default is
            :class:`~pmm_torchreid.guidance.HardMix` on ``block``/``k``.
        partner_labels (list of Tensor, optional): the partners' classes
            (their own Grad-CAMs matter to ``a_cutmix``). Default is None:
            their predicted classes.

    Returns:
        dict with
        ``'labels'`` (N, the classes used), ``'predicted'`` (bool),
        ``'cams'`` (one N x h x w tensor per stage, test time: every stage on
        the clean maps), ``'masks'`` (N x 1 x h x w, 0 on each stage's top-K
        blocks), and, with ``partners``, ``'mix_cams'`` and ``'mix_masks'``
        (the same along the training chain, each stage on its own input),
        ``'mix_inputs'`` (for stage s >= 2, the N x 1 x h x w mask that built
        its input: 0 where the blocks were replaced) and ``'mix_pasted'``
        (per mixed stage, True when the partner's features filled them,
        False when they were zeroed).
    """
    net = unwrap_model(model)
    num_stages = 1 + len(net.part_heads)
    if partners is not None and len(partners) < num_stages - 1:
        raise ValueError(
            'stage_views: {} mixed stage(s) need {} partner batch(es), got '
            '{}'.format(num_stages - 1, num_stages - 1, len(partners))
        )
    was_training = net.training
    net.eval()
    try:
        n = images.shape[0]
        if partners is None or num_stages == 1:
            return test_time_views(net, images, labels, block, k)
        partners = list(partners[:num_stages - 1])
        batch = torch.cat([images] + partners)
        clean = test_time_views(net, batch, None, block, k)
        all_labels = clean['labels'].clone()
        if labels is not None:
            all_labels[:n] = labels.to(all_labels.device).long()
        for s, lab in enumerate(partner_labels or []):
            all_labels[n * (s + 1):n * (s + 2)] = lab.to(all_labels.device)
        views = test_time_views(net, images, labels, block, k) \
            if labels is not None else {
                'labels': clean['labels'][:n], 'predicted': True,
                'cams': [c[:n] for c in clean['cams']],
                'masks': [m[:n] for m in clean['masks']]}
        # partner of sample i at stage s: row n * (s - 1) + i; the partner
        # rows themselves keep their own features (they are not pictured)
        given = []
        for s in range(1, num_stages):
            idx = torch.arange(batch.shape[0])
            idx[:n] = torch.arange(n) + n * s
            given.append(idx)
        chain_rule = with_partners(rule or HardMix(block, k), given,
                                   torch.Generator().manual_seed(0))
        seen = []  # (stage input, logits), in stage order
        hooks = [head.register_forward_hook(
            lambda mod, inp, out: seen.append((inp[0], out[0])))
            for head in [net.global_head] + list(net.part_heads)]
        try:
            with torch.no_grad():
                fmap = net.backbone(batch)
            fmap = fmap.detach().requires_grad_()
            with torch.enable_grad():
                out = net.forward_train(fmap, all_labels, chain_rule)
                mix_cams = [grad_cam(z, x, all_labels)[:n] for x, z in seen]
        finally:
            for hook in hooks:
                hook.remove()
        views.update(
            mix_cams=mix_cams,
            mix_masks=[block_mask(c, block, k) for c in mix_cams],
            mix_inputs=[m[:n].detach() for m in out['masks']],
            mix_pasted=[lab is not None for lab in out['partner_labels']])
        return views
    finally:
        net.train(was_training)


def draw_partners(
    pids: Sequence[int], pool_pids: Sequence[int], generator: torch.Generator
) -> List[int]:
    """For each pid, a uniformly random index into ``pool_pids`` of another
    identity (the rule of :func:`~pmm_torchreid.guidance.sample_negatives`,
    drawn from a whole image set instead of one batch)."""
    pool = torch.as_tensor(list(pool_pids))
    picks = []
    for pid in pids:
        others = torch.nonzero(pool != int(pid)).view(-1)
        if others.numel() == 0:
            raise ValueError(
                'no image of another identity than {} to mix with: the set '
                'holds a single identity'.format(pid)
            )
        j = torch.randint(others.numel(), (1, ), generator=generator).item()
        picks.append(int(others[j]))
    return picks


# --------------------------------------------------------------------------
# overlap between stages
# --------------------------------------------------------------------------
def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample IoU of two sets of selected regions.

    Args:
        a, b (Tensor): N x ... of 0/1 or bool, 1 where selected (for
            :func:`~pmm_torchreid.guidance.block_mask` output, pass
            ``mask == 0``: its top-K blocks are the 0s).

    Returns:
        Tensor: N values in [0, 1]; 1 for identical selections (two empty
        selections included), 0 for disjoint ones.
    """
    a = a.bool().flatten(1)
    b = b.bool().flatten(1)
    inter = (a & b).sum(1).float()
    union = (a | b).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1),
                       torch.ones_like(union))


def cam_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity of two CAMs (N x h x w); 0 if one is all
    zero.  CAMs are non-negative, so the value is in [0, 1]."""
    return F.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(),
                               dim=1, eps=1e-12)


def pairwise(items: Sequence[torch.Tensor], fn) -> 'OrderedDict[str, torch.Tensor]':
    """``fn`` on every pair of stages: ``{'I-II': ..., 'I-III': ..., ...}``."""
    out = OrderedDict()
    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            key = '{}-{}'.format(stage_name(i + 1), stage_name(j + 1))
            out[key] = fn(items[i], items[j])
    return out


def stage_overlap(cams: Sequence[torch.Tensor],
                  masks: Sequence[torch.Tensor]) -> Dict[str, 'OrderedDict']:
    """Per-sample pairwise overlaps: ``{'mask_iou': {pair: N}, 'cam_cosine':
    {pair: N}}`` for the top-K masks (0 = selected) and the CAMs.

    A pair in which one stage's CAM is all zero (no positive evidence, so
    its "top-K blocks" are only the tie-break) gets NaN, and
    :func:`summarize_overlap` leaves it out.
    """
    alive = [c.flatten(1).max(1).values > 0 for c in cams]

    def masked(fn, items):
        out = pairwise(list(items), fn)
        valid = pairwise(alive, lambda a, b: a & b)
        for pair in out:
            out[pair] = torch.where(valid[pair], out[pair].float(),
                                    torch.full_like(out[pair].float(),
                                                    float('nan')))
        return out

    return {
        'mask_iou': masked(mask_iou, [m == 0 for m in masks]),
        'cam_cosine': masked(cam_cosine, cams),
    }


def summarize_overlap(per_sample: Dict[str, 'OrderedDict']) -> Dict:
    """Means over samples of :func:`stage_overlap` (lists of batches allowed),
    NaNs left out, plus ``'mean'``: the mean over the stage pairs."""
    out = {}
    for metric, pairs in per_sample.items():
        means = OrderedDict()
        for pair, values in pairs.items():
            if isinstance(values, (list, tuple)):
                values = torch.cat([v.flatten().cpu() for v in values])
            values = values.float()
            values = values[~torch.isnan(values)]
            means[pair] = float(values.mean()) if values.numel() else \
                float('nan')
        if means:
            means['mean'] = float(np.mean(list(means.values())))
        out[metric] = means
    return out


def chance_iou(blocks: int, k: int) -> float:
    """Expected IoU of two independent uniformly random sets of ``k`` out of
    ``blocks`` blocks (the hypergeometric law of their intersection)."""
    if k == 0:
        return 1.0
    total = 0.0
    for j in range(max(0, 2 * k - blocks), k + 1):
        p = math.comb(k, j) * math.comb(blocks - k, k - j) / math.comb(blocks, k)
        total += p * j / (2 * k - j)
    return total


# --------------------------------------------------------------------------
# drawing
# --------------------------------------------------------------------------
_BG = (255, 255, 255)
_INK = (20, 20, 20)
_PAD = 4
_HEADER = 18
_TITLE = 16
_FOOTER = 15


def _font(size: int = 12):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    """3 x H x W in [0, 1] -> H x W x 3 uint8 RGB."""
    arr = img.detach().float().clamp(0, 1).mul(255).round().byte()
    return arr.permute(1, 2, 0).cpu().numpy()


def _outline(tile: np.ndarray, selected: np.ndarray, color=(255, 255, 255),
             width: int = 1) -> np.ndarray:
    """Draws the border of the ``selected`` region (H x W bool) on ``tile``."""
    sel = selected.astype(bool)
    edge = np.zeros_like(sel)
    pad = np.pad(sel, width, mode='constant', constant_values=False)
    h, w = sel.shape
    for dy in range(-width, width + 1):
        for dx in range(-width, width + 1):
            shifted = pad[width + dy:width + dy + h, width + dx:width + dx + w]
            edge |= sel & ~shifted
    out = tile.copy()
    out[edge] = color
    return out


def _scale(tile: np.ndarray, scale: int) -> np.ndarray:
    if scale == 1:
        return tile
    return tile.repeat(scale, axis=0).repeat(scale, axis=1)


def tile_scale(width: int, min_width: int = 128) -> int:
    """Integer magnification so that a tile is at least ``min_width`` wide
    (titles must fit)."""
    return max(1, int(math.ceil(min_width / float(width))))


def panel_size(height: int, width: int, num_stages: int = 3,
               with_mix: bool = True) -> tuple:
    """``(height, width)`` in pixels of :func:`render_panel`'s picture."""
    scale = tile_scale(width)
    tiles = 1 + num_stages + (2 * (num_stages - 1) if with_mix else 0)
    th, tw = height * scale, width * scale
    return (_PAD + _HEADER + _TITLE + th + _FOOTER + _PAD,
            _PAD + tiles * (tw + _PAD))


def _tiles_for(i: int, image01: torch.Tensor, views: Dict,
               partners01: Optional[Sequence[torch.Tensor]]):
    """(title, H x W x 3 uint8) tiles of sample ``i`` at image resolution."""
    size = image01.shape[-2:]
    img = image01[i:i + 1]
    tiles = [('input', _to_uint8(img[0]))]
    for s, (cam, mask) in enumerate(zip(views['cams'], views['masks']), 1):
        heat = _to_uint8(overlay(img, upsample_cam(cam[i:i + 1], size))[0])
        if float(cam[i].max()) > 0:  # an all-zero CAM has no top-K of its own
            sel = upsample_mask(mask[i:i + 1], size)[0].cpu().numpy() == 0
            heat = _outline(heat, sel)
        tiles.append(('stage {} CAM'.format(stage_name(s)), heat))
    if partners01 is not None and 'mix_inputs' in views:
        pasted = views.get('mix_pasted') or [True] * len(views['mix_inputs'])
        for s, keep in enumerate(views['mix_inputs'], 2):
            keep_px = upsample_mask(keep[i:i + 1], size)[0].bool().to(
                img.device)
            sel = keep_px.cpu().numpy() == 0
            if pasted[s - 2]:
                partner = partners01[s - 2][i:i + 1][0]
                title = 'mixed in {} *'
            else:  # the rule zeroes the blocks (cutout, batch_drop)
                partner = torch.full_like(img[0], 0.5)
                title = 'zeroed in {} *'
            mixed = torch.where(keep_px, img[0],
                                partner if pasted[s - 2] else
                                torch.zeros_like(img[0]))
            tiles.append(('partner {}'.format(stage_name(s)) if pasted[s - 2]
                          else 'no partner', _to_uint8(partner)))
            tiles.append((title.format(stage_name(s)),
                          _outline(_to_uint8(mixed), sel, color=(255, 0, 255))))
    return tiles


def render_panel(
    i: int,
    image01: torch.Tensor,
    views: Dict,
    partners01: Optional[Sequence[torch.Tensor]] = None,
    caption: str = ''
) -> np.ndarray:
    """One image's panel as an H x W x 3 uint8 RGB array.

    Tiles, left to right: the input; each stage's test-time Grad-CAM (jet
    colours, red = hot) with its top-K blocks outlined in white; then, per
    mixed stage, the partner of another identity and the mixed input, drawn
    in pixels (*: the mix happens on the feature map; the picture pastes the
    partner's image region under each replaced block, outlined in magenta).

    Args:
        i (int): the sample in the batch.
        image01 (Tensor): N x 3 x H x W RGB in [0, 1].
        views (dict): :func:`stage_views` output for the batch.
        partners01 (list of Tensor, optional): partner images in [0, 1].
        caption (str): header text (e.g. the file name and the class).
    """
    from PIL import Image, ImageDraw
    height, width = image01.shape[-2:]
    num_stages = len(views['cams'])
    with_mix = partners01 is not None and 'mix_inputs' in views
    scale = tile_scale(width)
    ph, pw = panel_size(height, width, num_stages, with_mix)
    canvas = Image.new('RGB', (pw, ph), _BG)
    draw = ImageDraw.Draw(canvas)
    font = _font(12)
    draw.text((_PAD, _PAD + 1), caption, fill=_INK, font=font)
    top = _PAD + _HEADER + _TITLE
    tw = width * scale
    for t, (title, tile) in enumerate(_tiles_for(i, image01, views,
                                                 partners01)):
        x = _PAD + t * (tw + _PAD)
        draw.text((x, _PAD + _HEADER), title, fill=_INK, font=font)
        canvas.paste(Image.fromarray(_scale(tile, scale)), (x, top))
    note = 'white: top-K blocks; red = hot'
    if with_mix:
        note += ('; * pixel view of the feature mix (magenta: replaced '
                 'blocks)')
    draw.text((_PAD, top + height * scale + 2), note, fill=_INK,
              font=_font(10))
    return np.asarray(canvas)


def contact_sheet(
    image01: torch.Tensor, views: Dict, captions: Sequence[str] = (),
    columns: int = 4, title: str = ''
) -> np.ndarray:
    """Many images on one page: per image, the input and each stage's CAM
    (top-K blocks outlined), ``columns`` images per row.  H x W x 3 uint8."""
    from PIL import Image, ImageDraw
    if columns < 1:
        raise ValueError('contact_sheet: columns must be >= 1, got {}'.format(
            columns))
    n, _, height, width = image01.shape
    num_stages = len(views['cams'])
    per = 1 + num_stages
    cell_w = per * width + (per - 1) + 2 * _PAD
    cell_h = _TITLE + height + _TITLE
    columns = min(columns, n)
    rows = int(math.ceil(n / float(columns)))
    sheet_w = columns * cell_w + _PAD
    sheet_h = _PAD + _HEADER + _TITLE + rows * cell_h + _PAD
    canvas = Image.new('RGB', (sheet_w, sheet_h), _BG)
    draw = ImageDraw.Draw(canvas)
    font, small = _font(12), _font(10)
    draw.text((_PAD, _PAD + 1), title, fill=_INK, font=font)
    heads = ['input'] + ['{}'.format(stage_name(s))
                         for s in range(1, num_stages + 1)]
    y0 = _PAD + _HEADER
    for c in range(columns):
        for t, head in enumerate(heads):
            x = c * cell_w + _PAD + t * (width + 1)
            draw.text((x + 2, y0), head, fill=_INK, font=small)
    for i in range(n):
        r, c = divmod(i, columns)
        x0 = c * cell_w + _PAD
        y = y0 + _TITLE + r * cell_h
        tiles = _tiles_for(i, image01, views, None)
        for t, (_, tile) in enumerate(tiles):
            canvas.paste(Image.fromarray(tile), (x0 + t * (width + 1), y))
        if i < len(captions):
            draw.text((x0, y + height + 1), captions[i], fill=_INK,
                      font=small)
    return np.asarray(canvas)


def save_png(array: np.ndarray, path: str) -> str:
    """Writes an H x W x 3 uint8 RGB array as a PNG, atomically."""
    from PIL import Image
    with atomic_write(path) as f:
        Image.fromarray(np.ascontiguousarray(array)).save(f, format='PNG')
    return path


# --------------------------------------------------------------------------
# whole image sets (used by scripts/visualize_gradcam.py and PMMEngine)
# --------------------------------------------------------------------------
def load_images(items: Sequence, transform, device=None) -> torch.Tensor:
    """Dataset items ``(path, pid, camid, ...)`` -> N x 3 x H x W, read with
    torchreid's ``read_image`` and ``transform`` (the test transform)."""
    import torchreid
    batch = torch.stack([transform(torchreid.utils.read_image(item[0]))
                         for item in items])
    return batch.to(device) if device is not None else batch


def item_name(item) -> str:
    return os.path.splitext(os.path.basename(item[0]))[0]


def _fmt(value) -> str:
    value = float(value)
    return 'n/a (zero CAM)' if math.isnan(value) else '{:.2f}'.format(value)


class StagePictures(object):
    """Panels, a contact sheet and the stage overlap for a set of images.

    Args:
        model (nn.Module): a PMM model.
        transform: the test transform (resize, to tensor, normalise).
        block (sequence of int): block size on the feature map (``pmm.block_size``).
        k (int): top-K (``pmm.top_k``).
        device (torch.device or str, optional): where the model runs.
        use_labels (bool): take the Grad-CAM at each item's pid (training
            images: pids are classifier classes) instead of the predicted
            class (query images). Default is False.
        rule (MixRule, optional): the mixing rule whose training chain is
            drawn. Default is None: A-Hard-Mix on ``block``/``k``.
    """

    def __init__(self, model, transform, block=(3, 2), k=DEFAULT_TOP_K,
                 device=None, use_labels=False, rule=None):
        self.model = model
        self.rule = rule
        self.transform = transform
        self.block = tuple(int(b) for b in block)
        self.k = int(k)
        self.device = device
        self.use_labels = use_labels
        self.mean, self.std = normalization_of(transform)

    @property
    def num_stages(self) -> int:
        return 1 + len(unwrap_model(self.model).part_heads)

    def compute(self, items: Sequence, partner_items: Sequence[Sequence] = ()):
        """Views for ``items``; ``partner_items[s]`` are the partners of the
        mixed stage ``s + 2`` (one per item), or empty for test time only."""
        images = load_images(items, self.transform, self.device)
        partners = [load_images(p, self.transform, self.device)
                    for p in partner_items] or None
        labels, partner_labels = None, None
        if self.use_labels:
            def pids(group):
                return torch.as_tensor([int(it[1]) for it in group],
                                       device=images.device)
            labels = pids(items)
            partner_labels = [pids(p) for p in partner_items]
        views = stage_views(self.model, images, labels, self.block, self.k,
                            partners, self.rule, partner_labels)
        return {
            'views': views,
            'images01': denormalize(images, self.mean, self.std),
            'partners01': None if partners is None else
            [denormalize(p, self.mean, self.std) for p in partners],
        }

    def caption(self, item, views, i, overlap=None) -> str:
        kind = 'predicted class' if views['predicted'] else 'class'
        text = '{}  pid {}  Grad-CAM at {} {}'.format(
            item_name(item), item[1], kind, int(views['labels'][i]))
        if overlap is not None:
            text += '  top-K IoU ' + ' '.join(
                '{} {}'.format(p, _fmt(v[i]))
                for p, v in overlap['mask_iou'].items())
        return text

    def write(self, items, partner_items, out_dir, columns=4, title='',
              prefixes=None) -> Dict:
        """Writes one PNG per item and ``sheet.png`` to ``out_dir``; returns
        ``{'panels': [paths], 'sheet': path, 'sheet_array': array,
        'overlap': summary of the items}``."""
        res = self.compute(items, partner_items)
        views = res['views']
        per = stage_overlap(views['cams'], views['masks'])
        paths = []
        for i, item in enumerate(items):
            panel = render_panel(i, res['images01'], views, res['partners01'],
                                 self.caption(item, views, i, per))
            name = item_name(item)
            if prefixes is not None:
                name = '{}_{}'.format(prefixes[i], name)
            paths.append(save_png(panel, os.path.join(out_dir, name + '.png')))
        captions = [item_name(it) for it in items]
        if per['mask_iou']:  # mean top-K IoU over the stage pairs
            mean_iou = torch.stack(list(per['mask_iou'].values())).nanmean(0)
            captions = ['{}  IoU {}'.format(c, _fmt(v))
                        for c, v in zip(captions, mean_iou)]
        sheet = contact_sheet(res['images01'], views, captions, columns, title)
        sheet_path = save_png(sheet, os.path.join(out_dir, 'sheet.png'))
        return {'panels': paths, 'sheet': sheet_path, 'sheet_array': sheet,
                'overlap': summarize_overlap(per)}

    def overlap(self, items, pool, generator, batch_size=64) -> Dict:
        """Mean pairwise stage overlap over ``items``, at test time and along
        the training chain (partners of another identity drawn from
        ``pool``); also the count of all-zero CAMs per stage."""
        acc = {'test': None, 'mixed': None}
        zero = [0] * self.num_stages
        pool_pids = [int(it[1]) for it in pool]
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            partner_items = [
                [pool[j] for j in draw_partners([it[1] for it in chunk],
                                                pool_pids, generator)]
                for _ in range(self.num_stages - 1)
            ]
            views = self.compute(chunk, partner_items)['views']
            parts = {'test': stage_overlap(views['cams'], views['masks'])}
            if 'mix_cams' in views:
                parts['mixed'] = stage_overlap(views['mix_cams'],
                                               views['mix_masks'])
            for s, cam in enumerate(views['cams']):
                zero[s] += int((cam.flatten(1).max(1).values <= 0).sum())
            for key, per in parts.items():
                if acc[key] is None:
                    acc[key] = {m: OrderedDict((p, []) for p in pairs)
                                for m, pairs in per.items()}
                for m, pairs in per.items():
                    for p, v in pairs.items():
                        acc[key][m][p].append(v.detach().cpu())
        return {
            'num_images': len(items),
            'test': summarize_overlap(acc['test']) if acc['test'] else {},
            'mixed': summarize_overlap(acc['mixed']) if acc['mixed'] else {},
            'zero_cams': {stage_name(s + 1): z for s, z in enumerate(zero)},
        }


def json_safe(obj):
    """``obj`` with NaN/inf floats turned into ``None`` (strict JSON)."""
    if isinstance(obj, dict):
        return type(obj)((k, json_safe(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def format_overlap(summary: Dict, blocks: Optional[int] = None,
                   k: Optional[int] = None) -> str:
    """Readable lines for :meth:`StagePictures.overlap`'s result."""
    lines = ['Mean pairwise overlap between stages over {} images'.format(
        summary['num_images'])]
    for key, label in (('test', 'test time (clean input)'),
                       ('mixed', 'training chain (A-Hard-Mix input)')):
        if not summary.get(key):
            continue
        for metric, pairs in summary[key].items():
            lines.append('  {:34s} {:10s} {}'.format(
                label, metric, '  '.join('{} {:.3f}'.format(p, v)
                                         for p, v in pairs.items())))
    if summary.get('zero_cams'):
        lines.append('  all-zero test-time CAMs (their pairs left out): ' +
                     ', '.join('{} {}'.format(s, n)
                               for s, n in summary['zero_cams'].items()))
    if blocks is not None and k is not None:
        lines.append('  random top-{} of {} blocks would give a mask IoU of '
                     '{:.3f}'.format(k, blocks, chance_iou(blocks, k)))
    return '\n'.join(lines)
