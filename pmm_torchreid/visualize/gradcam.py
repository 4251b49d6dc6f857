"""Pictures of what each PMM stage looks at: Grad-CAMs, top-K blocks, the mix.

The pieces, smallest first:

- :func:`stage_views` runs a trained :class:`~pmm_torchreid.models.PMM` on a
  batch with BatchNorm in eval mode (no running statistics change, no
  parameter ``.grad`` is written) and returns, for every stage, its Grad-CAM
  and top-K block mask, twice: at test time (every stage sees the clean maps)
  and along the training chain (stage ``s + 1`` sees the part map with stage
  ``s``'s top-K blocks taken from a partner of another identity, exactly the
  rule of :class:`~pmm_torchreid.models.guidance.HardMix`).
- :func:`upsample_cam`, :func:`upsample_mask`, :func:`overlay` and
  :func:`denormalize` map those feature-level maps onto the image pixels.
- :func:`render_panel` draws one image's panel, :func:`contact_sheet` many
  images in a grid; :func:`save_png` writes a picture atomically.
- :func:`mask_iou`, :func:`cam_cosine` and :func:`stage_overlap` measure how
  much the stages overlap: PMM's claim is that they attend to different,
  complementary regions, so the overlap should be low.

Every backbone works (the maps are resized onto the image, whatever the
backbone's stride), on CPU or GPU.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageDraw

from pmm_torchreid.models.guidance import (
    DEFAULT_TOP_K,
    HardMix,
    MixRule,
    block_mask,
    grad_cam,
    with_partners,
)
from pmm_torchreid.utils.checkpoint import unwrap
from pmm_torchreid.visualize.drawing import (
    BG,
    FOOTER,
    HEADER,
    INK,
    PAD,
    TITLE,
    denormalize,
    item_name,
    load_font,
    load_images,
    normalization_of,
    outline,
    overlay,
    save_png,
    scale_tile,
    stage_name,
    tile_scale,
    to_uint8,
    upsample_cam,
    upsample_mask,
)
from pmm_torchreid.visualize.overlap import chance_iou, stage_overlap, summarize_overlap

__all__ = [
    'staged_network', 'stage_views', 'test_time_views', 'StagePictures',
    'render_panel', 'contact_sheet', 'panel_size', 'format_overlap',
    'draw_partners'
]

#: What a network offers to be pictured stage by stage (PMM does):
#: ``forward_features(x)`` -> ``(F, P)``, the maps the stages see at test time;
#: ``stage_outputs(F, P)`` -> each stage's ``(logits, embedding)`` on them;
#: ``stage_heads`` (the stages' modules, in order, each called on its input
#: map); ``forward_train(F, labels, mixer)`` (the training chain).
STAGE_PROTOCOL = ('forward_features', 'stage_outputs', 'stage_heads',
                  'forward_train')


def staged_network(model: nn.Module) -> nn.Module:
    """The network inside ``nn.DataParallel``/``DistributedDataParallel``,
    checked to offer :data:`STAGE_PROTOCOL` (PMM does)."""
    net = unwrap(model)
    missing = [name for name in STAGE_PROTOCOL if not hasattr(net, name)]
    if missing:
        raise TypeError(
            'stage pictures need a PMM model (one with {}); got {}, which '
            'lacks {}'.format(', '.join(STAGE_PROTOCOL), type(net).__name__,
                              ', '.join(missing))
        )
    return net


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
        fmap, part = net.forward_features(images)
    fmap = fmap.detach().requires_grad_()
    if part is not None:
        part = part.detach().requires_grad_()
    with torch.enable_grad():
        logits = [z for z, _ in net.stage_outputs(fmap, part)]
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
    (:func:`~pmm_torchreid.models.guidance.grad_cam`): no parameter ``.grad`` is
    written.  The model's train/eval mode is restored afterwards.

    The training chain is the model's own
    :meth:`~pmm_torchreid.models.PMM.forward_train`, run with ``rule`` (any
    mixing rule) whose partners are fixed to the given images
    (:func:`~pmm_torchreid.models.guidance.with_partners`); random blocks come from
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
            :class:`~pmm_torchreid.models.guidance.HardMix` on ``block``/``k``.
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
    net = staged_network(model)
    num_stages = len(net.stage_heads)
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
            for head in net.stage_heads]
        try:
            with torch.no_grad():
                fmap, _ = net.forward_features(batch, parts=False)
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
    identity (the rule of :func:`~pmm_torchreid.models.guidance.sample_negatives`,
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


def panel_size(height: int, width: int, num_stages: int = 3,
               with_mix: bool = True) -> tuple:
    """``(height, width)`` in pixels of :func:`render_panel`'s picture."""
    scale = tile_scale(width)
    tiles = 1 + num_stages + (2 * (num_stages - 1) if with_mix else 0)
    th, tw = height * scale, width * scale
    return (PAD + HEADER + TITLE + th + FOOTER + PAD,
            PAD + tiles * (tw + PAD))


def _tiles_for(i: int, image01: torch.Tensor, views: Dict,
               partners01: Optional[Sequence[torch.Tensor]]):
    """(title, H x W x 3 uint8) tiles of sample ``i`` at image resolution."""
    size = image01.shape[-2:]
    img = image01[i:i + 1]
    tiles = [('input', to_uint8(img[0]))]
    for s, (cam, mask) in enumerate(zip(views['cams'], views['masks']), 1):
        heat = to_uint8(overlay(img, upsample_cam(cam[i:i + 1], size))[0])
        if float(cam[i].max()) > 0:  # an all-zero CAM has no top-K of its own
            sel = upsample_mask(mask[i:i + 1], size)[0].cpu().numpy() == 0
            heat = outline(heat, sel)
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
                          else 'no partner', to_uint8(partner)))
            tiles.append((title.format(stage_name(s)),
                          outline(to_uint8(mixed), sel, color=(255, 0, 255))))
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
    height, width = image01.shape[-2:]
    num_stages = len(views['cams'])
    with_mix = partners01 is not None and 'mix_inputs' in views
    scale = tile_scale(width)
    ph, pw = panel_size(height, width, num_stages, with_mix)
    canvas = Image.new('RGB', (pw, ph), BG)
    draw = ImageDraw.Draw(canvas)
    font = load_font(12)
    draw.text((PAD, PAD + 1), caption, fill=INK, font=font)
    top = PAD + HEADER + TITLE
    tw = width * scale
    for t, (title, tile) in enumerate(_tiles_for(i, image01, views,
                                                 partners01)):
        x = PAD + t * (tw + PAD)
        draw.text((x, PAD + HEADER), title, fill=INK, font=font)
        canvas.paste(Image.fromarray(scale_tile(tile, scale)), (x, top))
    note = 'white: top-K blocks; red = hot'
    if with_mix:
        note += ('; * pixel view of the feature mix (magenta: replaced '
                 'blocks)')
    draw.text((PAD, top + height * scale + 2), note, fill=INK,
              font=load_font(10))
    return np.asarray(canvas)


def contact_sheet(
    image01: torch.Tensor, views: Dict, captions: Sequence[str] = (),
    columns: int = 4, title: str = ''
) -> np.ndarray:
    """Many images on one page: per image, the input and each stage's CAM
    (top-K blocks outlined), ``columns`` images per row.  H x W x 3 uint8."""
    if columns < 1:
        raise ValueError('contact_sheet: columns must be >= 1, got {}'.format(
            columns))
    n, _, height, width = image01.shape
    num_stages = len(views['cams'])
    per = 1 + num_stages
    cell_w = per * width + (per - 1) + 2 * PAD
    cell_h = TITLE + height + TITLE
    columns = min(columns, n)
    rows = int(math.ceil(n / float(columns)))
    sheet_w = columns * cell_w + PAD
    sheet_h = PAD + HEADER + TITLE + rows * cell_h + PAD
    canvas = Image.new('RGB', (sheet_w, sheet_h), BG)
    draw = ImageDraw.Draw(canvas)
    font, small = load_font(12), load_font(10)
    draw.text((PAD, PAD + 1), title, fill=INK, font=font)
    heads = ['input'] + ['{}'.format(stage_name(s))
                         for s in range(1, num_stages + 1)]
    y0 = PAD + HEADER
    for c in range(columns):
        for t, head in enumerate(heads):
            x = c * cell_w + PAD + t * (width + 1)
            draw.text((x + 2, y0), head, fill=INK, font=small)
    for i in range(n):
        r, c = divmod(i, columns)
        x0 = c * cell_w + PAD
        y = y0 + TITLE + r * cell_h
        tiles = _tiles_for(i, image01, views, None)
        for t, (_, tile) in enumerate(tiles):
            canvas.paste(Image.fromarray(tile), (x0 + t * (width + 1), y))
        if i < len(captions):
            draw.text((x0, y + height + 1), captions[i], fill=INK,
                      font=small)
    return np.asarray(canvas)


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
        return len(staged_network(self.model).stage_heads)

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
