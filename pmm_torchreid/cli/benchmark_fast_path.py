"""The CPU fast path: the training step in float32 NCHW, channels-last and
channels-last + bfloat16, per model at its recipe's size and threads.

The command line of scripts/benchmark_fast_path.py; the measurements are
:mod:`pmm_torchreid.bench.fast_path`.  Run it alone on the machine: other
jobs on the same cores change the speed-ups.
"""
import argparse
from typing import Optional, Sequence

from pmm_torchreid.bench.fast_path import PRESETS, VARIANTS, bench_fast_path, print_profile


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', choices=list(PRESETS),
                        default=['pmm_osnet_x0_25', 'bdb_osnet_x0_25',
                                 'osnet_x0_25', 'pmm_resnet18'],
                        help='rows (pmm_resnet50 at 384x128 takes minutes)')
    parser.add_argument('--variants', nargs='+', choices=list(VARIANTS),
                        default=['fp32', 'cl', 'cl+bf16'],
                        help='the first is the base of the speed-ups')
    parser.add_argument('--repeats', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--threads', type=int, default=None,
                        help="torch threads for every row (default: each "
                        "row's recipe)")
    parser.add_argument('--force-bf16', action='store_true',
                        help='measure bfloat16 on a CPU without it natively '
                        '(emulated: slow)')
    parser.add_argument('--profile', action='store_true',
                        help='instead: where the step of each model and '
                        'variant spends its time (torch.profiler)')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.profile:
        for name in args.models:
            for variant in args.variants:
                print_profile(name, PRESETS[name], variant)
        return 0
    bench_fast_path(args.models, args.variants, args.repeats, args.warmup,
                    force_bf16=args.force_bf16, threads=args.threads)
    return 0
