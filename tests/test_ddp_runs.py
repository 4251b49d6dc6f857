"""Real distributed runs on the CPU: two gloo processes train on the
synthetic data (DistributedDataParallel), one rank is killed, one diverges,
and a run is resumed.

Every run uses one thread per process and a small setting: 10 training
identities (``data.val_ids 90`` holds the other 90 out as the evaluated
query/gallery), 32x16 images (a 2x1 map), a global batch of 16 (8 per rank:
2 identities x 4), so an epoch is 4 or 5 steps.
"""
import json
import os
import os.path as osp
import re
import socket
import subprocess
import sys
import time

import pytest
import torch
from helpers import DRIVER, ENV, ROOT, assert_same_checkpoints

from pmm_torchreid.utils.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

SMALL = [
    'data.height', '32', 'data.width', '16', 'pmm.block_size', '[1, 1]',
    'pmm.top_k', '1', 'train.batch_size', '16', 'data.workers', '0',
    'train.print_freq', '100', 'test.eval_freq', '1', 'data.val_ids', '90',
    'train.max_epoch', '2', 'train.dist_timeout', '30',
]
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
            '--nproc_per_node=2']


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def launch_by_hand(args, world=2, **popen):
    """Starts ``world`` processes of ``python ARGS`` with torchrun's
    variables set by hand: no torchrun agent watches them (as on a cluster
    whose scheduler starts one process per GPU)."""
    port = str(free_port())
    return [subprocess.Popen(
        [sys.executable] + args, cwd=ROOT, env=dict(
            ENV, MASTER_ADDR='127.0.0.1', MASTER_PORT=port,
            WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank)),
        **popen) for rank in range(world)]


def main_args(root, save_dir, *extra):
    return ['--config-file', osp.join(ROOT, 'configs', 'pmm_demo.yaml'),
            '--root', root, 'data.save_dir', save_dir] + SMALL + list(extra)


def torchrun(args, **popen):
    return subprocess.Popen(TORCHRUN + args, cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)


def finish(proc, timeout=240):
    out = proc.communicate(timeout=timeout)[0]
    return proc.returncode, out


def final_metrics(text):
    return re.findall(r'mAP: ([\d.]+)%.*?Rank-1\s*: ([\d.]+)%', text, re.S)[-1]


@pytest.fixture(scope='module')
def runs(synthetic_root, tmp_path_factory):
    """At once: (a) an uninterrupted 2-process, 2-epoch run under torchrun
    that records every rank's batches and final weights; (b) the same run
    started by hand (no torchrun agent to clean up), whose rank 1 kills
    itself with SIGKILL at epoch 2, iteration 2; (c) a run started by hand
    whose rank 1 gets a NaN classifier bias at the start of epoch 1."""
    base = tmp_path_factory.mktemp('ddp')
    straight, killed = str(base / 'straight'), str(base / 'killed')
    record, marker = str(base / 'record'), str(base / 'killed.marker')
    diverged = str(base / 'diverged')
    proc = torchrun([DRIVER, 'record', record, '--'] +
                    main_args(synthetic_root, straight))
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victims = launch_by_hand([DRIVER, 'sigkill_at:2:2:1', marker, '--'] +
                             main_args(synthetic_root, killed), **pipes)
    nans = launch_by_hand([DRIVER, 'nan_at_epoch:1:1', str(base / 'unused'),
                           '--'] + main_args(synthetic_root, diverged),
                          **pipes)
    try:
        outs = [p.communicate(timeout=240) for p in victims]
        ended = time.time()
        nan_outs = [p.communicate(timeout=240) for p in nans]
        code, out = finish(proc)
    finally:  # nothing is left running, whatever happened
        for p in victims + nans + [proc]:
            if p.poll() is None:
                p.kill()
    assert code == 0, out[-4000:]
    return dict(root=synthetic_root, straight=straight, out=out,
                record=record, killed=killed, marker=marker,
                victims=[(p.returncode, o, e) for p, (o, e) in
                         zip(victims, outs)], ended=ended, diverged=diverged,
                nans=[(p.returncode, e) for p, (_, e) in zip(nans, nan_outs)])


def test_two_processes_train_one_model_and_write_once(runs):
    straight = runs['straight']
    recs = [json.load(open(osp.join(runs['record'], 'rank{}.json'.format(r))))
            for r in range(2)]
    # the same weights and BatchNorm statistics on both ranks at the end
    assert recs[0]['state_sha256'] == recs[1]['state_sha256']
    # the same steps on both ranks, with disjoint whole identities
    steps = [[tuple(s[:2]) for s in rec['steps']] for rec in recs]
    assert steps[0] == steps[1] and {e for e, _ in steps[0]} == {0, 1}
    for a, b in zip(recs[0]['steps'], recs[1]['steps']):
        assert len(a[2]) == len(b[2]) == 2 and not set(a[2]) & set(b[2])
    # rank 0 alone evaluated and wrote: one set of files
    assert recs[1]['results'] == {} and recs[0]['results']
    assert sorted(os.listdir(osp.join(straight, 'model'))) == [
        'model.pth.tar-1', 'model.pth.tar-2']
    names = os.listdir(straight)
    assert len([n for n in names if n.startswith('train.log-')]) == 1
    assert len([n for n in names if n.startswith('events.out')]) == 1
    with open(osp.join(straight, 'curves.csv')) as f:
        lines = [line.split(',') for line in f.read().splitlines()]
    assert [line[1:3] for line in lines[1:]] == [
        ['train', '1'], ['test', '1'], ['train', '2'], ['test', '2']]
    # an epoch's mean loss is over both ranks' steps, not rank 0's alone
    loss = float(lines[1][lines[0].index('loss')])
    means = [sum(s[3] for s in rec['steps'] if s[0] == 0) /
             sum(1 for s in rec['steps'] if s[0] == 0) for rec in recs]
    assert loss == pytest.approx(sum(means) / 2, rel=1e-5)
    assert abs(means[0] - means[1]) > 1e-3  # the ranks' batches differ
    results = json.load(open(osp.join(straight, 'results.json')))
    assert results['world_size'] == 2 and results['batch_size'] == 16
    ckpt = load_checkpoint(osp.join(straight, 'model', 'model.pth.tar-2'))
    assert ckpt['world_size'] == 2 and len(ckpt['rank_states']) == 2
    assert not any(k.startswith('module.') for k in ckpt['state_dict'])
    assert '8 of the global batch of 16 images per rank' in runs['out']


def test_rank0_evaluation_equals_a_single_process_evaluation(runs, tmp_path):
    weights = osp.join(runs['straight'], 'model', 'model.pth.tar-2')
    proc = subprocess.run(
        [sys.executable, osp.join('scripts', 'main.py')] + main_args(
            runs['root'], str(tmp_path / 'eval'), 'test.evaluate', 'True',
            'model.load_weights', weights),
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert final_metrics(proc.stdout) == final_metrics(runs['out'])
    results = json.load(open(osp.join(runs['record'], 'rank0.json')))
    assert results['results']['pmm_synthetic']['epoch'] == 2


def test_a_killed_rank_stops_the_other_with_a_clear_message(runs):
    (code0, out0, err0), (code1, _, _) = runs['victims']
    assert code1 == -9  # SIGKILL
    with open(runs['marker']) as f:
        killed_at = float(f.read())
    assert runs['ended'] - killed_at < 60  # no hang
    assert code0 != 0
    last = osp.join(runs['killed'], 'model', 'model.pth.tar-1')
    assert ('LostRankError: rank 0 of 2 stopped at epoch 2, iteration 2: it '
            'lost contact with another rank') in err0, err0[-3000:]
    assert 'train.dist_timeout = 30 s' in err0
    assert 'the last checkpoint is "{}"'.format(last) in err0
    # the last checkpoint is whole, and the one the uninterrupted run wrote
    assert sorted(os.listdir(osp.dirname(last))) == ['model.pth.tar-1']
    assert_same_checkpoints(
        load_checkpoint(last),
        load_checkpoint(osp.join(runs['straight'], 'model',
                                 'model.pth.tar-1')))


def test_resuming_two_processes_continues_exactly(runs):
    # the killed run's checkpoint, resumed with torchrun and scripts/main.py
    killed = runs['killed']
    code, out = finish(torchrun(
        [osp.join('scripts', 'main.py')] + main_args(
            runs['root'], killed, 'model.resume',
            osp.join(killed, 'model', 'model.pth.tar-1'))))
    assert code == 0, out[-4000:]
    assert 'Restoring the random-number states of each of the 2 ranks' in out
    a = load_checkpoint(osp.join(killed, 'model', 'model.pth.tar-2'))
    b = load_checkpoint(osp.join(runs['straight'], 'model', 'model.pth.tar-2'))
    assert_same_checkpoints(a, b)
    for ra, rb in zip(a['rank_states'], b['rank_states']):
        assert torch.equal(ra['pmm_generator'], rb['pmm_generator'])
        assert torch.equal(ra['rng_state']['torch'], rb['rng_state']['torch'])
    assert final_metrics(out) == final_metrics(runs['out'])


def test_a_non_finite_loss_on_one_rank_stops_both(runs):
    message = ('FloatingPointError: rank 1 of 2: stage 1 loss is not finite')
    # both ranks stop, at the same step, with the same message
    for code, err in runs['nans']:
        assert code == 1
        assert message in err, err[-3000:]
        assert 'at epoch 1, iteration 1 (every rank stops)' in err
    assert not osp.exists(osp.join(runs['diverged'], 'model'))


@pytest.mark.slow
def test_a_hung_rank_stops_the_other_within_the_timeout(synthetic_root,
                                                         tmp_path):
    # rank 1 sleeps at the start of epoch 1, iteration 2 (after one step
    # taken together); rank 0 waits in that step's gradient all-reduce and
    # must give up after train.dist_timeout, not wait for rank 1 forever
    timeout = 8
    marker = str(tmp_path / 'hung.marker')
    procs = launch_by_hand(
        [DRIVER, 'hang_at:1:2:1', marker, '--'] +
        main_args(synthetic_root, str(tmp_path / 'hung'),
                  'train.dist_timeout', str(timeout)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err0 = procs[0].communicate(timeout=240)
        ended = time.time()
        still_hung = procs[1].poll() is None
    finally:  # the hung rank sleeps for 10 minutes: end it
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    with open(marker) as f:
        hung_at = float(f.read())
    assert still_hung  # rank 0 stopped on its own, not because rank 1 ended
    assert procs[0].returncode not in (0, None)
    # the wait lasted the configured timeout: not less, and not much more
    assert timeout - 2 <= ended - hung_at < timeout + 25, ended - hung_at
    assert ('LostRankError: rank 0 of 2 stopped at epoch 1, iteration 2: it '
            'lost contact with another rank, which died, was killed or did '
            'not answer within train.dist_timeout = {} s'.format(timeout)
            ) in err0, err0[-3000:]
    assert 'the last checkpoint is none (none was saved yet)' in err0
