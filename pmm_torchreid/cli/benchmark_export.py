"""The exported descriptor measured: difference to PyTorch, file size and
images/s of PyTorch, ONNX Runtime and OpenVINO, per descriptor choice.

The command line of scripts/benchmark_export.py; the measurements are
:mod:`pmm_torchreid.deploy.benchmark`.  Same flags and trailing KEY VALUE
pairs as scripts/main.py (this script's options first): the config gives the
model, the input size (data.height, data.width) and the query images the
difference is measured on.  Run it alone on the machine: other jobs on the
same cores change the speeds.
"""
import argparse
from typing import Optional, Sequence

import torch

from pmm_torchreid import launch
from pmm_torchreid.config.kwargs import imagedata_kwargs
from pmm_torchreid.data.datamanager import build_datamanager
from pmm_torchreid.deploy import export as E
from pmm_torchreid.deploy.benchmark import FORMATS, bench_export, print_table


def build_parser() -> argparse.ArgumentParser:
    parser = launch.build_parser()
    parser.description = __doc__.split('\n\n')[0]
    parser.add_argument('--weights', type=str, default='',
                        help='the trained checkpoint (default: '
                        'model.load_weights)')
    parser.add_argument('--descriptors', nargs='+', default=['all', 'global'],
                        choices=['all', 'global'],
                        help="descriptor choices; a model without the choice "
                        "measures 'all' alone (the lists take every word up "
                        'to the next option: KEY VALUE pairs go after '
                        'another option)')
    parser.add_argument('--formats', nargs='+', choices=FORMATS,
                        default=list(FORMATS), help='the runtimes measured')
    parser.add_argument('--batch-size', type=int, default=16,
                        help='images per batch (the speed is measured on one)')
    parser.add_argument('--num-images', type=int, default=16,
                        help='query images the difference is measured on')
    parser.add_argument('--repeats', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--threads', type=int, default=1,
                        help='CPU threads of every runtime')
    parser.add_argument('--dataset', type=str, default='',
                        help='target whose query images are used (default: '
                        'the first of data.targets)')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.weights:
        args.opts = list(args.opts or []) + ['model.load_weights',
                                             args.weights]
    cfg = launch.setup_config(args)
    if not cfg.model.load_weights:
        raise ValueError('no weights: give --weights PATH (or '
                         'model.load_weights PATH)')
    if args.batch_size < 1 or args.repeats < 1 or args.num_images < 1:
        raise ValueError('--batch-size, --repeats and --num-images must be '
                         '>= 1')
    E.import_onnx('dynamo')
    torch.set_num_threads(args.threads)
    datamanager = build_datamanager(**imagedata_kwargs(cfg))
    model = launch.build_model(cfg, datamanager.num_train_pids)
    E.load_export_weights(model, cfg.model.load_weights, cfg.model.name)
    model = model.cpu().eval()
    name = args.dataset or cfg.data.targets[0]
    images = E.query_images(datamanager, name, args.num_images)
    rows = bench_export(model, images, args.descriptors, args.formats,
                        args.batch_size, args.repeats, args.warmup)
    versions = ['torch {}'.format(torch.__version__.split('+')[0])]
    for module in ('onnxruntime', 'openvino'):
        try:
            versions.append('{} {}'.format(module, __import__(
                module).__version__.split('-')[0]))  # lazy: optional packages
        except ImportError:
            pass
    print_table(rows, '{} | {} x {} | {} query images of {} | batch {} | {} '
                'thread(s) | {} | median of {} batches'.format(
                    cfg.model.name, cfg.data.height, cfg.data.width,
                    args.num_images, name, args.batch_size, args.threads,
                    ', '.join(versions), args.repeats))
    return 0
