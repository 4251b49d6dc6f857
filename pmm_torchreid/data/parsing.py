"""Semantic body regions for MagnifierNet: where the masks come from, how a
parser's labels become regions, and how a mask rides along with its image
through the training transform.

**Regions.**  MagnifierNet works on four body regions (:data:`REGION_NAMES`):
``1`` head, ``2`` upper body, ``3`` lower body, ``4`` shoes; ``0`` is
background or anything that is not one of them.

**Where the masks come from**, for every training image, first match wins:

1. the synthetic dataset (``pmm_synthetic``): the exact part masks its
   generator draws (:func:`pmm_torchreid.data.synthetic.prepare_parts`, LIP label
   ids, drawn on first use into ``<root>/pmm_synthetic_parts/``);
2. ``masks_root`` (config ``magnifiernet.masks_root``): a folder that mirrors
   ``data.root``: the mask of ``<data.root>/REL/NAME.jpg`` is
   ``<masks_root>/REL/NAME.png``, a single-channel label PNG (mode ``L`` or
   ``P``) as human parsers write it, in the label set ``labels`` (config
   ``magnifiernet.mask_labels``: ``lip``, ``cihp`` or ``atr``, see
   :data:`LABEL_SETS`), mapped to regions by :data:`PART_TO_REGION`.  A mask
   of another size than its image is resized to it (nearest neighbour).  With
   ``masks_root`` set, a training image without a mask file is an error;
3. otherwise: fixed horizontal bands of the image (:data:`BANDS`), with a
   warning that says so.

``bands=True`` (config ``magnifiernet.regions 'bands'``) skips 1 and 2: every
image gets the bands, e.g. to measure what the exact masks of the synthetic
dataset add over positions alone.

**Geometry.**  :class:`PairedTransform` walks the training transform (a
torchvision ``Compose``) and applies every geometric step (resize, flip,
torchreid's random crop) to the mask with the same random draw (nearest
neighbour, so labels stay labels) and every photometric or occluding step
(colour jitter, normalisation, random erasing, random patch, Cutout) to the
image only.  Drawn from the same random state, the image is exactly the one
the plain transform gives.  :func:`attach_region_masks` swaps the training
loader of a torchreid data manager for one whose batches carry the masks as
``batch['regions']`` (N x H x W uint8 region ids).
"""
from __future__ import annotations

import os
import os.path as osp
import random
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from pmm_torchreid.data import synthetic
from pmm_torchreid.data.images import read_image
from pmm_torchreid.models.regions import BANDS, NUM_REGIONS, REGION_NAMES, band_rows

__all__ = [
    'REGION_NAMES', 'NUM_REGIONS', 'LABEL_SETS', 'PART_TO_REGION', 'BANDS',
    'region_table', 'band_regions', 'RegionSource', 'PairedTransform',
    'RegionMaskedDataset', 'attach_region_masks'
]


#: Label ids of common human parsers' PNGs, by label set: LIP (Gong et al.,
#: CVPR 2017; 20 labels) and CIHP (same ids), ATR (Liang et al.; 18 labels),
#: as SCHP and other parsers trained on them write them.
_LIP = ('background', 'hat', 'hair', 'glove', 'sunglasses', 'upper_clothes',
        'dress', 'coat', 'socks', 'pants', 'jumpsuits', 'scarf', 'skirt',
        'face', 'left_arm', 'right_arm', 'left_leg', 'right_leg',
        'left_shoe', 'right_shoe')
_ATR = ('background', 'hat', 'hair', 'sunglasses', 'upper_clothes', 'skirt',
        'pants', 'dress', 'belt', 'left_shoe', 'right_shoe', 'face',
        'left_leg', 'right_leg', 'left_arm', 'right_arm', 'bag', 'scarf')
LABEL_SETS: Dict[str, Tuple[str, ...]] = {'lip': _LIP, 'cihp': _LIP,
                                          'atr': _ATR}

#: Parser label -> region id.  Left and right sides merge, so a horizontal
#: flip needs no label swap.  Garments that span two regions (dress,
#: jumpsuits) count as upper body; socks count with the shoes (the feet);
#: bags are no region (LIP draws them as background).
PART_TO_REGION: Dict[str, int] = {
    'background': 0, 'bag': 0,
    'hat': 1, 'hair': 1, 'sunglasses': 1, 'face': 1,
    'upper_clothes': 2, 'coat': 2, 'dress': 2, 'jumpsuits': 2, 'scarf': 2,
    'glove': 2, 'left_arm': 2, 'right_arm': 2,
    'pants': 3, 'skirt': 3, 'belt': 3, 'left_leg': 3, 'right_leg': 3,
    'socks': 4, 'left_shoe': 4, 'right_shoe': 4,
}

_INVALID = 255


def region_table(labels: str) -> np.ndarray:
    """256-entry lookup ``label id -> region id`` for a label set (ids the
    set does not have map to 255, "invalid")."""
    if labels not in LABEL_SETS:
        raise ValueError('mask labels {!r}: expected one of {}'.format(
            labels, sorted(LABEL_SETS)))
    table = np.full(256, _INVALID, np.uint8)
    for i, name in enumerate(LABEL_SETS[labels]):
        table[i] = PART_TO_REGION[name]
    return table


def band_regions(width: int, height: int) -> Image.Image:
    """The fallback region map of a ``width x height`` image: :data:`BANDS`
    (defined with the regions, :mod:`pmm_torchreid.models.regions`, where
    BDB's band branch takes them too)."""
    rows = band_rows(height).numpy()
    return Image.fromarray(np.repeat(rows[:, None], width, axis=1), 'L')


# --------------------------------------------------------------------------
# where the masks are
# --------------------------------------------------------------------------
class RegionSource(object):
    """The region map of an image (see the module docstring for the order).

    Args:
        masks_root (str): folder mirroring ``data_root`` with label PNGs; ''
            for none.
        data_root (str): the images' root (``data.root``).
        labels (str): label set of the PNGs under ``masks_root``.
        bands (bool): the fixed bands for every image, whatever masks exist
            (then ``masks_root`` must be '').
    """

    def __init__(self, masks_root: str = '', data_root: str = '',
                 labels: str = 'lip', bands: bool = False):
        if bands and masks_root:
            raise ValueError(
                'the regions are the fixed bands (magnifiernet.regions '
                "'bands'), so magnifiernet.masks_root \"{}\" would be ignored; "
                "set one of them: masks_root '' or regions 'auto'".format(
                    masks_root))
        self.bands = bool(bands)
        self.masks_root = osp.abspath(osp.expanduser(masks_root)) \
            if masks_root else ''
        self.data_root = osp.abspath(osp.expanduser(data_root or '.'))
        self.labels = labels
        self.tables = {'lip': region_table('lip'),
                       labels: region_table(labels)}
        self.synthetic = {}  # dataset folder -> parts folder (or None)

    def locate(self, img_path: str) -> Tuple[Optional[str], str]:
        """``(mask path or None, label set)`` for an image; None: bands."""
        if self.bands:
            return None, ''
        img_path = osp.abspath(img_path)
        split_dir = osp.dirname(img_path)
        dataset_dir = osp.dirname(split_dir)
        if dataset_dir not in self.synthetic:
            self.synthetic[dataset_dir] = synthetic.prepare_parts(dataset_dir) \
                if synthetic.is_synthetic_dataset(dataset_dir) else None
        parts = self.synthetic[dataset_dir]
        if parts is not None:
            return osp.join(parts, osp.basename(split_dir),
                            osp.basename(img_path)), 'lip'
        if self.masks_root:
            rel = osp.relpath(img_path, self.data_root)
            if rel.startswith(os.pardir):
                raise ValueError(
                    'image "{}" is not under data.root "{}", so its mask cannot '
                    'be found under magnifiernet.masks_root "{}" (which mirrors '
                    'data.root)'.format(img_path, self.data_root,
                                        self.masks_root))
            return osp.join(self.masks_root,
                            osp.splitext(rel)[0] + '.png'), self.labels
        return None, ''

    def regions(self, img_path: str, size: Tuple[int, int]) -> Image.Image:
        """The ``L`` region map (ids 0..4) of an image of ``size`` (w, h)."""
        path, labels = self.locate(img_path)
        if path is None:
            return band_regions(*size)
        return load_regions(path, self.tables[labels], size, labels)

    def missing(self, img_paths: Sequence[str]) -> Tuple[List[str], int]:
        """``(mask files that do not exist, images that fall back to
        bands)`` among ``img_paths``."""
        absent, bands = [], 0
        for img_path in img_paths:
            path, _ = self.locate(img_path)
            if path is None:
                bands += 1
            elif not osp.isfile(path):
                absent.append(path)
        return absent, bands


def load_regions(path: str, table: np.ndarray, size: Tuple[int, int],
                 labels: str = '') -> Image.Image:
    """Reads a label PNG and maps it to region ids, at ``size`` (w, h).

    Raises:
        ValueError: not a single-channel label image, or label ids outside
            the label set (naming the file and the ids).
    """
    with Image.open(path) as mask:
        if mask.mode not in ('L', 'P'):
            raise ValueError(
                'mask "{}" has mode {}: expected a single-channel label PNG '
                '(mode L or P, one label id per pixel), not a colour '
                'picture'.format(path, mask.mode))
        ids = np.asarray(mask)
    regions = table[ids]
    if (regions == _INVALID).any():
        bad = sorted(set(np.unique(ids[regions == _INVALID]).tolist()))
        raise ValueError(
            'mask "{}" holds label ids {} that the label set {!r} does not '
            'have (0..{}); set magnifiernet.mask_labels to the parser\'s label '
            'set'.format(path, bad[:10], labels, int((table != _INVALID).sum()) - 1))
    out = Image.fromarray(regions, 'L')
    if out.size != tuple(size):
        out = out.resize(tuple(size), Image.NEAREST)
    return out


# --------------------------------------------------------------------------
# the same geometry for image and mask
# --------------------------------------------------------------------------
#: transforms that change pixel values only, or paint over them: the image
#: only (the regions underneath stay what they are)
_IMAGE_ONLY = ('Normalize', 'ColorJitter', 'RandomErasing', 'RandomPatch',
               'Cutout', 'Grayscale', 'RandomGrayscale', 'GaussianBlur')


class PairedTransform(object):
    """Applies a torchvision ``Compose`` to an image and, with the same
    random draws, its geometric steps to a region map.

    Known geometric steps: ``Resize`` (to a fixed height x width),
    ``RandomHorizontalFlip``, torchreid's ``Random2DTranslation``
    (``random_crop``) and ``ToTensor`` (the map becomes an H x W uint8
    tensor).  The steps in ``_IMAGE_ONLY`` touch the image only.

    Raises:
        TypeError: (at construction) a step it does not know, naming it.
    """

    def __init__(self, transform):
        self.transform = transform
        self.steps = list(getattr(transform, 'transforms', [transform]))
        for step in self.steps:
            name = type(step).__name__
            if name not in _IMAGE_ONLY and not hasattr(self, '_' + name):
                raise TypeError(
                    'the training transform holds {!r}, which semantic region '
                    'masks cannot follow; known: Resize, RandomHorizontalFlip, '
                    'Random2DTranslation, ToTensor and the image-only {}'.format(
                        name, list(_IMAGE_ONLY)))

    def __call__(self, img, regions):
        for step in self.steps:
            name = type(step).__name__
            if name in _IMAGE_ONLY:
                img = step(img)
            else:
                img, regions = getattr(self, '_' + name)(step, img, regions)
        return img, regions

    @staticmethod
    def _Resize(step, img, regions):
        size = step.size
        if isinstance(size, int) or len(size) != 2:
            raise TypeError('Resize({}) keeps the aspect ratio; region masks '
                            'need a fixed (height, width)'.format(size))
        return step(img), regions.resize((int(size[1]), int(size[0])),
                                         Image.NEAREST)

    @staticmethod
    def _RandomHorizontalFlip(step, img, regions):
        if torch.rand(1) < step.p:  # the draw torchvision's own step makes
            return (img.transpose(Image.FLIP_LEFT_RIGHT),
                    regions.transpose(Image.FLIP_LEFT_RIGHT))
        return img, regions

    @staticmethod
    def _Random2DTranslation(step, img, regions):
        # torchreid's random_crop, with its draws, on both
        size = (step.width, step.height)
        if random.uniform(0, 1) > step.p:
            return (img.resize(size, step.interpolation),
                    regions.resize(size, Image.NEAREST))
        new_w = int(round(step.width * 1.125))
        new_h = int(round(step.height * 1.125))
        x1 = int(round(random.uniform(0, new_w - step.width)))
        y1 = int(round(random.uniform(0, new_h - step.height)))
        box = (x1, y1, x1 + step.width, y1 + step.height)
        return (img.resize((new_w, new_h), step.interpolation).crop(box),
                regions.resize((new_w, new_h), Image.NEAREST).crop(box))

    @staticmethod
    def _ToTensor(step, img, regions):
        return step(img), torch.from_numpy(np.array(regions, np.uint8))


class RegionMaskedDataset(torch.utils.data.Dataset):
    """A torchreid image dataset whose items also carry ``'regions'``: the
    region map of the image after the same geometric transform (H x W
    uint8).  Other attributes are the wrapped dataset's."""

    def __init__(self, dataset, source: RegionSource):
        if getattr(dataset, 'k_tfm', 1) != 1:
            raise ValueError('data.k_tfm = {}: region masks follow one '
                             'augmentation per image (k_tfm 1)'.format(
                                 dataset.k_tfm))
        self.dataset = dataset
        self.source = source
        self.paired = PairedTransform(dataset.transform)

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):
        if name in ('dataset', 'source', 'paired'):  # not yet set (unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index):
        img_path, pid, camid, dsetid = self.dataset.data[index][:4]
        img = read_image(img_path)
        regions = self.source.regions(img_path, img.size)
        img, regions = self.paired(img, regions)
        return {'img': img, 'pid': pid, 'camid': camid, 'impath': img_path,
                'dsetid': dsetid, 'regions': regions}


def attach_region_masks(datamanager, masks_root: str = '', data_root: str = '',
                        labels: str = 'lip', bands: bool = False):
    """Makes the training batches of a torchreid data manager carry region
    maps (``batch['regions']``), in place; returns the data manager.

    The training loader is rebuilt around a :class:`RegionMaskedDataset`
    with the same sampler, batch size and workers.  Before that, the masks
    of every training image are located: a missing file under
    ``masks_root`` is an error (listing the first ones); images that have no
    mask source fall back to :data:`BANDS`, with a warning.  ``bands``:
    :class:`RegionSource`'s (every image gets the bands).  Idempotent.

    Raises:
        FileNotFoundError: masks missing under ``masks_root``.
    """
    loader = datamanager.train_loader
    if isinstance(loader.dataset, RegionMaskedDataset):
        return datamanager
    source = RegionSource(masks_root, data_root, labels, bands)
    paths = [item[0] for item in loader.dataset.data]
    absent, on_bands = source.missing(paths)
    if absent:
        raise FileNotFoundError(
            '{} of {} training images have no mask under magnifiernet.'
            'masks_root = "{}" (which mirrors data.root = "{}"), e.g.:\n  {}'
            '{}'.format(len(absent), len(paths), masks_root, source.data_root,
                        '\n  '.join(absent[:10]),
                        '\n  ... and {} more'.format(len(absent) - 10)
                        if len(absent) > 10 else ''))
    if source.bands:
        print('MagnifierNet: the regions of all {} training images are the '
              "fixed horizontal bands (magnifiernet.regions 'bands')".format(
                  len(paths)))
    elif on_bands:
        message = (
            'MagnifierNet: {} of {} training images have no semantic masks '
            '(magnifiernet.masks_root is empty and they are not the synthetic '
            "dataset's): their regions are FIXED HORIZONTAL BANDS of the image "
            '(head 0-15 %, upper body 15-50 %, lower body 50-90 %, shoes '
            '90-100 % of the height), not body parts. Give a human parser\'s '
            'label PNGs in magnifiernet.masks_root for real regions'.format(
                on_bands, len(paths)))
        warnings.warn(message)
        print('** ' + message)
    dataset = RegionMaskedDataset(loader.dataset, source)
    kwargs = dict(num_workers=loader.num_workers, pin_memory=loader.pin_memory,
                  collate_fn=loader.collate_fn, timeout=loader.timeout,
                  worker_init_fn=loader.worker_init_fn,
                  generator=loader.generator)
    if loader.num_workers > 0:
        kwargs.update(persistent_workers=loader.persistent_workers,
                      prefetch_factor=loader.prefetch_factor)
    if loader.batch_size is None:  # a batch sampler of its own
        kwargs['batch_sampler'] = loader.batch_sampler
    else:
        kwargs.update(batch_size=loader.batch_size, sampler=loader.sampler,
                      drop_last=loader.drop_last)
    datamanager.train_loader = torch.utils.data.DataLoader(dataset, **kwargs)
    return datamanager
