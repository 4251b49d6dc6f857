"""Export a trained model to ONNX or OpenVINO for deployment, checked against PyTorch.

The command line of ``scripts/export.py`` (the export, the check and the
deployment metadata are :mod:`pmm_torchreid.deploy.export`, the OpenVINO IR
:mod:`pmm_torchreid.deploy.openvino_ir`).

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

``--format openvino`` converts the checked ONNX model to an OpenVINO IR (an
.xml and a .bin of the same name), runs the same check on the IR with
OpenVINO (float32), and only then moves the pair into place; the facts are in
the IR's ``rt_info`` (section ``model_info``, the same keys).
``--normalize`` L2-normalises the features inside the graph (the check then
compares with PyTorch's normalised features).  ``--size HxW`` or
``--profile boxmot`` (256x128, and the ImageNet mean and std BoxMOT applies)
sets the input size instead of data.height and data.width; the checked
images are resized to it.
"""
from __future__ import annotations

import argparse
import os.path as osp
import sys
import time

import numpy as np
import torch

from pmm_torchreid import launch
from pmm_torchreid.config import checks
from pmm_torchreid.config.kwargs import imagedata_kwargs
from pmm_torchreid.data.datamanager import build_datamanager
from pmm_torchreid.deploy import export as E
from pmm_torchreid.deploy import openvino_ir as OV
from pmm_torchreid.models.descriptors import DESCRIPTORS
from pmm_torchreid.utils.io import atomic_write

__all__ = ['FORMATS', 'build_parser', 'export', 'main']

#: what ``--format`` writes
FORMATS = ('onnx', 'openvino')


def build_parser() -> argparse.ArgumentParser:
    parser = launch.build_parser()
    parser.description = __doc__.splitlines()[0]
    parser.add_argument('--output', type=str, default='',
                        help='the .onnx file, or the .xml of the OpenVINO '
                        'IR (its .bin beside it), to write (default: '
                        '<data.save_dir>/model.onnx or model.xml)')
    parser.add_argument('--format', type=str, default='onnx',
                        choices=FORMATS,
                        help="'onnx', or 'openvino': an OpenVINO IR converted "
                        'from the checked ONNX model and checked again')
    parser.add_argument('--normalize', action='store_true',
                        help='L2-normalise the features inside the graph '
                        '(unit-length output rows)')
    parser.add_argument('--descriptor', type=str, default='',
                        choices=[''] + list(DESCRIPTORS),
                        help="what the graph outputs: 'all' (the stages "
                        "concatenated, 1536-d for PMM) or 'global' (stage I "
                        'alone, 512-d); default: the config\'s test.descriptor')
    parser.add_argument('--size', type=str, default='',
                        help='input size HEIGHTxWIDTH, e.g. 256x128, instead '
                        'of data.height x data.width')
    parser.add_argument('--profile', type=str, default='',
                        choices=[''] + sorted(E.PROFILES),
                        help="a consumer's input conventions: 'boxmot' is "
                        '256x128 and needs the ImageNet data.norm_mean and '
                        'norm_std (what BoxMOT applies to every crop)')
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
    if args.size and args.profile:
        raise ValueError('--size {} and --profile {}: give one of them (the '
                         'profile sets the size)'.format(args.size,
                                                        args.profile))


def _input_size(args: argparse.Namespace):
    """``(height, width)`` asked for by ``--size`` or ``--profile``, or
    None (the config's)."""
    if args.profile:
        return E.PROFILES[args.profile][:2]
    if args.size:
        return E.parse_size(args.size)
    return None


def _check_profile(args: argparse.Namespace, cfg) -> None:
    """Raises ValueError when the config normalises images otherwise than
    the ``--profile``'s consumer does."""
    if not args.profile or E.PROFILES[args.profile][2] is None:
        return
    mean, std = E.PROFILES[args.profile][2]
    if not (np.allclose(cfg.data.norm_mean, mean, atol=1e-6) and
            np.allclose(cfg.data.norm_std, std, atol=1e-6)):
        raise ValueError(
            '--profile {}: data.norm_mean = {} and data.norm_std = {}, but '
            'the {} consumer normalises every image with mean {} and std {} '
            '(the model would see other inputs than it was trained on); use '
            '--size for the size alone'.format(
                args.profile, list(cfg.data.norm_mean),
                list(cfg.data.norm_std), args.profile, list(mean), list(std)))


def _print_check(what: str, runtime: str, check: dict, num: int, name: str,
                 tolerance: float, seconds: float) -> None:
    print('{} on {} query images of {} ({} vs PyTorch {}): max abs '
          'difference {} (tolerance {:g}); {:.1f} s'.format(
              what, num, name, runtime, torch.__version__,
              E.check_summary(check), tolerance, seconds))
    print('  to PyTorch in float64: {} {:.2e}, PyTorch float32 {:.2e}'.format(
        runtime.split()[0], check['onnx_vs_float64'],
        check['torch_vs_float64']))
    if check['rule'] == 'float32 rounding':
        print('  above --tolerance, but {} is within {} times PyTorch\'s own '
              'float32 error of the float64 features: float32 rounding, '
              'accepted (--strict would refuse it)'.format(
                  runtime.split()[0], E.FLOAT32_FACTOR))


def export(argv=None) -> dict:
    """Builds, loads, exports, checks and writes; returns the report
    (``output``, ``format``, ``opset``, ``exporter``, ``normalize``,
    ``check`` (onnxruntime's), ``ir_check`` (OpenVINO's, or None),
    ``feature_dim``, ``export_seconds``, ``check_seconds``, ``deployment``).

    Raises:
        ExportCheckError: a check failed (nothing is written).
        ValueError, FileNotFoundError, ...: a bad option, config or file.
    """
    args = build_parser().parse_args(argv)
    _check_options(args)
    size = _input_size(args)
    if size:  # after the user's KEY VALUE pairs: the size asked for wins
        args.opts = list(args.opts or []) + [
            'data.height', str(size[0]), 'data.width', str(size[1])]
    if args.descriptor:  # after the user's pairs, as --size
        args.opts = list(args.opts or []) + ['test.descriptor', args.descriptor]
    cfg = launch.setup_config(args)
    _check_profile(args, cfg)
    if not cfg.model.load_weights:
        raise ValueError(
            'model.load_weights is empty: the export needs trained weights; '
            'add `model.load_weights PATH` (e.g. model.load_weights '
            '{}/model/model.pth.tar-{}) after the options'.format(
                cfg.data.save_dir, cfg.train.max_epoch))
    E.check_exporter(args.exporter, args.opset)
    openvino = args.format == 'openvino'
    output = osp.abspath(args.output or osp.join(
        cfg.data.save_dir, 'model.xml' if openvino else 'model.onnx'))
    if osp.isdir(output):
        raise IsADirectoryError('--output "{}" is a folder; expected the path '
                                'of the {} file'.format(
                                    output, '.xml' if openvino else '.onnx'))
    if openvino and not output.endswith('.xml'):
        raise ValueError('--output "{}": --format openvino writes an .xml and '
                         'a .bin beside it; expected a path ending in .xml'
                         .format(output))
    onnx, onnxruntime = E.import_onnx(args.exporter)
    ov = OV.import_openvino() if openvino else None
    checks.check_paths(cfg)  # the datasets and the weights file exist
    torch.manual_seed(cfg.train.seed)

    datamanager = build_datamanager(**imagedata_kwargs(cfg))
    print('Building model: {}'.format(cfg.model.name))
    model = launch.build_model(cfg, datamanager.num_train_pids)
    count = E.load_export_weights(model, cfg.model.load_weights,
                                  cfg.model.name)
    print('Loaded {} tensors from "{}"'.format(count, cfg.model.load_weights))
    model = model.cpu().eval()
    # what is exported and checked: the features, L2-normalised or not
    descriptor = E.Descriptor(model, args.normalize).eval()

    name = args.dataset or cfg.data.targets[0]
    images = E.query_images(datamanager, name, args.num_images)
    sizes = [args.num_images, args.batch_size]
    # PyTorch's features before the export (which must not change the model)
    reference = {s: E.run_torch(descriptor, images, s) for s in sizes}
    feature_dim = reference[sizes[0]].shape[1]
    if size:
        print('Input size {} x {} ({}), instead of the config\'s'.format(
            size[0], size[1], '--profile ' + args.profile if args.profile
            else '--size'))

    print('Exporting with the {} exporter, opset {}{} ...'.format(
        args.exporter, args.opset,
        ', features L2-normalised in the graph' if args.normalize else ''))
    started = time.time()
    proto = E.export_onnx(model, cfg.data.height, cfg.data.width, args.opset,
                          args.exporter, normalize=args.normalize)
    export_seconds = time.time() - started
    info = E.deployment_info(cfg, feature_dim, cfg.model.load_weights,
                             normalize=args.normalize)
    E.add_metadata(proto, info, cfg.model.name)
    data = proto.SerializeToString()

    started = time.time()
    check = E.check_export(descriptor, E.onnx_session(data), images,
                           reference, args.tolerance, args.strict)
    check_seconds = time.time() - started
    _print_check('Check', 'onnxruntime ' + onnxruntime.__version__, check,
                 args.num_images, name, args.tolerance, check_seconds)
    if not check['passed']:
        raise E.ExportCheckError(E.failure_message(
            check, args.tolerance, args.strict, output))

    ir_check = None
    if openvino:
        started = time.time()
        ir = OV.convert_onnx(data, info, cfg.model.name)
        with OV.staged_ir(ir, output) as staged:
            export_seconds += time.time() - started
            started = time.time()
            ir_check = E.check_export(descriptor, OV.openvino_session(staged),
                                      images, reference, args.tolerance,
                                      args.strict)
            seconds = time.time() - started
            check_seconds += seconds
            _print_check('OpenVINO check of the IR', 'OpenVINO ' +
                         ov.__version__.split('-')[0], ir_check,
                         args.num_images, name, args.tolerance, seconds)
            if not ir_check['passed']:
                raise E.ExportCheckError(E.failure_message(
                    ir_check, args.tolerance, args.strict, output,
                    runtime='OpenVINO'))
            written = osp.getsize(staged) + osp.getsize(OV.bin_path(staged))
        print('Exported "{}" and "{}" ({:.1f} MB, OpenVINO IR from opset {}, '
              '{} exporter, OpenVINO {}) in {:.1f} s'.format(
                  output, OV.bin_path(output), written / 2**20, args.opset,
                  args.exporter, ov.__version__.split('-')[0],
                  export_seconds))
    else:
        with atomic_write(output) as f:
            f.write(data)
        print('Exported "{}" ({:.1f} MB, opset {}, {} exporter, onnx {}) in '
              '{:.1f} s'.format(output, len(data) / 2**20, args.opset,
                                args.exporter, onnx.__version__,
                                export_seconds))
    if args.normalize and cfg.test.dist_metric == 'euclidean' and \
            not cfg.test.normalize_feature:
        print('Note: the config evaluates the squared Euclidean distance of '
              'raw features (test.normalize_feature = False); --normalize '
              'gives unit vectors, whose Euclidean distance ranks as the '
              'cosine distance')
    print(E.format_deployment(info))
    return {
        'output': output, 'format': args.format, 'opset': args.opset,
        'exporter': args.exporter, 'normalize': args.normalize,
        'check': check, 'ir_check': ir_check, 'feature_dim': feature_dim,
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
