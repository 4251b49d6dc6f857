"""Write torchreid's CUHK01 splits.json from docs/cuhk01_splits.json, so that
split ids 0-5 are the identity partitions of docs/RESULTS.md.

The command line of scripts/cuhk01_splits.py (the writing is
:func:`pmm_torchreid.data.splits.write_cuhk01_splits`).
"""
import argparse
from typing import Optional, Sequence

from pmm_torchreid.data.splits import write_cuhk01_splits


def build_parser(record: Optional[str] = None) -> argparse.ArgumentParser:
    """``record``: the default of ``--record`` (the script passes
    docs/cuhk01_splits.json); without one, ``--record`` is required."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--root', default='reid-data',
                        help='data root holding cuhk01/campus')
    parser.add_argument('--record', default=record, required=not record,
                        help='the recorded training identities')
    return parser


def main(argv: Optional[Sequence[str]] = None,
         record: Optional[str] = None) -> int:
    args = build_parser(record).parse_args(argv)
    try:
        path = write_cuhk01_splits(args.root, args.record)
    except (OSError, ValueError) as error:
        raise SystemExit('error: {}'.format(error))
    print('CUHK01 splits from "{}" in "{}"'.format(args.record, path))
    return 0
