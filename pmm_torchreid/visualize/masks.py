"""Pictures of what the comparison systems weight: FMN's feature mask and
MagnifierNet's predicted semantic regions (``scripts/visualize_gradcam.py``
draws these for ``fmn*`` and ``magnifiernet*`` models instead of PMM's
stage Grad-CAMs).

- **FMN**: the mask ``M`` (N x 1 x h x w in [0, 1]) its high-level map
  predicts and imposes on the low-level map, shown over the image in absolute
  values (jet: 0 blue, 1 red; not rescaled per image), and the image times
  ``M`` (what the masked branch keeps).
- **MagnifierNet**: the parsing head's regions (the weights its fusion branch
  pools with), as one colour map (argmax) and one heat map per region
  (scaled to its own peak, which the title gives), next to the regions the
  data gives for the image (the synthetic dataset's exact
  masks, a parser's masks under ``magnifiernet.masks_root``, or the band
  fallback), with the share of feature cells where the two agree.

The model runs in eval mode under ``torch.no_grad``: nothing is changed.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from pmm_torchreid.data.parsing import RegionSource
from pmm_torchreid.models.magnifiernet import downsample_regions
from pmm_torchreid.models.regions import REGION_NAMES
from pmm_torchreid.utils.checkpoint import unwrap
from pmm_torchreid.visualize import drawing

__all__ = ['REGION_COLOURS', 'mask_views', 'MaskPictures']

#: background, head, upper body, lower body, shoes
REGION_COLOURS = np.array([(0, 0, 0), (230, 160, 40), (220, 40, 40),
                           (40, 80, 220), (200, 40, 200)], np.uint8)


def _kind(net) -> str:
    if hasattr(net, 'feature_mask'):
        return 'fmn'
    if hasattr(net, 'region_probabilities'):
        return 'magnifiernet'
    raise TypeError('mask pictures need an FMN or MagnifierNet model, got '
                    '{}'.format(type(net).__name__))


@torch.no_grad()
def mask_views(model, images: torch.Tensor) -> Dict:
    """``{'kind': 'fmn', 'mask': N x h x w}`` or ``{'kind': 'magnifiernet',
    'probs': N x 5 x h x w}`` for a normalised image batch (eval mode)."""
    net = unwrap(model)
    kind = _kind(net)
    was_training = net.training
    net.eval()
    try:
        if kind == 'fmn':
            return {'kind': kind, 'mask': net.feature_mask(images)[:, 0]}
        return {'kind': kind,
                'probs': net.region_probabilities(net.backbone(images))}
    finally:
        net.train(was_training)


def _colour_regions(regions: np.ndarray) -> np.ndarray:
    return REGION_COLOURS[np.clip(regions, 0, len(REGION_COLOURS) - 1)]


class MaskPictures(object):
    """Panels and a contact sheet of FMN masks or MagnifierNet regions.

    Args:
        model (nn.Module): an FMN or MagnifierNet model.
        transform: the test transform (torchreid's ``transform_te``).
        device: where the model runs.
        regions (RegionSource, optional): where the data's regions of an
            image come from (MagnifierNet). Default: the synthetic dataset's
            masks, else bands.
    """

    def __init__(self, model, transform, device=None,
                 regions: Optional[RegionSource] = None):
        self.model = model
        self.transform = transform
        self.device = device
        self.kind = _kind(unwrap(model))
        self.mean, self.std = drawing.normalization_of(transform)
        self.regions = regions or RegionSource()

    def tiles(self, items: Sequence) -> List[List]:
        """Per image, ``(title, H x W x 3 uint8)`` tiles, and the stats."""
        images = drawing.load_images(items, self.transform, self.device)
        views = mask_views(self.model, images)
        image01 = drawing.denormalize(images, self.mean, self.std).cpu()
        size = image01.shape[-2:]
        out = []
        if self.kind == 'fmn':
            mask = views['mask'].float().cpu()
            up = F.interpolate(mask.unsqueeze(1), size=tuple(size),
                               mode='bilinear', align_corners=False)[:, 0]
            heat = drawing.overlay(image01, up.clamp(0, 1))
            kept = image01 * up.unsqueeze(1)
            for i in range(len(items)):
                out.append(([('input', drawing.to_uint8(image01[i])),
                             ('FMN mask', drawing.to_uint8(heat[i])),
                             ('image x mask', drawing.to_uint8(kept[i]))],
                            {'mask_mean': float(mask[i].mean()),
                             'mask_min': float(mask[i].min()),
                             'mask_max': float(mask[i].max())}))
            return out
        probs = views['probs'].float().cpu()
        cells = probs.argmax(dim=1)
        up = F.interpolate(probs, size=tuple(size), mode='bilinear',
                           align_corners=False)
        for i, item in enumerate(items):
            tiles = [('input', drawing.to_uint8(image01[i]))]
            stats = {}
            data, source = self._data_regions(item[0], size)
            if data is not None:
                img = (drawing.to_uint8(image01[i]).astype(np.float32) * 0.4 +
                       _colour_regions(data).astype(np.float32) * 0.6)
                tiles.append(('regions ({})'.format(source),
                              img.astype(np.uint8)))
                small = downsample_regions(torch.from_numpy(data)[None],
                                           cells.shape[-2:])[0]
                stats['cell_agreement'] = float((small == cells[i]).float()
                                                .mean())
            pred = up[i].argmax(dim=0).numpy()
            img = (drawing.to_uint8(image01[i]).astype(np.float32) * 0.4 +
                   _colour_regions(pred).astype(np.float32) * 0.6)
            tiles.append(('regions (net)', img.astype(np.uint8)))
            for r, name in enumerate(REGION_NAMES, 1):
                # each region's probability scaled to its own peak (the
                # title gives the peak): where it is, even when it is small
                prob = up[i:i + 1, r].clamp(0, 1)
                peak = float(prob.max())
                heat = drawing.overlay(image01[i:i + 1], prob / max(peak, 1e-12))[0]
                tiles.append(('{} {:.2f}'.format(name.replace('_', ' '), peak),
                              drawing.to_uint8(heat)))
                stats['share_' + name] = float((cells[i] == r).float().mean())
            out.append((tiles, stats))
        return out

    def _data_regions(self, path: str, size):
        """``(H x W region ids or None, 'mask' or 'bands')``: the data's
        regions of an image, at the picture's size."""
        mask_path, _ = self.regions.locate(path)
        if mask_path is not None and not os.path.isfile(mask_path):
            return None, ''
        with Image.open(path) as img:
            full = self.regions.regions(path, img.size)
        return np.asarray(full.resize((int(size[1]), int(size[0])),
                                      Image.NEAREST)), \
            'mask' if mask_path is not None else 'bands'

    @staticmethod
    def panel(tiles, caption: str = '') -> np.ndarray:
        """One image's tiles side by side, titled, as H x W x 3 uint8."""
        height, width = tiles[0][1].shape[:2]
        scale = drawing.tile_scale(width)
        th, tw = height * scale, width * scale
        pad = drawing.PAD
        canvas = Image.new('RGB', (pad + len(tiles) * (tw + pad),
                                   pad + drawing.HEADER + drawing.TITLE + th + pad),
                           drawing.BG)
        draw = ImageDraw.Draw(canvas)
        font = drawing.load_font(12)
        draw.text((drawing.PAD, drawing.PAD + 1), caption, fill=drawing.INK, font=font)
        top = drawing.PAD + drawing.HEADER + drawing.TITLE
        for t, (title, tile) in enumerate(tiles):
            x = drawing.PAD + t * (tw + drawing.PAD)
            draw.text((x, drawing.PAD + drawing.HEADER), title, fill=drawing.INK, font=font)
            canvas.paste(Image.fromarray(drawing.scale_tile(tile, scale)), (x, top))
        return np.asarray(canvas)

    @staticmethod
    def sheet(panels: Sequence[np.ndarray], columns: int = 4,
              title: str = '') -> np.ndarray:
        """Panels in a grid, ``columns`` per row."""
        if columns < 1:
            raise ValueError('columns must be >= 1, got {}'.format(columns))
        columns = min(columns, len(panels))
        rows = int(math.ceil(len(panels) / float(columns)))
        ph = max(p.shape[0] for p in panels)
        pw = max(p.shape[1] for p in panels)
        canvas = Image.new('RGB', (columns * pw + drawing.PAD,
                                   drawing.PAD + drawing.HEADER + rows * ph), drawing.BG)
        ImageDraw.Draw(canvas).text((drawing.PAD, drawing.PAD + 1), title, fill=drawing.INK,
                                    font=drawing.load_font(12))
        for n, panel in enumerate(panels):
            r, c = divmod(n, columns)
            canvas.paste(Image.fromarray(panel),
                         (c * pw, drawing.PAD + drawing.HEADER + r * ph))
        return np.asarray(canvas)

    def write(self, items: Sequence, out_dir: str, columns: int = 4,
              title: str = '', prefixes: Sequence[str] = ()) -> Dict:
        """Writes one PNG per image and ``sheet.png``; returns the paths and
        the per-image and mean stats."""
        os.makedirs(out_dir, exist_ok=True)
        results = self.tiles(items)
        panels, paths, per_image = [], [], []
        for i, (item, (tiles, stats)) in enumerate(zip(items, results)):
            caption = '{}  {}'.format(drawing.item_name(item), '  '.join(
                '{} {:.2f}'.format(k.replace('share_', ''), v)
                for k, v in stats.items() if not k.startswith('share_')))
            panel = self.panel(tiles, caption)
            panels.append(panel)
            prefix = prefixes[i] if i < len(prefixes) else '{:02d}'.format(i)
            paths.append(drawing.save_png(panel, os.path.join(
                out_dir, '{}_{}.png'.format(prefix, drawing.item_name(item)))))
            per_image.append(dict(stats, image=item[0]))
        sheet = drawing.save_png(self.sheet(panels, columns, title),
                         os.path.join(out_dir, 'sheet.png'))
        keys = [k for k in per_image[0] if k != 'image'] if per_image else []
        mean = {k: float(np.mean([s[k] for s in per_image if k in s]))
                for k in keys}
        return {'panels': paths, 'sheet': sheet, 'per_image': per_image,
                'mean': mean}
