#!/usr/bin/env python
"""Run (model, mix) settings with one recipe and the same seeds; tabulate them.

Every run is ``scripts/main.py`` (the same code path as a user's run) in a
child process, with the recipe's config file and overrides, and its own
``data.save_dir``: ``<out>/<setting>/split<K>/seed<S>/``.  A run is finished
when its ``results.json`` exists; rerunning the same command skips finished
runs (and resumes an interrupted one from its last checkpoint, if it saved
one).  After every run the script rewrites, atomically:

- ``<out>/results.json`` and ``<out>/results.csv``: one record per run;
- ``<out>/table.md``: Rank-1 and mAP per setting, mean +- std over seeds,
  per split and over all runs, and the training time per run (the shape of
  the PMM paper's Table 3).

A setting is ``MODEL[:MIX][,KEY=VALUE...]``: ``pmm_osnet_x0_25:hard_mix``,
``bdb_osnet_x0_25`` (BDB trains with ``pmm.mix none``, and so do the
comparison systems ``fmn_*`` and ``magnifiernet_*``), ``osnet_x0_25``
(a torchreid model: torchreid's triplet engine, ``loss.name triplet``), or
``pmm_resnet18:hard_mix,model.pretrained=False``.

Examples::

    python scripts/ablation.py --config-file configs/ablation_cuhk01.yaml \\
        --root reid-data --out log/ablation_cuhk01 --seeds 1 2 3 --splits 0 \\
        --settings osnet_x0_25 bdb_osnet_x0_25 pmm_osnet_x0_25:hard_mix \\
        pmm_osnet_x0_25:none pmm_osnet_x0_25:cutout pmm_osnet_x0_25:cutmix
"""
import argparse
import csv
import difflib
import glob
import io
import json
import os
import os.path as osp
import re
import signal
import statistics
import subprocess
import sys
import time
from collections import OrderedDict

try:
    import pmm_torchreid  # noqa: F401  (installed: pip install -e .)
except ImportError:  # run from a source tree that is not installed
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from pmm_torchreid import checks, config as C  # noqa: E402
from pmm_torchreid.checkpoint import atomic_write  # noqa: E402
from pmm_torchreid.launch import read_results  # noqa: E402

#: the launcher every run goes through (a user's own run is the same command)
MAIN = osp.join(osp.dirname(osp.abspath(__file__)), 'main.py')

CSV_FIELDS = [
    'setting', 'split_id', 'seed', 'status', 'rank1', 'mAP', 'epoch',
    'train_seconds', 'run_seconds', 'wall_seconds', 'model', 'mix', 'save_dir'
]


class Setting(object):
    """One row of the table: a model, its mix and extra overrides."""

    def __init__(self, spec: str):
        self.spec = spec
        head, *extras = spec.split(',')
        model, _, mix = head.partition(':')
        if not model:
            raise ValueError('setting {!r}: expected MODEL[:MIX][,KEY=VALUE'
                             '...]'.format(spec))
        self.model, self.mix = model, mix or None
        self.overrides = []
        for extra in extras:
            key, eq, value = extra.partition('=')
            if not eq or not key:
                raise ValueError('setting {!r}: {!r} is not KEY=VALUE'.format(
                    spec, extra))
            self.overrides += [key, value]
        if C.takes_no_mix(model) and self.mix not in (None, 'none'):
            raise ValueError('setting {!r}: a BDB, FMN or MagnifierNet model '
                             'takes no mix (it has its own mechanism)'.format(
                                 spec))
        if not C.uses_pmm_engine(model) and self.mix is not None:
            raise ValueError('setting {!r}: {!r} is a torchreid model, trained '
                             'by torchreid\'s triplet engine; it takes no '
                             'mix'.format(spec, model))

    @property
    def slug(self) -> str:
        return re.sub(r'[^A-Za-z0-9_.=-]+', '_', self.spec.replace(':', '-'))

    def options(self):
        """KEY VALUE pairs for scripts/main.py."""
        opts = ['model.name', self.model]
        if C.takes_no_mix(self.model):
            opts += ['loss.name', 'pmm', 'pmm.mix', 'none']
        elif C.uses_pmm_engine(self.model):
            opts += ['loss.name', 'pmm']
            if self.mix:
                opts += ['pmm.mix', self.mix]
        else:
            opts += ['loss.name', 'triplet']
        return opts + self.overrides


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--config-file', required=True,
                        help='the shared recipe (yaml)')
    parser.add_argument('--root', default='', help='path to data root')
    parser.add_argument('--out', required=True, help='output folder')
    parser.add_argument('--settings', nargs='+', required=True,
                        help='MODEL[:MIX][,KEY=VALUE...] (see above)')
    parser.add_argument('--seeds', type=int, nargs='+', default=[1, 2, 3])
    parser.add_argument('--splits', type=int, nargs='+', default=[0],
                        help='data.split_id values')
    parser.add_argument('--jobs', type=int, default=1,
                        help='runs at the same time')
    parser.add_argument('--threads', type=int, default=0,
                        help='torch threads per run (OMP_NUM_THREADS); 0: '
                        'leave the default')
    parser.add_argument('--reference', default='',
                        help='the setting the paired differences are taken '
                        'against (default: the first)')
    parser.add_argument('--dry-run', action='store_true',
                        help='print the commands, run nothing')
    parser.add_argument('--table-only', action='store_true',
                        help='run nothing: rewrite table.md, results.json and '
                        'results.csv from the finished runs of --settings in '
                        '--out (also when the recipe check would refuse the '
                        'folder, e.g. for another --reference)')
    parser.add_argument('opts', nargs=argparse.REMAINDER,
                        help='KEY VALUE overrides for every run')
    return parser


# --------------------------------------------------------------------------
# the runs
# --------------------------------------------------------------------------
def run_dir(out, setting, split, seed):
    return osp.join(out, setting.slug, 'split{}'.format(split),
                    'seed{}'.format(seed))


def last_checkpoint(save_dir):
    found = []
    for path in glob.glob(osp.join(save_dir, 'model', 'model.pth.tar-*')):
        tail = path.rsplit('-', 1)[-1]
        if tail.isdigit():
            found.append((int(tail), path))
    return max(found)[1] if found else None


def command(args, setting, split, seed, save_dir):
    cmd = [sys.executable, MAIN,
           '--config-file', args.config_file]
    if args.root:
        cmd += ['--root', args.root]
    cmd += setting.options()
    cmd += ['train.seed', str(seed), 'data.split_id', str(split),
            'data.save_dir', save_dir]
    cmd += list(args.opts)
    resume = last_checkpoint(save_dir)
    if resume:
        cmd += ['model.resume', resume]
    return cmd


def _exit_with_parent():  # Linux: the child dies when the runner dies
    try:
        import ctypes
        ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)
    except Exception:
        pass


def start(cmd, save_dir, threads):
    os.makedirs(save_dir, exist_ok=True)
    env = dict(os.environ)
    if threads > 0:
        env['OMP_NUM_THREADS'] = env['MKL_NUM_THREADS'] = str(threads)
    log = open(osp.join(save_dir, 'console.log'), 'ab')
    log.write('\n$ {}\n'.format(' '.join(cmd)).encode())
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env=env, preexec_fn=_exit_with_parent)
    return proc, log


def tail(path, lines=15):
    try:
        with open(path, 'rb') as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 8000))
            text = f.read().decode('utf-8', 'replace')
    except OSError:
        return ''
    return '\n'.join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------
def read_record(setting, split, seed, save_dir, status=None):
    record = OrderedDict(setting=setting.spec, split_id=split, seed=seed,
                         status=status or 'missing', save_dir=save_dir)
    res = read_results(save_dir)
    if res is not None:
        target = next(iter(res['results'].values()), None)
        record.update(status='done', model=res['model'], mix=res['mix'],
                      train_seconds=res['train_seconds'],
                      run_seconds=res['run_seconds'])
        if target is not None:
            record.update(rank1=target['rank1'], mAP=target['mAP'],
                          epoch=target['epoch'])
        record['wall_seconds'] = res.get('wall_seconds')
    return record


def mean_std(values):
    if not values:
        return '-'
    if len(values) == 1:
        return '{:.1f} (1)'.format(values[0])
    return '{:.1f} ± {:.1f} ({})'.format(statistics.mean(values),
                                        statistics.stdev(values), len(values))


def table(records, settings, splits):
    """Markdown: one row per setting; Rank-1 and mAP per split and overall."""
    head = ['setting']
    for split in splits:
        head += ['split {} R1'.format(split), 'split {} mAP'.format(split)]
    if len(splits) > 1:
        head += ['all R1', 'all mAP']
    head += ['train min/run']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for setting in settings:
        mine = [r for r in records
                if r['setting'] == setting.spec and r['status'] == 'done']
        row = [setting.spec]
        groups = [[r for r in mine if r['split_id'] == s] for s in splits]
        if len(splits) > 1:
            groups.append(mine)
        for group in groups:
            row += [mean_std([r['rank1'] for r in group if 'rank1' in r]),
                    mean_std([r['mAP'] for r in group if 'mAP' in r])]
        times = [r['train_seconds'] / 60 for r in mine]
        row.append('{:.1f}'.format(statistics.mean(times)) if times else '-')
        lines.append('| ' + ' | '.join(row) + ' |')
    return '\n'.join(lines) + '\n'


def paired_table(records, settings, reference):
    """Markdown: each setting minus ``reference`` on the same (split, seed),
    mean ± std over those pairs: a difference is only worth reading when it
    is large against its own spread."""
    done = {(r['setting'], r['split_id'], r['seed']): r for r in records
            if r['status'] == 'done' and 'mAP' in r}
    lines = ['| setting | Δ R1 vs {0} | Δ mAP vs {0} | mAP Δ range | same '
             'sign in every pair |'.format(reference), '|---|---|---|---|---|']
    for setting in settings:
        if setting.spec == reference:
            continue
        pairs = [(r, done[(reference, r['split_id'], r['seed'])])
                 for key, r in sorted(done.items(), key=lambda kv: kv[0][1:])
                 if key[0] == setting.spec
                 and (reference, key[1], key[2]) in done]
        cells = []
        for metric in ('rank1', 'mAP'):
            diffs = [a[metric] - b[metric] for a, b in pairs]
            if not diffs:
                cells.append('-')
            elif len(diffs) == 1:
                cells.append('{:+.1f} (1)'.format(diffs[0]))
            else:
                cells.append('{:+.1f} ± {:.1f} ({})'.format(
                    statistics.mean(diffs), statistics.stdev(diffs),
                    len(diffs)))
        diffs = [a['mAP'] - b['mAP'] for a, b in pairs]
        if diffs:
            cells.append('{:+.1f} … {:+.1f}'.format(min(diffs), max(diffs)))
            cells.append('yes' if min(diffs) > 0 or max(diffs) < 0 else 'no')
        else:
            cells += ['-', '-']
        lines.append('| {} | {} | {} | {} | {} |'.format(setting.spec, *cells))
    return '\n'.join(lines) + '\n'


def write_outputs(out, records, settings, splits, recipe, reference=None):
    splits = sorted(set(splits) | {r['split_id'] for r in records
                                   if r['status'] == 'done'})
    with atomic_write(osp.join(out, 'results.json'), 'w') as f:
        json.dump({'recipe': recipe, 'runs': records}, f, indent=1)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_FIELDS, extrasaction='ignore')
    writer.writeheader()
    writer.writerows(records)
    with atomic_write(osp.join(out, 'results.csv'), 'w') as f:
        f.write(buf.getvalue())
    text = ('Rank-1 / mAP (%) on {}: mean ± std over seeds (number of '
            'runs).\n\n'.format(', '.join('split {}'.format(s) for s in splits))
            + table(records, settings, splits)
            + '\nDifferences on the same split and seed:\n\n'
            + paired_table(records, settings, reference or settings[0].spec))
    with atomic_write(osp.join(out, 'table.md'), 'w') as f:
        f.write(text)
    return text


def check_recipe(out, recipe):
    """The folder's runs must all share one recipe (else skipping is wrong)."""
    path = osp.join(out, 'recipe.json')
    if osp.isfile(path):
        with open(path) as f:
            old = json.load(f)
        # keys added to the plugin since, at their defaults, do not count
        if old.get('opts') != recipe.get('opts') or C.dump_differences(
                old.get('config', ''), recipe.get('config', '')):
            lines = lambda r: r.get('config', '').splitlines() + [
                'overrides: {}'.format(' '.join(r.get('opts', [])))]
            diff = [line for line in difflib.unified_diff(
                lines(old), lines(recipe), 'there', 'now', n=0, lineterm='')
                if not line.startswith('@@')]
            raise SystemExit(
                'error: "{}" holds runs of another recipe; use another --out, '
                'or delete that folder. Differences:\n{}'.format(
                    out, '\n'.join(diff[:40])))
        return
    os.makedirs(out, exist_ok=True)
    with atomic_write(path, 'w') as f:
        json.dump(recipe, f, indent=1)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.opts and args.opts[0] == '--':
        args.opts = args.opts[1:]
    if len(args.opts) % 2:
        raise SystemExit('error: overrides must be KEY VALUE pairs, got '
                         '{}'.format(args.opts))
    if args.jobs < 1:
        raise SystemExit('error: --jobs must be >= 1, got {}'.format(
            args.jobs))
    try:
        settings = [Setting(spec) for spec in args.settings]
    except ValueError as error:
        raise SystemExit('error: {}'.format(error))
    if args.reference and args.reference not in args.settings:
        raise SystemExit('error: --reference {!r} is not one of --settings '
                         '{}'.format(args.reference, args.settings))
    # the whole plan is validated before any run starts
    for setting in settings:
        cfg = C.get_default_config()
        try:
            C.merge_file(cfg, args.config_file)
            C.merge_list(cfg, setting.options() + list(args.opts))
            checks.check_config(cfg)
        except (ValueError, KeyError, OSError) as error:
            raise SystemExit('error: setting {!r}: {}'.format(setting.spec,
                                                             error))
    # the recipe is the merged values (comments and key order do not count)
    cfg = C.get_default_config()
    C.merge_file(cfg, args.config_file)
    C.merge_list(cfg, list(args.opts))
    recipe = {'config': cfg.dump(), 'opts': list(args.opts)}

    plan = [(setting, split, seed) for split in args.splits
            for seed in args.seeds for setting in settings]
    if args.dry_run:
        for setting, split, seed in plan:
            save_dir = run_dir(args.out, setting, split, seed)
            print(' '.join(command(args, setting, split, seed, save_dir)))
        return 0
    if args.table_only:  # the folder's own recipe, not re-checked
        path = osp.join(args.out, 'recipe.json')
        if osp.isfile(path):
            with open(path) as f:
                recipe = json.load(f)
    else:
        check_recipe(args.out, recipe)

    status = {}
    todo = []
    for setting, split, seed in plan:
        save_dir = run_dir(args.out, setting, split, seed)
        if osp.isfile(osp.join(save_dir, 'results.json')):
            status[save_dir] = 'done'
            print('skip (finished): {} split {} seed {}'.format(
                setting.spec, split, seed))
        else:
            todo.append((setting, split, seed, save_dir))

    def records():
        """The planned runs, then the finished runs of the same settings
        that earlier commands left in ``--out`` (other seeds or splits)."""
        found = list(plan)
        for setting in settings:
            pattern = osp.join(args.out, setting.slug, 'split*', 'seed*',
                               'results.json')
            for path in sorted(glob.glob(pattern)):
                parts = path.split(os.sep)
                split, seed = parts[-3][5:], parts[-2][4:]
                if split.isdigit() and seed.isdigit() and \
                        (setting, int(split), int(seed)) not in found:
                    found.append((setting, int(split), int(seed)))
        return [read_record(s, sp, sd, run_dir(args.out, s, sp, sd),
                            status.get(run_dir(args.out, s, sp, sd)))
                for s, sp, sd in found]

    if args.table_only:
        print(write_outputs(args.out, records(), settings, args.splits,
                            recipe, args.reference))
        return 0
    running = {}
    failed = 0
    try:
        while todo or running:
            while todo and len(running) < args.jobs:
                setting, split, seed, save_dir = todo.pop(0)
                cmd = command(args, setting, split, seed, save_dir)
                print('start: {} split {} seed {} -> {}'.format(
                    setting.spec, split, seed, save_dir), flush=True)
                proc, log = start(cmd, save_dir, args.threads)
                running[proc] = (setting, split, seed, save_dir, log,
                                 time.time())
            time.sleep(0.5)
            for proc in [p for p in running if p.poll() is not None]:
                setting, split, seed, save_dir, log, began = running.pop(proc)
                log.close()
                wall = time.time() - began
                done = proc.returncode == 0 and osp.isfile(
                    osp.join(save_dir, 'results.json'))
                if done:
                    status[save_dir] = 'done'
                    print('done: {} split {} seed {} in {:.0f} s'.format(
                        setting.spec, split, seed, wall), flush=True)
                else:
                    failed += 1
                    status[save_dir] = 'failed'
                    print('FAILED (exit {}): {} split {} seed {}; log "{}":\n'
                          '{}'.format(proc.returncode, setting.spec, split,
                                      seed, osp.join(save_dir, 'console.log'),
                                      tail(osp.join(save_dir, 'console.log'))),
                          flush=True)
                write_outputs(args.out, records(), settings, args.splits,
                              recipe, args.reference)
    except KeyboardInterrupt:
        for proc in running:
            proc.terminate()
        for proc in running:
            proc.wait()
        print('interrupted; rerun the same command to go on')
        write_outputs(args.out, records(), settings, args.splits, recipe,
                      args.reference)
        return 130
    print(write_outputs(args.out, records(), settings, args.splits, recipe,
                        args.reference))
    print('results in "{}" (table.md, results.json, results.csv)'.format(
        args.out))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
