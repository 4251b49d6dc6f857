"""ONNX export of the eval-mode descriptor, checked against PyTorch
(``scripts/export.py``; the command line is :mod:`pmm_torchreid.cli.export`).

- :func:`load_export_weights`: the strict weight load (every tensor the
  descriptor depends on must be in the file).
- :func:`export_onnx`: the network as one function ``images -> features``
  (:class:`Descriptor`, optionally L2-normalising the features inside the
  graph), exported in memory and its graph checked.
- :func:`check_export`: onnxruntime against PyTorch on real images at two
  batch sizes (:func:`query_images`, :func:`run_torch`, :func:`run_onnx`).
- :func:`deployment_info` / :func:`format_deployment`: the preprocessing and
  distance a deployment needs (stored as the model's ``metadata_props``, and
  as the OpenVINO IR's ``rt_info``: :mod:`pmm_torchreid.deploy.openvino_ir`).
- :func:`parse_size` / :data:`PROFILES`: the input size of an export
  (``--size HxW``, ``--profile boxmot``).

onnx, onnxruntime and onnxscript are optional dependencies (the ``[onnx]``
extra): they are imported only when an export runs.
"""
from __future__ import annotations

import copy
import io
import json
import os.path as osp
import warnings
from collections import OrderedDict
from typing import Dict, List

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pmm_torchreid.data.images import read_image
from pmm_torchreid.data.queries import query_set
from pmm_torchreid.utils.checkpoint import load_checkpoint, strip_module
from pmm_torchreid.utils.io import sha256

__all__ = [
    'INPUT_NAME', 'OUTPUT_NAME', 'DEFAULT_OPSET', 'MIN_DYNAMO_OPSET',
    'FLOAT32_FACTOR', 'EXPORTERS', 'ExportCheckError', 'load_export_weights',
    'Descriptor', 'check_exporter', 'export_onnx', 'check_graph',
    'query_images', 'batches', 'run_torch', 'run_onnx', 'onnx_session',
    'check_export', 'check_summary', 'failure_message', 'add_metadata',
    'deployment_info', 'format_deployment', 'import_onnx', 'PROFILES',
    'IMAGENET_MEAN', 'IMAGENET_STD', 'parse_size', 'distance_formula'
]

#: names of the graph's input and output
INPUT_NAME = 'images'
OUTPUT_NAME = 'features'
#: the default opset: the lowest the torch.export-based exporter writes (it
#: fails to convert its graphs to older ones), run by onnxruntime >= 1.14
DEFAULT_OPSET = 18
MIN_DYNAMO_OPSET = 18
#: float32 rounding: onnxruntime's distance to PyTorch's float64 features may
#: be up to this many times PyTorch's own float32 distance (an export that
#: changed the computation is orders of magnitude further)
FLOAT32_FACTOR = 4
EXPORTERS = ('dynamo', 'torchscript')
#: torchvision's ImageNet statistics (torchreid's default data.norm_mean/std)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: ``--profile NAME`` -> (height, width, the mean and std the consumer
#: applies itself, or None when it reads them from the metadata).  BoxMOT's
#: re-ID backends resize every crop to 256 x 128 (except for the model types
#: they special-case by file name) and normalise with the ImageNet mean and
#: std, whatever the file says.
PROFILES = {'boxmot': (256, 128, (IMAGENET_MEAN, IMAGENET_STD))}


class ExportCheckError(RuntimeError):
    """The exported model does not reproduce PyTorch within the tolerance."""


# --------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------
def _is_classifier(key: str) -> bool:
    return 'classifier' in key.split('.')


def load_export_weights(model: nn.Module, path: str, model_name: str = '') -> int:
    """Loads the weights of ``path`` into ``model``, strictly for every tensor
    the descriptor depends on.

    Unlike :func:`pmm_torchreid.utils.checkpoint.load_pretrained_weights`, which
    skips what does not fit (right for fine-tuning), an exported model must
    compute exactly what was trained: every tensor of the model must be in
    the file with the model's shape, and the file must hold no other tensor.
    Only the classifiers are exempt (their size is the number of training
    identities, and the descriptor does not use them).  The file is read with
    ``torch.load(weights_only=True)``.

    Args:
        model (nn.Module): the freshly built model.
        path (str): a checkpoint (``{'state_dict': ...}``) or a state dict.
        model_name (str): ``model.name``, for the error message.

    Returns:
        int: the number of tensors loaded.

    Raises:
        FileNotFoundError, RuntimeError: naming the file (see
            :func:`pmm_torchreid.utils.checkpoint.load_checkpoint`).
        ValueError: the file does not match the model: names the file, the
            model and the first missing, unexpected and reshaped tensors.

    Examples::

        >>> model = launch.build_model(cfg, num_classes=100).eval()
        >>> load_export_weights(model, 'log/pmm_demo/model/model.pth.tar-24',
        ...                     'pmm_resnet18')
        164
    """
    checkpoint = load_checkpoint(path, map_location='cpu')
    state = checkpoint.get('state_dict', checkpoint) \
        if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(
            torch.is_tensor(v) for v in state.values()):
        raise ValueError('"{}" holds no state dict (a dict of tensors, or a '
                         'checkpoint with a "state_dict" entry)'.format(path))
    state = strip_module(state)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not _is_classifier(k)]
    unexpected = [k for k in state if k not in own and not _is_classifier(k)]
    reshaped = ['{} (file {}, model {})'.format(k, list(state[k].shape),
                                                list(own[k].shape))
                for k in own if k in state and not _is_classifier(k)
                and state[k].shape != own[k].shape]
    if missing or unexpected or reshaped:
        def some(keys):
            return '{}{}'.format(', '.join(keys[:3]),
                                 ', ...' if len(keys) > 3 else '')
        problems = ['{} {} ({})'.format(len(keys), what, some(keys))
                    for what, keys in (('missing', missing),
                                       ('unexpected', unexpected),
                                       ('of another shape', reshaped)) if keys]
        raise ValueError(
            'model.load_weights = "{}" does not match model.name = {!r}: {} '
            'tensors; was it trained as another model, or with other '
            'pmm.num_stages / pmm.embedding_dim / bdb.bands / '
            'magnifiernet.fusion?'.format(
                path, model_name or type(model).__name__, '; '.join(problems)))
    loaded = {k: v for k, v in state.items()
              if k in own and v.shape == own[k].shape}
    own.update(loaded)
    model.load_state_dict(own)
    return len(loaded)


# --------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------
class Descriptor(nn.Module):
    """The eval-mode network as one function ``images -> features`` (so the
    exported graph has exactly one input and one output).

    With ``normalize``, the features are divided by their L2 norm inside the
    graph (``torch.nn.functional.normalize``: ``x / max(||x||, 1e-12)``), so
    every output row has unit length."""

    def __init__(self, model: nn.Module, normalize: bool = False):
        super().__init__()
        self.model = model
        self.normalize = bool(normalize)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.model(images)
        if self.normalize:
            features = F.normalize(features, p=2, dim=1)
        return features


def check_exporter(exporter: str, opset: int) -> None:
    """Raises ValueError for an unknown exporter, or an opset it cannot
    write."""
    if exporter not in EXPORTERS:
        raise ValueError('exporter {!r}: expected one of {}'.format(
            exporter, EXPORTERS))
    if exporter == 'dynamo' and opset < MIN_DYNAMO_OPSET:
        raise ValueError(
            '--opset {}: the dynamo exporter writes opset {} or newer; use '
            '--exporter torchscript for an older opset'.format(
                opset, MIN_DYNAMO_OPSET))


def export_onnx(model: nn.Module, height: int, width: int,
                opset: int = DEFAULT_OPSET, exporter: str = 'dynamo',
                normalize: bool = False):
    """Exports the eval-mode ``model`` to an in-memory ONNX model.

    Input ``images`` (float32, batch x 3 x ``height`` x ``width``) -> output
    ``features`` (float32, batch x D), with a dynamic batch dimension named
    ``batch``; with ``normalize``, each row L2-normalised in the graph
    (:class:`Descriptor`).

    Args:
        model (nn.Module): in eval mode; ``model(images)`` gives one tensor.
        height (int), width (int): the input size.
        opset (int): ONNX opset. Default is :data:`DEFAULT_OPSET`.
        exporter (str): ``'dynamo'`` (``torch.onnx.export(dynamo=True)``,
            torch.export-based; opset >= 18) or ``'torchscript'`` (the
            deprecated TorchScript-based exporter). Default is ``'dynamo'``.
        normalize (bool): L2-normalise the features in the graph. Default is
            False.

    Returns:
        onnx.ModelProto: checked by ``onnx.checker`` with the opset asked for.

    Raises:
        ValueError: the model is in training mode, or an opset the exporter
            cannot write.
        RuntimeError: the graph does not have the expected input, output,
            shapes or opset.

    Examples::

        >>> proto = export_onnx(model.eval(), 384, 128)
        >>> proto.graph.output[0].name
        'features'
    """
    import onnx  # lazy: optional dependency (the [onnx] extra)
    if model.training:
        raise ValueError('export_onnx: the model is in training mode; call '
                         'model.eval() first (the descriptor is eval-mode)')
    check_exporter(exporter, opset)
    wrapper = Descriptor(model, normalize).eval()
    example = torch.zeros(2, 3, height, width)  # batch 2: no 0/1 specialising
    names = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                 opset_version=opset)
    if exporter == 'dynamo':
        program = torch.onnx.export(
            wrapper, (example, ), dynamo=True, external_data=False,
            dynamic_shapes={INPUT_NAME: {0: torch.export.Dim('batch', min=1)}},
            verbose=False, **names)
        proto = program.model_proto
    else:
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', DeprecationWarning)
            torch.onnx.export(
                wrapper, (example, ), buffer, dynamo=False,
                dynamic_axes={INPUT_NAME: {0: 'batch'},
                              OUTPUT_NAME: {0: 'batch'}}, **names)
        proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto)
    check_graph(proto, height, width, opset)
    return proto


def _dims(value_info) -> List:
    return [d.dim_param or d.dim_value
            for d in value_info.type.tensor_type.shape.dim]


def check_graph(proto, height: int, width: int, opset: int) -> None:
    """Raises RuntimeError unless the graph has the one input ``images``
    ``[batch, 3, height, width]``, the one output ``features`` ``[batch, D]``
    and the opset asked for."""
    inputs = [i for i in proto.graph.input]
    outputs = [o for o in proto.graph.output]
    found = {d.domain: d.version for d in proto.opset_import}.get('', None)
    problems = []
    if [i.name for i in inputs] != [INPUT_NAME]:
        problems.append('inputs {} (expected [{!r}])'.format(
            [i.name for i in inputs], INPUT_NAME))
    elif _dims(inputs[0])[1:] != [3, height, width] or \
            not isinstance(_dims(inputs[0])[0], str):
        problems.append('input shape {} (expected [batch, 3, {}, {}])'.format(
            _dims(inputs[0]), height, width))
    if [o.name for o in outputs] != [OUTPUT_NAME]:
        problems.append('outputs {} (expected [{!r}])'.format(
            [o.name for o in outputs], OUTPUT_NAME))
    elif len(_dims(outputs[0])) != 2 or not isinstance(
            _dims(outputs[0])[0], str):
        problems.append('output shape {} (expected [batch, D])'.format(
            _dims(outputs[0])))
    if found != opset:
        problems.append('opset {} (asked for {})'.format(found, opset))
    if problems:
        raise RuntimeError('the exported graph has ' + '; '.join(problems))


# --------------------------------------------------------------------------
# the check
# --------------------------------------------------------------------------
def query_images(datamanager, name: str, num: int) -> torch.Tensor:
    """``num`` query images of target ``name``, spread evenly over its query
    set, read and transformed as torchreid's evaluation reads them (the data
    manager's test transform): num x 3 x H x W."""
    query = query_set(datamanager, name)
    if num > len(query):
        raise ValueError('--num-images {}: the query set of {} has {} '
                         'images'.format(num, name, len(query)))
    chosen = [query[i * len(query) // num][0] for i in range(num)]
    return torch.stack([datamanager.transform_te(read_image(p))
                        for p in chosen])


def batches(num: int, batch_size: int) -> List[slice]:
    return [slice(i, min(num, i + batch_size))
            for i in range(0, num, batch_size)]


def run_torch(model: nn.Module, images: torch.Tensor,
              batch_size: int) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model(images[s]) for s in batches(
            len(images), batch_size)]).numpy()


def run_onnx(session, images: torch.Tensor, batch_size: int) -> np.ndarray:
    array = images.numpy().astype(np.float32)
    return np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: array[s]})[0]
                           for s in batches(len(array), batch_size)])


def onnx_session(model_bytes: bytes):
    """An onnxruntime CPU session on the serialized model, with as many
    threads as torch uses (``OMP_NUM_THREADS``)."""
    import onnxruntime as ort  # lazy: optional dependency (the [onnx] extra)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, options,
                                providers=['CPUExecutionProvider'])


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape or not np.isfinite(a).all():
        return float('inf')
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def check_export(model: nn.Module, session, images: torch.Tensor,
                 reference: Dict[int, np.ndarray], tolerance: float = 1e-4,
                 strict: bool = False) -> dict:
    """Compares onnxruntime's features of ``images`` with PyTorch's, at each
    batch size of ``reference`` (batch size -> :func:`run_torch`'s features,
    taken before the export), and with PyTorch's in float64.

    The export passes when the max abs difference is at most ``tolerance``.
    Deep networks in float32 can differ by more from rounding alone (PMM on
    ResNet-50 at 384 x 128: PyTorch's own features differ by about 2e-4
    between batch sizes, and by about 4e-4 from float64), so unless
    ``strict``, it also passes when onnxruntime is no further than
    :data:`FLOAT32_FACTOR` times PyTorch's float32 error from the float64
    features: an export that changed the computation is much further.

    Returns:
        dict: ``diffs`` (batch size -> max abs difference; inf when the
        shapes differ or a value is not finite), ``max_abs_diff``,
        ``onnx_vs_float64`` and ``torch_vs_float64`` (max abs differences
        to PyTorch's float64 features), ``passed`` and ``rule``
        (``'tolerance'``, ``'float32 rounding'`` or ``'failed'``).

    Examples::

        >>> reference = {16: run_torch(model, images, 16),
        ...              1: run_torch(model, images, 1)}
        >>> check_export(model, onnx_session(proto.SerializeToString()),
        ...              images, reference)['diffs']  # doctest: +ELLIPSIS
        {16: ..., 1: ...}
    """
    outputs = {s: run_onnx(session, images, s) for s in reference}
    diffs = {s: _max_abs(outputs[s], reference[s]) for s in reference}
    exact = run_torch(copy.deepcopy(model).double(), images.double(),
                      len(images))
    onnx64 = max(_max_abs(out, exact) for out in outputs.values())
    torch64 = max(_max_abs(ref, exact) for ref in reference.values())
    worst = max(diffs.values())
    if worst <= tolerance:
        rule = 'tolerance'
    elif not strict and onnx64 <= FLOAT32_FACTOR * torch64:
        rule = 'float32 rounding'
    else:
        rule = 'failed'
    return {'diffs': diffs, 'max_abs_diff': worst, 'onnx_vs_float64': onnx64,
            'torch_vs_float64': torch64, 'passed': rule != 'failed',
            'rule': rule}


def check_summary(check: dict) -> str:
    """``'1.1e-05 at batch 16, 9.5e-06 at batch 1'`` (in the order of the
    batch sizes checked)."""
    return ', '.join('{:.2e} at batch {}'.format(diff, size)
                     for size, diff in check['diffs'].items())


def failure_message(check: dict, tolerance: float, strict: bool,
                    output: str, runtime: str = 'onnxruntime') -> str:
    """What :class:`ExportCheckError` says of a failed :func:`check_export`
    (``runtime``: what ran the exported model)."""
    return (
        'the exported model does not reproduce PyTorch: max abs '
        'difference {:.3e} > --tolerance {:g} ({}){}; "{}" was not '
        'written (a file already there is left as it was)'.format(
            check['max_abs_diff'], tolerance, check_summary(check),
            '' if strict else ', and {} is {:.2e} from '
            'PyTorch\'s float64 features, more than {} times PyTorch\'s '
            'float32 {:.2e}'.format(runtime, check['onnx_vs_float64'],
                                    FLOAT32_FACTOR,
                                    check['torch_vs_float64']),
            output))


# --------------------------------------------------------------------------
# what a deployment needs
# --------------------------------------------------------------------------
def parse_size(text: str) -> tuple:
    """``'256x128'`` -> ``(256, 128)`` (height, width; ``x`` or ``X``).

    Raises:
        ValueError: not two positive integers joined by ``x``.
    """
    parts = str(text).lower().split('x')
    try:
        height, width = (int(p) for p in parts)
    except ValueError:
        height = width = 0
    if height < 1 or width < 1:
        raise ValueError('--size {!r}: expected HEIGHTxWIDTH in pixels, e.g. '
                         '256x128'.format(text))
    return height, width


def distance_formula(dist_metric: str, normalize_feature: bool,
                     output_normalized: bool) -> str:
    """The distance of two output rows ``a`` and ``b``, as the config's
    evaluation computes it (torchreid: ``test.normalize_feature``
    L2-normalises the features, then ``test.dist_metric`` compares them;
    ``'euclidean'`` is the squared Euclidean distance).

    With ``output_normalized`` (``--normalize``) the rows are unit vectors:
    the squared Euclidean distance is then ``2 - 2 a.b``, which ranks as the
    cosine distance (and not as an evaluation of raw features with
    ``test.normalize_feature = False`` would)."""
    if dist_metric == 'cosine':
        if output_normalized:
            return 'cosine distance 1 - a.b (a, b: unit vectors)'
        return 'cosine distance 1 - a.b / (|a| |b|)'
    if output_normalized:
        return ('squared Euclidean |a - b|^2 = 2 - 2 a.b (a, b: unit '
                'vectors; ranks as the cosine distance)')
    if normalize_feature:
        return ('squared Euclidean of the L2-normalised vectors '
                '|a/|a| - b/|b||^2 = 2 - 2 a.b / (|a| |b|)')
    return 'squared Euclidean |a - b|^2 of the raw vectors'


def deployment_info(cfg, feature_dim: int, weights: str,
                    normalize: bool = False) -> 'OrderedDict':
    """The facts a deployment needs, as strings (stored as the ONNX model's
    ``metadata_props`` and the OpenVINO IR's ``rt_info``; lists and booleans
    in JSON).

    The input: ``input_shape`` (``["batch", 3, H, W]``), ``input_size``
    (``[H, W]``), ``layout`` NCHW, ``input_dtype`` float32; an image becomes
    it by a ``resize`` (bilinear, of the PIL image) to H x W, its
    ``color_order`` (RGB) 8-bit pixels (``pixel_range`` [0, 255]) times
    ``pixel_scale`` (1/255), then ``(x - norm_mean) / norm_std`` per channel.
    The output: ``output_shape`` (``["batch", D]``), ``feature_dim`` D, the
    ``descriptor`` (``test.descriptor``) and ``output_normalized`` (whether
    the graph L2-normalises each row: ``normalize``).  The distance:
    ``dist_metric`` and ``normalize_feature`` (the config's evaluation) and
    ``distance`` (:func:`distance_formula`: the same on the output rows).
    """
    height, width = int(cfg.data.height), int(cfg.data.width)
    return OrderedDict([
        ('model_name', cfg.model.name),
        ('weights_file', osp.basename(weights)),
        ('weights_sha256', sha256(weights)),
        ('input_name', INPUT_NAME),
        ('input_shape', json.dumps(['batch', 3, height, width])),
        ('input_size', json.dumps([height, width])),
        ('layout', 'NCHW'),
        ('input_dtype', 'float32'),
        ('color_order', 'RGB'),
        ('resize', 'bilinear'),
        ('pixel_range', json.dumps([0, 255])),
        ('pixel_scale', '1/255'),
        ('norm_mean', json.dumps([float(v) for v in cfg.data.norm_mean])),
        ('norm_std', json.dumps([float(v) for v in cfg.data.norm_std])),
        ('output_name', OUTPUT_NAME),
        ('output_shape', json.dumps(['batch', int(feature_dim)])),
        ('feature_dim', str(int(feature_dim))),
        ('descriptor', str(cfg.test.get('descriptor', 'all'))),
        ('output_normalized', json.dumps(bool(normalize))),
        ('dist_metric', cfg.test.dist_metric),
        ('normalize_feature', json.dumps(bool(cfg.test.normalize_feature))),
        ('distance', distance_formula(cfg.test.dist_metric,
                                      bool(cfg.test.normalize_feature),
                                      bool(normalize))),
    ])


def add_metadata(proto, info: Dict[str, str], model_name: str) -> None:
    """Stores ``info`` (:func:`deployment_info`) as the model's
    ``metadata_props``, and a doc string naming the model."""
    for key, value in info.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = '{} person re-identification descriptor ' \
        '(pmm_torchreid)'.format(model_name)


def format_deployment(info: Dict[str, str]) -> str:
    height, width = json.loads(info['input_shape'])[2:]
    normalize = json.loads(info['normalize_feature'])
    if info['dist_metric'] == 'euclidean':
        distance = 'squared Euclidean (torchreid\'s euclidean_squared_distance)'
    else:
        distance = 'cosine distance, 1 - cos(a, b)'
    return '\n'.join([
        'Deployment:',
        '  input    {} {} {}  ({}: N x 3 x H x W, any N >= 1)'.format(
            info['input_name'], info['input_dtype'],
            info['input_shape'].replace('"', ''), info.get('layout', 'NCHW')),
        '  resize   to H x W = {} x {}, {} (torchvision Resize of the PIL '
        'image; the aspect ratio is not kept)'.format(height, width,
                                                     info['resize']),
        '  pixels   {}; values x {} -> [0, 1]; then (x - mean) / std per '
        'channel'.format(info['color_order'], info['pixel_scale']),
        '  mean     {}'.format(info['norm_mean']),
        '  std      {}'.format(info['norm_std']),
        '  output   {} float32 {}'.format(
            info['output_name'], info['output_shape'].replace('"', '')),
        '  distance {} on the {} features (test.dist_metric = {!r}, '
        'test.normalize_feature = {})'.format(
            distance, 'L2-normalised' if normalize else 'raw',
            info['dist_metric'], normalize),
        '  features {}; descriptor {!r}'.format(
            'L2-normalised in the graph (unit length)'
            if json.loads(info.get('output_normalized', 'false'))
            else 'raw (not normalised in the graph)',
            info.get('descriptor', 'all')),
        '  compare  output rows a, b by {}'.format(info.get('distance', '?')),
    ])


def import_onnx(exporter: str):
    """``(onnx, onnxruntime)``, after checking that the packages the
    ``exporter`` needs are installed (onnxscript for ``'dynamo'``).

    Raises:
        ImportError: naming the missing package and how to install them.
    """
    needed = ['onnx', 'onnxruntime'] + (['onnxscript'] if exporter == 'dynamo'
                                        else [])
    modules = []
    for name in needed:
        try:
            # lazy: optional dependencies (the [onnx] extra)
            modules.append(__import__(name))
        except ImportError as error:
            raise ImportError(
                'scripts/export.py needs the packages {} ({} is missing: {}); '
                'install them with `pip install onnx onnxruntime onnxscript` '
                '(versions in requirements.txt)'.format(
                    ', '.join(needed), name, error)) from error
    return modules[0], modules[1]
