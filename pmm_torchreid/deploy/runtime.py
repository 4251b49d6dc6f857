"""Person crops -> features with an exported model, without PyTorch.

:class:`Embedder` loads a file written by ``scripts/export.py`` (``.onnx``,
run by onnxruntime; ``.xml``, an OpenVINO IR, run by OpenVINO), reads the
preprocessing the export recorded in it (``metadata_props`` / ``rt_info``:
input size, RGB, mean, std, whether the output is L2-normalised, the
distance), and embeds crops of any size: uint8 ``H x W x 3`` RGB arrays,
image files or PIL images.  Each crop is resized as torchreid's test
transform resizes it (PIL bilinear to the recorded ``H x W``), scaled by
1/255 and normalised with the recorded mean and std, so the features are the
ones PyTorch computes from the same crops.

This module imports only NumPy, Pillow and the runtime of the file (and
nothing of this package, nor torch): a deployment without PyTorch can copy
the file and use it alone (importing it as
``pmm_torchreid.deploy.runtime`` from an installed plugin imports torch
through the package's ``__init__``).
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

__all__ = ['Embedder', 'read_metadata', 'preprocess', 'distance_matrix',
           'REQUIRED_KEYS']

#: the metadata an exported file must carry
REQUIRED_KEYS = ('input_name', 'input_shape', 'color_order', 'resize',
                 'pixel_scale', 'norm_mean', 'norm_std', 'output_name',
                 'output_shape', 'dist_metric', 'normalize_feature')


def _onnx_session(path: str, threads: Optional[int]):
    import onnxruntime as ort  # lazy: only .onnx files need it
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options,
                                providers=['CPUExecutionProvider'])


def _openvino_model(path: str):
    import openvino as ov  # lazy: only .xml files need it
    core = ov.Core()
    return core, core.read_model(path)


def _rt_info(model) -> Dict[str, str]:
    found = model.get_rt_info()
    section = found['model_info'] if 'model_info' in found else {}
    return {key: model.get_rt_info(['model_info', key]).astype(str)
            for key in section}


def read_metadata(path: str) -> Dict[str, str]:
    """The deployment facts recorded in an exported file (strings; lists and
    booleans in JSON): an ONNX model's ``metadata_props`` or an OpenVINO
    IR's ``rt_info['model_info']``."""
    if path.endswith('.xml'):
        return _rt_info(_openvino_model(path)[1])
    return dict(_onnx_session(path, 1).get_modelmeta().custom_metadata_map)


def _as_image(crop, bgr: bool) -> Image.Image:
    """A crop as an RGB PIL image (a path, a PIL image, or a uint8
    ``H x W x 3`` array: RGB, or BGR with ``bgr``)."""
    if isinstance(crop, (str, os.PathLike)):
        with Image.open(crop) as img:
            return img.convert('RGB')
    if isinstance(crop, Image.Image):
        return crop.convert('RGB')
    array = np.asarray(crop)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3 \
            or array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(
            'a crop is a uint8 H x W x 3 array (RGB), an image file or a PIL '
            'image; got an array of dtype {} and shape {}'.format(
                array.dtype, array.shape))
    if bgr:
        array = array[:, :, ::-1]
    return Image.fromarray(np.ascontiguousarray(array), 'RGB')


def preprocess(crops: Sequence, height: int, width: int,
               mean: Sequence[float], std: Sequence[float],
               bgr: bool = False) -> np.ndarray:
    """Crops -> the model's input, float32 ``N x 3 x height x width``.

    Each crop is resized with PIL's bilinear filter to ``height x width``
    (what torchvision's ``Resize`` does to a PIL image, so torchreid's test
    transform), its values divided by 255 and normalised per channel,
    ``(x - mean) / std``, in float32 as ``ToTensor`` and ``Normalize`` do.

    Args:
        crops: uint8 ``H x W x 3`` arrays (any H, W; RGB, or BGR as OpenCV
            reads them with ``bgr``), image file paths or PIL images.
        height, width (int): the input size the model was exported for.
        mean, std: per channel, RGB order.
        bgr (bool): the arrays are BGR. Default is False.
    """
    mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    out = np.empty((len(crops), 3, height, width), dtype=np.float32)
    for i, crop in enumerate(crops):
        img = _as_image(crop, bgr).resize((width, height), Image.BILINEAR)
        pixels = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
        out[i] = (pixels.astype(np.float32) / np.float32(255) - mean) / std
    return out


def distance_matrix(a: np.ndarray, b: np.ndarray, metric: str,
                    normalize: bool) -> np.ndarray:
    """torchreid's distance of every row of ``a`` to every row of ``b``:
    with ``normalize`` the rows are L2-normalised first; ``'cosine'`` is
    ``1 - cos``, ``'euclidean'`` the squared Euclidean distance."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if normalize or metric == 'cosine':
        a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    if metric == 'cosine':
        return 1.0 - a @ b.T
    if metric == 'euclidean':
        return np.maximum((a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None, :]
                          - 2.0 * a @ b.T, 0.0)
    raise ValueError('dist_metric {!r}: expected cosine or euclidean'.format(
        metric))


class Embedder(object):
    """An exported descriptor, ready to embed person crops.

    Args:
        path (str): a ``.onnx`` file (onnxruntime) or the ``.xml`` of an
            OpenVINO IR (OpenVINO; its ``.bin`` beside it), as
            ``scripts/export.py`` writes them.
        threads (int): CPU threads of the runtime (None: its default).
        precision (str): OpenVINO's ``INFERENCE_PRECISION_HINT``. Default
            ``'f32'``: on CPUs with native bfloat16 OpenVINO would otherwise
            compute in bfloat16, and the features would no longer be
            PyTorch's.

    Attributes:
        info (dict): the recorded facts (:func:`read_metadata`).
        height, width (int): the input size.
        feature_dim (int): D, the width of a feature.
        normalized (bool): the model L2-normalises its output.

    Raises:
        ValueError: the file lacks the metadata of ``scripts/export.py`` or
            records a preprocessing this class does not perform.

    Example::

        embedder = Embedder('log/pmm_demo/model.onnx')
        features = embedder(['a.jpg', 'b.jpg'])       # 2 x 1536 float32
        distances = embedder.distance(features, features)
    """

    def __init__(self, path: str, threads: Optional[int] = None,
                 precision: str = 'f32'):
        self.path = os.fspath(path)
        if self.path.endswith('.xml'):
            core, model = _openvino_model(self.path)
            self.info = _rt_info(model)
            config = {'INFERENCE_PRECISION_HINT': precision}
            if threads:
                config['INFERENCE_NUM_THREADS'] = int(threads)
            self._compiled = core.compile_model(model, 'CPU', config)
            self._session = None
        elif self.path.endswith('.onnx'):
            self._session = _onnx_session(self.path, threads)
            self.info = dict(
                self._session.get_modelmeta().custom_metadata_map)
            self._compiled = None
        else:
            raise ValueError('"{}": expected an .onnx file or the .xml of an '
                             'OpenVINO IR'.format(self.path))
        self._read_info()

    def _read_info(self) -> None:
        info = self.info
        missing = [k for k in REQUIRED_KEYS if k not in info]
        if missing:
            raise ValueError(
                '"{}" lacks the metadata {} of scripts/export.py (exported '
                'otherwise?)'.format(self.path, ', '.join(missing)))
        expected = {'color_order': 'RGB', 'resize': 'bilinear',
                    'pixel_scale': '1/255', 'layout': 'NCHW',
                    'input_dtype': 'float32'}
        for key, value in expected.items():
            if info.get(key, value) != value:
                raise ValueError('"{}" records {} = {!r}; this runtime '
                                 'performs {!r}'.format(self.path, key,
                                                        info[key], value))
        shape = json.loads(info['input_shape'])
        self.height, self.width = int(shape[2]), int(shape[3])
        self.mean = [float(v) for v in json.loads(info['norm_mean'])]
        self.std = [float(v) for v in json.loads(info['norm_std'])]
        self.feature_dim = int(json.loads(info['output_shape'])[1])
        self.normalized = bool(json.loads(info.get('output_normalized',
                                                   'false')))
        self.metric = info['dist_metric']
        self.normalize_feature = bool(json.loads(info['normalize_feature']))

    def preprocess(self, crops: Sequence, bgr: bool = False) -> np.ndarray:
        """Crops -> the model's input (:func:`preprocess` with the recorded
        size, mean and std)."""
        return preprocess(crops, self.height, self.width, self.mean,
                          self.std, bgr)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """The model on a preprocessed batch: ``N x D`` float32."""
        if self._session is not None:
            return self._session.run([self.info['output_name']],
                                     {self.info['input_name']: batch})[0]
        return np.asarray(self._compiled([batch])[self._compiled.output(0)])

    def embed(self, crops: Sequence, batch_size: int = 32,
              bgr: bool = False) -> np.ndarray:
        """Features of ``crops`` (see :func:`preprocess`), in batches of
        ``batch_size``: ``len(crops) x D`` float32 (``0 x D`` for none)."""
        crops = list(crops)
        if batch_size < 1:
            raise ValueError('batch_size {}: expected >= 1'.format(batch_size))
        parts: List[np.ndarray] = [
            self.run(self.preprocess(crops[i:i + batch_size], bgr))
            for i in range(0, len(crops), batch_size)]
        if not parts:
            return np.zeros((0, self.feature_dim), dtype=np.float32)
        return np.concatenate(parts).astype(np.float32, copy=False)

    __call__ = embed

    def distance(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """The recorded distance (``dist_metric``, after L2 normalisation
        when ``normalize_feature``) of every row of ``a`` to every row of
        ``b``: ``len(a) x len(b)``, smaller is more alike."""
        return distance_matrix(a, b, self.metric, self.normalize_feature)
