"""Data pieces that torchreid lacks: Cutout (the PMM recipe), a data manager
builder that accepts it as the transform ``'cutout'`` and can leave bad images
out, and an image reader that raises instead of retrying forever."""
from __future__ import annotations

import os
import random
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence, Tuple

import torch
from PIL import Image

__all__ = [
    'Cutout', 'build_datamanager', 'BadImageError', 'read_image',
    'install_safe_image_reader', 'find_bad_images', 'drop_bad_images'
]


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


def build_datamanager(
    cutout_size: int = 64,
    cutout_prob: float = 0.5,
    cutout_inside: bool = True,
    check_images: bool = True,
    skip_bad_images: bool = False,
    val_ids: int = 0,
    val_seed: int = 0,
    **kwargs
):
    """``torchreid.data.ImageDataManager(**kwargs)``, plus ``'cutout'`` and
    the image checks.

    When ``'cutout'`` is among ``kwargs['transforms']``, it is removed before
    torchreid sees the list and a :class:`Cutout` is appended to the training
    transform, after normalisation.

    With ``check_images`` (the default), every train/query/gallery image is
    decoded once while the data manager is built (threads; about 0.25 ms per
    image here), before any training: bad images raise
    :class:`BadImageError` listing all of them, or, with ``skip_bad_images``,
    are left out of the lists (one warning each) before torchreid builds its
    samplers.  Without the check, a bad image stops the run when it is first
    read -- possibly hours later, at the first evaluation.

    With ``val_ids`` > 0, that many training identities of the source dataset
    are held out (:func:`pmm_torchreid.splits.carve_validation`, drawn with
    ``val_seed``) and become the query and gallery that are evaluated; the
    model trains on the other identities and the test split is not read.
    """
    cutout = (cutout_size, cutout_prob, cutout_inside)
    if check_images or skip_bad_images or val_ids:
        return _with_dataset_hook(
            _build, check_images or skip_bad_images, skip_bad_images,
            val_ids, val_seed, cutout=cutout, **kwargs
        )
    return _build(cutout, **kwargs)


def _build(cutout, **kwargs):
    import torchreid
    transforms = kwargs.get('transforms') or []
    if isinstance(transforms, str):
        transforms = [transforms]
    transforms = [t.lower() for t in transforms]
    use_cutout = 'cutout' in transforms
    kwargs['transforms'] = [t for t in transforms if t != 'cutout']
    datamanager = torchreid.data.ImageDataManager(**kwargs)
    if use_cutout:
        op = Cutout(*cutout)
        print('+ cutout {}x{} (p={}, {}) after normalization'.format(
            op.size, op.size, op.p, 'inside the image' if op.inside else
            'clipped at the border'))
        seen = set()
        for compose in (datamanager.transform_tr,
                        datamanager.train_loader.dataset.transform):
            if id(compose) not in seen:
                compose.transforms.append(op)
                seen.add(id(compose))
    return datamanager


_LISTS = ('train', 'query', 'gallery')


def _with_dataset_hook(build, check: bool, skip: bool, val_ids: int,
                       val_seed: int, **kwargs):
    """Runs ``build(**kwargs)`` with torchreid's dataset factory wrapped so
    that every dataset, as it is created, has its validation identities held
    out (``val_ids``) and its images decoded once (``check``)."""
    import torchreid
    module = sys.modules[torchreid.data.ImageDataManager.__module__]
    original = module.init_image_dataset
    cache, reported = {}, set()

    def init_and_check(name, **dataset_kwargs):
        dataset = original(name, **dataset_kwargs)
        if val_ids:
            from .splits import hold_out_validation
            counts = hold_out_validation(dataset, val_ids, val_seed)
            if ('val', name) not in reported:
                reported.add(('val', name))
                print('=> {}: validation, not the test split: {} training '
                      'identities held out (data.val_seed {}) as {} query and '
                      '{} gallery images; training on the other {} identities '
                      '({} images)'.format(
                          name, val_ids, val_seed, counts['query'],
                          counts['gallery'], counts['train_ids'],
                          counts['train_images']))
        if not check:
            return dataset
        if skip:
            before = {s: len(getattr(dataset, s)) for s in _LISTS}
            drop_bad_images(dataset, cache=cache, name=name)
            counts = {s: n - len(getattr(dataset, s)) for s, n in before.items()}
            if any(counts.values()) and name not in reported:
                reported.add(name)
                print('=> {}: left out {} bad image(s) ({} train, {} query, {} '
                      'gallery)'.format(name, sum(counts.values()),
                                        counts['train'], counts['query'],
                                        counts['gallery']))
            return dataset
        bad = _scan(dataset, cache, name)
        if bad:
            listed = ''.join('\n  "{}": {}'.format(p, r) for p, r in bad[:20])
            more = '\n  ... and {} more'.format(len(bad) - 20) \
                if len(bad) > 20 else ''
            raise BadImageError(
                '{} bad image(s) in dataset {!r}; stopping before any '
                'training:{}{}\nFix or remove them, or set '
                'data.skip_bad_images True to leave them out'.format(
                    len(bad), name, listed, more
                )
            )
        return dataset

    module.init_image_dataset = init_and_check
    try:
        return build(**kwargs)
    finally:
        module.init_image_dataset = original


# --------------------------------------------------------------------------
# image reading that never hangs
# --------------------------------------------------------------------------
class BadImageError(OSError):
    """An image file that cannot be decoded (corrupt, truncated, unreadable)."""


def read_image(path: str, attempts: int = 3, delay: float = 0.05):
    """Reads an RGB ``PIL.Image``; raises instead of retrying forever.

    torchreid's ``utils.read_image`` loops without end on a file that never
    decodes.  This one tries ``attempts`` times (``delay`` seconds apart, to
    ride out a transient network-filesystem error) and then raises.

    Raises:
        FileNotFoundError: the path does not exist.
        BadImageError: naming the file and the decoder's complaint.
    """
    attempts = max(1, int(attempts))
    reason = None
    for attempt in range(attempts):
        if attempt:
            time.sleep(delay)
        if not os.path.exists(path):
            raise FileNotFoundError('image "{}" does not exist'.format(path))
        try:
            with Image.open(path) as img:
                return img.convert('RGB')
        except Exception as error:  # PIL raises OSError, SyntaxError, ...
            reason = '{}: {}'.format(type(error).__name__, error)
    raise BadImageError(
        'cannot read image "{}" ({}; tried {} times). List every bad file with '
        '`python scripts/check_dataset.py --config-file ...`, or set '
        'data.skip_bad_images True to leave bad files out'.format(
            path, reason, attempts
        )
    )


_MISSING = 'the file does not exist'


def _decode_error(path: str) -> Optional[str]:
    """None if ``path`` decodes to an RGB image, else why not."""
    if not os.path.exists(path):
        return _MISSING
    try:
        with Image.open(path) as img:
            img.convert('RGB')
    except Exception as error:  # PIL raises OSError, SyntaxError, ...
        return '{}: {}'.format(type(error).__name__, error)
    return None


def install_safe_image_reader() -> None:
    """Makes torchreid's image datasets read through :func:`read_image`.

    torchreid's ``ImageDataset.__getitem__`` calls the ``read_image`` bound in
    its own module; that name (and ``torchreid.utils.read_image``) is pointed
    at ours.  Called by ``import pmm_torchreid``; idempotent.  DataLoader
    workers started with ``fork`` (Linux's default) inherit it.
    """
    import torchreid
    dataset_module = sys.modules[torchreid.data.ImageDataset.__module__]
    tools_module = sys.modules[torchreid.utils.set_random_seed.__module__]
    for module in (dataset_module, tools_module, torchreid.utils):
        if hasattr(module, 'read_image'):
            module.read_image = read_image


def find_bad_images(paths: Sequence[str], workers: int = 4) -> List[Tuple[str, str]]:
    """Decodes every image once; returns ``(path, reason)`` of the bad ones.

    Reading happens in ``workers`` threads (PIL releases the GIL while it
    decodes); the order of the result follows ``paths``.
    """
    paths = list(paths)
    with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
        reasons = list(pool.map(_decode_error, paths, chunksize=64))
    return [(p, r) for p, r in zip(paths, reasons) if r is not None]


def _relabel(items: List[tuple]) -> List[tuple]:
    """Train items with identities renumbered 0..P-1 (in the old order)."""
    pids = sorted({item[1] for item in items})
    new = {pid: i for i, pid in enumerate(pids)}
    return [(item[0], new[item[1]]) + tuple(item[2:]) for item in items]


def _scan(dataset, cache: dict, name: str = '', workers: int = 4,
          warn: bool = False) -> List[Tuple[str, str]]:
    """The bad images of a dataset's train/query/gallery lists, decoding only
    the files that ``cache`` (path -> reason or None) does not know yet."""
    paths = sorted({item[0] for s in _LISTS for item in getattr(dataset, s)})
    new = [p for p in paths if p not in cache]
    if new:
        start = time.time()
        found = dict(find_bad_images(new, workers))
        for path in new:
            cache[path] = found.get(path)
        print('=> {}: decoded {} images in {:.1f} s'.format(
            name or type(dataset).__name__, len(new), time.time() - start))
        if warn:
            for path, reason in sorted(found.items()):
                warnings.warn('skipping bad image "{}" ({}; '
                              'data.skip_bad_images is True)'.format(path, reason))
    return [(p, cache[p]) for p in paths if cache[p] is not None]


def drop_bad_images(
    dataset, workers: int = 4, cache: Optional[dict] = None, name: str = ''
) -> List[Tuple[str, str]]:
    """Removes unreadable images from a torchreid dataset, in place.

    The train, query and gallery lists are filtered (train identities are
    renumbered if one loses all its images) and the dataset's counts
    recomputed; one warning names each bad file.  Returns the bad files.
    ``cache`` (path -> reason or None) spares decoding a file twice when the
    same lists come in several datasets (torchreid builds one per mode).
    """
    bad = dict(_scan(dataset, {} if cache is None else cache, name, workers,
                     warn=True))
    if not bad:
        return []
    for split in _LISTS:
        items = [item for item in getattr(dataset, split) if item[0] not in bad]
        if split == 'train':
            items = _relabel(items)
        setattr(dataset, split, items)
    mode = getattr(dataset, 'mode', 'train')
    dataset.data = getattr(dataset, mode)
    dataset.num_train_pids = dataset.get_num_pids(dataset.train)
    dataset.num_train_cams = dataset.get_num_cams(dataset.train)
    return sorted(bad.items())
