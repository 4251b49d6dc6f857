"""scripts/ablation.py end to end on the synthetic data: two tiny settings,
killed after the first run and rerun (finished runs are skipped), the table
and the raw results."""
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from helpers import CONFIG, ENV, ROOT, SMALL, in_process

MAIN = os.path.join(ROOT, 'scripts', 'main.py')

SETTINGS = ['pmm_resnet18:cutmix', 'osnet_x0_25']
TINY = ['model.pretrained', 'False'] + SMALL + [
    'train.max_epoch', '1', 'train.warmup_epochs', '0', 'train.stepsize', '[1]',
    'test.eval_freq', '-1', 'loss.triplet.weight_x', '1.0',
]


def ablation_cmd(root, out, *extra):
    return [sys.executable, os.path.join(ROOT, 'scripts', 'ablation.py'),
            '--config-file', os.path.join(ROOT, 'configs', 'pmm_demo.yaml'),
            '--root', root, '--out', out, '--seeds', '1', '--splits', '0',
            '--settings'] + SETTINGS + list(extra) + ['--'] + TINY


def run_dir(out, slug):
    return os.path.join(out, slug, 'split0', 'seed1')


def children_of(out):
    """Processes whose command line names the output folder (the runs)."""
    found = []
    for pid in os.listdir('/proc'):
        if not pid.isdigit():
            continue
        try:
            with open('/proc/{}/cmdline'.format(pid), 'rb') as f:
                cmdline = f.read().decode('utf-8', 'replace')
        except OSError:
            continue
        if 'main.py' in cmdline and out in cmdline:
            found.append(int(pid))
    return found


def run_ablation(argv):
    """scripts/ablation.py's main in this process (its runs are children)."""
    from pmm_torchreid.cli.ablation import main
    return in_process(main, argv, main_script=MAIN)


@pytest.fixture(scope='module')
def killed_then_rerun(synthetic_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('ablation'))
    first = run_dir(out, 'pmm_resnet18-cutmix')
    second = run_dir(out, 'osnet_x0_25')
    # 1) kill the runner as soon as its first run has finished
    runner = subprocess.Popen(ablation_cmd(synthetic_root, out), cwd=ROOT, env=ENV,
                              stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    deadline = time.time() + 400
    while not os.path.exists(os.path.join(first, 'results.json')):
        assert runner.poll() is None, runner.stdout.read().decode()[-3000:]
        assert time.time() < deadline, 'first run did not finish'
        time.sleep(0.2)
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    killed_log = runner.stdout.read().decode()
    for _ in range(100):  # the running child follows its parent
        if not children_of(out):
            break
        time.sleep(0.1)
    orphans = children_of(out)
    second_done_when_killed = os.path.exists(
        os.path.join(second, 'results.json'))
    # 2) rerun: the finished run is skipped, the other one runs (a child
    # process: the runner forks its run, which a test worker's threads make
    # unsafe); 3) once more: nothing left to do (in this process)
    rerun = subprocess.run(ablation_cmd(synthetic_root, out), cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=400)
    again = run_ablation(ablation_cmd(synthetic_root, out)[2:])
    return dict(out=out, first=first, second=second, killed_log=killed_log,
                orphans=orphans, rerun=rerun, again=again,
                second_done_when_killed=second_done_when_killed)


@pytest.mark.slow
def test_killed_runner_leaves_no_run_behind(killed_then_rerun):
    r = killed_then_rerun
    assert r['orphans'] == []
    assert 'start: pmm_resnet18:cutmix' in r['killed_log']
    assert not r['second_done_when_killed']


@pytest.mark.slow
def test_rerun_skips_finished_runs_and_does_the_rest(killed_then_rerun):
    r = killed_then_rerun
    rerun, again = r['rerun'], r['again']
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert 'skip (finished): pmm_resnet18:cutmix split 0 seed 1' in \
        rerun.stdout
    assert 'start: pmm_resnet18:cutmix' not in rerun.stdout
    assert 'start: osnet_x0_25 split 0 seed 1' in rerun.stdout
    assert again.returncode == 0
    assert 'start:' not in again.stdout
    assert again.stdout.count('skip (finished)') == 2
    # one training log per run: nothing was trained twice
    for folder in (r['first'], r['second']):
        logs = [f for f in os.listdir(folder) if f.startswith('train.log')]
        assert len(logs) == 1, (folder, logs)


@pytest.mark.slow
def test_raw_results_and_table(killed_then_rerun):
    r = killed_then_rerun
    with open(os.path.join(r['out'], 'results.json')) as f:
        data = json.load(f)
    runs = data['runs']
    assert [(x['setting'], x['status']) for x in runs] == [
        (s, 'done') for s in SETTINGS]
    for run in runs:
        assert 0 <= run['rank1'] <= 100 and 0 <= run['mAP'] <= 100
        assert run['epoch'] == 1 and run['train_seconds'] > 0
        assert run['wall_seconds'] >= run['run_seconds'] > 0
        # the per-run record written by scripts/main.py agrees
        with open(os.path.join(run['save_dir'], 'results.json')) as f:
            own = json.load(f)
        assert own['results']['pmm_synthetic']['mAP'] == run['mAP']
        assert own['seed'] == 1 and own['split_id'] == 0
    assert runs[0]['model'] == 'pmm_resnet18' and runs[0]['mix'] == 'cutmix'
    assert runs[1]['model'] == 'osnet_x0_25' and runs[1]['mix'] is None
    with open(os.path.join(r['out'], 'results.csv')) as f:
        rows = list(csv.DictReader(f))
    assert [row['setting'] for row in rows] == SETTINGS
    assert float(rows[0]['mAP']) == pytest.approx(runs[0]['mAP'])
    # each row says what its run was evaluated on (SMALL holds 90 out)
    assert [(row['evaluated_on'], row['val_ids']) for row in rows] == [
        ('validation', '90')] * 2
    with open(os.path.join(r['out'], 'table.md')) as f:
        table = f.read()
    lines = [l for l in table.splitlines() if l.startswith('|')]
    assert lines[0] == ('| setting | split 0 R1 | split 0 mAP | '
                        'train min/run | params at inference (M) | '
                        'descriptor |')
    for line, run in zip(lines[2:], runs):
        cells = [c.strip() for c in line.strip('|').split('|')]
        assert cells[0] == run['setting']
        assert cells[1] == '{:.1f} (1)'.format(run['rank1'])
        assert cells[2] == '{:.1f} (1)'.format(run['mAP'])
    # the paired differences against the first setting
    paired = lines[lines.index('| setting | Δ R1 vs {0} | Δ mAP vs {0} | mAP '
                               'Δ range | same sign in every pair | Δ mAP per '
                               'split (mean over seeds) | Δ mAP over splits, '
                               '95 % interval |'.format(SETTINGS[0])) + 2]
    diff = runs[1]['mAP'] - runs[0]['mAP']
    assert paired == '| {} | {:+.1f} (1) | {:+.1f} (1) | {:+.1f} … {:+.1f} ' \
        '| {} | 0: {:+.1f} | - |'.format(
            SETTINGS[1], runs[1]['rank1'] - runs[0]['rank1'], diff, diff, diff,
            'no' if diff == 0 else 'yes', diff)  # one split: no interval


@pytest.mark.slow
def test_other_recipe_in_the_same_folder_is_refused(killed_then_rerun,
                                                    synthetic_root):
    out = killed_then_rerun['out']
    before = sorted(os.listdir(out))
    with pytest.raises(SystemExit) as info:
        run_ablation(ablation_cmd(synthetic_root, out)[2:-len(TINY)] + TINY[:-2] +
                   ['loss.triplet.weight_x', '0.5'])
    message = str(info.value)
    assert 'holds runs of another recipe' in message
    assert '+overrides: ' in message and 'weight_x 0.5' in message
    assert sorted(os.listdir(out)) == before  # nothing started


@pytest.mark.slow
def test_other_data_in_the_same_folder_is_refused(killed_then_rerun,
                                                  synthetic_root, tmp_path):
    """The recipe does not hold the data root: data.json does. A copy of the
    data under another root goes on (nothing left to run); the same
    command on a root with one training image less is refused."""
    import shutil  # lazy: only this test copies a dataset

    out = killed_then_rerun['out']
    with open(os.path.join(out, 'data.json')) as f:
        record = f.read()
    assert json.loads(record)['splits']['0']['parts'][
        'pmm_synthetic/train']['images'] > 0
    copy = str(tmp_path / 'copy')
    shutil.copytree(os.path.join(synthetic_root, 'pmm_synthetic'),
                    os.path.join(copy, 'pmm_synthetic'))
    args = ablation_cmd(copy, out)[2:]
    again = run_ablation(args)
    assert again.returncode == 0 and again.stdout.count('skip (finished)') == 2
    train = os.path.join(copy, 'pmm_synthetic', 'train')
    os.remove(os.path.join(train, sorted(os.listdir(train))[0]))
    before = sorted(os.listdir(out))
    with pytest.raises(SystemExit, match=re.escape(
            'that read other data than the data root "{}"'.format(copy))):
        run_ablation(args)
    assert sorted(os.listdir(out)) == before  # nothing started
    with open(os.path.join(out, 'data.json')) as f:
        assert f.read() == record  # nor rewritten


def test_bad_setting_is_refused_before_any_run(tmp_path, capsys):
    from pmm_torchreid.cli.ablation import main
    for setting, message in [
            ('bdb_resnet18:hard_mix', 'takes no mix'),
            ('osnet_x0_25:cutmix', "torchreid's triplet engine"),
            ('pmm_resnet18:mixup', "pmm.mix = 'mixup'"),
            ('pmm_resnet18,model.pretrained', 'is not KEY=VALUE')]:
        with pytest.raises(SystemExit) as info:
            main(['--config-file', CONFIG, '--out', str(tmp_path / 'x'),
                  '--settings', setting], main_script=MAIN)
        assert message in str(info.value), (setting, info.value)
        assert not (tmp_path / 'x').exists()
