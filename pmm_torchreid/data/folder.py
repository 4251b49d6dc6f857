"""Your own data as a torchreid image dataset: folders of person crops named
the way Market-1501 names them, or CSV files that list the crops.

The dataset lives in ``<root>/<dataset_dir>/`` (``root`` is ``data.root``;
an absolute ``dataset_dir`` is used as it is), one entry per split::

    train/     or  bounding_box_train/  or  train.csv
    query/                              or  query.csv
    gallery/   or  bounding_box_test/   or  gallery.csv

A real Market-1501 or DukeMTMC-reID folder therefore reads as it is.

**Folders.**  Every image directly inside (``.jpg``, ``.jpeg``, ``.png``,
``.bmp``, in any case; sub-folders and other files are not read) is named
``<pid>_c<camera><rest>.<ext>`` (:data:`NAME_FORMAT`): the identity, an
integer; ``_c`` and the camera number, counted from 1 as in Market-1501; then
anything that does not begin with a digit, or nothing.  For example
``0001_c1_0001.jpg``, ``0002_c1s1_000451_03.jpg``, ``17_c2.png``.  The
identity ``-1`` marks junk crops, which are left out (Market-1501's rule).

**CSV files.**  One row per image: ``path,pid,camid``, the path relative to
the CSV file's folder (or absolute), the identity, and the camera id counted
from 0 as torchreid stores it.  A header row ``path,pid,camid`` may come
first; blank rows and rows beginning with ``#`` are skipped; ``pid`` -1 is
junk here too.

As in torchreid's own datasets, the training identities are renumbered
0..N-1; query and gallery keep theirs.  Before anything trains, the dataset
checks what torchreid's evaluation needs: a query counts only if the gallery
holds its identity seen by *another* camera.  No such query at all is an
error; some without one give a warning, and so do identities that are both
in training and in the query set.

Register it with torchreid under a name of your choice
(:func:`folder_dataset`), then use that name in ``data.sources`` and
``data.targets``::

    import torchreid
    from pmm_torchreid.data.folder import folder_dataset
    torchreid.data.register_image_dataset('my_shop', folder_dataset('my_shop'))

docs/OWN_DATA.md is the guide.
"""
from __future__ import annotations

import csv
import functools
import os
import os.path as osp
import re
import warnings
from typing import Callable, Dict, List, Sequence, Tuple

import torchreid

from pmm_torchreid.data.splits import relabel

__all__ = ['FolderDataset', 'folder_dataset', 'read_folder', 'read_csv',
           'split_source', 'check_query_gallery', 'IMAGE_EXTENSIONS',
           'NAME_FORMAT', 'SPLIT_FOLDERS', 'CSV_HEADER']

#: The files a split folder contributes (compared in lower case).
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')
#: How an image in a split folder is named.
NAME_FORMAT = ('<pid>_c<camera>[rest].<ext> (camera from 1, rest not starting '
               'with a digit; e.g. 0001_c1_0001.jpg or 0002_c1s1_000451_03.jpg)')
#: The folder names each split may have, in the order they are looked for.
SPLIT_FOLDERS = {
    'train': ('train', 'bounding_box_train'),
    'query': ('query', ),
    'gallery': ('gallery', 'bounding_box_test'),
}
#: The columns of a split's CSV file (and its optional header row).
CSV_HEADER = ('path', 'pid', 'camid')

_NAME = re.compile(r'^(-?\d+)_c(\d+)(?:\D.*)?$')
_JUNK = -1

Item = Tuple[str, int, int]


# --------------------------------------------------------------------------
# reading one split
# --------------------------------------------------------------------------
def _parse_name(stem: str) -> Tuple[int, int]:
    """``(pid, camid)`` of a file name's stem; ValueError with the reason."""
    match = _NAME.match(stem)
    if match is None:
        raise ValueError('the name does not follow ' + NAME_FORMAT)
    pid, camera = int(match.group(1)), int(match.group(2))
    if pid < _JUNK:
        raise ValueError('identity {}: expected an integer >= 0 (or -1 for '
                         'a junk crop, left out)'.format(pid))
    if camera < 1:
        raise ValueError('camera c{}: camera numbers in file names count '
                         'from 1, as in Market-1501 (c1, c2, ...)'.format(
                             camera))
    return pid, camera - 1


def read_folder(folder: str) -> List[Item]:
    """``[(path, pid, camid)]`` of the images directly in ``folder``, sorted
    by name; junk crops (pid -1) are left out.

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
        ValueError: image files whose names do not follow
            :data:`NAME_FORMAT`, naming the first, why, and how many more.
    """
    if not osp.isdir(folder):
        raise FileNotFoundError('"{}" is not a folder'.format(folder))
    items, bad = [], []
    for name in sorted(os.listdir(folder)):
        stem, ext = osp.splitext(name)
        path = osp.join(folder, name)
        if name.startswith('.') or ext.lower() not in IMAGE_EXTENSIONS or \
                not osp.isfile(path):
            continue
        try:
            pid, camid = _parse_name(stem)
        except ValueError as error:
            bad.append((path, str(error)))
            continue
        if pid != _JUNK:
            items.append((path, pid, camid))
    if bad:
        path, reason = bad[0]
        raise ValueError('image "{}": {}{}'.format(
            path, reason, '' if len(bad) == 1 else
            ' ({} more file(s) in "{}" are misnamed, e.g. "{}")'.format(
                len(bad) - 1, folder, osp.basename(bad[1][0]))))
    return items


def _integer(text: str, column: str, where: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError('{}: {} {!r} is not an integer; expected rows '
                         '"path,pid,camid", e.g. "train/0001_a.jpg,1,0"'.format(
                             where, column, text)) from None


def read_csv(path: str) -> List[Item]:
    """``[(path, pid, camid)]`` of the rows of the CSV file ``path``, in
    file order; junk rows (pid -1) are left out.  Image paths are made
    absolute against the CSV file's folder.

    Raises:
        FileNotFoundError: no such CSV file; or a row's image does not exist
            (naming the file, the line and the path).
        ValueError: a row that is not ``path,pid,camid`` with integers, pid
            >= -1 and camid >= 0 (naming the file, the line and the value).
    """
    if not osp.isfile(path):
        raise FileNotFoundError('"{}" is not a file'.format(path))
    base = osp.dirname(osp.abspath(path))
    items, first = [], True
    with open(path, newline='', encoding='utf-8-sig') as f:
        reader = csv.reader(f)
        for row in reader:
            cells = [cell.strip() for cell in row]
            if not any(cells) or cells[0].startswith('#'):
                continue
            where = '"{}", line {}'.format(path, reader.line_num)
            if first and [c.lower() for c in cells] == list(CSV_HEADER):
                first = False
                continue
            first = False
            if len(cells) != len(CSV_HEADER):
                raise ValueError(
                    '{}: {} value(s) {!r}; expected 3, "path,pid,camid"'.format(
                        where, len(cells), ','.join(row)))
            image, pid, camid = cells
            pid = _integer(pid, 'pid', where)
            camid = _integer(camid, 'camid', where)
            if pid < _JUNK:
                raise ValueError('{}: pid {}; expected an integer >= 0 (or -1 '
                                 'for a junk crop, left out)'.format(where, pid))
            if camid < 0:
                raise ValueError('{}: camid {}; expected an integer >= 0 '
                                 '(camera ids count from 0 in a CSV '
                                 'file)'.format(where, camid))
            full = osp.join(base, osp.expanduser(image))
            if not image or not osp.isfile(full):
                raise FileNotFoundError('{}: image {!r} not found ({})'.format(
                    where, image, full))
            if pid != _JUNK:
                items.append((osp.normpath(full), pid, camid))
    return items


def split_source(dataset_dir: str, split: str) -> str:
    """The folder or CSV file that holds ``split`` in ``dataset_dir``.

    Raises:
        FileNotFoundError: none of the names :data:`SPLIT_FOLDERS` and
            ``<split>.csv`` exists (naming them).
        ValueError: more than one exists.
    """
    names = [n for n in SPLIT_FOLDERS[split]
             if osp.isdir(osp.join(dataset_dir, n))]
    if osp.isfile(osp.join(dataset_dir, split + '.csv')):
        names.append(split + '.csv')
    expected = ' or '.join(['{}/'.format(n) for n in SPLIT_FOLDERS[split]] +
                           [split + '.csv'])
    if not names:
        raise FileNotFoundError(
            'the {} split of "{}" is missing: expected {} in that folder '
            '(docs/OWN_DATA.md)'.format(split, dataset_dir, expected))
    if len(names) > 1:
        raise ValueError(
            'the {} split of "{}" is given twice, by {}: keep one of them'.format(
                split, dataset_dir, ' and '.join(names)))
    return osp.join(dataset_dir, names[0])


def _read_split(source: str) -> List[Item]:
    return read_csv(source) if source.endswith('.csv') else \
        read_folder(source)


# --------------------------------------------------------------------------
# what evaluation needs
# --------------------------------------------------------------------------
def _warn(message: str) -> None:
    warnings.warn(message)
    print('** ' + message)


def check_query_gallery(query: Sequence[Item], gallery: Sequence[Item],
                        where: str = '') -> int:
    """The number of queries torchreid's evaluation can use: those whose
    identity the gallery holds from another camera (same-camera matches are
    not counted, as for Market-1501).  Warns when some cannot be used.

    Raises:
        ValueError: not one query can be used.
    """
    cameras: Dict[int, set] = {}
    for _, pid, camid in gallery:
        cameras.setdefault(pid, set()).add(camid)
    usable = sum(1 for _, pid, camid in query
                 if cameras.get(pid, set()) - {camid})
    where = ' of {}'.format(where) if where else ''
    if not usable:
        raise ValueError(
            'no query{} has a gallery image of its identity from another '
            'camera, so there is nothing to evaluate: torchreid never counts '
            'a match seen by the query\'s own camera. Check the camera ids '
            '(the c<camera> of the file names, or the camid column) and that '
            'query and gallery share identities (docs/OWN_DATA.md)'.format(
                where))
    if usable < len(query):
        _warn('{} of {} queries{} have no gallery image of their identity '
              'from another camera; torchreid\'s evaluation skips '
              'them'.format(len(query) - usable, len(query), where))
    return usable


# --------------------------------------------------------------------------
# the dataset
# --------------------------------------------------------------------------
class FolderDataset(torchreid.data.ImageDataset):
    """A person re-identification dataset read from ``<root>/<dataset_dir>``
    (the module docstring gives the layout and the naming).

    Register it with torchreid through :func:`folder_dataset`, or subclass
    it with ``dataset_dir`` set as a class attribute.

    Args:
        root (str, optional): the datasets' root (``data.root``). Default
            is ''.
        dataset_dir (str, optional): the dataset's folder, relative to
            ``root`` or absolute. Default is the class attribute.
        kwargs: passed on to ``torchreid.data.ImageDataset`` (``transform``,
            ``mode``, ``combineall``, ``verbose``, ...; others are ignored).

    Raises:
        FileNotFoundError: the folder, a split, a CSV file or an image it
            lists is missing.
        ValueError: a misnamed image, a bad CSV row, an empty split, or no
            query that can be evaluated.
    """
    dataset_dir = ''

    def __init__(self, root: str = '', dataset_dir: str = '',
                 **kwargs) -> None:
        dataset_dir = dataset_dir or self.dataset_dir
        if not dataset_dir:
            raise ValueError('FolderDataset needs dataset_dir: the folder '
                             'that holds train, query and gallery')
        self.root = osp.abspath(osp.expanduser(root))
        self.dataset_dir = osp.join(self.root, osp.expanduser(dataset_dir))
        if not osp.isdir(self.dataset_dir):
            raise FileNotFoundError(
                'dataset folder "{}" not found (data.root "{}" + "{}"): '
                'expected it to hold train/, query/ and gallery/ (or '
                'train.csv, query.csv, gallery.csv; docs/OWN_DATA.md)'.format(
                    self.dataset_dir, root, dataset_dir))
        lists = {}
        for split in SPLIT_FOLDERS:
            source = split_source(self.dataset_dir, split)
            lists[split] = _read_split(source)
            if not lists[split]:
                raise ValueError('the {} split "{}" holds no image'.format(
                    split, source))
        train, query, gallery = (lists[s] for s in ('train', 'query',
                                                    'gallery'))
        check_query_gallery(query, gallery, '"{}"'.format(self.dataset_dir))
        shared = {p for _, p, _ in train} & {p for _, p, _ in query}
        if shared:
            _warn('{} identities of "{}" are both in train and in query (e.g. '
                  '{}): results on identities seen in training overstate '
                  'what the model does on new people'.format(
                      len(shared), self.dataset_dir, sorted(shared)[:3]))
        super().__init__(relabel(train), query, gallery, **kwargs)


def folder_dataset(dataset_dir: str) -> Callable[..., FolderDataset]:
    """What to register with torchreid for the dataset in
    ``<data.root>/<dataset_dir>`` (or the absolute ``dataset_dir``): a
    callable that builds a :class:`FolderDataset` from torchreid's dataset
    arguments.  Its ``dataset_dir`` attribute is where ``scripts/main.py``
    looks for the folder before any work.

    Examples::

        >>> build = folder_dataset('my_shop')
        >>> build.dataset_dir
        'my_shop'

    and then ``torchreid.data.register_image_dataset('my_shop', build)``.
    """
    if not isinstance(dataset_dir, str) or not dataset_dir:
        raise ValueError('folder_dataset: dataset_dir {!r}: expected the '
                         'name of a folder under data.root, or an absolute '
                         'path'.format(dataset_dir))
    build = functools.partial(FolderDataset, dataset_dir=dataset_dir)
    build.dataset_dir = dataset_dir
    return build
