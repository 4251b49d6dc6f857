"""OpenVINO IR export (``scripts/export.py --format openvino``): the checked
ONNX model converted to an OpenVINO IR, an ``.xml`` (the graph) and a ``.bin``
(the weights) of the same name, checked against PyTorch before it is put in
place.

- :func:`convert_onnx`: ``openvino.convert_model`` of the ONNX bytes that
  onnxruntime has just checked, with the deployment facts
  (:func:`pmm_torchreid.deploy.export.deployment_info`) in the model's
  ``rt_info`` under ``model_info`` and the input's layout set to NCHW.
- :func:`staged_ir`: the pair saved (float32 weights) into a hidden temporary
  folder next to the target; the caller checks that copy
  (:func:`openvino_session`, the same ``run`` as an onnxruntime session), and
  only a check that passes moves it into place (:func:`replace_pair`).
- :func:`read_model_info`: the facts read back from an IR.

The openvino package is an optional dependency (the ``[openvino]`` extra); it
is imported only when an IR is written or read.
"""
from __future__ import annotations

import contextlib
import io
import os
import os.path as osp
import shutil
import tempfile
from typing import Dict, Iterator, List

import numpy as np
import torch

__all__ = ['RT_INFO_SECTION', 'import_openvino', 'convert_onnx',
           'read_model_info', 'OpenVINOSession', 'openvino_session',
           'bin_path', 'replace_pair', 'staged_ir']

#: the ``rt_info`` section holding the deployment facts
RT_INFO_SECTION = 'model_info'


def import_openvino():
    """The ``openvino`` module.

    Raises:
        ImportError: naming the package and how to install it.
    """
    try:
        import openvino  # lazy: optional dependency (the [openvino] extra)
    except ImportError as error:
        raise ImportError(
            'scripts/export.py --format openvino needs the openvino package '
            '({}); install it with `pip install openvino` (the version in '
            'requirements.txt) or `pip install "pmm-torchreid[openvino]"`'
            .format(error)) from error
    return openvino


def convert_onnx(data: bytes, info: Dict[str, str], model_name: str):
    """The serialized ONNX model ``data`` as an ``openvino.Model``.

    The deployment facts ``info`` are stored as ``rt_info`` entries
    ``['model_info', key]`` (strings, as in the ONNX ``metadata_props``), the
    input's layout is set to ``NCHW`` and the model is named ``model_name``.
    Conversion keeps float32 (no weight compression happens before
    :func:`staged_ir` saves it).
    """
    ov = import_openvino()
    model = ov.convert_model(io.BytesIO(data))
    for key, value in info.items():
        model.set_rt_info(str(value), [RT_INFO_SECTION, key])
    model.get_parameters()[0].set_layout(ov.Layout('NCHW'))
    model.set_friendly_name(model_name)
    return model


def read_model_info(model) -> Dict[str, str]:
    """``rt_info['model_info']`` of an ``openvino.Model`` as a dict of
    strings (empty when the IR has none)."""
    found = model.get_rt_info()
    section = found[RT_INFO_SECTION] if RT_INFO_SECTION in found else {}
    return {key: model.get_rt_info([RT_INFO_SECTION, key]).astype(str)
            for key in section}


class OpenVINOSession(object):
    """A compiled OpenVINO model behind onnxruntime's ``run(names, feeds)``,
    so that :func:`pmm_torchreid.deploy.export.check_export` and
    :func:`~pmm_torchreid.deploy.export.run_onnx` run it as they run an
    onnxruntime session."""

    def __init__(self, compiled):
        self.compiled = compiled

    def run(self, names: List[str], feeds: Dict[str, np.ndarray]):
        (array, ) = feeds.values()
        result = self.compiled([array])
        outputs = {o.get_any_name(): result[o] for o in self.compiled.outputs}
        return [np.asarray(outputs[name]) for name in names]


def openvino_session(xml: str) -> OpenVINOSession:
    """The IR ``xml`` (and its ``.bin``) read from disk and compiled for the
    CPU in float32 (``INFERENCE_PRECISION_HINT f32``: on CPUs with native
    bfloat16 the plugin would otherwise compute in bfloat16), with as many
    threads as torch uses."""
    ov = import_openvino()
    core = ov.Core()
    compiled = core.compile_model(
        core.read_model(xml), 'CPU',
        {'INFERENCE_PRECISION_HINT': 'f32',
         'INFERENCE_NUM_THREADS': torch.get_num_threads()})
    return OpenVINOSession(compiled)


def bin_path(xml: str) -> str:
    """The weights file of the IR ``xml``: the same path ending in .bin."""
    return osp.splitext(xml)[0] + '.bin'


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_pair(source: str, target: str) -> None:
    """Moves the IR ``source`` (.xml and .bin) onto ``target``'s pair.

    A pair cannot be renamed at once, so the order keeps one rule: whenever
    ``target`` exists, the .bin beside it is its own.  The old .xml goes
    first, then the new .bin takes the old one's place, then the new .xml
    arrives.  A process killed half way leaves the old pair, or no .xml at
    all (a model that fails to load), never an .xml read with another
    export's weights.
    """
    folder = osp.dirname(osp.abspath(target))
    if osp.lexists(target):
        os.unlink(target)
        _fsync(folder)
    os.replace(bin_path(source), bin_path(target))
    os.replace(source, target)
    _fsync(folder)


@contextlib.contextmanager
def staged_ir(model, target: str) -> Iterator[str]:
    """Saves ``model`` as an IR in a hidden temporary folder next to
    ``target`` (``.<name>.*.tmp``, float32: ``compress_to_fp16=False``) and
    yields the path of its .xml.  When the block ends without an error the
    pair replaces ``target``'s (:func:`replace_pair`); on an error nothing is
    moved.  The folder is removed either way (and the debris of a writer that
    was killed, by the next write to ``target``).

    Example (``check`` raises on a failed check: nothing is moved)::

        with staged_ir(model, 'deploy/model.xml') as xml:
            check(openvino_session(xml))
    """
    ov = import_openvino()
    if not target.endswith('.xml'):
        raise ValueError('--output "{}": an OpenVINO IR is an .xml file (and '
                         'a .bin beside it); expected a path ending in .xml'
                         .format(target))
    folder = osp.dirname(osp.abspath(target))
    os.makedirs(folder, exist_ok=True)
    prefix = '.' + osp.basename(target) + '.'
    for name in os.listdir(folder):  # debris of a writer that was killed
        if name.startswith(prefix) and name.endswith('.tmp'):
            shutil.rmtree(osp.join(folder, name), ignore_errors=True)
    staging = tempfile.mkdtemp(prefix=prefix, suffix='.tmp', dir=folder)
    try:
        xml = osp.join(staging, osp.basename(target))
        ov.save_model(model, xml, compress_to_fp16=False)
        mask = os.umask(0o022)
        os.umask(mask)
        for path in (xml, bin_path(xml)):
            os.chmod(path, 0o666 & ~mask)
            _fsync(path)
        yield xml
        replace_pair(xml, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
