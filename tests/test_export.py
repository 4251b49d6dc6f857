"""scripts/export.py, run as a user runs it, from a folder that is not the
repository (its main in this process; once the script in a child process):
ONNX files of pmm_resnet18, pmm_osnet_x0_25 (the default dynamo exporter)
and bdb_resnet18 (the TorchScript exporter) that onnxruntime runs like
PyTorch, on random and real images at two batch sizes; the deployment facts
it prints and stores; and its errors."""
import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')  # torch's default (dynamo) exporter needs it

from helpers import ENV, ROOT, export_pairs, in_process, make_export_checkpoint  # noqa: E402

from pmm_torchreid import launch  # noqa: E402
from pmm_torchreid.data import read_image  # noqa: E402
from pmm_torchreid.utils.checkpoint import load_checkpoint  # noqa: E402

SCRIPT = os.path.join(ROOT, 'scripts', 'export.py')
CONFIG = os.path.join(ROOT, 'configs', 'pmm_demo.yaml')
# the script must run this tree's package, not another installed copy
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]  # not the defaults: are they used?
# model -> the exporter its test uses (both exporters, every backbone)
MODELS = {'pmm_resnet18': 'dynamo', 'pmm_osnet_x0_25': 'dynamo',
          'bdb_resnet18': 'torchscript'}


#: the KEY VALUE pairs of a small export run, and a checkpoint to export
overrides = export_pairs
make_checkpoint = make_export_checkpoint


def build_cfg(root, model, save_dir, weights=None):
    args = launch.build_parser().parse_args(
        ['--config-file', CONFIG, '--root', root, '-m', model] +
        overrides(model, save_dir, weights))
    return launch.setup_config(args)


def run_export(root, model, save_dir, weights, *options, cwd, child=False):
    """scripts/export.py's main run from ``cwd``, in this process (with
    ``child``: the script itself, in a child process): its exit code and
    what it printed (``returncode``, ``stdout``, ``stderr``)."""
    from pmm_torchreid.cli.export import main
    argv = ['--config-file', CONFIG, '--root', root, '-m', model] + \
        list(options) + overrides(model, save_dir, weights)
    if child:
        return subprocess.run([sys.executable, SCRIPT] + argv, cwd=cwd, env=ENV,
                              capture_output=True, text=True, timeout=300)
    return in_process(main, argv, cwd)


def torch_model(root, model, weights):
    net = launch.build_model(build_cfg(root, model, '.'), 100)
    net.load_state_dict(load_checkpoint(weights, 'cpu')['state_dict'])
    return net.eval()


def gallery_images(root, num):
    """Real images (gallery: the script checks query images), transformed
    as torchreid's evaluation transforms them."""
    import torchreid
    transform = torchreid.data.transforms.build_transforms(
        64, 32, norm_mean=MEAN, norm_std=STD)[1]
    paths = sorted(glob.glob(os.path.join(root, 'pmm_synthetic', 'gallery',
                                          '*.png')))[::37][:num]
    return torch.stack([transform(read_image(p)) for p in paths])


@pytest.fixture(scope='module', params=sorted(MODELS))
def exported(request, synthetic_root, tmp_path_factory):
    """(model, .onnx path, weights, completed process) of one export."""
    model = request.param
    work = tmp_path_factory.mktemp('export-' + model)
    weights = make_checkpoint(synthetic_root, model,
                              str(work / 'weights' / 'model.pth.tar-1'))
    save_dir = str(work / 'log')
    options = ['--exporter', MODELS[model]]
    if MODELS[model] == 'torchscript':
        options += ['--opset', '17', '--output', 'deploy/bdb.onnx']
        path = str(work / 'deploy' / 'bdb.onnx')  # relative to the cwd
    else:
        path = os.path.join(save_dir, 'model.onnx')  # the default
    proc = run_export(synthetic_root, model, save_dir, weights, *options,
                      cwd=str(work))
    return model, path, weights, proc


@pytest.mark.slow
def test_export_writes_a_checked_file(exported):
    model, path, _, proc = exported
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert os.path.isfile(path)
    assert not [n for n in os.listdir(os.path.dirname(path))
                if n.endswith('.tmp')]  # no debris of the atomic write
    found = re.search(r'Check on 16 query images of pmm_synthetic .*max abs '
                      r'difference (\S+) at batch 16, (\S+) at batch 1 ',
                      proc.stdout)
    assert found, proc.stdout[-2000:]
    assert max(float(found.group(1)), float(found.group(2))) <= 1e-4
    found = re.search(r'to PyTorch in float64: onnxruntime (\S+), PyTorch '
                      r'float32 (\S+)\n', proc.stdout)
    assert found and max(map(float, found.groups())) <= 1e-4
    assert 'Exported "{}"'.format(path) in proc.stdout


@pytest.mark.slow
def test_printed_deployment_matches_the_config(exported):
    _, _, _, proc = exported
    out = proc.stdout
    assert re.search(r'input +images float32 \[batch, 3, 64, 32\]', out)
    assert re.search(r'output +features float32 \[batch, 1536\]', out)
    assert re.search(r'resize +to H x W = 64 x 32', out)
    assert re.search(r'pixels +RGB; values x 1/255 -> \[0, 1\]', out)
    mean = re.search(r'^  mean +(\[.*\])$', out, re.M).group(1)
    std = re.search(r'^  std +(\[.*\])$', out, re.M).group(1)
    assert json.loads(mean) == MEAN and json.loads(std) == STD
    assert re.search(r"distance cosine .* on the L2-normalised features "
                     r"\(test.dist_metric = 'cosine', test.normalize_feature "
                     r"= True\)", out)


@pytest.mark.slow
def test_metadata_and_graph(exported):
    model, path, weights, _ = exported
    proto = onnx.load(path)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta['model_name'] == model
    assert meta['weights_file'] == os.path.basename(weights)
    assert json.loads(meta['norm_mean']) == MEAN
    assert json.loads(meta['norm_std']) == STD
    assert meta['color_order'] == 'RGB' and meta['pixel_scale'] == '1/255'
    assert meta['dist_metric'] == 'cosine'
    assert json.loads(meta['normalize_feature']) is True
    assert json.loads(meta['input_shape']) == ['batch', 3, 64, 32]
    assert json.loads(meta['output_shape']) == ['batch', 1536]
    opset = {d.domain: d.version for d in proto.opset_import}['']
    assert opset == (17 if MODELS[model] == 'torchscript' else 18)
    (inp, ), (out, ) = proto.graph.input, proto.graph.output
    assert inp.name == 'images' and out.name == 'features'
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [3, 64, 32]


@pytest.mark.slow
def test_onnxruntime_equals_pytorch(exported, synthetic_root):
    """Random and real images, batches of 1 and 5, read from the file."""
    model, path, weights, proc = exported
    assert proc.returncode == 0, proc.stderr[-3000:]
    net = torch_model(synthetic_root, model, weights)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(path, options,
                                   providers=['CPUExecutionProvider'])
    torch.manual_seed(1)
    sets = {'random': torch.randn(5, 3, 64, 32),
            'real': gallery_images(synthetic_root, 5)}
    for kind, images in sets.items():
        for size in (1, 5):
            with torch.no_grad():
                ref = torch.cat([net(images[i:i + size])
                                 for i in range(0, 5, size)]).numpy()
            out = np.concatenate([
                session.run(['features'], {'images': images[i:i + size]
                                           .numpy()})[0]
                for i in range(0, 5, size)])
            assert out.shape == (5, 1536)
            diff = np.abs(out - ref).max()
            assert diff <= 1e-4, (model, kind, size, diff)


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------
@pytest.fixture(scope='module')
def bdb_weights(synthetic_root, tmp_path_factory):
    work = tmp_path_factory.mktemp('other-weights')
    return make_checkpoint(synthetic_root, 'bdb_resnet18',
                           str(work / 'bdb.pth.tar'))


@pytest.mark.slow
def test_missing_load_weights_names_the_key(synthetic_root, tmp_path):
    proc = run_export(synthetic_root, 'pmm_resnet18', str(tmp_path / 'log'),
                      None, cwd=str(tmp_path), child=True)  # the script itself
    assert proc.returncode == 1
    assert 'model.load_weights is empty' in proc.stderr
    assert not os.path.exists(tmp_path / 'log' / 'model.onnx')


@pytest.mark.slow
def test_missing_weights_file_names_the_file(synthetic_root, tmp_path):
    missing = str(tmp_path / 'nowhere' / 'model.pth.tar-9')
    proc = run_export(synthetic_root, 'pmm_resnet18', str(tmp_path / 'log'),
                      missing, cwd=str(tmp_path))
    assert proc.returncode == 1
    assert 'model.load_weights' in proc.stderr and missing in proc.stderr


@pytest.mark.slow
def test_weights_of_another_model_name_the_file(synthetic_root, tmp_path,
                                                bdb_weights):
    proc = run_export(synthetic_root, 'pmm_resnet18', str(tmp_path / 'log'),
                      bdb_weights, cwd=str(tmp_path))
    assert proc.returncode == 1
    message = proc.stderr.strip().splitlines()[-1]
    assert bdb_weights in message and "'pmm_resnet18'" in message
    assert 'missing' in message and 'part_heads.0.' in message
    assert 'unexpected' in message and 'part_head.' in message
    assert not os.path.exists(tmp_path / 'log' / 'model.onnx')


def _export_in_process(root, weights, target, *options):
    """scripts/export.py's main, called in this process on bdb_resnet18 (the
    TorchScript exporter, 4 query images checked at batch sizes 4 and 3):
    its exit code."""
    from pmm_torchreid.cli.export import main
    return main(['--config-file', CONFIG, '--root', root, '-m', 'bdb_resnet18',
                 '--exporter', 'torchscript', '--opset', '17',
                 '--num-images', '4', '--batch-size', '3',
                 '--output', str(target)] + list(options) +
                overrides('bdb_resnet18', str(target.parent.parent / 'log'),
                          weights))


class _Shifted(object):
    """An onnxruntime session whose features are all off by ``shift``: an
    export that no longer reproduces PyTorch."""

    def __init__(self, session, shift):
        self.session, self.shift = session, shift

    def run(self, names, feeds):
        return [out + np.float32(self.shift)
                for out in self.session.run(names, feeds)]


@pytest.mark.parametrize('strict', [True, False])
def test_a_failed_check_writes_nothing(synthetic_root, tmp_path, bdb_weights,
                                       monkeypatch, capsys, strict):
    """onnxruntime's features shifted by 1e-3 (far above the tolerance and
    float32 rounding): exit code 1, an error naming the difference, the
    tolerance and the file, the previous file kept byte for byte, and no
    temporary file left."""
    from pmm_torchreid.deploy import export as E
    real_session = E.onnx_session
    monkeypatch.setattr(E, 'onnx_session',
                        lambda data: _Shifted(real_session(data), 1e-3))
    monkeypatch.chdir(tmp_path)
    target = tmp_path / 'deploy' / 'model.onnx'
    target.parent.mkdir()
    target.write_bytes(b'the previous export')
    code = _export_in_process(synthetic_root, bdb_weights, target,
                              '--tolerance', '1e-4',
                              *(['--strict'] if strict else []))
    out, err = capsys.readouterr()
    assert code == 1, out[-2000:] + err[-2000:]
    assert re.search(r'max abs difference 1\.0\de-03 at batch 4, 1\.0\de-03 '
                     r'at batch 3 \(tolerance 0\.0001\)', out), out[-2000:]
    assert err.startswith('Error: the exported model does not reproduce '
                          'PyTorch: max abs difference 1.0')
    assert '> --tolerance 0.0001' in err
    assert '"{}" was not written'.format(target) in err
    assert ('float64' in err) != strict  # the rounding rule, without --strict
    assert target.read_bytes() == b'the previous export'
    assert os.listdir(target.parent) == ['model.onnx']  # no .tmp left
    assert 'Exported' not in out


def test_a_passing_check_replaces_the_file(synthetic_root, tmp_path,
                                           bdb_weights, monkeypatch, capsys):
    """The same export, its check passing under --strict: exit code 0, and
    the previous file replaced by a valid ONNX file of the network, with no
    temporary file left."""
    monkeypatch.chdir(tmp_path)
    target = tmp_path / 'deploy' / 'model.onnx'
    target.parent.mkdir()
    target.write_bytes(b'the previous export')
    code = _export_in_process(synthetic_root, bdb_weights, target,
                              '--tolerance', '1e-4', '--strict')
    out, err = capsys.readouterr()
    assert code == 0, out[-2000:] + err[-2000:]
    found = re.search(r'max abs difference (\S+) at batch 4, (\S+) at batch 3',
                      out)
    assert found and max(map(float, found.groups())) <= 1e-4
    assert 'Exported "{}"'.format(target) in out
    assert os.listdir(target.parent) == ['model.onnx']
    proto = onnx.load(str(target))
    onnx.checker.check_model(proto)
    assert [o.name for o in proto.graph.output] == ['features']
    session = ort.InferenceSession(str(target),
                                   providers=['CPUExecutionProvider'])
    images = gallery_images(synthetic_root, 2)
    with torch.no_grad():
        ref = torch_model(synthetic_root, 'bdb_resnet18', bdb_weights)(images)
    got = session.run(['features'], {'images': images.numpy()})[0]
    assert np.abs(got - ref.numpy()).max() <= 1e-4


def test_a_negative_tolerance_is_refused(tmp_path):
    from pmm_torchreid.cli.export import main
    with pytest.raises(ValueError, match='--tolerance -1.0: expected >= 0'):
        main(['--tolerance', '-1', '--output', str(tmp_path / 'x.onnx')])
    assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_the_global_descriptor_exports_stage_one(synthetic_root, tmp_path):
    weights = make_checkpoint(synthetic_root, 'bdb_resnet18',
                              str(tmp_path / 'w' / 'model.pth.tar-1'))
    target = tmp_path / 'deploy' / 'global.onnx'
    proc = run_export(synthetic_root, 'bdb_resnet18', str(tmp_path / 'log'),
                      weights, '--descriptor', 'global', '--exporter',
                      'torchscript', '--opset', '17', '--num-images', '4',
                      '--output', str(target), cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r'output +features float32 \[batch, 512\]', proc.stdout)
    meta = {p.key: p.value for p in onnx.load(str(target)).metadata_props}
    assert meta['descriptor'] == 'global' and meta['feature_dim'] == '512'
    # what the file computes is stage I of the trained network
    import onnxruntime  # lazy: with onnx, only for the export tests
    net = torch_model(synthetic_root, 'bdb_resnet18', weights)
    images = torch.randn(3, 3, 64, 32)
    with torch.no_grad():
        stage_one = net.global_head(net.backbone(images))[1].numpy()
    got = onnxruntime.InferenceSession(str(target)).run(
        None, {'images': images.numpy()})[0]
    assert got.shape == (3, 512) and abs(got - stage_one).max() < 1e-4
