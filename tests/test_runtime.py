"""pmm_torchreid.deploy.runtime: the preprocessing is torchreid's test
transform bit for bit, the distances are torchreid's, and Embedder, on an
ONNX file and an OpenVINO IR written by scripts/export.py (its main in this
process), reads the recorded preprocessing and gives PyTorch's features for
crops of any size (files and arrays), in a process where torch cannot be
imported."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

pytest.importorskip('onnx')
pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')  # torch's default (dynamo) exporter needs it
pytest.importorskip('openvino')

from helpers import (  # noqa: E402
    CONFIG,
    ENV,
    ROOT,
    export_pairs,
    exported_model,
    in_process,
    make_export_checkpoint,
)

from pmm_torchreid.deploy import runtime as R  # noqa: E402

RUNTIME = os.path.join(ROOT, 'pmm_torchreid', 'deploy', 'runtime.py')
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]  # export_pairs'


def eval_transform(height=64, width=32):
    import torchreid
    return torchreid.data.transforms.build_transforms(
        height, width, norm_mean=MEAN, norm_std=STD)[1]


def crops(root):
    """Three image files and three uint8 RGB arrays, all of other sizes than
    the model's input (two smaller, one larger)."""
    paths = sorted(glob.glob(os.path.join(root, 'pmm_synthetic', 'gallery',
                                          '*.png')))[::53][:3]
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, size=shape, dtype=np.uint8)
              for shape in ((50, 20, 3), (130, 61, 3), (17, 9, 3))]
    return paths + arrays


def as_pil(crop):
    return Image.open(crop).convert('RGB') if isinstance(crop, str) \
        else Image.fromarray(crop)


def test_preprocess_is_the_test_transform_bit_for_bit(synthetic_root):
    transform = eval_transform()
    items = crops(synthetic_root)
    got = R.preprocess(items, 64, 32, MEAN, STD)
    want = torch.stack([transform(as_pil(c)) for c in items]).numpy()
    assert got.dtype == np.float32 and got.shape == (6, 3, 64, 32)
    assert np.array_equal(got, want)
    # BGR arrays (as OpenCV reads them) give the same input
    bgr = [c[:, :, ::-1] for c in items[3:]]
    assert np.array_equal(R.preprocess(bgr, 64, 32, MEAN, STD, bgr=True),
                          want[3:])
    for bad in (np.zeros((8, 4, 3), np.float32), np.zeros((8, 4), np.uint8),
                np.zeros((8, 4, 4), np.uint8)):
        with pytest.raises(ValueError, match='a crop is a uint8 H x W x 3'):
            R.preprocess([bad], 64, 32, MEAN, STD)


@pytest.mark.parametrize('metric', ['cosine', 'euclidean'])
@pytest.mark.parametrize('normalize', [False, True])
def test_distance_matrix_is_torchreids(metric, normalize):
    import torchreid
    torch.manual_seed(0)
    a, b = torch.randn(4, 8), torch.randn(6, 8) * 3
    if normalize:
        ref = torchreid.metrics.compute_distance_matrix(
            F.normalize(a), F.normalize(b), metric)
    else:
        ref = torchreid.metrics.compute_distance_matrix(a, b, metric)
    got = R.distance_matrix(a.numpy(), b.numpy(), metric, normalize)
    assert got.shape == (4, 6)
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-4, rtol=1e-5)


def test_a_file_without_the_metadata_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper
    graph = helper.make_graph(
        [helper.make_node('Identity', ['images'], ['features'])], 'g',
        [helper.make_tensor_value_info('images', TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info('features', TensorProto.FLOAT, [1, 3])])
    path = str(tmp_path / 'other.onnx')
    onnx.save(helper.make_model(graph, ir_version=8, opset_imports=[
        helper.make_opsetid('', 18)]), path)
    with pytest.raises(ValueError, match='lacks the metadata input_name, '):
        R.Embedder(path)
    with pytest.raises(ValueError, match=r'expected an \.onnx file or the '):
        R.Embedder(str(tmp_path / 'model.pth.tar'))


@pytest.fixture(scope='module')
def exports(synthetic_root, tmp_path_factory):
    """pmm_resnet18 exported twice from one checkpoint at 64x32: ONNX with
    raw features, OpenVINO with features normalised in the graph; the
    ``(weights, {'onnx': path, 'openvino': path})``."""
    from pmm_torchreid.cli.export import main
    work = tmp_path_factory.mktemp('runtime')
    weights = make_export_checkpoint(synthetic_root, 'pmm_resnet18',
                                     str(work / 'model.pth.tar-1'))
    paths = {'onnx': str(work / 'pmm.onnx'), 'openvino': str(work / 'pmm.xml')}
    for fmt, options in (('onnx', []), ('openvino', ['--normalize'])):
        proc = in_process(main, [
            '--config-file', CONFIG, '--root', synthetic_root, '-m',
            'pmm_resnet18', '--format', fmt, '--output', paths[fmt],
            '--num-images', '4', '--batch-size', '3'] + options +
            export_pairs('pmm_resnet18', str(work / 'log'), weights),
            str(work))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return weights, paths


@pytest.mark.slow
@pytest.mark.parametrize('fmt', ['onnx', 'openvino'])
def test_the_embedder_reads_the_recorded_preprocessing(exports, fmt):
    embedder = R.Embedder(exports[1][fmt], threads=1)
    assert (embedder.height, embedder.width) == (64, 32)
    assert embedder.mean == MEAN and embedder.std == STD
    assert embedder.feature_dim == 1536
    assert embedder.normalized == (fmt == 'openvino')
    assert embedder.metric == 'cosine' and embedder.normalize_feature
    assert R.read_metadata(exports[1][fmt]) == embedder.info
    assert json.loads(embedder.info['input_size']) == [64, 32]
    assert embedder([]).shape == (0, 1536)


@pytest.mark.slow
def test_the_embedder_gives_pytorchs_features(exports, synthetic_root):
    """Files and arrays of other sizes, in uneven batches (2, 2, 2 and 4,
    2), against the model on torchreid's test transform of the same crops."""
    weights, paths = exports
    net = exported_model(synthetic_root, 'pmm_resnet18', weights)
    items = crops(synthetic_root)
    transform = eval_transform()
    with torch.no_grad():
        raw = net(torch.stack([transform(as_pil(c)) for c in items]))
    for fmt, want in (('onnx', raw), ('openvino', F.normalize(raw, dim=1))):
        embedder = R.Embedder(paths[fmt], threads=1)
        for batch_size in (2, 4):
            got = embedder.embed(items, batch_size=batch_size)
            assert got.dtype == np.float32 and got.shape == (6, 1536)
            diff = np.abs(got - want.numpy()).max()
            assert diff <= 1e-4, (fmt, batch_size, diff)
        # the recorded distance ranks as torchreid's evaluation does
        ref = R.distance_matrix(raw.numpy(), raw.numpy(), 'cosine', True)
        np.testing.assert_allclose(embedder.distance(got, got), ref,
                                   atol=1e-5)


#: the child: runtime.py loaded from its file with torch made unimportable,
#: both files embedding the same crops, the features saved
CHILD = r'''
import importlib.util, sys
import numpy as np
sys.modules['torch'] = None  # any import of torch now raises ImportError
spec = importlib.util.spec_from_file_location('runtime', sys.argv[1])
runtime = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runtime)
crops = sys.argv[4:] + [np.full((40, 17, 3), 200, np.uint8)]
for path, out in ((sys.argv[2], 'onnx.npy'), (sys.argv[3], 'openvino.npy')):
    np.save(out, runtime.Embedder(path, threads=1).embed(crops, batch_size=2))
assert sys.modules['torch'] is None, 'torch was imported'
print('torch modules:', sorted(m for m in sys.modules
                              if m.split('.')[0] == 'torch'))
'''


@pytest.mark.slow
def test_the_embedder_runs_without_torch(exports, synthetic_root, tmp_path):
    _, paths = exports
    files = crops(synthetic_root)[:3]
    proc = subprocess.run(
        [sys.executable, '-c', CHILD, RUNTIME, paths['onnx'],
         paths['openvino']] + files, cwd=str(tmp_path), env=ENV,
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "torch modules: ['torch']" in proc.stdout  # the poisoned entry only
    items = files + [np.full((40, 17, 3), 200, np.uint8)]
    for fmt in ('onnx', 'openvino'):
        child = np.load(str(tmp_path / '{}.npy'.format(fmt)))
        here = R.Embedder(paths[fmt], threads=1).embed(items, batch_size=2)
        assert child.shape == (4, 1536)
        np.testing.assert_allclose(child, here, atol=1e-6)
