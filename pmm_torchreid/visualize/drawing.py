"""What every picture of the plugin is drawn with: stage names, the inverse
of the input normalisation, heat-map overlays, tiles, fonts and colours, and
atomic PNG writes."""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFont

from pmm_torchreid.data.images import read_image
from pmm_torchreid.utils.io import atomic_write

__all__ = ['STAGE_NAMES', 'stage_name', 'normalization_of', 'denormalize',
           'upsample_cam', 'upsample_mask', 'colorize', 'overlay', 'BG', 'INK',
           'PAD', 'HEADER', 'TITLE', 'FOOTER', 'load_font', 'to_uint8', 'outline',
           'scale_tile', 'tile_scale', 'save_png', 'load_images', 'item_name']

STAGE_NAMES = ('I', 'II', 'III', 'IV', 'V', 'VI', 'VII', 'VIII')


def stage_name(s: int) -> str:
    """Roman numeral of stage ``s`` (1-based), as in the paper."""
    return STAGE_NAMES[s - 1] if 1 <= s <= len(STAGE_NAMES) else str(s)


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
    import matplotlib  # lazy: optional dependency (the [pictures] extra)
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
# drawing
# --------------------------------------------------------------------------
BG = (255, 255, 255)
INK = (20, 20, 20)
PAD = 4
HEADER = 18
TITLE = 16
FOOTER = 15


def load_font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """3 x H x W in [0, 1] -> H x W x 3 uint8 RGB."""
    arr = img.detach().float().clamp(0, 1).mul(255).round().byte()
    return arr.permute(1, 2, 0).cpu().numpy()


def outline(tile: np.ndarray, selected: np.ndarray, color=(255, 255, 255),
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


def scale_tile(tile: np.ndarray, scale: int) -> np.ndarray:
    if scale == 1:
        return tile
    return tile.repeat(scale, axis=0).repeat(scale, axis=1)


def tile_scale(width: int, min_width: int = 128) -> int:
    """Integer magnification so that a tile is at least ``min_width`` wide
    (titles must fit)."""
    return max(1, int(math.ceil(min_width / float(width))))


def save_png(array: np.ndarray, path: str) -> str:
    """Writes an H x W x 3 uint8 RGB array as a PNG, atomically."""
    with atomic_write(path) as f:
        Image.fromarray(np.ascontiguousarray(array)).save(f, format='PNG')
    return path


# --------------------------------------------------------------------------
# whole image sets (used by scripts/visualize_gradcam.py and PMMEngine)
# --------------------------------------------------------------------------
def load_images(items: Sequence, transform, device=None) -> torch.Tensor:
    """Dataset items ``(path, pid, camid, ...)`` -> N x 3 x H x W, read with
    torchreid's ``read_image`` and ``transform`` (the test transform)."""
    batch = torch.stack([transform(read_image(item[0]))
                         for item in items])
    return batch.to(device) if device is not None else batch


def item_name(item) -> str:
    return os.path.splitext(os.path.basename(item[0]))[0]


