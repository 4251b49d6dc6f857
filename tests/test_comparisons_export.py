"""scripts/export.py on the comparison systems, with the pattern of
tests/test_export.py: the eval-mode FMN and MagnifierNet networks export
(dynamo exporter, opset 18), pass the script's own check, and onnxruntime
reproduces PyTorch on random and real images at batch sizes 1 and 5."""
import os
import re

import numpy as np
import pytest
import torch

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')

from helpers import ROOT, in_process, perturb_batchnorm  # noqa: E402

from pmm_torchreid import launch  # noqa: E402
from pmm_torchreid.utils.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402

CONFIG = os.path.join(ROOT, 'configs', 'pmm_demo.yaml')
#: model -> descriptor size
MODELS = {'fmn_resnet18': 1024, 'magnifiernet_osnet_x0_25': 1536}


def overrides(save_dir, weights=None):
    pairs = ['data.height', '64', 'data.width', '32', 'model.pretrained',
             'False', 'data.workers', '0', 'data.check_images', 'False',
             'pmm.mix', 'none', 'data.save_dir', save_dir]
    return pairs + (['model.load_weights', weights] if weights else [])


def build(root, model, save_dir='.'):
    args = launch.build_parser().parse_args(
        ['--config-file', CONFIG, '--root', root, '-m', model] +
        overrides(save_dir))
    return launch.build_model(launch.setup_config(args), 100)


@pytest.fixture(scope='module', params=sorted(MODELS))
def exported(request, synthetic_root, tmp_path_factory):
    """(model, .onnx path, weights, completed process)."""
    model = request.param
    work = tmp_path_factory.mktemp('export-' + model)
    torch.manual_seed(0)
    net = perturb_batchnorm(build(synthetic_root, model))  # non-trivial
    weights = str(work / 'weights' / 'model.pth.tar-1')
    save_checkpoint({'state_dict': net.state_dict(), 'epoch': 1}, weights)
    save_dir = str(work / 'log')
    from pmm_torchreid.cli.export import main
    proc = in_process(main, ['--config-file', CONFIG, '--root', synthetic_root,
                             '-m', model] + overrides(save_dir, weights),
                      cwd=str(work))
    return model, os.path.join(save_dir, 'model.onnx'), weights, proc


@pytest.mark.slow
def test_export_writes_a_checked_file(exported):
    model, path, _, proc = exported
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert os.path.isfile(path)
    found = re.search(r'max abs difference (\S+) at batch 16, (\S+) at batch '
                      r'1 ', proc.stdout)
    assert found and max(map(float, found.groups())) <= 1e-4
    assert re.search(r'output +features float32 \[batch, {}\]'.format(
        MODELS[model]), proc.stdout)
    proto = onnx.load(path)
    (out, ) = proto.graph.output
    assert out.name == 'features'
    assert {p.key: p.value for p in proto.metadata_props}['model_name'] == model


@pytest.mark.slow
def test_onnxruntime_equals_pytorch(exported, synthetic_root):
    model, path, weights, proc = exported
    assert proc.returncode == 0, proc.stderr[-3000:]
    net = build(synthetic_root, model)
    net.load_state_dict(load_checkpoint(weights, 'cpu')['state_dict'])
    net.eval()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(path, options,
                                   providers=['CPUExecutionProvider'])
    import glob

    import torchreid

    from pmm_torchreid.data import read_image
    transform = torchreid.data.transforms.build_transforms(64, 32)[1]
    paths = sorted(glob.glob(os.path.join(synthetic_root, 'pmm_synthetic',
                                          'gallery', '*.png')))[::37][:5]
    torch.manual_seed(1)
    sets = {'random': torch.randn(5, 3, 64, 32),
            'real': torch.stack([transform(read_image(p)) for p in paths])}
    for kind, images in sets.items():
        for size in (1, 5):
            with torch.no_grad():
                ref = torch.cat([net(images[i:i + size])
                                 for i in range(0, 5, size)]).numpy()
            out = np.concatenate([
                session.run(['features'], {'images': images[i:i + size]
                                           .numpy()})[0]
                for i in range(0, 5, size)])
            assert out.shape == (5, MODELS[model])
            assert np.abs(out - ref).max() <= 1e-4, (model, kind, size)
