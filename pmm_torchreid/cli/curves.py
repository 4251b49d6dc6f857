"""Draws the training curves a run writes to <save_dir>/curves.csv (PMM, BDB or
a torchreid engine run through scripts/main.py).

The command line of ``scripts/plot_curves.py``; the plot is
:func:`pmm_torchreid.visualize.curves.plot`.
"""
from __future__ import annotations

import argparse
import os.path as osp

from pmm_torchreid.engine.curves import read_curves
from pmm_torchreid.visualize.curves import plot

__all__ = ['build_parser', 'main']


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('source', help='curves.csv, or the save_dir holding it')
    parser.add_argument('-o', '--output', default='',
                        help='PNG to write (default: curves.png next to the '
                        'CSV)')
    parser.add_argument('--title', default='', help='title of the figure')
    parser.add_argument('--dpi', type=int, default=100, help='resolution')
    return parser


def main(argv=None) -> None:
    """Reads the CSV, writes the PNG and says so."""
    args = build_parser().parse_args(argv)
    path = args.source
    if osp.isdir(path):
        path = osp.join(path, 'curves.csv')
    rows = read_curves(path)
    output = args.output or osp.join(osp.dirname(osp.abspath(path)),
                                     'curves.png')
    plot(rows, output, args.title, args.dpi)
    print('Saved "{}" ({} rows)'.format(output, len(rows)))
