"""Data pieces of the PMM recipe that torchreid lacks: Cutout, and a data manager
builder that accepts it as the transform name ``'cutout'``."""
from __future__ import annotations

import random

import torch

__all__ = ['Cutout', 'build_datamanager']


class Cutout(object):
    """Sets a random square of a normalised image tensor to zero (DeVries and
    Taylor, 2017), as in the BDB/PMM recipe: applied after normalisation.

    The square's centre is uniform over the image; the square is clipped at
    the borders.  Randomness comes from Python's ``random`` (seeded by
    torchreid's ``set_random_seed`` and per DataLoader worker by PyTorch).

    Args:
        size (int): side of the square in pixels. Default is 64.
        p (float): probability of applying it. Default is 0.5.
    """

    def __init__(self, size: int = 64, p: float = 0.5):
        if size < 1 or not 0.0 <= p <= 1.0:
            raise ValueError(
                'Cutout needs size >= 1 and 0 <= p <= 1, got size={} p={}'.format(
                    size, p
                )
            )
        self.size = int(size)
        self.p = float(p)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if random.random() >= self.p:
            return img
        height, width = img.shape[-2:]
        cy, cx = random.randrange(height), random.randrange(width)
        half = self.size // 2
        y0, y1 = max(0, cy - half), min(height, cy - half + self.size)
        x0, x1 = max(0, cx - half), min(width, cx - half + self.size)
        img = img.clone()
        img[..., y0:y1, x0:x1] = 0
        return img

    def __repr__(self):
        return 'Cutout(size={}, p={})'.format(self.size, self.p)


def build_datamanager(cutout_size: int = 64, cutout_prob: float = 0.5, **kwargs):
    """``torchreid.data.ImageDataManager(**kwargs)``, plus ``'cutout'``.

    When ``'cutout'`` is among ``kwargs['transforms']``, it is removed before
    torchreid sees the list and a :class:`Cutout` is appended to the training
    transform, after normalisation.  ``use_gpu`` or ``device`` is passed on to
    whichever the installed torchreid accepts.
    """
    import torchreid
    transforms = kwargs.get('transforms') or []
    if isinstance(transforms, str):
        transforms = [transforms]
    transforms = [t.lower() for t in transforms]
    cutout = 'cutout' in transforms
    kwargs['transforms'] = [t for t in transforms if t != 'cutout']
    datamanager = torchreid.data.ImageDataManager(**kwargs)
    if cutout:
        op = Cutout(cutout_size, cutout_prob)
        print('+ cutout {}x{} (p={}) after normalization'.format(
            op.size, op.size, op.p))
        seen = set()
        for compose in (datamanager.transform_tr,
                        datamanager.train_loader.dataset.transform):
            if id(compose) not in seen:
                compose.transforms.append(op)
                seen.add(id(compose))
    return datamanager
