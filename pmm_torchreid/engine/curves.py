"""Training curves as a CSV file: one row per training epoch, one per evaluation.

:class:`CurveLog` appends rows to ``<save_dir>/curves.csv`` and flushes each
one, so the file survives a crash and grows across resumed runs.  Every row
carries a ``run`` id; :func:`read_curves` keeps, for a run that starts at epoch
``e``, the earlier runs' rows before ``e`` only (resume semantics: a resumed run
overrides what the interrupted run wrote after its checkpoint).
``scripts/plot_curves.py`` draws the file.
"""
from __future__ import annotations

import csv
import os
import time
from typing import Dict, List, Sequence

__all__ = ['curve_columns', 'CurveLog', 'read_curves']


def curve_columns(keys: Sequence[str]) -> List[str]:
    """The CSV header for a training step that reports the numbers ``keys``
    (e.g. PMM's ``loss``, ``loss_t1``, ``loss_x1``, ``acc1``, ...; torchreid's
    triplet engine's ``loss_t``, ``loss_x``, ``acc``)."""
    steps = [k for k in keys if k != 'loss']
    return (['run', 'kind', 'epoch', 'step', 'lr', 'loss'] + steps +
            ['dataset', 'mAP', 'rank1', 'seconds'])


class CurveLog(object):
    """Appends rows to a CSV file, one flushed line at a time.

    Args:
        path (str): the CSV file (created with its header if absent).
        columns (sequence of str): the header (:func:`curve_columns`). An
            existing file with another header (e.g. a model with another
            number of stages) is renamed to ``<name>-<time>.csv`` and a new
            file is started.

    Rows are dicts; missing columns are left empty, unknown keys are an error
    naming them.
    """

    def __init__(self, path: str, columns: Sequence[str]):
        self.path = path
        self.columns = list(columns)
        self.run = time.strftime('%Y%m%d-%H%M%S') + '-{}'.format(os.getpid())
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        if os.path.isfile(path) and os.path.getsize(path) > 0:
            with open(path, newline='') as f:
                header = next(csv.reader(f), [])
            if header != self.columns:
                stem, ext = os.path.splitext(path)
                moved = '{}-{}{}'.format(stem, time.strftime('%Y%m%d-%H%M%S'),
                                         ext)
                os.replace(path, moved)
                print('curves: {} has other columns ({}); moved it to {}'.format(
                    path, header, moved))
        new = not os.path.isfile(path) or os.path.getsize(path) == 0
        if not new:
            with open(path, 'rb') as f:  # a half-written last line: end it
                f.seek(-1, os.SEEK_END)
                ends = f.read(1) == b'\n'
            if not ends:
                with open(path, 'a', newline='') as f:
                    f.write('\n')
        self._file = open(path, 'a', newline='')
        self._writer = csv.DictWriter(self._file, fieldnames=self.columns)
        if new:
            self._writer.writeheader()
            self._flush()

    def _flush(self):
        self._file.flush()
        os.fsync(self._file.fileno())

    def write(self, row: Dict) -> None:
        unknown = sorted(set(row) - set(self.columns) - {'run'})
        if unknown:
            raise KeyError('curves: columns {} are not in {} (header {})'.format(
                unknown, self.path, self.columns))
        full = {'run': self.run}
        for key, value in row.items():
            full[key] = '{:.6g}'.format(value) if isinstance(value, float) \
                else value
        self._writer.writerow(full)
        self._flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def _number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def read_curves(path: str) -> List[Dict]:
    """The rows of a curves CSV, numbers as floats, with resumed runs merged.

    Rows that cannot be parsed (a line cut by a crash) are skipped.

    Raises:
        FileNotFoundError: naming the path.
        ValueError: if the file has no ``kind`` and ``epoch`` columns.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError('no curves file at "{}"'.format(path))
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or 'kind' not in reader.fieldnames \
                or 'epoch' not in reader.fieldnames:
            raise ValueError(
                '"{}" is not a curves file: its header {} lacks kind and '
                'epoch'.format(path, reader.fieldnames))
        raw = list(reader)
    runs: Dict[str, List[Dict]] = {}
    order: List[str] = []
    for r in raw:
        epoch = _number(r.get('epoch'))
        if r.get('kind') not in ('train', 'test') or epoch is None \
                or None in r.values():
            continue
        row = {}
        for key, value in r.items():
            if key in ('run', 'kind', 'dataset'):
                row[key] = value
            else:
                row[key] = _number(value)
        run = r.get('run', '')
        if run not in runs:
            runs[run] = []
            order.append(run)
        runs[run].append(row)
    kept: List[Dict] = []
    for run in order:
        first = min(row['epoch'] for row in runs[run])
        kept = [row for row in kept if row['epoch'] < first] + runs[run]
    return kept
