"""Nothing lost: real training runs killed with SIGKILL while a checkpoint is
being written, exact resume, a diverging run, and unsafe checkpoint files.

Every run is scripts/main.py on the synthetic data (tests/fault_driver.py
injects the fault); all use one thread, so CPU results are bit-exact.
"""
import hashlib
import os
import os.path as osp
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from pmm_torchreid.utils.checkpoint import load_checkpoint

from conftest import ROOT

FAST = [
    'data.height', '64', 'data.width', '32', 'pmm.block_size', '[1, 1]',
    'pmm.top_k', '2', 'train.batch_size', '16', 'data.workers', '0',
    'train.print_freq', '100', 'test.eval_freq', '1',
]
ENV = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
DRIVER = osp.join(ROOT, 'tests', 'fault_driver.py')


def main_args(root, save_dir, *extra):
    return ['--config-file', osp.join(ROOT, 'configs', 'pmm_demo.yaml'),
            '--root', root, 'data.save_dir', save_dir] + FAST + list(extra)


def start(fault, marker, args):
    return subprocess.Popen(
        [sys.executable, DRIVER, fault, marker, '--'] + args, cwd=ROOT,
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def run_main(args, timeout=300):
    proc = subprocess.run(
        [sys.executable, osp.join('scripts', 'main.py')] + args, cwd=ROOT,
        env=ENV, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def kill_at_marker(proc, marker, timeout=300):
    """Waits for ``marker``, then SIGKILLs ``proc`` (the fault is reached)."""
    deadline = time.time() + timeout
    while not osp.exists(marker):
        if proc.poll() is not None:
            raise AssertionError('run ended before the fault:\n' +
                                 proc.stdout.read()[-3000:])
        assert time.time() < deadline, 'fault never reached'
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return proc.stdout.read()


def sha256(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def final_metrics(text):
    return re.findall(r'mAP: ([\d.]+)%.*?Rank-1\s*: ([\d.]+)%', text, re.S)[-1]


def assert_same_checkpoints(a, b):
    assert a['epoch'] == b['epoch'] and a['rank1'] == b['rank1']
    assert a['state_dict'].keys() == b['state_dict'].keys()
    for key in a['state_dict']:
        assert torch.equal(a['state_dict'][key], b['state_dict'][key]), key
    for sa, sb in zip(a['optimizer']['state'].values(),
                      b['optimizer']['state'].values()):
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]),
                               torch.as_tensor(sb[key])), key
    assert a['scheduler'] == b['scheduler']
    assert torch.equal(a['pmm_generator'], b['pmm_generator'])
    assert torch.equal(a['rng_state']['torch'], b['rng_state']['torch'])


@pytest.fixture(scope='module')
def runs(synthetic_root, tmp_path_factory):
    """An uninterrupted 2-epoch run, and the same run killed half way through
    writing its epoch-2 checkpoint (both at once: one core each)."""
    base = tmp_path_factory.mktemp('runs')
    straight, killed = str(base / 'straight'), str(base / 'killed')
    marker = str(base / 'marker')
    straight_proc = subprocess.Popen(
        [sys.executable, osp.join('scripts', 'main.py')] +
        main_args(synthetic_root, straight, 'train.max_epoch', '2'),
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True
    )
    killed_proc = start('pause_mid_write:2', marker,
                        main_args(synthetic_root, killed, 'train.max_epoch', '2'))
    killed_out = kill_at_marker(killed_proc, marker)
    straight_out, _ = straight_proc.communicate(timeout=300)
    assert straight_proc.returncode == 0, straight_out[-3000:]
    return synthetic_root, straight, straight_out, killed, killed_out


def test_kill_mid_write_keeps_the_previous_checkpoint(runs):
    _, straight, _, killed, out = runs
    folder = osp.join(killed, 'model')
    assert 'Checkpoint saved to' in out and out.count('Checkpoint saved') == 1
    ckpt = load_checkpoint(osp.join(folder, 'model.pth.tar-1'))
    assert ckpt['epoch'] == 1
    assert_same_checkpoints(
        ckpt, load_checkpoint(osp.join(straight, 'model', 'model.pth.tar-1')))
    assert not osp.exists(osp.join(folder, 'model.pth.tar-2'))
    # the half-written file exists only under a hidden temporary name
    leftovers = [f for f in os.listdir(folder) if f.endswith('.tmp')]
    assert len(leftovers) == 1 and leftovers[0].startswith('.model.pth.tar-2.')
    partial = osp.join(folder, leftovers[0])
    assert os.path.getsize(partial) > 1000
    with pytest.raises(RuntimeError, match='refused to load'):
        load_checkpoint(partial)  # really half a file


def test_resume_after_the_kill_equals_the_uninterrupted_run(runs):
    root, straight, straight_out, killed, _ = runs
    out = run_main(main_args(
        root, killed, 'train.max_epoch', '2', 'model.resume',
        osp.join(killed, 'model', 'model.pth.tar-1')))
    assert 'Restored the random-number states' in out
    folder = osp.join(killed, 'model')  # saving tar-2 again cleared the debris
    assert sorted(os.listdir(folder)) == ['model.pth.tar-1', 'model.pth.tar-2']
    assert_same_checkpoints(
        load_checkpoint(osp.join(killed, 'model', 'model.pth.tar-2')),
        load_checkpoint(osp.join(straight, 'model', 'model.pth.tar-2')))
    assert final_metrics(out) == final_metrics(straight_out)


def test_without_the_rng_states_the_resumed_run_differs(runs, tmp_path):
    # the check above is not vacuous: the saved states are what makes it exact
    root, straight, _, killed, _ = runs
    ckpt = load_checkpoint(osp.join(killed, 'model', 'model.pth.tar-1'))
    del ckpt['rng_state'], ckpt['pmm_generator']
    stripped = str(tmp_path / 'no-rng.pth')
    torch.save(ckpt, stripped)
    save_dir = str(tmp_path / 'log')
    out = run_main(main_args(root, save_dir, 'train.max_epoch', '2',
                             'model.resume', stripped))
    assert 'holds no random-number states' in out
    a = load_checkpoint(osp.join(save_dir, 'model', 'model.pth.tar-2'))
    b = load_checkpoint(osp.join(straight, 'model', 'model.pth.tar-2'))
    assert any(not torch.equal(a['state_dict'][k], b['state_dict'][k])
               for k in a['state_dict'] if a['state_dict'][k].is_floating_point())


def test_kill_before_rename_keeps_the_old_file_of_that_name(runs, tmp_path):
    root, straight, _, _, _ = runs
    save_dir = str(tmp_path / 'log')
    run_main(main_args(root, save_dir, 'train.max_epoch', '1'))
    old = osp.join(save_dir, 'model', 'model.pth.tar-1')
    before = sha256(old)
    marker = str(tmp_path / 'marker')
    # a second run into the same folder, with another seed, is killed when
    # its complete new model.pth.tar-1 waits to replace the old one
    proc = start('pause_before_rename:model.pth.tar-1', marker,
                 main_args(root, save_dir, 'train.max_epoch', '1',
                           'train.seed', '2'))
    kill_at_marker(proc, marker)
    assert sha256(old) == before
    assert load_checkpoint(old)['epoch'] == 1
    leftovers = [f for f in os.listdir(osp.join(save_dir, 'model'))
                 if f.endswith('.tmp')]
    assert len(leftovers) == 1
    new = load_checkpoint(osp.join(save_dir, 'model', leftovers[0]))
    assert new['epoch'] == 1 and new['state_dict'].keys() == \
        load_checkpoint(old)['state_dict'].keys()  # complete, only not renamed


def test_diverging_run_stops_naming_stage_and_keeps_last_checkpoint(
        runs, tmp_path):
    root = runs[0]
    save_dir = str(tmp_path / 'log')
    proc = subprocess.run(
        [sys.executable, DRIVER, 'nan_at_epoch:2', str(tmp_path / 'unused'),
         '--'] + main_args(root, save_dir, 'train.max_epoch', '3'),
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0
    last = osp.join(save_dir, 'model', 'model.pth.tar-1')
    assert 'FloatingPointError: stage 1 loss is not finite' in proc.stderr
    assert 'at epoch 2, iteration 1;' in proc.stderr
    assert 'the last good checkpoint is "{}"'.format(last) in proc.stderr
    ckpt = load_checkpoint(last)
    assert all(torch.isfinite(v).all() for v in ckpt['state_dict'].values()
               if v.is_floating_point())
    assert sorted(os.listdir(osp.join(save_dir, 'model'))) == [
        'model.pth.tar-1']
