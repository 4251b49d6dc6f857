"""Speed and memory of :func:`pmm_torchreid.metrics.evaluate_rank` against
torchreid's ``evaluate_rank`` on problems the size of Market-1501 and MSMT17.

The command line of scripts/benchmark_eval.py: the problems are
:mod:`pmm_torchreid.metrics.problems`, the measurements
:mod:`pmm_torchreid.bench.ranking`.  Exits 1 when an output of ours differs
from torchreid's.
"""
import argparse
from typing import Optional, Sequence

import torch

from pmm_torchreid.bench.ranking import bench_size, print_header
from pmm_torchreid.metrics.problems import SIZES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--sizes', nargs='+', choices=sorted(SIZES),
                        default=['market', 'msmt17'])
    parser.add_argument('--threads', type=int, default=None,
                        help='CPU threads (default: torch.get_num_threads())')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--max-rank', type=int, default=50)
    parser.add_argument('--skip-torchreid', action='store_true',
                        help="do not time torchreid's Python path")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print_header(threads)
    ok = True
    for name in args.sizes:
        ok &= bench_size(name, args.seed, args.repeats, args.max_rank,
                         threads, args.skip_torchreid)
    return 0 if ok else 1
