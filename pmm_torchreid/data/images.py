"""Image reading that never hangs, and scans for bad images.

torchreid's ``read_image`` retries forever on a file that never decodes; the
one here raises after a few tries, and :func:`install_safe_image_reader` makes
torchreid's datasets use it.
"""
from __future__ import annotations

import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence, Tuple

from PIL import Image

from pmm_torchreid.data.splits import relabel
from pmm_torchreid.utils.torchreid_internals import point_read_image_at

__all__ = ['BadImageError', 'read_image', 'install_safe_image_reader',
           'find_bad_images', 'drop_bad_images', 'scan_bad_images',
           'DATASET_LISTS']

#: The lists of a torchreid dataset that hold images.
DATASET_LISTS = ('train', 'query', 'gallery')


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
    point_read_image_at(read_image)


def find_bad_images(paths: Sequence[str], workers: int = 4) -> List[Tuple[str, str]]:
    """Decodes every image once; returns ``(path, reason)`` of the bad ones.

    Reading happens in ``workers`` threads (PIL releases the GIL while it
    decodes); the order of the result follows ``paths``.
    """
    paths = list(paths)
    with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
        reasons = list(pool.map(_decode_error, paths, chunksize=64))
    return [(p, r) for p, r in zip(paths, reasons) if r is not None]


def scan_bad_images(dataset, cache: dict, name: str = '', workers: int = 4,
          warn: bool = False) -> List[Tuple[str, str]]:
    """The bad images of a dataset's train/query/gallery lists, decoding only
    the files that ``cache`` (path -> reason or None) does not know yet."""
    paths = sorted({item[0] for s in DATASET_LISTS for item in getattr(dataset, s)})
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
    bad = dict(scan_bad_images(dataset, {} if cache is None else cache, name, workers,
                     warn=True))
    if not bad:
        return []
    for split in DATASET_LISTS:
        items = [item for item in getattr(dataset, split) if item[0] not in bad]
        if split == 'train':
            items = relabel(items)
        setattr(dataset, split, items)
    mode = getattr(dataset, 'mode', 'train')
    dataset.data = getattr(dataset, mode)
    dataset.num_train_pids = dataset.get_num_pids(dataset.train)
    dataset.num_train_cams = dataset.get_num_cams(dataset.train)
    return sorted(bad.items())
