"""Kill a checkpoint writer with SIGKILL at random moments; count survivors.

The command line of :mod:`pmm_torchreid.bench.checkpoints`
(scripts/stress_checkpoints.py): exits 1 when a kill left a file that does
not load as one complete state.
"""
import argparse
from typing import Optional, Sequence

from pmm_torchreid.bench.checkpoints import stress


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--kills', type=int, default=50)
    parser.add_argument('--megabytes', type=float, default=95.0,
                        help='checkpoint size (ResNet-50 PMM: about 95 MB)')
    parser.add_argument('--delay', type=float, nargs=2, default=[0.0, 3.0],
                        help='kill a uniform [MIN, MAX] s after the writer '
                        'is ready (its imports done)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--unsafe', action='store_true',
                        help='write with plain torch.save (for comparison)')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    results = stress(args.kills, args.megabytes, args.delay, args.seed,
                     args.unsafe)
    return 0 if set(results) <= {'ok', 'missing'} else 1
