"""Nothing lost: real training runs killed with SIGKILL while a checkpoint is
being written, exact resume, a diverging run, and unsafe checkpoint files.

Every run is scripts/main.py on the synthetic data (tests/fault_driver.py
injects the fault); all use one thread, so CPU results are bit-exact.
"""
import hashlib
import os
import os.path as osp
import shutil
import signal
import time

import pytest
import torch
from helpers import DRIVER, assert_same_checkpoints, final_metrics, main_args, script, start

from pmm_torchreid.utils.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow


def run_main(args):
    return script('main.py', *args).stdout


def faulty(fault, marker, args):
    """scripts/main.py under tests/fault_driver.py with ``fault``."""
    return start([DRIVER, fault, marker, '--'] + args)


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


@pytest.fixture(scope='module')
def runs(synthetic_root, demo_run, tmp_path_factory):
    """The uninterrupted 2-epoch demo run, and the same run killed half way
    through writing its epoch-2 checkpoint."""
    straight, straight_out = demo_run
    base = tmp_path_factory.mktemp('runs')
    killed, marker = str(base / 'killed'), str(base / 'marker')
    killed_out = kill_at_marker(
        faulty('pause_mid_write:2', marker,
               main_args(synthetic_root, killed, 'train.max_epoch', '2')),
        marker)
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
    assert 'Last epoch = 1' in out
    assert 'epoch: [2/2]' in out and 'epoch: [1/2]' not in out
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


def test_a_periodic_checkpoint_resumes_a_killed_run_exactly(synthetic_root,
                                                            tmp_path):
    # evaluated only at the end, so torchreid alone would save nothing before
    no_eval = ['test.eval_freq', '-1', 'train.max_epoch', '3']
    plain = str(tmp_path / 'plain')
    plain_out = run_main(main_args(synthetic_root, plain, *no_eval))
    assert os.listdir(osp.join(plain, 'model')) == ['model.pth.tar-3']
    # the same run with train.checkpoint_freq 1, killed while its last
    # checkpoint waits to be renamed into place
    killed, marker = str(tmp_path / 'killed'), str(tmp_path / 'marker')
    periodic = no_eval + ['train.checkpoint_freq', '1']
    out = kill_at_marker(
        faulty('pause_before_rename:model.pth.tar-3', marker,
               main_args(synthetic_root, killed, *periodic)), marker)
    assert out.count('Periodic checkpoint saved') == 2
    folder = osp.join(killed, 'model')
    # tar-2 replaced tar-1; tar-3 exists only under its temporary name
    assert [f for f in os.listdir(folder) if not f.endswith('.tmp')] == [
        'model.pth.tar-2']
    ckpt = load_checkpoint(osp.join(folder, 'model.pth.tar-2'))
    assert ckpt['epoch'] == 2 and ckpt['periodic'] is True
    assert 'rank1' not in ckpt  # no evaluation behind it
    out = run_main(main_args(synthetic_root, killed, *periodic, 'model.resume',
                             osp.join(folder, 'model.pth.tar-2')))
    assert 'Restored the random-number states' in out
    assert 'epoch: [3/3]' in out and 'epoch: [2/3]' not in out
    # the periodic checkpoint it resumed from went once tar-3 was written
    assert os.listdir(folder) == ['model.pth.tar-3']
    # neither the periodic saves nor the kill changed the run
    assert_same_checkpoints(
        load_checkpoint(osp.join(folder, 'model.pth.tar-3')),
        load_checkpoint(osp.join(plain, 'model', 'model.pth.tar-3')))
    assert final_metrics(out) == final_metrics(plain_out)


def test_kill_before_rename_keeps_the_old_file_of_that_name(runs, tmp_path):
    root, straight, _, _, _ = runs
    save_dir = str(tmp_path / 'log')
    # the folder of a finished run (the uninterrupted run's epoch-1 file)
    os.makedirs(osp.join(save_dir, 'model'))
    old = osp.join(save_dir, 'model', 'model.pth.tar-1')
    shutil.copyfile(osp.join(straight, 'model', 'model.pth.tar-1'), old)
    before = sha256(old)
    marker = str(tmp_path / 'marker')
    # a second run into the same folder, with another seed, is killed when
    # its complete new model.pth.tar-1 waits to replace the old one
    proc = faulty('pause_before_rename:model.pth.tar-1', marker,
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
    assert sha256(osp.join(save_dir, 'model', leftovers[0])) != before


def test_diverging_run_stops_naming_stage_and_keeps_last_checkpoint(
        runs, tmp_path):
    root = runs[0]
    save_dir = str(tmp_path / 'log')
    proc = script(DRIVER, 'nan_at_epoch:2', str(tmp_path / 'unused'), '--',
                  *main_args(root, save_dir, 'train.max_epoch', '3'),
                  check=False)
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
