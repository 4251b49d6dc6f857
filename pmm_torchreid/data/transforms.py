"""The Cutout image transform of the BDB/PMM recipe (torchreid has none)."""
from __future__ import annotations

import random

import torch

__all__ = ['Cutout']


class Cutout(object):
    """Sets a random square of a normalised image tensor to zero (DeVries and
    Taylor, 2017), as in the BDB/PMM recipe: applied after normalisation.

    With ``inside`` (the default, the PMM/BDB reference code's Cutout) the
    whole square lies inside the image: its top-left corner is uniform over
    the places where it fits, drawn as the reference draws it
    (``random.uniform(0, 1) > p`` skips; then ``random.randint`` for the top,
    then for the left).  Without ``inside`` (DeVries and Taylor's original) the
    centre is uniform over the image and the square is clipped at the border,
    so on average less than ``size x size`` is zeroed.  Randomness comes from
    Python's ``random`` (seeded by torchreid's ``set_random_seed`` and per
    DataLoader worker by PyTorch).

    Args:
        size (int): side of the square in pixels. Default is 64.
        p (float): probability of applying it. Default is 0.5.
        inside (bool): keep the whole square inside the image. Default is True.

    Raises:
        ValueError: (when called) with ``inside``, an image smaller than the
            square.
    """

    def __init__(self, size: int = 64, p: float = 0.5, inside: bool = True):
        if size < 1 or not 0.0 <= p <= 1.0:
            raise ValueError(
                'Cutout needs size >= 1 and 0 <= p <= 1, got size={} p={}'.format(
                    size, p
                )
            )
        self.size = int(size)
        self.p = float(p)
        self.inside = bool(inside)

    def region(self, height: int, width: int):
        """Draws ``(top, bottom, left, right)`` of the square, or None when
        the image is left as it is."""
        if self.inside:
            if random.uniform(0, 1) > self.p:
                return None
            if self.size > height or self.size > width:
                raise ValueError(
                    'Cutout: a {0}x{0} square does not fit inside a {1}x{2} '
                    'image; lower data.cutout_size or set data.cutout_inside '
                    'False'.format(self.size, height, width))
            top = random.randint(0, height - self.size)
            left = random.randint(0, width - self.size)
            return top, top + self.size, left, left + self.size
        if random.random() >= self.p:
            return None
        cy, cx = random.randrange(height), random.randrange(width)
        half = self.size // 2
        return (max(0, cy - half), min(height, cy - half + self.size),
                max(0, cx - half), min(width, cx - half + self.size))

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        box = self.region(*img.shape[-2:])
        if box is None:
            return img
        y0, y1, x0, x1 = box
        img = img.clone()
        img[..., y0:y1, x0:x1] = 0
        return img

    def __repr__(self):
        return 'Cutout(size={}, p={}, inside={})'.format(self.size, self.p,
                                                         self.inside)
