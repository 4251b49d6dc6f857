"""Set finished studies of scripts/ablation.py side by side: how each setting
and each gap to a reference setting change from one recipe to another.

The command line of :mod:`pmm_torchreid.study.compare`
(scripts/compare_studies.py, ``pmm-compare-studies``): the runs of the
studies are paired by split and seed; every change is a later study minus
the first, with each split's mean over seeds and a 95 % interval with the
splits as the unit.  It reads the folders' ``results.json`` and trains
nothing; ``--out`` also writes the tables to a file (atomically).
"""
import argparse
from typing import Optional, Sequence

from pmm_torchreid.study.compare import CompareError, compare, load_study
from pmm_torchreid.utils.io import atomic_write

__all__ = ['build_parser', 'main']


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog='Example: --studies log/controls_e30 log/length_e60 --labels '
        '"30 epochs" "60 epochs" --reference pmm_osnet_x0_25:hard_mix',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--studies', nargs='+', required=True,
                        metavar='FOLDER',
                        help='the --out folders of scripts/ablation.py, the '
                        'first one the baseline of every change')
    parser.add_argument('--labels', nargs='+', default=None,
                        help='a name per study for the tables (default: the '
                        'folders\' names)')
    parser.add_argument('--reference', required=True,
                        help='the setting every gap is taken against')
    parser.add_argument('--settings', nargs='+', default=None,
                        help='the settings to show (default: every setting '
                        'all studies have)')
    parser.add_argument('--metric', choices=('mAP', 'rank1'), default='mAP')
    parser.add_argument('--out', default='',
                        help='also write the tables (markdown) to this file')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    labels = args.labels or [None] * len(args.studies)
    if len(labels) != len(args.studies):
        raise SystemExit('error: --labels: {} labels for {} studies'.format(
            len(labels), len(args.studies)))
    try:
        studies = [load_study(folder, label)
                   for folder, label in zip(args.studies, labels)]
        text = compare(studies, args.reference, args.settings, args.metric)
    except CompareError as error:
        raise SystemExit('error: {}'.format(error))
    print(text, end='')
    if args.out:
        with atomic_write(args.out, 'w') as f:
            f.write(text)
    return 0
