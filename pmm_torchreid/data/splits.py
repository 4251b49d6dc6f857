"""Which images train and which evaluate: validation identities carved out of
a training set, and CUHK01 splits written from a recorded list.

Choices (a mixed share, a schedule length, a start epoch, a learning rate)
must not be made on the test split.  :func:`carve_validation` holds out some
training identities as a validation query/gallery; ``data.val_ids N`` makes
every run evaluate on them instead of the test split, and train on the rest.

torchreid draws CUHK01's ten identity partitions without a seed the first time
it reads the dataset, so two machines measure different splits.
:func:`write_cuhk01_splits` writes torchreid's ``splits.json`` from the
training identities recorded in ``docs/cuhk01_splits.json`` instead, so the
study in ``docs/RESULTS.md`` can be rerun on the same splits.
"""
from __future__ import annotations

import glob
import json
import os.path as osp
import random
from typing import List, Sequence, Tuple

from pmm_torchreid.utils.io import atomic_write

__all__ = ['relabel', 'carve_validation', 'hold_out_validation', 'write_cuhk01_splits']


def relabel(items: Sequence[tuple]) -> List[tuple]:
    """Items with identities renumbered 0..P-1 in increasing old order."""
    new = {pid: i for i, pid in enumerate(sorted({it[1] for it in items}))}
    return [(it[0], new[it[1]]) + tuple(it[2:]) for it in items]


def carve_validation(
    train: Sequence[tuple], num_ids: int, seed: int = 0
) -> Tuple[List[tuple], List[tuple], List[tuple]]:
    """Holds ``num_ids`` training identities out as a validation set.

    The identities are drawn uniformly (``random.Random(seed)``, independent
    of the training seed, so every setting of a study sees the same split),
    from the identities in the order of their first image's file name, so
    that a copy of the data in another folder gives the same draw.
    For each of them, the images of one camera, drawn at random, become
    queries and the images of its other cameras the gallery; an identity seen
    by one camera only goes to the gallery as a distractor.  Same-camera
    matches are then excluded by torchreid's evaluation as usual.

    Args:
        train (list): torchreid train items ``(path, pid, camid, ...)``.
        num_ids (int): identities to hold out, at least 1, leaving at least 2
            to train on.
        seed (int): seed of the draw. Default is 0.

    Returns:
        tuple: ``(train, query, gallery)``; the remaining training identities
        are renumbered 0..P-1, the validation items keep their labels.

    Raises:
        ValueError: too few identities, or no held-out identity seen by two
            cameras (no query would have a match).
    """
    # identities in the order of their first file name: torchreid's training
    # numbers can follow the order a folder is listed in (DukeMTMC-reID), so
    # a copy of the data elsewhere would hold out other people; where the
    # numbers follow the names (Market-1501, CUHK01), this is their order
    first = {}
    for it in train:
        name = osp.basename(it[0])
        first[it[1]] = min(first.get(it[1], name), name)
    pids = sorted(first, key=lambda pid: (first[pid], pid))
    order = {pid: i for i, pid in enumerate(pids)}
    if not 1 <= num_ids <= len(pids) - 2:
        raise ValueError(
            'data.val_ids = {}: expected 1 to {} validation identities (the '
            'training set has {} identities and at least 2 must remain for '
            'training)'.format(num_ids, len(pids) - 2, len(pids)))
    rng = random.Random(seed)
    held = set(rng.sample(pids, num_ids))
    rest = relabel([it for it in train if it[1] not in held])
    by_pid = {}
    for it in train:
        if it[1] in held:
            by_pid.setdefault(it[1], []).append(tuple(it))
    query, gallery = [], []
    for pid in sorted(held, key=order.get):
        items = by_pid[pid]
        cams = sorted({it[2] for it in items})
        qcam = rng.choice(cams) if len(cams) > 1 else None
        query += [it for it in items if it[2] == qcam]
        gallery += [it for it in items if it[2] != qcam]
    if not query:
        raise ValueError(
            'data.val_ids = {}: none of the held-out identities is seen by two '
            'cameras, so no validation query would have a match'.format(
                num_ids))
    return rest, query, gallery


def hold_out_validation(dataset, num_ids: int, seed: int = 0) -> dict:
    """Applies :func:`carve_validation` to a torchreid dataset, in place: its
    ``train`` list shrinks, and its ``query``/``gallery`` become the held-out
    identities (the test split is not used).  Returns the counts."""
    train, query, gallery = carve_validation(dataset.train, num_ids, seed)
    dataset.train, dataset.query, dataset.gallery = train, query, gallery
    dataset.data = getattr(dataset, getattr(dataset, 'mode', 'train'))
    dataset.num_train_pids = dataset.get_num_pids(train)
    dataset.num_train_cams = dataset.get_num_cams(train)
    return {'train_ids': dataset.num_train_pids, 'train_images': len(train),
            'query': len(query), 'gallery': len(gallery)}


def write_cuhk01_splits(root: str, record: str) -> str:
    """Writes torchreid's ``<root>/cuhk01/splits.json`` from a record of the
    training identities (``docs/cuhk01_splits.json``), exactly as torchreid's
    ``CUHK01.prepare_split`` lays a split out: split ``2i`` has camera A as
    query and camera B as gallery, split ``2i + 1`` the same identities with
    the cameras swapped.  The record's splits must be the even ids 0, 2, ...
    with none missing, because torchreid indexes the list.

    An existing ``splits.json`` is left alone if it holds the same training
    identities, and refused otherwise (delete it to write the recorded one).

    Returns:
        str: the path of ``splits.json``.

    Raises:
        FileNotFoundError: no ``<root>/cuhk01/campus`` folder of images.
        ValueError: the record does not fit the images or the existing file.
    """
    root = osp.abspath(osp.expanduser(root))
    campus = osp.join(root, 'cuhk01', 'campus')
    paths = sorted(glob.glob(osp.join(campus, '*.png')))
    if not paths:
        raise FileNotFoundError(
            'no CUHK01 images in "{}" (expected campus/IIIICNN.png)'.format(
                campus))
    with open(record) as f:
        wanted = json.load(f)['splits']
    ids = sorted(int(k) for k in wanted)
    if ids != list(range(0, 2 * len(ids), 2)):
        raise ValueError(
            '"{}" records splits {}; expected the even ids 0, 2, ... up to '
            'some number, none missing'.format(record, ids))
    images = []  # (path, 0-based identity, camera view 0 or 1)
    for path in paths:
        name = osp.basename(path)
        images.append((path, int(name[:4]) - 1, (int(name[4:7]) - 1) // 2))
    all_pids = {pid for _, pid, _ in images}
    splits = []
    for split_id in ids:
        train_ids = sorted(p - 1 for p in wanted[str(split_id)]
                           ['train_identities'])
        if not set(train_ids) <= all_pids:
            raise ValueError('"{}" split {}: identities missing from "{}"'
                             .format(record, split_id, campus))
        label = {pid: i for i, pid in enumerate(train_ids)}
        train, cam_a, cam_b = [], [], []
        for path, pid, cam in images:
            if pid in label:
                train.append([path, label[pid], cam])
            else:
                (cam_a if cam == 0 else cam_b).append([path, pid, cam])
        counts = {'num_train_pids': len(train_ids),
                  'num_query_pids': len(all_pids) - len(train_ids),
                  'num_gallery_pids': len(all_pids) - len(train_ids)}
        splits.append(dict(train=train, query=cam_a, gallery=cam_b, **counts))
        splits.append(dict(train=train, query=cam_b, gallery=cam_a, **counts))
    target = osp.join(root, 'cuhk01', 'splits.json')
    if osp.exists(target):
        with open(target) as f:
            old = json.load(f)
        same = len(old) >= len(splits) and all(
            sorted(osp.basename(it[0]) for it in o['train'])
            == sorted(osp.basename(it[0]) for it in s['train'])
            for o, s in zip(old, splits))
        if not same:
            raise ValueError(
                '"{}" already holds other splits than "{}"; delete it to '
                'write the recorded ones'.format(target, record))
        return target
    with atomic_write(target, 'w') as f:
        json.dump(splits, f)
    return target
