"""The exported descriptor measured (scripts/benchmark_export.py): for each
descriptor choice (``'all'``, ``'global'``) and each runtime (PyTorch,
onnxruntime on the ONNX export, OpenVINO on the IR converted from it), the
max abs difference of the features to PyTorch's on real query images, the
size of what a deployment loads, and the extraction speed on this CPU.

The runtimes take turns batch by batch (so that drifts of a shared machine
hit them alike), all with the same number of threads, and the median time of
a batch is reported as images per second.  OpenVINO computes in float32
(``INFERENCE_PRECISION_HINT f32``).  Sizes: the ONNX file, the IR's .xml
plus .bin, and for PyTorch the model's whole state dict as ``torch.save``
writes it (the classifiers included: a checkpoint holds them).

This lives in :mod:`pmm_torchreid.deploy`, not :mod:`pmm_torchreid.bench`,
because it runs the export (the layering keeps those two packages apart).
"""
from __future__ import annotations

import copy
import io
import os.path as osp
import statistics
import tempfile
import time
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from pmm_torchreid.deploy import export as E
from pmm_torchreid.deploy import openvino_ir as OV

__all__ = ['FORMATS', 'descriptor_choices', 'runners', 'bench_export',
           'print_table']

#: the rows of each descriptor, in order
FORMATS = ('pytorch', 'onnxruntime', 'openvino')
LABELS = {'pytorch': 'PyTorch', 'onnxruntime': 'ONNX Runtime',
          'openvino': 'OpenVINO'}


def descriptor_choices(model: nn.Module, wanted: Sequence[str]) -> List[str]:
    """The choices of ``wanted`` the model offers: all of them where it has
    ``set_descriptor``, else ``'all'`` alone (printing what is skipped)."""
    if hasattr(model, 'set_descriptor'):
        return list(wanted)
    skipped = [d for d in wanted if d != 'all']
    if skipped:
        print('{} has one descriptor: skipping {}'.format(
            type(model).__name__, ', '.join(skipped)))
    return ['all'] if 'all' in wanted else []


def _state_dict_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue())


def runners(model: nn.Module, height: int, width: int, formats: Sequence[str],
            folder: str) -> 'OrderedDict':
    """``format -> (run, bytes)``: ``run(images)`` gives ``N x D`` features
    of a float32 NCHW array; ``bytes`` is what a deployment loads.  The ONNX
    model is exported in memory, the IR saved in ``folder``."""
    out = OrderedDict()
    data = None
    if 'pytorch' in formats:
        def run_torch(array: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return model(torch.from_numpy(array)).numpy()
        out['pytorch'] = (run_torch, _state_dict_bytes(model))
    if 'onnxruntime' in formats or 'openvino' in formats:
        data = E.export_onnx(model, height, width).SerializeToString()
    if 'onnxruntime' in formats:
        session = E.onnx_session(data)
        out['onnxruntime'] = (
            lambda a: session.run([E.OUTPUT_NAME], {E.INPUT_NAME: a})[0],
            len(data))
    if 'openvino' in formats:
        xml = osp.join(folder, 'model.xml')
        ov = OV.import_openvino()
        ov.save_model(OV.convert_onnx(data, {}, 'model'), xml,
                      compress_to_fp16=False)
        ir = OV.openvino_session(xml)
        out['openvino'] = (
            lambda a: ir.run([E.OUTPUT_NAME], {E.INPUT_NAME: a})[0],
            osp.getsize(xml) + osp.getsize(OV.bin_path(xml)))
    return out


def _median_seconds(runs: Dict[str, Callable], batch: np.ndarray,
                    repeats: int, warmup: int) -> Dict[str, float]:
    for _ in range(warmup):
        for run in runs.values():
            run(batch)
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():  # take turns: drifts hit all alike
            started = time.perf_counter()
            run(batch)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_export(model: nn.Module, images: torch.Tensor,
                 descriptors: Sequence[str], formats: Sequence[str] = FORMATS,
                 batch_size: int = 16, repeats: int = 10,
                 warmup: int = 2) -> List[dict]:
    """Measures ``model`` (eval mode, weights loaded) on ``images`` (N x 3 x
    H x W, the test transform's) for each descriptor and format.

    The difference to PyTorch is taken on all N images at ``batch_size``;
    the speed on one batch of ``batch_size`` (the images repeated when N is
    smaller).  PyTorch's own float32 error is the distance of its features
    to those of the model in float64.

    Returns:
        list of dict: one row per (descriptor, format): ``descriptor``,
        ``format``, ``dim``, ``max_abs_diff`` (to PyTorch float32),
        ``vs_float64``, ``bytes``, ``images_per_s``.
    """
    height, width = images.shape[2:]
    array = images.numpy().astype(np.float32)
    batch = np.ascontiguousarray(np.resize(array, (batch_size, ) +
                                           array.shape[1:]))
    rows = []
    for name in descriptor_choices(model, descriptors):
        if hasattr(model, 'set_descriptor'):
            model.set_descriptor(name)
        reference = E.run_torch(model, images, batch_size)
        exact = E.run_torch(copy.deepcopy(model).double(), images.double(),
                            batch_size)
        with tempfile.TemporaryDirectory() as folder:
            found = runners(model, height, width, formats, folder)
            outputs = {f: np.concatenate([run(array[s]) for s in E.batches(
                len(array), batch_size)]) for f, (run, _) in found.items()}
            seconds = _median_seconds({f: r for f, (r, _) in found.items()},
                                      batch, repeats, warmup)
        for fmt, (_, size) in found.items():
            rows.append({
                'descriptor': name, 'format': fmt,
                'dim': int(outputs[fmt].shape[1]),
                'max_abs_diff': E._max_abs(outputs[fmt], reference),
                'vs_float64': E._max_abs(outputs[fmt], exact),
                'bytes': size, 'images_per_s': batch_size / seconds[fmt]})
    return rows


def print_table(rows: List[dict], header: Optional[str] = None) -> None:
    """The rows as a Markdown table (the one docs/DEPLOYMENT.md shows)."""
    if header:
        print(header)
    print('| descriptor | runtime | D | max abs diff to PyTorch | to float64 '
          '| file (MB) | images/s |')
    print('|---|---|---|---|---|---|---|')
    for r in rows:
        print('| {} | {} | {} | {} | {:.1e} | {:.1f} | {:.0f} |'.format(
            r['descriptor'], LABELS[r['format']], r['dim'],
            '0 (reference)' if r['format'] == 'pytorch'
            else '{:.1e}'.format(r['max_abs_diff']), r['vs_float64'],
            r['bytes'] / 2**20, r['images_per_s']))
