"""The dataset check of ``scripts/check_dataset.py``: every train, query and
gallery image of some torchreid datasets, decoded once as training would
decode it (PIL, RGB), and the files that fail."""
from __future__ import annotations

import hashlib
import os.path as osp
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torchreid

from pmm_torchreid.data.images import DATASET_LISTS, find_bad_images

__all__ = ['dataset_items', 'dataset_images', 'check_dataset', 'fingerprint']


def dataset_items(names: Sequence[str], root: str = '', split_id: int = 0,
                  **dataset_kwargs) -> Dict[Tuple[str, str], List[tuple]]:
    """``{(dataset, split): [(path, pid, camid, ...)]}`` for each dataset of
    ``names`` (each once, in order) and its train, query and gallery splits,
    as torchreid lists them (training identities relabelled).

    ``dataset_kwargs``: torchreid's dataset options (``cuhk03_labeled``,
    ``cuhk03_classic_split``, ``market1501_500k``).
    """
    lists = {}
    for name in dict.fromkeys(names):
        dataset = torchreid.data.datasets.init_image_dataset(
            name, transform=None, mode='train', root=root, split_id=split_id,
            combineall=False, verbose=False, **dataset_kwargs)
        for split in DATASET_LISTS:
            lists[(name, split)] = [tuple(item) for item in
                                    getattr(dataset, split)]
    return lists


def dataset_images(names: Sequence[str], root: str = '', split_id: int = 0,
                   **dataset_kwargs) -> Dict[Tuple[str, str], List[str]]:
    """``{(dataset, split): [paths]}``: :func:`dataset_items`' paths."""
    return {key: [item[0] for item in items] for key, items in
            dataset_items(names, root, split_id, **dataset_kwargs).items()}


def check_dataset(lists: Dict[Tuple[str, str], List[str]],
                  workers: int = 4) -> Tuple[List[str], Dict[str, str]]:
    """``(paths, bad)``: the distinct paths of :func:`dataset_images`'s
    ``lists`` (sorted) and ``{path: reason}`` for each one that does not
    decode, read by ``workers`` threads."""
    paths = sorted({p for items in lists.values() for p in items})
    return paths, dict(find_bad_images(paths, workers=workers))


def fingerprint(items: Iterable[tuple],
                sizes: Optional[Dict[str, int]] = None) -> Dict[str, object]:
    """``{'images': n, 'digest': hex}``: what a list of ``(path, pid, camid,
    ...)`` items holds, whatever the folder it lies in. The digest covers
    each image's file name, camera and size in bytes, and its identity (named
    by the first file name of that identity's images, since torchreid's
    training numbers can follow the order a folder is listed in), sorted: it
    changes when images are added, removed, renamed, relabelled or replaced
    by others of another size, and stays the same for a copy of the data
    under another root, a link to it, or a split file that names the images
    under the root where it was written (CUHK01: absolute paths).
    ``sizes``: file sizes already read (path -> bytes), filled in.

    Raises:
        FileNotFoundError: listed images are missing (how many, and one).
    """
    sizes = {} if sizes is None else sizes
    items = list(items)
    names = {}
    for path, pid, *_ in items:
        name = osp.basename(path)
        names[pid] = min(names.get(pid, name), name)
    lines, missing = [], []
    for path, pid, camid, *_ in items:
        if path not in sizes:
            try:
                sizes[path] = osp.getsize(path)
            except FileNotFoundError:
                missing.append(path)
                continue
        lines.append('{}\t{}\t{}\t{}\n'.format(osp.basename(path), names[pid],
                                                camid, sizes[path]))
    if missing:
        raise FileNotFoundError(
            '{} of the {} images listed are missing, e.g. "{}": the dataset is '
            'incomplete, or a split file written under another data root '
            'names that root\'s images (for CUHK01, write it again with '
            'scripts/cuhk01_splits.py)'.format(
                len(missing), len(items), missing[0]))
    digest = hashlib.sha256(''.join(sorted(lines)).encode()).hexdigest()
    return {'images': len(lines), 'digest': digest[:16]}
