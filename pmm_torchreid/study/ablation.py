"""The ablation runner: (model, mix) settings trained with one recipe and the
same seeds, then tabulated (scripts/ablation.py).

Every run is ``scripts/main.py`` (the same code path as a user's run) in a
child process, with the recipe's config file and overrides, and its own
``data.save_dir``: ``<out>/<setting>/split<K>/seed<S>/``.  A run is finished
when its ``results.json`` exists; running the same plan again skips finished
runs (and resumes an interrupted one from its last checkpoint, if it saved
one).  A folder holds the runs of one recipe and one data: ``<out>/recipe.json``
(the merged config and the overrides) and ``<out>/data.json`` (per split, each
dataset's train, query and gallery images counted and digested, so that other
images are refused; a copy of the same images under another root is not) are
written by the first command that plans runs there, and compared (and, for a
new split, extended) by every later one.  After every run the runner
rewrites, atomically:

- ``<out>/results.json`` and ``<out>/results.csv``: one record per run;
- ``<out>/table.md``: Rank-1 and mAP per setting, mean +- std over seeds,
  per split and over all runs, the training time per run (the shape of
  the PMM paper's Table 3), and the setting's parameters at inference and
  descriptor size; then each setting's paired differences against a
  reference setting.

The parameters at inference (those the eval-mode descriptor depends on,
:func:`pmm_torchreid.models.capacity.inference_capacity`) and the descriptor
size are measured once per setting on a network built from the recipe and
the setting (untrained, at ``data.height x data.width``), not read from the
runs, so a folder written before they existed gets them too.

A setting is ``MODEL[:MIX][,KEY=VALUE...]`` (:class:`Setting`).
"""
from __future__ import annotations

import csv
import ctypes
import difflib
import glob
import io
import json
import math
import os
import os.path as osp
import re
import signal
import statistics
import subprocess
import sys
import time
from collections import OrderedDict
from typing import IO, Dict, List, Optional, Sequence, Tuple

import torch

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock
    fcntl = None

from pmm_torchreid.config.checks import check_config, check_paths
from pmm_torchreid.config.defaults import get_default_config
from pmm_torchreid.config.files import dump_differences, merge_file, merge_list
from pmm_torchreid.data.check import dataset_items, fingerprint
from pmm_torchreid.launch import build_model, import_user_module, names_a_file, read_results
from pmm_torchreid.models.capacity import InferenceCapacity, inference_capacity
from pmm_torchreid.models.families import takes_no_mix, uses_pmm_engine
from pmm_torchreid.utils.io import atomic_write

__all__ = ['AblationError', 'CSV_FIELDS', 'Setting', 'Ablation', 'run_dir',
           'last_checkpoint', 'command', 'start', 'tail', 'read_record',
           'mean_std', 'table', 'paired_table', 'paired_differences',
           'split_interval', 'T95', 'write_outputs', 'evaluated_on',
           'check_data', 'DATA_FILE', 'data_root',
           'check_settings', 'check_overrides', 'check_splits', 'RUN_KEYS',
           'DATA_KEYS',
           'recipe_of', 'check_recipe', 'setting_capacity', 'capacities']

#: the columns of results.csv; ``inference_params`` and ``descriptor_dim``
#: come from the setting (:func:`setting_capacity`), the same in each of its
#: runs; ``evaluated_on`` (``test`` or ``validation``) and ``val_ids`` (the
#: identities held out) from the run's record
CSV_FIELDS = [
    'setting', 'split_id', 'seed', 'status', 'rank1', 'mAP', 'epoch',
    'train_seconds', 'run_seconds', 'wall_seconds', 'model', 'mix', 'save_dir',
    'inference_params', 'descriptor_dim', 'evaluated_on', 'val_ids'
]


class AblationError(ValueError):
    """A plan the runner refuses before it starts a run (the message is the
    reason, without the ``error: `` that the command line adds)."""


class Setting(object):
    """One row of the table: a model, its mix and extra overrides.

    ``pmm_osnet_x0_25:hard_mix``, ``bdb_osnet_x0_25`` (BDB trains with
    ``pmm.mix none``, and so do the comparison systems ``fmn_*`` and
    ``magnifiernet_*``), ``osnet_x0_25`` (a torchreid model: torchreid's
    triplet engine, ``loss.name triplet``), or
    ``pmm_resnet18:hard_mix,model.pretrained=False``.

    Raises:
        AblationError: the spec is malformed, or gives a mix to a model that
            takes none.
    """

    def __init__(self, spec: str):
        self.spec = spec
        head, *extras = spec.split(',')
        model, _, mix = head.partition(':')
        if not model:
            raise AblationError('setting {!r}: expected MODEL[:MIX][,KEY=VALUE'
                                '...]'.format(spec))
        self.model, self.mix = model, mix or None
        self.overrides = []
        for extra in extras:
            key, eq, value = extra.partition('=')
            if not eq or not key:
                raise AblationError('setting {!r}: {!r} is not KEY=VALUE'
                                    .format(spec, extra))
            self.overrides += [key, value]
        if takes_no_mix(model) and self.mix not in (None, 'none'):
            raise AblationError('setting {!r}: a BDB, FMN or MagnifierNet '
                                'model takes no mix (it has its own '
                                'mechanism)'.format(spec))
        if not uses_pmm_engine(model) and self.mix is not None:
            raise AblationError('setting {!r}: {!r} is a torchreid model, '
                                'trained by torchreid\'s triplet engine; it '
                                'takes no mix'.format(spec, model))

    @property
    def slug(self) -> str:
        return re.sub(r'[^A-Za-z0-9_.=-]+', '_', self.spec.replace(':', '-'))

    def options(self) -> List[str]:
        """KEY VALUE pairs for scripts/main.py."""
        opts = ['model.name', self.model]
        if takes_no_mix(self.model):
            opts += ['loss.name', 'pmm', 'pmm.mix', 'none']
        elif uses_pmm_engine(self.model):
            opts += ['loss.name', 'pmm']
            if self.mix:
                opts += ['pmm.mix', self.mix]
        else:
            opts += ['loss.name', 'triplet']
        return opts + self.overrides


# --------------------------------------------------------------------------
# the recipe
# --------------------------------------------------------------------------
def register_user_code(specs: Sequence[str]) -> List[str]:
    """Imports each ``--register`` file or module here (so that the plan's
    configs are checked with the user's datasets) and returns them as the
    runs will take them: files as absolute paths, module names as given.

    Raises:
        AblationError: a file or module that cannot be imported, naming it.
    """
    given = []
    for spec in specs:
        try:
            import_user_module(spec)
        except (ImportError, OSError) as error:
            raise AblationError(str(error).strip('"')) from None
        given.append(osp.abspath(osp.expanduser(spec)) if names_a_file(spec)
                     else spec)
    return given


def check_settings(settings: Sequence[Setting], config_file: str,
                   opts: Sequence[str]) -> None:
    """Every setting's merged config passes :func:`check_config` (the whole
    plan is validated before any run starts).

    Raises:
        AblationError: naming the setting and the reason.
    """
    for setting in settings:
        cfg = get_default_config()
        try:
            merge_file(cfg, config_file)
            merge_list(cfg, setting.options() + list(opts))
            check_config(cfg)
        except (ValueError, KeyError, OSError) as error:
            raise AblationError('setting {!r}: {}'.format(setting.spec, error))


#: keys the runner sets for every run (:func:`command`)
RUN_KEYS = ('train.seed', 'data.split_id', 'data.save_dir', 'model.resume')

#: keys that decide which images the runs read, train on and are evaluated
#: on: the same for every setting of a folder (:func:`check_splits` reads
#: the data once, ``data.json`` records it, the table compares the runs), so
#: a setting may not set them
DATA_KEYS = ('data.root', 'data.sources', 'data.targets', 'data.combineall',
             'data.load_train_targets', 'data.val_ids', 'data.val_seed',
             'data.skip_bad_images', 'cuhk03.labeled_images',
             'cuhk03.classic_split', 'market1501.use_500k_distractors')


def check_overrides(settings: Sequence[Setting], opts: Sequence[str]) -> None:
    """The overrides shared by every run may not set what the runner sets
    per run (:data:`RUN_KEYS`: the seed, the split, the folder, the resume
    checkpoint) nor what a setting sets (``model.name``, ``loss.name``,
    ``pmm.mix``, its own ``KEY=VALUE``): they come after those on the
    command line, so they would win, and the runs would not be what their
    folders and the table say. A setting may set neither the per-run keys
    nor :data:`DATA_KEYS`: every setting of a folder reads the same data,
    checked once (another dataset is another folder;
    ``scripts/compare_studies.py`` sets folders side by side).

    Raises:
        AblationError: naming the key and where to give it instead.
    """
    for setting in settings:
        for key in setting.overrides[0::2]:
            if key in RUN_KEYS:
                raise AblationError(
                    'setting {!r} sets {}; the runner sets it for every run'
                    .format(setting.spec, key))
            if key in DATA_KEYS:
                raise AblationError(
                    'setting {!r} sets {}, which decides the images the runs '
                    'read, train on or are evaluated on; every setting of a '
                    'folder reads the same data: '
                    'give it in the config file or the overrides, and '
                    'another dataset in another --out (compare the folders '
                    'with scripts/compare_studies.py)'.format(setting.spec,
                                                              key))
    keys = list(opts[0::2])
    for key in keys:
        if key in RUN_KEYS:
            raise AblationError(
                'the overrides set {}; the runner sets it for every run{}'
                .format(key, {'train.seed': ' (give --seeds)',
                              'data.split_id': ' (give --splits)'}.get(
                                  key, '')))
        for setting in settings:
            if key in setting.options()[0::2]:
                raise AblationError(
                    'the overrides set {}, which setting {!r} sets for its '
                    'runs; give it in the config file, or in the setting '
                    '(MODEL:MIX, or MODEL,KEY=VALUE)'.format(key, setting.spec))


def check_splits(config_file: str, opts: Sequence[str], root: str,
                 splits: Sequence[int]) -> Dict[str, dict]:
    """Reads every source and target dataset once per split, here, before
    any run: torchreid writes a dataset's split file on first use, and runs
    started together would race to write it. With several splits, each must
    give other training data: a dataset with one split (Market-1501, a
    folder of your own) ignores ``data.split_id``, and its "splits" would be
    copies that the interval over splits takes for independent ones.

    Returns what the runs will read, for :func:`check_data`: ``{split:
    {'root': the data root, 'parts': {'DATASET/PART': fingerprint}}}``
    (train, query and gallery of each dataset,
    :func:`~pmm_torchreid.data.check.fingerprint`).

    Raises:
        AblationError: a dataset cannot be read, an image it lists is
            missing, or two splits give the same training data.
    """
    cfg = merge_file(get_default_config(), config_file)
    if root:  # as scripts/main.py: the file, the root, then the overrides
        cfg.data.root = root
    merge_list(cfg, list(opts))
    sources = list(dict.fromkeys(cfg.data.sources))
    names = list(dict.fromkeys(sources + list(cfg.data.targets)))
    trained = sources + (list(cfg.data.targets) if cfg.data.load_train_targets
                         else [])
    parts = ('train', 'query', 'gallery') if cfg.data.combineall else ('train',)
    seen, found, sizes = {}, OrderedDict(), {}
    for split in dict.fromkeys(splits):
        try:
            check_paths(cfg)
            lists = dataset_items(
                names, cfg.data.root, split,
                cuhk03_labeled=cfg.cuhk03.labeled_images,
                cuhk03_classic_split=cfg.cuhk03.classic_split,
                market1501_500k=cfg.market1501.use_500k_distractors)
            prints = OrderedDict(
                ('{}/{}'.format(name, part), fingerprint(items, sizes))
                for (name, part), items in lists.items())
        except Exception as error:  # torchreid raises many kinds
            raise AblationError('cannot read split {} of {} under "{}": {}: {}'
                                .format(split, ', '.join(map(repr, names)),
                                        cfg.data.root, type(error).__name__,
                                        error)) from None
        train = frozenset(item[0] for name in dict.fromkeys(trained)
                          for part in parts for item in lists[(name, part)])
        if train in seen:
            raise AblationError(
                '--splits {}: {} give{} the same training data for '
                'data.split_id {} and {}: a dataset with one split ignores '
                'data.split_id, and an odd split id of CUHK01 or VIPeR is the '
                'even one before it with the cameras swapped; give splits '
                'that differ (e.g. 0 2 4), or one split and more seeds'.format(
                    ' '.join(map(str, splits)),
                    ', '.join(map(repr, dict.fromkeys(trained))),
                    's' if len(set(trained)) == 1 else '', seen[train], split))
        seen[train] = split
        found[str(split)] = {'root': data_root(cfg.data.root),
                             'parts': prints}
    return found


def data_root(root: str) -> str:
    """The data root as a record names it (absolute)."""
    return osp.abspath(osp.expanduser(root or '.'))


#: the file of a study folder that records what data its runs read, and
#: the file commands lock while they read and write it
DATA_FILE, DATA_LOCK = 'data.json', '.data.lock'


def _read_data_record(path: str) -> dict:
    """``data.json``'s ``{split: {'root': str, 'parts': {name: {'images':
    int, 'digest': str}}}}``; raises :class:`AblationError` on anything
    else."""
    try:
        with open(path) as f:
            record = json.load(f)
        splits = record['splits']
        for entry in splits.values():
            if not isinstance(entry['root'], str):
                raise TypeError('a root is not a text')
            for fp in entry['parts'].values():
                if not (isinstance(fp['images'], int)
                        and isinstance(fp['digest'], str)):
                    raise TypeError('a part is not {images, digest}')
    except (ValueError, KeyError, AttributeError, TypeError) as error:
        raise AblationError(
            '"{}" is not a data record of this runner ({}: {}); move it away '
            'to record the data again (check first that the finished runs '
            'read the data the next command reads)'.format(
                path, type(error).__name__, error)) from None
    return splits


def check_data(out: str, found: Dict[str, dict]) -> None:
    """The folder's runs must all read the same data (the recipe holds the
    config, not what ``--root`` holds): records ``found`` (per split, the
    root and each dataset/part's fingerprint, as :func:`check_splits`
    returns it) in ``<out>/data.json`` when the command plans its runs, and
    compares with it later; a split or a part not recorded yet is added.
    The same data under another root, or through a link, is the same data.
    A folder with finished runs but no record (written before records
    existed) is noted on stderr: the record then starts with this command.

    Commands started together on one folder (other splits, say) take turns
    (a lock on ``<out>/.data.lock``), so that neither loses the other's
    record. A split recorded by an earlier command that left no run of it
    (a wrong ``--root``, stopped at once) is recorded again, with a note.

    Raises:
        AblationError: a split's data differs from what the folder's runs
            read (naming the split, the dataset and part, and the counts).
    """
    os.makedirs(out, exist_ok=True)
    if fcntl is None:  # pragma: no cover - not POSIX
        _check_data(out, found)
        return
    lock = os.open(osp.join(out, DATA_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as error:  # some network file systems lock nothing
            print('note: no lock on "{}" ({}); do not start two commands on '
                  'this folder at once'.format(out, error), file=sys.stderr)
        _check_data(out, found)
    finally:
        os.close(lock)  # and the lock with it


def _check_data(out: str, found: Dict[str, dict]) -> None:
    path = osp.join(out, DATA_FILE)
    if osp.isfile(path):
        record = _read_data_record(path)
    else:
        record = {}
        done = glob.glob(osp.join(glob.escape(out), '*', 'split*', 'seed*',
                                  'results.json'))
        if done:
            print('note: "{}" holds {} finished run{} but no {}: it records '
                  'the data of this command from now on; check that those '
                  'runs read the same data'.format(
                      out, len(done), 's' if len(done) > 1 else '',
                      DATA_FILE), file=sys.stderr)
    changed = not record
    for split, entry in found.items():
        there = record.setdefault(split, {'root': entry['root'], 'parts': {}})
        differ = ['{}: {} images (digest {}) there, {} now (digest {}){}'
                  .format(part, there['parts'][part]['images'],
                          there['parts'][part]['digest'], fp['images'],
                          fp['digest'],
                          '; the same count, other files, labels or sizes'
                          if there['parts'][part]['images'] == fp['images']
                          else '')
                  for part, fp in entry['parts'].items()
                  if part in there['parts'] and there['parts'][part] != fp]
        if differ and not glob.glob(osp.join(glob.escape(out), '*',
                                             'split{}'.format(split))):
            print('note: "{}" recorded other data for split {} (from the '
                  'root "{}") but holds no run of it: recorded again from '
                  '"{}"'.format(path, split, there['root'], entry['root']),
                  file=sys.stderr)
            there = record[split] = {'root': entry['root'], 'parts': {}}
            changed, differ = True, []
        if differ:
            raise AblationError(
                '"{}" holds runs of split {} that read other data than the '
                'data root "{}" gives now (recorded in "{}", from the root '
                '"{}"):\n  {}\nuse another --out, or the data those runs '
                'read; if you know the runs compare (the same images fetched '
                'again), move "{}" away and it is recorded again'.format(
                    out, split, entry['root'], path, there['root'],
                    '\n  '.join(differ), path))
        for part, fp in entry['parts'].items():
            if part not in there['parts']:
                there['parts'][part] = fp
                changed = True
    if changed:
        with atomic_write(path, 'w') as f:
            json.dump({'splits': record}, f, indent=1, sort_keys=True)


def recipe_of(config_file: str, opts: Sequence[str]) -> dict:
    """The recipe: the merged values (comments and key order do not count)
    and the overrides."""
    cfg = get_default_config()
    merge_file(cfg, config_file)
    merge_list(cfg, list(opts))
    return {'config': cfg.dump(), 'opts': list(opts)}


def _recipe_lines(recipe: dict) -> List[str]:
    return recipe.get('config', '').splitlines() + [
        'overrides: {}'.format(' '.join(recipe.get('opts', [])))]


#: keys that decide when a run saves, not what it trains (a run with periodic
#: checkpoints equals the run without them): the runs of a folder may differ
#: in them, so that a study can start saving periodically half-way
BOOKKEEPING_KEYS = ('train.checkpoint_freq',)


def _training_opts(opts: Sequence[str]) -> List[str]:
    """``opts`` without the :data:`BOOKKEEPING_KEYS` pairs."""
    return [item for key, value in zip(opts[0::2], opts[1::2])
            if key not in BOOKKEEPING_KEYS for item in (key, value)]


def check_recipe(out: str, recipe: dict) -> None:
    """The folder's runs must all share one recipe (else skipping is wrong):
    writes ``<out>/recipe.json`` on first use, compares with it later
    (:data:`BOOKKEEPING_KEYS` left out of the comparison).

    Raises:
        AblationError: ``out`` holds runs of another recipe (with the
            differences).
    """
    path = osp.join(out, 'recipe.json')
    if osp.isfile(path):
        with open(path) as f:
            old = json.load(f)
        # keys added to the plugin since, at their defaults, do not count
        differ = [key for key in dump_differences(
            old.get('config', ''), recipe.get('config', ''))
            if key not in BOOKKEEPING_KEYS]
        if differ or _training_opts(old.get('opts') or []) != \
                _training_opts(recipe.get('opts') or []):
            diff = [line for line in difflib.unified_diff(
                _recipe_lines(old), _recipe_lines(recipe), 'there', 'now',
                n=0, lineterm='')
                if not line.startswith('@@')]
            raise AblationError(
                '"{}" holds runs of another recipe; use another --out, or '
                'delete that folder. Differences:\n{}'.format(
                    out, '\n'.join(diff[:40])))
        return
    os.makedirs(out, exist_ok=True)
    with atomic_write(path, 'w') as f:
        json.dump(recipe, f, indent=1)


def setting_capacity(setting: Setting, recipe: dict) -> InferenceCapacity:
    """The parameters at inference and the descriptor size of ``setting``
    under ``recipe`` (:func:`recipe_of`, or a folder's ``recipe.json``):
    its network built as a run builds it (untrained, 2 classes: the
    classifiers do not count) and measured at ``data.height x data.width``
    (:func:`~pmm_torchreid.models.capacity.inference_capacity`).  torch's
    global random state is left as it was.

    Raises:
        ValueError, KeyError: the recipe and setting do not make a config.
    """
    cfg = get_default_config()
    cfg.merge_from_other_cfg(cfg.load_cfg(recipe['config']))
    merge_list(cfg, setting.options() + ['model.pretrained', 'False',
                                         'use_gpu', 'False'])
    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg, num_classes=2)
        return inference_capacity(model, cfg.data.height, cfg.data.width)


def capacities(settings: Sequence[Setting],
               recipe: dict) -> Dict[str, Optional[InferenceCapacity]]:
    """:func:`setting_capacity` of each setting, by spec; None (with a
    line saying why) for one whose network cannot be built here."""
    found = {}
    for setting in settings:
        try:
            found[setting.spec] = setting_capacity(setting, recipe)
        except (ValueError, KeyError, TypeError, RuntimeError, AssertionError,
                AttributeError, ImportError, OSError) as error:
            # the results still get tabulated, with '-' in these columns
            print('** {}: no parameter count ({}: {})'.format(
                setting.spec, type(error).__name__, error))
            found[setting.spec] = None
    return found


# --------------------------------------------------------------------------
# the runs
# --------------------------------------------------------------------------
def run_dir(out: str, setting: Setting, split: int, seed: int) -> str:
    return osp.join(out, setting.slug, 'split{}'.format(split),
                    'seed{}'.format(seed))


def last_checkpoint(save_dir: str) -> Optional[str]:
    found = []
    for path in glob.glob(osp.join(save_dir, 'model', 'model.pth.tar-*')):
        tail = path.rsplit('-', 1)[-1]
        if tail.isdigit():
            found.append((int(tail), path))
    return max(found)[1] if found else None


def command(main_script: str, config_file: str, root: str, setting: Setting,
            split: int, seed: int, save_dir: str,
            opts: Sequence[str] = (), register: Sequence[str] = ()) -> List[str]:
    """``[sys.executable, main_script, ...]``: one run, resumed from its last
    checkpoint if it has one; ``register``: what each run imports first
    (scripts/main.py's ``--register``, e.g. the user's own dataset)."""
    cmd = [sys.executable, main_script, '--config-file', config_file]
    for spec in register:
        cmd += ['--register', spec]
    if root:
        cmd += ['--root', root]
    cmd += setting.options()
    cmd += ['train.seed', str(seed), 'data.split_id', str(split),
            'data.save_dir', save_dir]
    cmd += list(opts)
    resume = last_checkpoint(save_dir)
    if resume:
        cmd += ['model.resume', resume]
    return cmd


def _exit_with_parent():  # Linux: the child dies when the runner dies
    try:
        ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)
    except Exception:
        pass


def start(cmd: List[str], save_dir: str,
          threads: int) -> Tuple[subprocess.Popen, IO[bytes]]:
    """Starts ``cmd`` with its output appended to ``<save_dir>/console.log``;
    ``threads > 0`` sets OMP_NUM_THREADS and MKL_NUM_THREADS."""
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


def tail(path: str, lines: int = 15) -> str:
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
def read_record(setting: Setting, split: int, seed: int, save_dir: str,
                status: Optional[str] = None) -> OrderedDict:
    record = OrderedDict(setting=setting.spec, split_id=split, seed=seed,
                         status=status or 'missing', save_dir=save_dir)
    res = read_results(save_dir)
    if res is not None:
        target = next(iter(res['results'].values()), None)
        record.update(status='done', model=res['model'], mix=res['mix'],
                      train_seconds=res['train_seconds'],
                      run_seconds=res['run_seconds'],
                      evaluated_on=res.get('evaluated_on', 'test'),
                      val_ids=res.get('val_ids', 0))
        if target is not None:
            record.update(rank1=target['rank1'], mAP=target['mAP'],
                          epoch=target['epoch'])
        record['wall_seconds'] = res.get('wall_seconds')
    return record


def mean_std(values: Sequence[float]) -> str:
    if not values:
        return '-'
    if len(values) == 1:
        return '{:.1f} (1)'.format(values[0])
    return '{:.1f} ± {:.1f} ({})'.format(statistics.mean(values),
                                        statistics.stdev(values), len(values))


def table(records: Sequence[dict], settings: Sequence[Setting],
          splits: Sequence[int],
          capacity: Optional[Dict[str, Optional[InferenceCapacity]]] = None
          ) -> str:
    """Markdown: one row per setting; Rank-1 and mAP per split and overall,
    training minutes per run, then the parameters at inference (millions)
    and the descriptor size from ``capacity`` (:func:`capacities`; ``-``
    where unknown)."""
    capacity = capacity or {}
    head = ['setting']
    for split in splits:
        head += ['split {} R1'.format(split), 'split {} mAP'.format(split)]
    if len(splits) > 1:
        head += ['all R1', 'all mAP']
    head += ['train min/run', 'params at inference (M)', 'descriptor']
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
        cap = capacity.get(setting.spec)
        row += ['{:.3f}'.format(cap.parameters / 1e6), str(cap.descriptor_dim)] \
            if cap is not None else ['-', '-']
        lines.append('| ' + ' | '.join(row) + ' |')
    return '\n'.join(lines) + '\n'


#: two-sided 95 % quantiles of Student's t by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447,
       7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def split_interval(per_split: Sequence[float]) -> Optional[Tuple[float, float,
                                                                  float]]:
    """``(mean, low, high)``: the mean of per-split mean differences and its
    95 % t-interval with the splits as the unit (seeds of one split share its
    identities, so they are not independent pairs); None for fewer than two
    splits (or more than 11, where the table of quantiles ends)."""
    k = len(per_split)
    if k < 2 or k - 1 not in T95:
        return None
    mean = statistics.mean(per_split)
    half = T95[k - 1] * statistics.stdev(per_split) / math.sqrt(k)
    return mean, mean - half, mean + half


def paired_differences(records: Sequence[dict], setting: str,
                       reference: str, metric: str = 'mAP'
                       ) -> 'OrderedDict[int, List[float]]':
    """``setting`` minus ``reference`` in ``metric`` on the same split and
    seed, by split (in split order, seeds in order)."""
    done = {(r['setting'], int(r['split_id']), int(r['seed'])): r
            for r in records if r['status'] == 'done' and 'mAP' in r}
    diffs: 'OrderedDict[int, List[float]]' = OrderedDict()
    for (name, split, seed), r in sorted(done.items(),
                                         key=lambda kv: kv[0][1:]):
        other = done.get((reference, split, seed))
        if name == setting and other is not None:
            diffs.setdefault(split, []).append(
                float(r[metric]) - float(other[metric]))
    return diffs


def paired_table(records: Sequence[dict], settings: Sequence[Setting],
                 reference: str) -> str:
    """Markdown: each setting minus ``reference`` on the same (split, seed),
    mean ± std over those pairs (a difference is only worth reading when it
    is large against its own spread), then the mean over each split's seeds
    and, with the splits as the unit, their mean and 95 % interval."""
    lines = ['| setting | Δ R1 vs {0} | Δ mAP vs {0} | mAP Δ range | same '
             'sign in every pair | Δ mAP per split (mean over seeds) | Δ mAP '
             'over splits, 95 % interval |'.format(reference),
             '|---|---|---|---|---|---|---|']
    for setting in settings:
        if setting.spec == reference:
            continue
        cells = []
        for metric in ('rank1', 'mAP'):
            by_split = paired_differences(records, setting.spec, reference,
                                          metric)
            diffs = [d for split in by_split.values() for d in split]
            if not diffs:
                cells.append('-')
            elif len(diffs) == 1:
                cells.append('{:+.1f} (1)'.format(diffs[0]))
            else:
                cells.append('{:+.1f} ± {:.1f} ({})'.format(
                    statistics.mean(diffs), statistics.stdev(diffs),
                    len(diffs)))
        if diffs:
            cells.append('{:+.1f} … {:+.1f}'.format(min(diffs), max(diffs)))
            cells.append('yes' if min(diffs) > 0 or max(diffs) < 0 else 'no')
            means = [statistics.mean(d) for d in by_split.values()]
            cells.append(', '.join('{}: {:+.1f}'.format(split, m) for split, m
                                   in zip(by_split, means)))
            interval = split_interval(means)
            cells.append('-' if interval is None else
                         '{:+.1f} [{:+.1f}, {:+.1f}] ({} splits)'.format(
                             *interval, len(means)))
        else:
            cells += ['-'] * 4
        lines.append('| {} | {} |'.format(setting.spec, ' | '.join(cells)))
    return '\n'.join(lines) + '\n'


def write_outputs(out: str, records: Sequence[dict],
                  settings: Sequence[Setting], splits: Sequence[int],
                  recipe: dict, reference: Optional[str] = None,
                  capacity: Optional[Dict[str, Optional[InferenceCapacity]]]
                  = None) -> str:
    """Rewrites ``results.json``, ``results.csv`` and ``table.md`` in ``out``
    (atomically); returns the text of ``table.md``.  ``capacity``: each
    setting's :func:`setting_capacity` (measured here when not given), put
    into every record of the setting (``inference_params``,
    ``descriptor_dim``) and into the table."""
    if capacity is None:
        capacity = capacities(settings, recipe)
    splits = sorted(set(splits) | {r['split_id'] for r in records
                                   if r['status'] == 'done'})
    records = [_with_capacity(r, capacity.get(r['setting'])) for r in records]
    with atomic_write(osp.join(out, 'results.json'), 'w') as f:
        json.dump({'recipe': recipe, 'runs': records}, f, indent=1)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_FIELDS, extrasaction='ignore')
    writer.writeheader()
    writer.writerows(records)
    with atomic_write(osp.join(out, 'results.csv'), 'w') as f:
        f.write(buf.getvalue())
    text = ('Rank-1 / mAP (%) {}: mean ± std over seeds (number of '
            'runs).\n\n'.format(evaluated_on(records, splits))
            + table(records, settings, splits, capacity)
            + '\nDifferences on the same split and seed:\n\n'
            + paired_table(records, settings, reference or settings[0].spec))
    with atomic_write(osp.join(out, 'table.md'), 'w') as f:
        f.write(text)
    return text


def evaluated_on(records: Sequence[dict], splits: Sequence[int]) -> str:
    """What the finished runs of ``records`` were evaluated on, for the
    table's first line: the test split, or validation identities held out of
    the training set (``data.val_ids``), and a warning where they differ.

    >>> evaluated_on([{'status': 'done', 'evaluated_on': 'validation',
    ...                'val_ids': 100}], [0])
    'on 100 validation identities held out of the training set of split 0'
    """
    where = ', '.join('split {}'.format(s) for s in splits)
    kinds = OrderedDict()
    for r in records:
        if r['status'] == 'done':
            key = (r.get('evaluated_on', 'test'), r.get('val_ids', 0))
            kinds[key] = kinds.get(key, 0) + 1
    if len(kinds) > 1:
        return ('on {}; WARNING, these runs were evaluated on different data '
                '({}), so their differences do not compare'.format(
                    where, ', '.join(
                        '{} run{} on {}'.format(
                            n, 's' if n > 1 else '', 'the test split'
                            if kind == 'test' else '{} validation '
                            'identities'.format(val_ids))
                        for (kind, val_ids), n in kinds.items())))
    if not kinds:
        return 'on {} (no run has finished yet)'.format(where)
    if next(iter(kinds))[0] != 'test':
        return 'on {} validation identities held out of the training set ' \
            'of {}'.format(next(iter(kinds))[1], where)
    return 'on the test split of {}'.format(where)


def _with_capacity(record: dict, cap: Optional[InferenceCapacity]) -> dict:
    record = OrderedDict(record)
    if cap is not None:
        record.update(inference_params=cap.parameters,
                      descriptor_dim=cap.descriptor_dim)
    return record


# --------------------------------------------------------------------------
# the plan and the job pool
# --------------------------------------------------------------------------
class Ablation(object):
    """The runs of ``settings`` x ``splits`` x ``seeds`` in ``out``, each
    ``[sys.executable, main_script, ...]`` with ``config_file``, ``root`` and
    the overrides ``opts``."""

    def __init__(self, main_script: str, config_file: str, out: str,
                 settings: Sequence[Setting], splits: Sequence[int],
                 seeds: Sequence[int], opts: Sequence[str] = (),
                 root: str = '', threads: int = 0, reference: str = '',
                 register: Sequence[str] = ()):
        self.main_script, self.config_file = main_script, config_file
        self.register = list(register)
        self.out, self.root, self.opts = out, root, list(opts)
        self.settings, self.splits = list(settings), list(splits)
        self.threads, self.reference = threads, reference
        self.plan = [(setting, split, seed) for split in splits
                     for seed in seeds for setting in settings]
        self.recipe = recipe_of(config_file, self.opts)
        self.status: Dict[str, str] = {}
        self.capacity: Optional[Dict[str, Optional[InferenceCapacity]]] = None

    def run_dir(self, setting: Setting, split: int, seed: int) -> str:
        return run_dir(self.out, setting, split, seed)

    def command(self, setting: Setting, split: int, seed: int) -> List[str]:
        return command(self.main_script, self.config_file, self.root, setting,
                       split, seed, self.run_dir(setting, split, seed),
                       self.opts, self.register)

    def commands(self) -> List[List[str]]:
        """The command of every planned run (what a dry run prints)."""
        return [self.command(*run) for run in self.plan]

    def use_folder_recipe(self) -> None:
        """Tabulate under the folder's own recipe (not re-checked), if it
        has one."""
        path = osp.join(self.out, 'recipe.json')
        if osp.isfile(path):
            with open(path) as f:
                self.recipe = json.load(f)
            self.capacity = None

    def check_recipe(self) -> None:
        check_recipe(self.out, self.recipe)

    def pending(self) -> List[Tuple[Setting, int, int, str]]:
        """The planned runs that have not finished (printing a line for each
        finished one, which is skipped)."""
        todo = []
        for setting, split, seed in self.plan:
            save_dir = self.run_dir(setting, split, seed)
            if osp.isfile(osp.join(save_dir, 'results.json')):
                self.status[save_dir] = 'done'
                print('skip (finished): {} split {} seed {}'.format(
                    setting.spec, split, seed))
            else:
                todo.append((setting, split, seed, save_dir))
        return todo

    def records(self) -> List[OrderedDict]:
        """The planned runs, then the finished runs of the same settings
        that earlier commands left in ``out`` (other seeds or splits)."""
        found = list(self.plan)
        for setting in self.settings:
            pattern = osp.join(self.out, setting.slug, 'split*', 'seed*',
                               'results.json')
            for path in sorted(glob.glob(pattern)):
                parts = path.split(os.sep)
                split, seed = parts[-3][5:], parts[-2][4:]
                if split.isdigit() and seed.isdigit() and \
                        (setting, int(split), int(seed)) not in found:
                    found.append((setting, int(split), int(seed)))
        return [read_record(s, sp, sd, self.run_dir(s, sp, sd),
                            self.status.get(self.run_dir(s, sp, sd)))
                for s, sp, sd in found]

    def write(self) -> str:
        """Rewrites the outputs from the runs in ``out``; the table text.
        The settings' parameter counts are measured on the first call."""
        if self.capacity is None:
            self.capacity = capacities(self.settings, self.recipe)
        return write_outputs(self.out, self.records(), self.settings,
                             self.splits, self.recipe, self.reference,
                             self.capacity)

    def run(self, todo: List[Tuple[Setting, int, int, str]],
            jobs: int = 1) -> int:
        """Runs ``todo`` (:meth:`pending`), ``jobs`` at a time, rewriting the
        outputs after each; 0, 1 if a run failed, 130 if interrupted."""
        todo = list(todo)
        running = {}
        failed = 0
        try:
            while todo or running:
                while todo and len(running) < jobs:
                    setting, split, seed, save_dir = todo.pop(0)
                    cmd = self.command(setting, split, seed)
                    print('start: {} split {} seed {} -> {}'.format(
                        setting.spec, split, seed, save_dir), flush=True)
                    proc, log = start(cmd, save_dir, self.threads)
                    running[proc] = (setting, split, seed, save_dir, log,
                                     time.time())
                time.sleep(0.5)
                for proc in [p for p in running if p.poll() is not None]:
                    failed += not self._finished(proc, *running.pop(proc))
                    self.write()
        except KeyboardInterrupt:
            for proc in running:
                proc.terminate()
            for proc in running:
                proc.wait()
            print('interrupted; rerun the same command to go on')
            self.write()
            return 130
        print(self.write())
        print('results in "{}" (table.md, results.json, results.csv)'.format(
            self.out))
        return 1 if failed else 0

    def _finished(self, proc: subprocess.Popen, setting: Setting, split: int,
                  seed: int, save_dir: str, log: IO[bytes],
                  began: float) -> bool:
        """Records (and prints) the end of one run; whether it succeeded."""
        log.close()
        wall = time.time() - began
        done = proc.returncode == 0 and osp.isfile(
            osp.join(save_dir, 'results.json'))
        if done:
            self.status[save_dir] = 'done'
            print('done: {} split {} seed {} in {:.0f} s'.format(
                setting.spec, split, seed, wall), flush=True)
        else:
            self.status[save_dir] = 'failed'
            print('FAILED (exit {}): {} split {} seed {}; log "{}":\n'
                  '{}'.format(proc.returncode, setting.spec, split, seed,
                              osp.join(save_dir, 'console.log'),
                              tail(osp.join(save_dir, 'console.log'))),
                  flush=True)
        return done
