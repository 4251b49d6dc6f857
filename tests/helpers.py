"""What the tests share: paths, the environment and settings of the runs of
scripts/*.py, one runner, a PMM engine on no data, one batch, and the
comparison of two checkpoints.  Test files import from here, never from
each other."""
import io
import os
import os.path as osp
import re
import subprocess
import sys
import types

import numpy as np
import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
SHARED = osp.join(osp.dirname(ROOT), 'shared')
CONFIG = osp.join(ROOT, 'configs', 'pmm_demo.yaml')
DRIVER = osp.join(ROOT, 'tests', 'fault_driver.py')

#: every child process: one thread (bit-exact CPU results, and two test
#: workers share the two cores), the CPU, unbuffered output (a test reads what
#: a child it killed printed), and this checkout first on the path
ENV = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1',
           CUDA_VISIBLE_DEVICES='', PYTHONUNBUFFERED='1',
           PYTHONPATH=os.pathsep.join(
               [ROOT] + [p for p in [os.environ.get('PYTHONPATH')] if p]))

#: the small run of scripts/main.py on the synthetic data: 32x16 images (a
#: 2x1 map), 10 training identities (``data.val_ids 90`` holds the other 90
#: out as the evaluated query/gallery: 180 queries, 540 gallery images), a
#: batch of 16; an epoch is a few steps
SMALL = [
    'use_gpu', 'False', 'data.height', '32', 'data.width', '16',
    'pmm.block_size', '[1, 1]', 'pmm.top_k', '1', 'train.batch_size', '16',
    'data.workers', '0', 'train.print_freq', '1', 'test.eval_freq', '1',
    'data.val_ids', '90',
]
SMALL_QUERIES = 180


def main_args(root, save_dir, *extra, config=CONFIG):
    """scripts/main.py's arguments for a SMALL run into ``save_dir``."""
    return ['--config-file', config, '--root', root,
            'data.save_dir', save_dir] + SMALL + list(extra)


def script(name, *args, check=True, timeout=300, cwd=ROOT, env=None):
    """Runs ``scripts/NAME`` (or, for a path ending in .py elsewhere, that
    file) in a child process; with ``check``, asserts it succeeded."""
    path = name if osp.isabs(name) else osp.join(ROOT, 'scripts', name)
    proc = subprocess.run([sys.executable, path] + [str(a) for a in args],
                          cwd=cwd, env=ENV if env is None else env,
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def start(args, **popen):
    """``python ARGS`` started in the background, output piped as text."""
    popen = dict(dict(cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                      stderr=subprocess.STDOUT, text=True), **popen)
    return subprocess.Popen([sys.executable] + [str(a) for a in args], **popen)


def final_metrics(text):
    """The last (mAP, Rank-1) a run printed."""
    return re.findall(r'mAP: ([\d.]+)%.*?Rank-1\s*: ([\d.]+)%', text, re.S)[-1]


def batch(n_ids=4, per_id=2, height=64, width=32, seed=1):
    """A random batch as the engines take it: ``{'img', 'pid'}`` (by default
    8 images of 4 identities, 2 each, 64x32)."""
    torch.manual_seed(seed)
    labels = torch.arange(n_ids).repeat_interleave(per_id)
    return {'img': torch.randn(len(labels), 3, height, width), 'pid': labels}


def images_and_labels(n_ids=3, per_id=2, height=64, width=32):
    """``batch`` as a pair, the way the networks are called."""
    data = batch(n_ids, per_id, height, width, seed=0)
    return data['img'], data['pid']


def pmm_engine(cls=None, *, optimizer=None, num_classes=4, seed=1,
               block_size=(2, 1), top_k=2, **kwargs):
    """A PMM engine on ResNet-18 (seeded weights, train mode) over a data
    manager with no data: only the training step is used.  ``optimizer``
    builds one from the parameters (SGD at 0.01 by default)."""
    from pmm_torchreid.engine import PMMEngine
    from pmm_torchreid.models import PMM
    torch.manual_seed(0)
    model = PMM(num_classes, backbone='resnet18', pretrained=False)
    opt = (optimizer or (lambda p: torch.optim.SGD(p, lr=0.01)))(
        model.parameters())
    fake = types.SimpleNamespace(train_loader=None, test_loader={})
    engine = (cls or PMMEngine)(fake, model, opt, use_gpu=False,
                                block_size=block_size, top_k=top_k, seed=seed,
                                **kwargs)
    model.train()
    return engine


def _same(a, b, where):
    """Deep equality of checkpoint parts: tensors bit for bit, NumPy arrays
    exactly, containers element by element (same keys, same lengths)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), \
            where
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        assert np.array_equal(np.asarray(a), np.asarray(b)), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _same(a[key], b[key], '{}.{}'.format(where, key))
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, '{}[{}]'.format(where, i))
    else:
        assert a == b, (where, a, b)


def assert_same_checkpoints(a, b):
    """Two checkpoints hold the same training state: the weights, the whole
    optimiser (every parameter's state and the groups), the scheduler, the
    gradient scaler, and every random-number state the run resumes from
    (torch's, NumPy's, Python's, CUDA's and the mixing generator)."""
    assert a['epoch'] == b['epoch'] and a.get('rank1') == b.get('rank1')
    assert a.get('periodic') == b.get('periodic')
    _same(a['state_dict'], b['state_dict'], 'state_dict')
    assert len(a['optimizer']['state']) == len(b['optimizer']['state']) > 0
    _same(a['optimizer'], b['optimizer'], 'optimizer')
    _same(a['scheduler'], b['scheduler'], 'scheduler')
    assert ('grad_scaler' in a) == ('grad_scaler' in b)
    _same(a.get('grad_scaler'), b.get('grad_scaler'), 'grad_scaler')
    _same(a['pmm_generator'], b['pmm_generator'], 'pmm_generator')
    assert a['rng_state'].keys() == b['rng_state'].keys()
    assert {'torch', 'numpy', 'python'} <= set(a['rng_state'])
    _same(a['rng_state'], b['rng_state'], 'rng_state')


class _Console(io.StringIO):
    """What a program in this process prints to.  torchreid's ``Logger``
    (which scripts/main.py puts on ``sys.stdout``) closes the stream it wraps
    when it is closed or collected: this one stays readable."""

    def close(self):
        pass


def in_process(main, argv, cwd=None, **kwargs):
    """``main(argv, **kwargs)`` of a ``pmm_torchreid.cli`` module in this
    process (one torch thread, as in a child), from ``cwd``, without what a
    child process costs in imports:
    ``returncode``, ``stdout`` and ``stderr`` as a child's run gives them (an
    exception is printed as the script's process would print it, exit code 1;
    ``SystemExit`` passes through)."""
    import contextlib
    import traceback
    out, err, here = _Console(), _Console(), os.getcwd()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as ENV gives a child: bit-exact, one core
    os.chdir(cwd or here)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in argv], **kwargs)
                code = 0 if code is None else code  # a script's exit status
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(here)
        torch.set_num_threads(threads)
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(),
                                 stderr=err.getvalue())


def export_pairs(model, save_dir, weights=None, height=64, width=32,
                 mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)):
    """The KEY VALUE pairs of a small scripts/export.py run: ``height`` x
    ``width``, no ImageNet weights, a mean and std that are not the defaults
    (so their use is checked), cosine distance on normalised features, the
    mixing rule the model trains with, and ``model.load_weights``."""
    pairs = ['data.height', str(height), 'data.width', str(width),
             'model.pretrained', 'False', 'data.workers', '0',
             'data.check_images', 'False', 'data.norm_mean', str(list(mean)),
             'data.norm_std', str(list(std)), 'test.dist_metric', 'cosine',
             'test.normalize_feature', 'True',
             'pmm.mix', 'none' if model.startswith('bdb') else 'hard_mix',
             'data.save_dir', save_dir]
    return pairs + (['model.load_weights', weights] if weights else [])


def make_export_checkpoint(root, model, path):
    """A checkpoint of a freshly built ``model`` (seeded, 100 identities)
    whose BatchNorm layers hold non-trivial statistics, so that an export
    folding them into the convolutions is checked too: ``path``."""
    from pmm_torchreid import launch  # lazy: most tests never export
    from pmm_torchreid.utils.checkpoint import save_checkpoint  # lazy: as above
    args = launch.build_parser().parse_args(
        ['--config-file', CONFIG, '--root', root, '-m', model] +
        export_pairs(model, osp.dirname(path)))
    torch.manual_seed(0)
    net = perturb_batchnorm(launch.build_model(launch.setup_config(args), 100))
    save_checkpoint({'state_dict': net.state_dict(), 'epoch': 1}, path)
    return path


def perturb_batchnorm(net):
    """Gives every BatchNorm layer of ``net`` statistics and an affine part
    off their defaults (from torch's global generator); returns ``net``."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return net


def exported_model(root, model, weights):
    """The eval-mode network of an export test (:func:`export_pairs`) with
    the weights of ``weights``."""
    from pmm_torchreid import launch  # lazy: most tests never export
    from pmm_torchreid.utils.checkpoint import load_checkpoint  # lazy: as above
    args = launch.build_parser().parse_args(
        ['--config-file', CONFIG, '--root', root, '-m', model] +
        export_pairs(model, '.', weights))
    net = launch.build_model(launch.setup_config(args), 100)
    net.load_state_dict(load_checkpoint(weights, 'cpu')['state_dict'])
    return net.eval()


def fake_campus(folder, num_ids=12):
    """A tiny CUHK01 ``campus/`` folder: ``num_ids`` identities, 4 blank
    images each (shots 1-2 camera A, 3-4 camera B)."""
    from PIL import Image  # lazy: only the CUHK01 tests draw images
    os.makedirs(folder)
    img = Image.fromarray(np.zeros((4, 2, 3), dtype=np.uint8))
    for pid in range(1, num_ids + 1):
        for shot in range(1, 5):
            img.save(osp.join(folder, '{:04d}{:03d}.png'.format(pid, shot)))
