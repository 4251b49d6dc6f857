"""Cost of PMM's Grad-CAM guidance: the training step with ``pmm.mix hard_mix``
versus ``none`` (same model, same batch), plus the reference code's way of
taking the Grad-CAM, for comparison (scripts/benchmark.py; the measurements
are :mod:`pmm_torchreid.bench.training`).

With ``--device cuda`` it measures training throughput on a GPU instead:
images/s of ``pmm_resnet50`` (``hard_mix`` and ``none``) and ``bdb_resnet50``
at 384x128, batch 64, per ``--precision`` (float32, ``train.amp``, or a forced
bfloat16 / float16), the peak GPU memory of training, plus the images/s of
feature extraction for evaluation.
"""
import argparse
from typing import Optional, Sequence

import torch

from pmm_torchreid.bench.training import PRECISIONS, bench_backbone, bench_device
from pmm_torchreid.models.guidance import MIX_MODES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--backbones', nargs='+',
                        default=['resnet50', 'osnet_x0_25'])
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--height', type=int, default=384)
    parser.add_argument('--width', type=int, default=128)
    parser.add_argument('--block', type=int, nargs=2, default=[3, 2])
    parser.add_argument('--top-k', type=int, default=8)
    parser.add_argument('--repeats', type=int, default=7)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--threads', type=int, default=0,
                        help='torch threads (0: leave the default)')
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cpu',
                        help="'cuda': the GPU throughput table (fp32 vs AMP)")
    parser.add_argument('--precision', nargs='+', default=['fp32', 'amp'],
                        choices=list(PRECISIONS),
                        help="with --device cuda: 'amp' is what train.amp "
                        "picks on this GPU; 'bf16' and 'fp16' (with a "
                        'gradient scaler) force one; the first is the base')
    parser.add_argument('--modes', nargs='+',
                        default=['none', 'hard_mix', 'reference'],
                        choices=list(MIX_MODES) + ['reference'],
                        help='pmm.mix values (the ablation variants too) and '
                        "'reference', A-Hard-Mix with the reference code's "
                        'Grad-CAM')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == 'cuda':
        if not torch.cuda.is_available():
            raise SystemExit('error: --device cuda, but torch sees no CUDA '
                             'device here (torch {})'.format(
                                 torch.__version__))
        torch.backends.cudnn.benchmark = True
        bench_device('cuda', max(args.repeats, 20), max(args.warmup, 5),
                     precisions=tuple(args.precision))
        return
    if 'none' not in args.modes:
        args.modes.insert(0, 'none')
    print('torch {} | {} threads | device cpu'.format(
        torch.__version__, torch.get_num_threads()))
    for backbone in args.backbones:
        bench_backbone(backbone, args.batch, args.height, args.width,
                       tuple(args.block), args.top_k, args.repeats,
                       args.warmup, args.modes)
