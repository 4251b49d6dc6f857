"""The dataset check of ``scripts/check_dataset.py``: every train, query and
gallery image of some torchreid datasets, decoded once as training would
decode it (PIL, RGB), and the files that fail."""
from __future__ import annotations

import hashlib
import os
import os.path as osp
from typing import Dict, Iterable, List, Sequence, Tuple

import torchreid

from pmm_torchreid.data.images import DATASET_LISTS, find_bad_images

__all__ = ['dataset_images', 'check_dataset', 'fingerprint']


def dataset_images(names: Sequence[str], root: str = '', split_id: int = 0,
                   **dataset_kwargs) -> Dict[Tuple[str, str], List[str]]:
    """``{(dataset, split): [paths]}`` for each dataset of ``names`` (each
    once, in order) and its train, query and gallery splits.

    ``dataset_kwargs``: torchreid's dataset options (``cuhk03_labeled``,
    ``cuhk03_classic_split``, ``market1501_500k``).
    """
    lists = {}
    for name in dict.fromkeys(names):
        dataset = torchreid.data.datasets.init_image_dataset(
            name, transform=None, mode='train', root=root, split_id=split_id,
            combineall=False, verbose=False, **dataset_kwargs)
        for split in DATASET_LISTS:
            lists[(name, split)] = [item[0] for item in getattr(dataset, split)]
    return lists


def check_dataset(lists: Dict[Tuple[str, str], List[str]],
                  workers: int = 4) -> Tuple[List[str], Dict[str, str]]:
    """``(paths, bad)``: the distinct paths of :func:`dataset_images`'s
    ``lists`` (sorted) and ``{path: reason}`` for each one that does not
    decode, read by ``workers`` threads."""
    paths = sorted({p for items in lists.values() for p in items})
    return paths, dict(find_bad_images(paths, workers=workers))


def fingerprint(paths: Iterable[str], root: str) -> Dict[str, object]:
    """``{'images': n, 'digest': hex}``: what a list of images holds, the
    same under another root. The digest covers each path relative to
    ``root`` (as given, if outside it), sorted, with its size in bytes (-1
    for a missing file), so it changes when images are added, removed,
    renamed or replaced by others of another size; a copy of the same data
    under another root gives the same fingerprint."""
    base = osp.abspath(osp.expanduser(root or '.'))
    lines = []
    for path in paths:
        full = osp.abspath(path)
        name = osp.relpath(full, base)
        if name == osp.pardir or name.startswith(osp.pardir + os.sep):
            name = full
        try:
            size = osp.getsize(full)
        except OSError:
            size = -1
        lines.append('{}\t{}\n'.format(name.replace(os.sep, '/'), size))
    digest = hashlib.sha256(''.join(sorted(lines)).encode()).hexdigest()
    return {'images': len(lines), 'digest': digest[:16]}
