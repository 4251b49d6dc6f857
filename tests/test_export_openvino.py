"""scripts/export.py --format openvino, --normalize, --size and --profile
(its main in this process): an OpenVINO IR of pmm_resnet18 that OpenVINO
runs like PyTorch's L2-normalised features, at the size asked for, with the
deployment facts in its rt_info; a tampered IR refused with the previous
pair kept; the pair never half replaced; the option errors."""
import json
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ov = pytest.importorskip('openvino')
pytest.importorskip('onnx')
pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')  # torch's default (dynamo) exporter needs it

from helpers import CONFIG, export_pairs, exported_model, in_process, make_export_checkpoint  # noqa: E402

from pmm_torchreid.data import read_image  # noqa: E402
from pmm_torchreid.deploy import export as E  # noqa: E402
from pmm_torchreid.deploy import openvino_ir as OV  # noqa: E402

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]  # export_pairs' (not ImageNet's)
#: every key of the deployment facts, in both formats
KEYS = ['model_name', 'weights_file', 'weights_sha256', 'input_name',
        'input_shape', 'input_size', 'layout', 'input_dtype', 'color_order',
        'resize', 'pixel_range', 'pixel_scale', 'norm_mean', 'norm_std',
        'output_name', 'output_shape', 'feature_dim', 'descriptor',
        'output_normalized', 'dist_metric', 'normalize_feature', 'distance']


def export_main(root, model, save_dir, weights, *options, cwd,
                height=64, width=32):
    from pmm_torchreid.cli.export import main
    argv = ['--config-file', CONFIG, '--root', root, '-m', model] + \
        list(options) + export_pairs(model, save_dir, weights, height, width)
    return in_process(main, argv, cwd)


def real_images(root, num, height=64, width=32):
    import glob

    import torchreid
    transform = torchreid.data.transforms.build_transforms(
        height, width, norm_mean=MEAN, norm_std=STD)[1]
    paths = sorted(glob.glob(os.path.join(root, 'pmm_synthetic', 'gallery',
                                          '*.png')))[::37][:num]
    return torch.stack([transform(read_image(p)) for p in paths])


def compiled(xml):
    core = ov.Core()
    return core.compile_model(core.read_model(xml), 'CPU',
                              {'INFERENCE_PRECISION_HINT': 'f32',
                               'INFERENCE_NUM_THREADS': 1})


@pytest.fixture(scope='module')
def exported(synthetic_root, tmp_path_factory):
    """One export: the config says 32x16, ``--size 64x32`` wins; the
    features are normalised in the graph; the target already holds an
    older pair, which the export replaces."""
    work = tmp_path_factory.mktemp('export-openvino')
    weights = make_export_checkpoint(synthetic_root, 'pmm_resnet18',
                                     str(work / 'weights' / 'model.pth.tar-1'))
    folder = work / 'deploy' / 'pmm_resnet18_openvino_model'
    folder.mkdir(parents=True)
    (folder / 'pmm.xml').write_bytes(b'the previous graph')
    (folder / 'pmm.bin').write_bytes(b'the previous weights')
    proc = export_main(synthetic_root, 'pmm_resnet18', str(work / 'log'),
                       weights, '--format', 'openvino', '--normalize',
                       '--size', '64x32', '--output',
                       'deploy/pmm_resnet18_openvino_model/pmm.xml',
                       cwd=str(work), height=32, width=16)
    return proc, str(folder / 'pmm.xml'), weights


@pytest.mark.slow
def test_both_checks_pass_before_the_pair_replaces_the_old_one(exported):
    proc, xml, _ = exported
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    onnx_line = re.search(r'\nCheck on 16 query images of pmm_synthetic .*max '
                          r'abs difference (\S+) at batch 16, (\S+) at batch 1 ',
                          out)
    ir_line = re.search(r'\nOpenVINO check of the IR on 16 query images of '
                        r'pmm_synthetic \(OpenVINO .*max abs difference (\S+) '
                        r'at batch 16, (\S+) at batch 1 ', out)
    assert onnx_line and ir_line, out[-3000:]
    assert onnx_line.start() < ir_line.start()
    assert max(map(float, ir_line.groups() + onnx_line.groups())) <= 1e-4
    assert 'Exported "{}" and "{}"'.format(xml, xml[:-4] + '.bin') in out
    assert sorted(os.listdir(os.path.dirname(xml))) == ['pmm.bin', 'pmm.xml']
    assert open(xml, 'rb').read(5) == b'<?xml'


@pytest.mark.slow
def test_the_ir_reproduces_pytorchs_normalised_features(exported,
                                                        synthetic_root):
    """Random and real images, batches of 1 and 5, read from the files."""
    proc, xml, weights = exported
    assert proc.returncode == 0, proc.stderr[-3000:]
    net = exported_model(synthetic_root, 'pmm_resnet18', weights)
    model = compiled(xml)
    torch.manual_seed(1)
    sets = {'random': torch.randn(5, 3, 64, 32),
            'real': real_images(synthetic_root, 5)}
    for kind, images in sets.items():
        with torch.no_grad():
            ref = F.normalize(net(images), dim=1).numpy()
        for size in (1, 5):
            out = np.concatenate([model([images[i:i + size].numpy()])[0]
                                  for i in range(0, 5, size)])
            assert out.shape == (5, 1536)
            assert np.abs(np.linalg.norm(out, axis=1) - 1).max() <= 1e-5
            diff = np.abs(out - ref).max()
            assert diff <= 1e-4, (kind, size, diff)


@pytest.mark.slow
def test_the_ir_records_the_deployment_facts(exported):
    proc, xml, weights = exported
    model = ov.Core().read_model(xml)
    info = OV.read_model_info(model)
    assert sorted(info) == sorted(KEYS)
    assert info['model_name'] == 'pmm_resnet18'
    assert info['weights_file'] == os.path.basename(weights)
    assert json.loads(info['norm_mean']) == MEAN
    assert json.loads(info['norm_std']) == STD
    assert info['color_order'] == 'RGB' and info['layout'] == 'NCHW'
    assert json.loads(info['pixel_range']) == [0, 255]
    assert info['pixel_scale'] == '1/255' and info['resize'] == 'bilinear'
    assert json.loads(info['output_shape']) == ['batch', 1536]
    assert info['feature_dim'] == '1536' and info['descriptor'] == 'all'
    assert json.loads(info['output_normalized']) is True
    assert info['dist_metric'] == 'cosine'
    assert info['distance'] == 'cosine distance 1 - a.b (a, b: unit vectors)'
    assert model.get_parameters()[0].get_layout() == ov.Layout('NCHW')
    assert 'features L2-normalised in the graph' in proc.stdout


@pytest.mark.slow
def test_the_size_option_changes_the_input_shape(exported):
    """The config says 32x16; --size 64x32 is what is exported, checked,
    printed and recorded."""
    proc, xml, _ = exported
    model = ov.Core().read_model(xml)
    (param, ) = model.get_parameters()
    shape = param.get_partial_shape()
    assert shape[0].is_dynamic and [shape[i].get_length()
                                    for i in (1, 2, 3)] == [3, 64, 32]
    assert model.outputs[0].get_any_name() == 'features'
    info = OV.read_model_info(model)
    assert json.loads(info['input_shape']) == ['batch', 3, 64, 32]
    assert json.loads(info['input_size']) == [64, 32]
    assert 'Input size 64 x 32 (--size), instead of the config\'s' in \
        proc.stdout
    assert re.search(r'resize +to H x W = 64 x 32', proc.stdout)


# --------------------------------------------------------------------------
# a tampered IR, the pair's replacement, the options
# --------------------------------------------------------------------------
@pytest.fixture(scope='module')
def bdb_weights(synthetic_root, tmp_path_factory):
    work = tmp_path_factory.mktemp('openvino-weights')
    return make_export_checkpoint(synthetic_root, 'bdb_resnet18',
                                  str(work / 'bdb.pth.tar'))


class _Shifted(object):
    """An OpenVINO session whose features are all off by ``shift``: an IR
    that no longer reproduces PyTorch."""

    def __init__(self, session, shift):
        self.session, self.shift = session, shift

    def run(self, names, feeds):
        return [out + np.float32(self.shift)
                for out in self.session.run(names, feeds)]


def test_a_tampered_ir_is_refused_and_the_old_pair_kept(
        synthetic_root, tmp_path, bdb_weights, monkeypatch):
    """OpenVINO's features shifted by 1e-3 (onnxruntime's are not): the
    ONNX check passes, the IR's fails; exit code 1, an error naming the
    difference, the tolerance and the file; the previous pair kept byte for
    byte and no temporary folder left."""
    real_session = OV.openvino_session
    monkeypatch.setattr(OV, 'openvino_session',
                        lambda xml: _Shifted(real_session(xml), 1e-3))
    target = tmp_path / 'deploy' / 'bdb.xml'
    target.parent.mkdir()
    target.write_bytes(b'the previous graph')
    (tmp_path / 'deploy' / 'bdb.bin').write_bytes(b'the previous weights')
    proc = export_main(synthetic_root, 'bdb_resnet18', str(tmp_path / 'log'),
                       bdb_weights, '--format', 'openvino', '--exporter',
                       'torchscript', '--opset', '17', '--num-images', '4',
                       '--batch-size', '3', '--output', str(target),
                       cwd=str(tmp_path))
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 1, out[-2000:] + err[-2000:]
    found = re.search(r'\nCheck on 4 .*max abs difference (\S+) at batch 4, '
                      r'(\S+) at batch 3', out)
    assert found and max(map(float, found.groups())) <= 1e-4  # ONNX passes
    assert re.search(r'OpenVINO check of the IR on 4 .*max abs difference '
                     r'1\.0\de-03 at batch 4, 1\.0\de-03 at batch 3 '
                     r'\(tolerance 0\.0001\)', out), out[-2000:]
    assert 'Error: the exported model does not reproduce PyTorch: max abs ' \
        'difference 1.0' in err
    assert 'and OpenVINO is' in err and '> --tolerance 0.0001' in err
    assert '"{}" was not written'.format(target) in err
    assert target.read_bytes() == b'the previous graph'
    assert (tmp_path / 'deploy' / 'bdb.bin').read_bytes() == \
        b'the previous weights'
    assert sorted(os.listdir(target.parent)) == ['bdb.bin', 'bdb.xml']
    assert 'Exported' not in out


def test_the_pair_is_never_an_xml_with_another_bin(tmp_path, monkeypatch):
    """The renames of replace_pair fail one after the other: each time the
    target is the old pair, or has no .xml; the last run puts the new pair
    in place."""
    def write(folder, text):
        os.makedirs(str(folder), exist_ok=True)
        (folder / 'm.xml').write_text(text + ' xml')
        (folder / 'm.bin').write_text(text + ' bin')
        return str(folder / 'm.xml')

    target = write(tmp_path / 'target', 'old')
    real_replace, calls = os.replace, []

    def failing(after):
        def replace(src, dst):
            calls.append(dst)
            if len(calls) > after:
                raise OSError('disk full')
            real_replace(src, dst)
        return replace

    for after in (0, 1):
        calls.clear()
        source = write(tmp_path / 'new{}'.format(after), 'new')
        monkeypatch.setattr(OV.os, 'replace', failing(after))
        with pytest.raises(OSError, match='disk full'):
            OV.replace_pair(source, target)
        assert not os.path.exists(target)  # no graph: no wrong weights
    monkeypatch.setattr(OV.os, 'replace', real_replace)
    OV.replace_pair(write(tmp_path / 'new', 'new'), target)
    assert open(target).read() == 'new xml'
    assert open(OV.bin_path(target)).read() == 'new bin'
    assert sorted(os.listdir(str(tmp_path / 'target'))) == ['m.bin', 'm.xml']


def test_parse_size():
    assert E.parse_size('256x128') == (256, 128)
    assert E.parse_size('64X32') == (64, 32)
    for bad in ('256', '256x', 'x128', '0x128', '256x128x3', 'axb', '-1x4'):
        with pytest.raises(ValueError, match='expected HEIGHTxWIDTH'):
            E.parse_size(bad)
    assert E.PROFILES['boxmot'][:2] == (256, 128)


@pytest.mark.parametrize('options, message', [
    (['--size', '64x32', '--profile', 'boxmot'], 'give one of them'),
    (['--profile', 'boxmot'], r'--profile boxmot: data.norm_mean = \[0.5, '),
    (['--format', 'openvino', '--output', 'x.onnx'], 'ending in .xml'),
])
def test_option_errors(synthetic_root, tmp_path, options, message):
    """Refused before anything is built or written (the profile: BoxMOT
    normalises with ImageNet's mean and std, these pairs do not)."""
    from pmm_torchreid.cli.export import main
    with pytest.raises(ValueError, match=message):
        main(['--config-file', CONFIG, '--root', synthetic_root, '-m',
              'pmm_resnet18'] + options +
             export_pairs('pmm_resnet18', str(tmp_path), 'w.pth'))
    assert not os.listdir(str(tmp_path))


# --------------------------------------------------------------------------
# scripts/benchmark_export.py's measurements, on a tiny network
# --------------------------------------------------------------------------
class _TwoDescriptors(torch.nn.Module):
    """A convolution and two heads: ``'all'`` gives both (12-d), ``'global'``
    the first (8-d), as the plugin's networks choose."""

    descriptor = 'all'

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.extra = torch.nn.Linear(8, 4)

    def set_descriptor(self, name):
        self.descriptor = name
        return self

    def forward(self, x):
        pooled = self.conv(x).mean((2, 3))
        if self.descriptor == 'global':
            return pooled
        return torch.cat([pooled, self.extra(pooled)], 1)


@pytest.mark.slow  # three exports with torch.export: about 10 s
def test_the_export_benchmark_measures_each_descriptor_and_runtime(capsys):
    from pmm_torchreid.deploy import benchmark as B
    torch.manual_seed(1)
    images = torch.randn(5, 3, 16, 8)
    rows = B.bench_export(_TwoDescriptors().eval(), images, ['all', 'global'],
                          batch_size=2, repeats=1, warmup=0)
    assert [(r['descriptor'], r['format']) for r in rows] == [
        (d, f) for d in ('all', 'global') for f in B.FORMATS]
    for r in rows:
        assert r['dim'] == (12 if r['descriptor'] == 'all' else 8)
        assert r['max_abs_diff'] <= 1e-5 and r['vs_float64'] <= 1e-5
        assert r['bytes'] > 0 and r['images_per_s'] > 0
    assert [r['max_abs_diff'] for r in rows if r['format'] == 'pytorch'] == \
        [0.0, 0.0]
    B.print_table(rows)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith('| descriptor | runtime | D |')
    assert lines[2].startswith('| all | PyTorch | 12 | 0 (reference) |')
    assert lines[7].startswith('| global | OpenVINO | 8 | ')
    # a network without the choice: 'all' alone
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(1),
                                torch.nn.LazyLinear(6))
    plain(images)
    rows = B.bench_export(plain.eval(), images, ['all', 'global'],
                          formats=['pytorch', 'onnxruntime'], batch_size=5,
                          repeats=1, warmup=0)
    assert [(r['descriptor'], r['format']) for r in rows] == [
        ('all', 'pytorch'), ('all', 'onnxruntime')]
    assert 'Sequential has one descriptor: skipping global' in \
        capsys.readouterr().out
