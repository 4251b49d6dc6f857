"""Export a trained model to ONNX for deployment, checked against PyTorch.

The command line of ``scripts/export.py`` (the export, the check and the
deployment metadata are :mod:`pmm_torchreid.deploy.export`).

Same flags and trailing KEY VALUE overrides as scripts/main.py (options of this
script go before the KEY VALUE pairs).  It builds the model of the config,
loads the weights of ``model.load_weights`` (required; every tensor the
descriptor depends on must be in the file), and exports the eval-mode network:
input ``images`` (float32, N x 3 x H x W, any N >= 1) -> output ``features``
(float32, N x D, the descriptor torchreid's evaluation uses; D = 1536 for the
PMM, BDB and MagnifierNet models, 1024 for FMN).

Before the file is written, onnxruntime runs the exported bytes on real query
images of the first target (read and transformed as torchreid's evaluation
reads them), once as one batch of ``--num-images`` and once in batches of
``--batch-size``, and compares with PyTorch: a max abs difference above
``--tolerance`` writes nothing and exits with code 1, unless it is float32
rounding (onnxruntime within 4 times PyTorch's own float32 error of
PyTorch's float64 features; ``--strict`` refuses that too).  The file is written
atomically (temporary file, fsync, rename), so it is never half-written.  The
preprocessing and distance a deployment needs are printed and stored in the
model's metadata (``metadata_props``).
"""
from __future__ import annotations

import argparse
import os.path as osp
import sys
import time

import torch

from pmm_torchreid import launch
from pmm_torchreid.config import checks
from pmm_torchreid.config.kwargs import imagedata_kwargs
from pmm_torchreid.data.datamanager import build_datamanager
from pmm_torchreid.deploy import export as E
from pmm_torchreid.utils.io import atomic_write

__all__ = ['build_parser', 'export', 'main']


def build_parser() -> argparse.ArgumentParser:
    parser = launch.build_parser()
    parser.description = __doc__.splitlines()[0]
    parser.add_argument('--output', type=str, default='',
                        help='the .onnx file to write (default: '
                        '<data.save_dir>/model.onnx)')
    parser.add_argument('--opset', type=int, default=E.DEFAULT_OPSET,
                        help='ONNX opset (>= {} with the dynamo exporter)'
                        .format(E.MIN_DYNAMO_OPSET))
    parser.add_argument('--exporter', type=str, default='dynamo',
                        choices=E.EXPORTERS,
                        help="'dynamo': torch.export-based (torch's default); "
                        "'torchscript': the deprecated TorchScript-based one, "
                        'for runtimes that need an opset below {}'.format(
                            E.MIN_DYNAMO_OPSET))
    parser.add_argument('--num-images', type=int, default=16,
                        help='query images the check runs on')
    parser.add_argument('--batch-size', type=int, default=1,
                        help='the check also runs the images in batches of '
                        'this size (besides one batch of all of them)')
    parser.add_argument('--tolerance', type=float, default=1e-4,
                        help='largest max abs difference to PyTorch accepted')
    parser.add_argument('--strict', action='store_true',
                        help='fail whenever the difference exceeds '
                        '--tolerance, even when it is float32 rounding (see '
                        'check_export)')
    parser.add_argument('--dataset', type=str, default='',
                        help='target dataset whose query images are used '
                        '(default: the first of data.targets)')
    return parser


def _check_options(args: argparse.Namespace) -> None:
    if args.num_images < 2:
        raise ValueError('--num-images {}: expected >= 2 (the check runs two '
                         'batch sizes)'.format(args.num_images))
    if not 1 <= args.batch_size < args.num_images:
        raise ValueError('--batch-size {}: expected 1 to --num-images - 1 = {} '
                         '(a second batch size besides one batch of all '
                         'images)'.format(args.batch_size, args.num_images - 1))
    if not args.tolerance >= 0:
        raise ValueError('--tolerance {}: expected >= 0'.format(args.tolerance))


def export(argv=None) -> dict:
    """Builds, loads, exports, checks and writes; returns the report
    (``output``, ``opset``, ``exporter``, ``check``, ``feature_dim``,
    ``export_seconds``, ``check_seconds``, ``deployment``).

    Raises:
        ExportCheckError: the check failed (nothing is written).
        ValueError, FileNotFoundError, ...: a bad option, config or file.
    """
    args = build_parser().parse_args(argv)
    _check_options(args)
    cfg = launch.setup_config(args)
    if not cfg.model.load_weights:
        raise ValueError(
            'model.load_weights is empty: the export needs trained weights; '
            'add `model.load_weights PATH` (e.g. model.load_weights '
            '{}/model/model.pth.tar-{}) after the options'.format(
                cfg.data.save_dir, cfg.train.max_epoch))
    E.check_exporter(args.exporter, args.opset)
    output = osp.abspath(args.output or osp.join(cfg.data.save_dir,
                                                 'model.onnx'))
    if osp.isdir(output):
        raise IsADirectoryError('--output "{}" is a folder; expected the path '
                                'of the .onnx file'.format(output))
    onnx, onnxruntime = E.import_onnx(args.exporter)
    checks.check_paths(cfg)  # the datasets and the weights file exist
    torch.manual_seed(cfg.train.seed)

    datamanager = build_datamanager(**imagedata_kwargs(cfg))
    print('Building model: {}'.format(cfg.model.name))
    model = launch.build_model(cfg, datamanager.num_train_pids)
    count = E.load_export_weights(model, cfg.model.load_weights,
                                  cfg.model.name)
    print('Loaded {} tensors from "{}"'.format(count, cfg.model.load_weights))
    model = model.cpu().eval()

    name = args.dataset or cfg.data.targets[0]
    images = E.query_images(datamanager, name, args.num_images)
    sizes = [args.num_images, args.batch_size]
    # PyTorch's features before the export (which must not change the model)
    reference = {s: E.run_torch(model, images, s) for s in sizes}
    feature_dim = reference[sizes[0]].shape[1]

    print('Exporting with the {} exporter, opset {} ...'.format(
        args.exporter, args.opset))
    started = time.time()
    proto = E.export_onnx(model, cfg.data.height, cfg.data.width, args.opset,
                          args.exporter)
    export_seconds = time.time() - started
    info = E.deployment_info(cfg, feature_dim, cfg.model.load_weights)
    E.add_metadata(proto, info, cfg.model.name)
    data = proto.SerializeToString()

    started = time.time()
    check = E.check_export(model, E.onnx_session(data), images, reference,
                           args.tolerance, args.strict)
    check_seconds = time.time() - started
    print('Check on {} query images of {} (onnxruntime {} vs PyTorch {}): '
          'max abs difference {} (tolerance {:g}); {:.1f} s'.format(
              args.num_images, name, onnxruntime.__version__,
              torch.__version__, E.check_summary(check), args.tolerance,
              check_seconds))
    print('  to PyTorch in float64: onnxruntime {:.2e}, PyTorch float32 '
          '{:.2e}'.format(check['onnx_vs_float64'], check['torch_vs_float64']))
    if check['rule'] == 'float32 rounding':
        print('  above --tolerance, but onnxruntime is within {} times '
              'PyTorch\'s own float32 error of the float64 features: float32 '
              'rounding, accepted (--strict would refuse it)'.format(
                  E.FLOAT32_FACTOR))
    if not check['passed']:
        raise E.ExportCheckError(E.failure_message(
            check, args.tolerance, args.strict, output))

    with atomic_write(output) as f:
        f.write(data)
    print('Exported "{}" ({:.1f} MB, opset {}, {} exporter, onnx {}) in '
          '{:.1f} s'.format(output, len(data) / 2**20, args.opset,
                            args.exporter, onnx.__version__, export_seconds))
    print(E.format_deployment(info))
    return {
        'output': output, 'opset': args.opset, 'exporter': args.exporter,
        'check': check, 'feature_dim': feature_dim,
        'export_seconds': export_seconds, 'check_seconds': check_seconds,
        'deployment': dict(info),
    }


def main(argv=None) -> int:
    """:func:`export`; 0 when the file is written, 1 (with ``Error: ...`` on
    stderr) when the check fails.  Other errors propagate (a traceback and
    exit status 1 from ``scripts/export.py``)."""
    try:
        export(argv)
    except E.ExportCheckError as error:
        print('Error: {}'.format(error), file=sys.stderr)
        return 1
    return 0
