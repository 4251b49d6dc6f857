"""The value chooser (scripts/choose.py): one config key, a few values, chosen
on validation identities carved out of the user's own training set.

Every value is trained with every seed, through the ablation runner
(:class:`pmm_torchreid.study.ablation.Ablation`: the same child processes, job
pool, resume and recipe check), each run with ``data.val_ids N``: it trains on
the rest of the training set and evaluates on the ``N`` held-out identities,
never on the test split.  A value's setting is the config's own model (and mix)
with ``KEY=VALUE`` (for ``model.name``, the value's model as the ablation runner
trains it: :func:`value_base`, with the runner's ``,KEY=VALUE`` options a value
may carry, e.g. ``bdb_osnet_x0_25,bdb.bands=4``); its runs lie in
``<out>/<KEY>=<VALUE>/split<K>/seed<S>/``.

The value with the best mean validation mAP over the seeds wins (on equal
means, the first value given).  Validation sets are small and one seed's noise
can be as large as the differences between values: the chooser says when the
best value's lead over another is within the larger of their seed spreads
(standard deviations over the seeds), so that the choice reads as a tie.

``<out>/choice.json`` records the plan, each value's options (the model, its
loss and mix, ``KEY VALUE``), every run's validation mAP and Rank-1,
the means and spreads, and the choice; ``<out>/chosen.yaml`` is the whole
config with the chosen value and validation off (``data.val_ids 0``), which
``scripts/main.py`` and ``scripts/ablation.py`` take as it is.
"""
from __future__ import annotations

import ast
import json
import os
import os.path as osp
import shlex
import statistics
import tempfile
import time
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import yaml
from yacs.config import CfgNode as CN

from pmm_torchreid.config.checks import check_config, check_paths
from pmm_torchreid.config.defaults import get_default_config
from pmm_torchreid.config.files import (
    AUTO_BOOL_KEYS,
    ConfigKeyError,
    auto_bool,
    merge_file,
    merge_list,
)
from pmm_torchreid.data.check import dataset_items, fingerprint
from pmm_torchreid.data.splits import carve_validation
from pmm_torchreid.launch import read_results
from pmm_torchreid.models.families import takes_no_mix, uses_pmm_engine
from pmm_torchreid.study.ablation import (
    DATA_KEYS,
    Ablation,
    AblationError,
    Setting,
    check_data,
    check_recipe,
    check_settings,
    data_root,
)
from pmm_torchreid.utils.io import atomic_write

__all__ = ['ChooseError', 'DEFAULT_SEEDS', 'RUNNER_KEYS', 'LAUNCHER',
           'parse_value', 'split_options', 'ValueSetting', 'base_setting',
           'value_base',
           'summarize', 'pick', 'verdict', 'format_table', 'read_validation',
           'train_items', 'held_out_note', 'portable_dump', 'chosen_config',
           'Chooser']

#: two seeds at least: one seed's noise can be as large as the differences
DEFAULT_SEEDS = (1, 2)

#: keys the runner sets for every run (the overrides may not set them, and
#: they are not values to choose)
RUNNER_KEYS = ('data.val_ids', 'train.seed', 'data.save_dir', 'model.resume')

#: keys whose values are not a choice on one validation set: they change
#: the validation set itself, the images read (:data:`DATA_KEYS`) or where
#: the runs go
NOT_CHOICES = RUNNER_KEYS + ('data.val_seed', 'data.split_id',
                             'test.evaluate') + DATA_KEYS

#: what a run is when no scripts/main.py path is given (the ``pmm-choose``
#: command of an installed plugin): ``python -c`` running ``pmm-train``'s main
LAUNCHER = ['-c', 'import sys; from pmm_torchreid.cli.train import main; '
            'sys.exit(main())']


class ChooseError(AblationError):
    """A plan the chooser refuses, or a run record it will not read (the
    message is the reason)."""


# --------------------------------------------------------------------------
# the values
# --------------------------------------------------------------------------
def _lookup(cfg: CN, key: str):
    node = cfg
    for part in key.split('.'):
        if not isinstance(node, CN) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def _check_key(cfg: CN, key: str):
    """The config's value of ``key``; refuses an unknown key, a section and
    a key the runner owns."""
    try:
        current = _lookup(cfg, key)
    except KeyError:
        try:  # merge_list's message: the closest existing keys
            merge_list(cfg.clone(), [key, '0'])
        except ConfigKeyError as error:
            raise ChooseError('--key {!r}: {}'.format(
                key, str(error).split(': ', 1)[-1])) from None
        raise ChooseError('--key {!r}: unknown config key'.format(key))
    if isinstance(current, CN):
        raise ChooseError('--key {!r} is a section of the config; expected one '
                          'of its keys: {}'.format(key, ', '.join(
                              '{}.{}'.format(key, k) for k in sorted(current))))
    if key in NOT_CHOICES:
        raise ChooseError(
            '--key {!r}: the chooser sets it, or it changes the validation set '
            'itself or the images read; expected a key of the recipe (a share, a length, a '
            'learning rate, ...)'.format(key))
    return current


def parse_value(cfg: CN, key: str, text: str) -> Tuple[object, str]:
    """``(value, text)``: ``text`` read as a Python or YAML literal of the
    type that ``cfg`` holds under ``key`` (an int becomes a float for a float
    key, a tuple a list for a list key; a text stays text for a text key), and
    the canonical text that gives the same value on scripts/main.py's command
    line (``'0.0625'``, ``'[1, 1]'``, ``'hard_mix'``).

    Raises:
        ChooseError: an unknown key, or a value of another type (naming the
            key, the value and the type expected).
    """
    current = _check_key(cfg, key)
    if key in AUTO_BOOL_KEYS:
        try:
            value = auto_bool(key, text)
        except ValueError as error:
            raise ChooseError('--values {!r}: {}'.format(text, error)) from None
        return value, value
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
    if isinstance(current, str):
        value = text  # a text key: the text as typed ('1' stays '1')
    elif isinstance(current, float) and type(value) is int:
        value = float(value)
    elif isinstance(current, list) and isinstance(value, tuple):
        value = list(value)
    elif isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if type(value) is not type(current):
        raise ChooseError(
            '--values {!r} for {}: expected a {} like the config\'s {!r}, '
            'got a {}'.format(text, key, type(current).__name__, current,
                              type(value).__name__))
    if isinstance(value, str):
        try:  # a text that reads as another literal goes quoted
            ast.literal_eval(value)
            canonical = repr(value)
        except (ValueError, SyntaxError, TypeError, MemoryError,
                RecursionError):
            canonical = value
    else:
        canonical = repr(value)
    check = cfg.clone()
    try:
        merge_list(check, [key, canonical])
    except (KeyError, ValueError) as error:
        raise ChooseError('--values {!r} for {}: {}'.format(text, key, error))
    if _lookup(check, key) != value:  # pragma: no cover - a safety net
        raise ChooseError('--values {!r} for {}: reads back as {!r}'.format(
            text, key, _lookup(check, key)))
    return value, canonical


def base_setting(cfg: CN) -> Tuple[str, List[str]]:
    """``(spec, overrides)``: the ablation setting that trains ``cfg``'s own
    model as the config does (its mix, its torchreid loss)."""
    model = cfg.model.name
    extra = []
    if uses_pmm_engine(model) and not takes_no_mix(model):
        spec = '{}:{}'.format(model, cfg.pmm.mix)
    else:
        spec = model
        if not uses_pmm_engine(model) and cfg.loss.name != 'triplet':
            extra = ['loss.name', cfg.loss.name]
    return spec, extra


def split_options(key: str, text: str) -> Tuple[str, List[str]]:
    """``(model, [KEY, VALUE, ...])``: a ``model.name`` value may carry
    ``,KEY=VALUE`` options, as the ablation runner's settings do
    (``bdb_osnet_x0_25,bdb.bands=4``), so that a model's variants compete
    with the others on validation (a mix is an option too:
    ``pmm_osnet_x0_25,pmm.mix=random_mix``).  Any other key, or a value
    without a comma: ``(text, [])`` (a list such as ``[1, 1]`` keeps its
    comma).

    Raises:
        ChooseError: no model before the options, ``MODEL:MIX``, an option
            that is not ``KEY=VALUE`` (an option's value cannot hold a
            comma), a key with a space, a key given twice, or options on a
            value of another key.
    """
    if key != 'model.name':
        head, comma, rest = text.partition(',')
        if comma and '[' not in head and '=' in rest.split(',')[0] and \
                '.' in rest.split('=')[0]:
            raise ChooseError(
                '--values {!r}: ,KEY=VALUE options go with --key model.name '
                'only (a value of {} is one value); give the option in the '
                'config file or the overrides'.format(text, key))
        return text, []
    if ',' not in text and ':' not in text:
        return text, []
    head, *extras = text.split(',')
    if not head.strip():
        raise ChooseError('--values {!r}: no model before the options '
                          '(expected MODEL[,KEY=VALUE...])'.format(text))
    if ':' in head:
        model, _, mix = head.partition(':')
        raise ChooseError(
            '--values {!r}: a model.name value takes its mix as an option, '
            '{},pmm.mix={} (MODEL:MIX is the ablation runner\'s form)'.format(
                text, model, mix))
    pairs: List[str] = []
    for extra in extras:
        option, eq, value = extra.partition('=')
        if not eq or not option:
            raise ChooseError(
                '--values {!r}: {!r} is not KEY=VALUE (a model.name value is '
                'MODEL[,KEY=VALUE...]; an option\'s value cannot hold a comma: '
                'give a list in the config file or the overrides)'.format(
                    text, extra))
        if option != option.strip() or ' ' in option:
            raise ChooseError('--values {!r}: the option key {!r} has a space'
                              .format(text, option))
        if option in pairs[0::2]:
            raise ChooseError('--values {!r} sets {} twice'.format(
                text, option))
        pairs += [option, value]
    return head, pairs


def value_base(cfg: CN, key: str, value, config_file: str = '',
               options: Sequence[str] = (), text: str = ''
               ) -> Tuple[str, List[str]]:
    """:func:`base_setting` of the config with ``KEY VALUE``, for the one key
    that changes what a setting is, ``model.name``: each model then trains as
    the ablation runner trains it (BDB, FMN and MagnifierNet with ``pmm.mix
    none``, a torchreid model with torchreid's triplet engine, a PMM model
    with the config's mix and share), so that PMM can be set against BDB on
    validation.  Any other key: the config's own model.

    Raises:
        ChooseError: a PMM value while the config's own model takes no mix
            (a BDB, FMN or MagnifierNet config, whose ``pmm.mix`` is
            ``none``): the PMM runs would not mix at all.
    """
    if key != 'model.name':
        return base_setting(cfg)
    mix = dict(zip(options[0::2], options[1::2])).get('pmm.mix', 'none')
    if uses_pmm_engine(value) and not takes_no_mix(value) and \
            takes_no_mix(cfg.model.name) and mix == 'none':
        raise ChooseError(
            '--values {}: config file "{}" trains {}, which takes no mix '
            '(pmm.mix {!r}), so the {} runs would not mix at all; give a PMM '
            'config, e.g. the chosen.yaml of a share choice, or the mix as '
            'an option ({},pmm.mix=hard_mix)'.format(
                text or value, config_file, cfg.model.name, cfg.pmm.mix,
                value, value))
    other = cfg.clone()
    other.defrost()
    other.model.name = value
    if not uses_pmm_engine(value):
        other.loss.name = 'triplet'  # a torchreid model: the runner's engine
    return base_setting(other)


class ValueSetting(Setting):
    """The setting of one value: the config's model, or for ``model.name``
    the value's (``base``, see :func:`value_base`), with ``KEY VALUE`` and
    then the value's own ``options`` (:func:`split_options`) last.  Its
    label, and the name of its run folder, is ``KEY=VALUE`` as typed."""

    def __init__(self, base: str, extra: Sequence[str], key: str, value,
                 text: str, options: Sequence[str] = ()):
        super().__init__(base)
        head = split_options(key, text)[0] if options else text
        self.overrides += list(extra) + [key, head] + list(options)
        self.key, self.value, self.text = key, value, text
        self.spec = '{}={}'.format(key, text)


# --------------------------------------------------------------------------
# the choice
# --------------------------------------------------------------------------
def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(texts: Sequence[str], maps: Sequence[Sequence[float]],
              rank1s: Sequence[Sequence[float]]) -> List[dict]:
    """One row per value: ``text``, ``mAP`` and ``rank1`` (per seed), their
    means and standard deviations over the seeds (0 with one seed)."""
    rows = []
    for text, m, r in zip(texts, maps, rank1s):
        if not m:
            raise ChooseError('value {}: no finished run'.format(text))
        rows.append(OrderedDict(
            text=text, mAP=list(m), rank1=list(r),
            mAP_mean=statistics.mean(m), mAP_std=_std(m),
            rank1_mean=statistics.mean(r), rank1_std=_std(r)))
    return rows


#: means closer than this are equal (the records' mAPs are rounded floats)
TIE = 1e-9


def pick(rows: Sequence[dict]) -> dict:
    """The choice among :func:`summarize`'s rows: ``best`` (index of the best
    mean mAP, the first given on equal means), ``tied_with`` (the other
    values of the same mean), ``runner_up`` (the next best index, or None),
    ``within_spread_of`` (the values whose mean is behind the best's by no
    more than the larger of the two seed spreads) and ``within_spread``."""
    if len(rows) < 2:
        raise ChooseError('expected at least 2 values to choose from')
    top = max(row['mAP_mean'] for row in rows)
    best = next(i for i, row in enumerate(rows)
                if row['mAP_mean'] >= top - TIE)
    others = [i for i in range(len(rows)) if i != best]
    runner_up = max(others, key=lambda i: (rows[i]['mAP_mean'], -i))
    b = rows[best]
    close = [rows[i]['text'] for i in others
             if b['mAP_mean'] - rows[i]['mAP_mean']
             <= max(b['mAP_std'], rows[i]['mAP_std']) + TIE]
    return OrderedDict(
        best=best, runner_up=runner_up,
        tied_with=[rows[i]['text'] for i in others
                   if rows[i]['mAP_mean'] >= top - TIE],
        within_spread_of=close, within_spread=bool(close))


def _mean_std(row: dict) -> str:
    """``'mean ± std'`` of a row's mAPs (the mean alone for one seed)."""
    if len(row['mAP']) < 2:
        return '{:.2f}'.format(row['mAP_mean'])
    return '{:.2f} ± {:.2f}'.format(row['mAP_mean'], row['mAP_std'])


def _seeds(seeds: Sequence[int]) -> str:
    return 'seed{} {}'.format('s' if len(seeds) > 1 else '',
                              ' '.join(str(s) for s in seeds))


def verdict(key: str, rows: Sequence[dict], choice: dict,
            seeds: Sequence[int]) -> List[str]:
    """The lines that say what was chosen and how far it stands out."""
    b, r = rows[choice['best']], rows[choice['runner_up']]
    lines = ['chosen: {} = {} (mean validation mAP {} over {} seed{})'.format(
        key, b['text'], _mean_std(b), len(seeds), 's' if len(seeds) > 1 else '')]
    if choice['tied_with']:
        lines.append('tie: {} have the same mean validation mAP; the first '
                     'value given, {}, is chosen'.format(
                         ', '.join([b['text']] + choice['tied_with']),
                         b['text']))
    if len(seeds) < 2:
        lines.append('one seed: no seed spread is measured, so nothing says '
                     'whether the lead of {:.2f} over {} is more than one '
                     'seed\'s noise; run two seeds or more'.format(
                         b['mAP_mean'] - r['mAP_mean'], r['text']))
    if choice['within_spread']:
        lines.append('the best is within the seed spread of {}: treat the '
                     'choice as a tie; more seeds or validation identities '
                     'would separate them'.format(
                         ', '.join(choice['within_spread_of'])))
    elif len(seeds) > 1:
        lines.append('the best is ahead of the runner-up, {}, by {:.2f} mAP, '
                     'more than the larger of their seed spreads ({:.2f})'
                     .format(r['text'], b['mAP_mean'] - r['mAP_mean'],
                             max(b['mAP_std'], r['mAP_std'])))
    return lines


def format_table(key: str, rows: Sequence[dict],
                 seeds: Sequence[int]) -> str:
    """Markdown: value | mAP mean ± std | mAP per seed | Rank-1 mean."""
    lines = ['| {} | mAP mean ± std | mAP per seed ({}) | Rank-1 mean |'.format(
        key, ', '.join(str(s) for s in seeds)), '|---|---|---|---|']
    for row in rows:
        lines.append('| {} | {} | {} | {:.2f} |'.format(
            row['text'], _mean_std(row),
            ', '.join('{:.2f}'.format(m) for m in row['mAP']),
            row['rank1_mean']))
    return '\n'.join(lines) + '\n'


def read_validation(save_dir: str, val_ids: int) -> Optional[dict]:
    """``{'mAP', 'rank1', 'epoch'}`` of the finished run in ``save_dir``
    (None if it has not finished), read only from a run evaluated on
    ``val_ids`` validation identities.

    Raises:
        ChooseError: the record was measured on the test split, or on another
            number of validation identities, or holds no result.
    """
    try:
        record = read_results(save_dir)
    except ValueError as error:
        raise ChooseError(str(error)) from None
    if record is None:
        return None
    path = osp.join(save_dir, 'results.json')
    if record.get('evaluated_on') != 'validation':
        raise ChooseError(
            '"{}" was evaluated on {!r}; the chooser reads validation results '
            'only (evaluated_on \'validation\'): delete that run folder and '
            'rerun'.format(path, record.get('evaluated_on')))
    if record.get('val_ids') != val_ids:
        raise ChooseError(
            '"{}" was evaluated on {} validation identities; this choice '
            'holds {} out (--val-ids): delete that run folder and '
            'rerun'.format(path, record.get('val_ids'), val_ids))
    result = next(iter(record['results'].values()), None)
    if not result or 'mAP' not in result:
        raise ChooseError('"{}" holds no evaluation (results is {!r})'.format(
            path, record['results']))
    return {'mAP': float(result['mAP']), 'rank1': float(result['rank1']),
            'epoch': result.get('epoch')}


def train_items(cfg: CN) -> List[tuple]:
    """The training items ``(path, pid, camid, ...)`` of ``cfg``'s source
    dataset (read as a run reads it; its folder must exist)."""
    check_paths(cfg)
    source = cfg.data.sources[0]
    return dataset_items(
        [source], cfg.data.root, cfg.data.split_id,
        cuhk03_labeled=cfg.cuhk03.labeled_images,
        cuhk03_classic_split=cfg.cuhk03.classic_split,
        market1501_500k=cfg.market1501.use_500k_distractors)[(source, 'train')]


#: above this share of the training identities held out, the chooser warns
HELD_OUT_WARN = 1 / 3


def held_out_note(val_ids: int, total: int,
                  queries: Optional[Dict[str, int]] = None) -> List[str]:
    """What the chooser prints about its validation identities: how many of
    the ``total`` training identities are held out and how many each run
    trains on, and a warning when more than a third are held out (the runs
    then train on far fewer identities than the chosen config will, and the
    value that wins there may not win with all of them). ``queries``
    (:meth:`Chooser.check_ids`): the held-out identities that have queries
    and the query and gallery images.

    >>> held_out_note(100, 485)
    ['validation: 100 of 485 training identities held out (21 %); each run trains on 385']
    >>> len(held_out_note(100, 485)), held_out_note(100, 200)[1][:45]
    (1, 'warning: more than a third of the training id')
    """
    share = val_ids / float(total)
    lines = ['validation: {} of {} training identities held out ({:.0f} %); '
             'each run trains on {}'.format(val_ids, total, 100 * share,
                                            total - val_ids)]
    if queries:
        lines.append(
            'validation queries: {} of the {} held-out identities are seen by '
            'two cameras or more ({} query and {} gallery images); the others '
            'are gallery distractors'.format(queries['query_ids'], val_ids,
                                             queries['query'],
                                             queries['gallery']))
    if share > HELD_OUT_WARN:
        lines.append(
            'warning: more than a third of the training identities are held '
            'out, so the runs train on {} where the chosen config will train '
            'on {}; a value that wins on fewer identities may not win on all '
            'of them; about a fifth is usually enough (CUHK01: 100 of '
            '485)'.format(total - val_ids, total))
    return lines


def portable_dump(cfg: CN, set_on_purpose: bool = False) -> str:
    """``cfg.dump()`` without ``use_gpu`` where it is this machine's default
    (whether torch sees a GPU), so that a chosen.yaml made on a CPU machine
    trains on the GPU of the machine that runs it, and one made on a GPU
    machine still runs on a CPU. A ``use_gpu`` the user set
    (``set_on_purpose``: the config file or the overrides name it), or one
    that differs from the default, is kept.

    >>> cfg = get_default_config()
    >>> 'use_gpu' in portable_dump(cfg), 'use_gpu' in cfg.dump()
    (False, True)
    """
    lines = cfg.dump().splitlines(True)
    if not set_on_purpose and cfg.use_gpu == get_default_config().use_gpu:
        lines = [line for line in lines if not line.startswith('use_gpu:')]
    return ''.join(lines)


def _base_config(config_file: str, opts: Sequence[str], root: str = '') -> CN:
    cfg = get_default_config()
    merge_file(cfg, config_file)
    if root:
        cfg.data.root = root
    merge_list(cfg, list(opts))
    return cfg


def chosen_config(config_file: str, opts: Sequence[str], setting: Setting,
                  root: str = '', save_dir: str = '') -> CN:
    """The config of ``setting``'s runs (``config_file``, ``root``, the
    setting's options, the overrides ``opts``), with validation off
    (``data.val_ids 0``) and ``data.save_dir`` = ``save_dir`` (if given)."""
    cfg = _base_config(config_file, [], root)
    merge_list(cfg, setting.options() + list(opts))
    cfg.data.val_ids = 0
    if save_dir:
        cfg.data.save_dir = save_dir
    check_config(cfg)
    return cfg


# --------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------
class _Runs(Ablation):
    """The ablation runner, where each run is scripts/main.py
    (``main_script``) or, without it, :data:`LAUNCHER`."""

    def __init__(self, main_script: Optional[str], *args, **kwargs):
        super().__init__(main_script or '', *args, **kwargs)
        self.launcher = [main_script] if main_script else list(LAUNCHER)

    def command(self, setting: Setting, split: int, seed: int) -> List[str]:
        cmd = super().command(setting, split, seed)
        return cmd[:1] + self.launcher + cmd[2:]


class Chooser(object):
    """The choice of ``key`` among ``values`` (texts, as typed) on
    ``val_ids`` validation identities, with ``seeds``, in ``out``.

    ``main_script``: the path of scripts/main.py that every run is, or None
    for :data:`LAUNCHER` (``pmm-train``'s main in ``python -c``).

    Raises:
        ChooseError: the plan is refused (naming the key, the value or the
            option, and what was expected).
    """

    def __init__(self, config_file: str, out: str, key: str,
                 values: Sequence[str], val_ids: int,
                 seeds: Sequence[int] = DEFAULT_SEEDS, opts: Sequence[str] = (),
                 root: str = '', main_script: Optional[str] = None,
                 threads: int = 0, register: Sequence[str] = ()):
        self.config_file, self.out, self.key = config_file, out, key
        self.queries: Optional[Dict[str, int]] = None  # set by check_ids
        self.data: Optional[dict] = None  # set by check_ids, for check_data
        self.val_ids, self.seeds = int(val_ids), list(seeds)
        self.opts, self.root = list(opts), root
        if len(self.opts) % 2:
            raise ChooseError('overrides must be KEY VALUE pairs, got {}'
                              .format(self.opts))
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ChooseError('--seeds {}: expected distinct seeds'.format(
                self.seeds))
        typed = self.opts[0::2]
        if key in typed:
            raise ChooseError('the overrides set {} themselves; it is the key '
                              'being chosen: give its values with --values'
                              .format(key))
        for owned in RUNNER_KEYS:
            if owned in typed:
                raise ChooseError(
                    'the overrides set {} themselves; the chooser sets it for '
                    'every run{}'.format(owned, ' (give --val-ids N)' if
                                         owned == 'data.val_ids' else ''))
        try:
            cfg = _base_config(config_file, self.opts, root)
        except (KeyError, ValueError, OSError) as error:
            raise ChooseError(str(error).strip('"')) from None
        if cfg.data.val_ids:
            raise ChooseError(
                'config file "{}" sets data.val_ids = {}; the chooser holds '
                'the validation identities out itself (--val-ids): set it to '
                '0 there'.format(config_file, cfg.data.val_ids))
        if self.val_ids < 2:
            raise ChooseError('--val-ids {}: expected 2 validation identities '
                              'or more'.format(self.val_ids))
        if len(values) < 2:
            raise ChooseError('--values {}: expected 2 values or more to '
                              'choose from'.format(list(values)))
        self.cfg = cfg
        parsed, options = [], []
        for text in values:
            head, pairs = split_options(key, text)
            for option in pairs[0::2]:
                if option == key or option in NOT_CHOICES:
                    raise ChooseError(
                        '--values {!r} sets {}: the chooser sets it, or it '
                        'changes the validation set or the images read; a '
                        'value\'s options may set the model\'s own keys (e.g. '
                        'bdb.bands=4)'.format(text, option))
                if option in typed:
                    raise ChooseError(
                        '--values {!r} sets {}, and so do the overrides, '
                        'which come last and would win: give it in one '
                        'place'.format(text, option))
            value, canonical = parse_value(cfg, key, head)
            if pairs:  # the model with its options, as typed
                canonical += text[len(head):]
            parsed.append((value, canonical))
            options.append(pairs)
        self.values = [v for v, _ in parsed]
        self.texts = [t for _, t in parsed]
        for i, text in enumerate(self.texts):
            if text in self.texts[:i]:
                raise ChooseError('--values: {!r} and {!r} are the same value '
                                  '({})'.format(values[self.texts.index(text)],
                                                values[i], text))
        self.options = options
        self.settings = [
            ValueSetting(*value_base(cfg, key, v, config_file, pairs, t),
                         key, v, t, pairs)
            for (v, t), pairs in zip(parsed, options)]
        slugs = [s.slug for s in self.settings]
        for i, slug in enumerate(slugs):
            if slug in slugs[:i]:
                raise ChooseError('--values {} and {} would share the run '
                                  'folder {!r}'.format(
                                      self.texts[slugs.index(slug)],
                                      self.texts[i], slug))
        self.run_opts = self.opts + ['data.val_ids', str(self.val_ids)]
        try:
            check_settings(self.settings, config_file, self.run_opts)
        except AblationError as error:
            raise ChooseError(str(error)) from None
        if any(options):  # two texts, one config: the same runs twice
            dumps = [chosen_config(config_file, self.opts, setting, root).dump()
                     for setting in self.settings]
            for i, dump in enumerate(dumps):
                if dump in dumps[:i]:
                    raise ChooseError(
                        '--values: {!r} and {!r} give the same config (the '
                        'same runs twice)'.format(
                            self.texts[dumps.index(dump)], self.texts[i]))
        self.split = int(cfg.data.split_id)
        self.study = _Runs(main_script, config_file, out, self.settings,
                           [self.split], self.seeds, self.run_opts, root=root,
                           threads=threads, register=register)
        self.plan = OrderedDict(key=key, values=self.texts,
                                val_ids=self.val_ids)
        self.study.recipe['choose'] = self.plan

    def commands(self) -> List[List[str]]:
        return self.study.commands()

    def run_dir(self, index: int, seed: int) -> str:
        """The run folder of the ``index``-th value and ``seed``."""
        return self.study.run_dir(self.settings[index], self.split, seed)

    # ---- before the runs
    def check_ids(self) -> int:
        """Refuses a ``--val-ids`` that leaves fewer than 2 training
        identities, or whose validation set would have no query (no held-out
        identity seen by two cameras), before any run; returns the number of
        training identities and sets :attr:`queries` (the held-out
        identities with queries, the query and gallery images) and
        :attr:`data` (what the runs read, for :meth:`check_folder`)."""
        cfg = self.cfg.clone()
        try:
            items = train_items(cfg)
            total = len({item[1] for item in items})
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise ChooseError('cannot read the training set of {!r}: {}'.format(
                cfg.data.sources[0], error)) from None
        if self.val_ids > total - 2:
            raise ChooseError(
                '--val-ids {}: expected 2 to {} validation identities ({}\'s '
                'training set has {} identities and at least 2 must remain '
                'for training)'.format(self.val_ids, max(2, total - 2),
                                       cfg.data.sources[0], total))
        try:
            _, query, gallery = carve_validation(items, self.val_ids,
                                                 int(cfg.data.val_seed))
        except ValueError as error:
            raise ChooseError('--val-ids {} on {}\'s training set: {}'.format(
                self.val_ids, cfg.data.sources[0], error)) from None
        self.queries = {'query_ids': len({item[1] for item in query}),
                        'query': len(query), 'gallery': len(gallery)}
        try:
            prints = {'{}/train'.format(cfg.data.sources[0]): fingerprint(items)}
        except FileNotFoundError as error:
            raise ChooseError('the training set of {!r} under "{}": {}'.format(
                cfg.data.sources[0], cfg.data.root, error)) from None
        self.data = {str(self.split): {'root': data_root(cfg.data.root),
                                       'parts': prints}}
        return total

    def check_folder(self) -> None:
        """``out`` holds nothing, or runs of this same plan (key, values,
        validation identities, config and overrides; the seeds may differ:
        a rerun with more seeds reuses the finished ones), read from the
        same training images (after :meth:`check_ids`; a copy under another
        root is the same)."""
        path = osp.join(self.out, 'recipe.json')
        if osp.isfile(path):
            with open(path) as f:
                old = json.load(f)
            there = old.get('choose')
            if there is None:
                raise ChooseError(
                    '"{}" holds runs of an ablation, not of a choice; use '
                    'another --out'.format(self.out))
            if there != json.loads(json.dumps(self.plan)):
                raise ChooseError(
                    '"{}" holds the choice of {} among {} on {} validation '
                    'identities; this command chooses {} among {} on {}: use '
                    'another --out, or delete that folder'.format(
                        self.out, there.get('key'), there.get('values'),
                        there.get('val_ids'), self.key, self.texts,
                        self.val_ids))
        try:
            check_recipe(self.out, self.study.recipe)
            if self.data is not None:
                check_data(self.out, self.data)
        except AblationError as error:
            raise ChooseError(str(error)) from None

    # ---- the runs and the choice
    def run(self, jobs: int = 1) -> int:
        """Runs what is not finished (the ablation runner), then chooses;
        0, 1 if a run failed (no choice then), 130 if interrupted.

        Raises:
            ChooseError: a finished run's record is refused
                (:func:`read_validation`), before any run starts.
        """
        for i in range(len(self.settings)):
            for seed in self.seeds:
                read_validation(self.run_dir(i, seed), self.val_ids)
        code = self.study.run(self.study.pending(), jobs)
        if code:
            if code != 130:
                print('no choice: not every run finished; rerun the same '
                      'command to go on')
            return code
        self.choose()
        return 0

    def collect(self) -> Tuple[List[dict], Dict[str, Dict[str, str]]]:
        """The rows of :func:`summarize` from the runs' records, and the run
        folders (value text -> seed -> folder).

        Raises:
            ChooseError: a run has not finished, or its record is refused
                (:func:`read_validation`).
        """
        maps, rank1s, dirs = [], [], OrderedDict()
        for i, text in enumerate(self.texts):
            m, r = [], []
            dirs[text] = OrderedDict()
            for seed in self.seeds:
                save_dir = self.run_dir(i, seed)
                found = read_validation(save_dir, self.val_ids)
                if found is None:
                    raise ChooseError('the run of {} seed {} has not finished '
                                      '("{}")'.format(self.settings[i].spec,
                                                      seed, save_dir))
                m.append(found['mAP'])
                r.append(found['rank1'])
                dirs[text][str(seed)] = save_dir
            maps.append(m)
            rank1s.append(r)
        return summarize(self.texts, maps, rank1s), dirs

    def choose(self) -> dict:
        """Reads the runs, prints the table and the choice, writes
        ``choice.json`` and ``chosen.yaml``; returns the choice record."""
        rows, dirs = self.collect()
        choice = pick(rows)
        best = choice['best']
        dataset = self.cfg.data.sources[0]
        print('\nValidation mAP / Rank-1 (%) on {} identities held out of {}\'s '
              'training set (data.val_seed {}), {}:\n'.format(
                  self.val_ids, dataset, self.cfg.data.val_seed,
                  _seeds(self.seeds)))
        print(format_table(self.key, rows, self.seeds))
        lines = verdict(self.key, rows, choice, self.seeds)
        for line in lines:
            print(line)
        when = time.strftime('%Y-%m-%d %H:%M:%S')
        setting = self.settings[best]
        save_dir = '{}_{}'.format(osp.normpath(self.cfg.data.save_dir),
                                  setting.slug)
        cfg = chosen_config(self.config_file, self.opts, setting, self.root,
                            save_dir)
        yaml_path = osp.join(self.out, 'chosen.yaml')
        header = ['Chosen by scripts/choose.py on {}: {} = {}'.format(
                      when, self.key, self.texts[best]),
                  'validation mAP (mean ± std over {}) on {} '
                  'identities held out of {}\'s training set '
                  '(data.val_seed {}):'.format(
                      _seeds(self.seeds), self.val_ids, dataset,
                      self.cfg.data.val_seed)]
        header += ['  {} = {}: {}'.format(self.key, row['text'], _mean_std(row))
                   for row in rows]
        header += lines[1:]
        header += ['from --config-file {}{}{}; the runs are in {}'.format(
                       self.config_file,
                       ' --root {}'.format(self.root) if self.root else '',
                       ' and the overrides {}'.format(shlex.join(self.opts))
                       if self.opts else '', self.out),
                   'Validation is off here (data.val_ids 0): this config '
                   'trains on the whole training set and evaluates on the '
                   'test split.']
        text = ''.join('# {}\n'.format(h) for h in header) + portable_dump(
            cfg, set_on_purpose=self._sets_use_gpu())
        self._check_dump(text, cfg)
        with atomic_write(yaml_path, 'w') as f:
            f.write(text)
        record = OrderedDict(
            key=self.key, values=self.values, texts=self.texts,
            seeds=self.seeds, val_ids=self.val_ids,
            val_seed=int(self.cfg.data.val_seed), split_id=self.split,
            dataset=dataset, config_file=self.config_file,
            overrides=self.opts, root=self.root,
            per_value=[OrderedDict(
                value=self.values[i], text=row['text'],
                value_options=self.options[i],
                options=self.settings[i].options(),
                mAP=OrderedDict(zip(map(str, self.seeds), row['mAP'])),
                rank1=OrderedDict(zip(map(str, self.seeds), row['rank1'])),
                mAP_mean=row['mAP_mean'], mAP_std=row['mAP_std'],
                rank1_mean=row['rank1_mean'], rank1_std=row['rank1_std'],
                run_dirs=dirs[row['text']]) for i, row in enumerate(rows)],
            chosen=self.values[best], chosen_text=self.texts[best],
            chosen_options=self.options[best],
            tie=bool(choice['tied_with']), tied_with=choice['tied_with'],
            runner_up=self.texts[choice['runner_up']],
            within_spread=choice['within_spread'],
            within_spread_of=choice['within_spread_of'],
            spread_measured=len(self.seeds) > 1,
            chosen_yaml=yaml_path, chosen_save_dir=save_dir, written=when)
        with atomic_write(osp.join(self.out, 'choice.json'), 'w') as f:
            json.dump(record, f, indent=1, allow_nan=False)
        print('choice in "{}", the config with it (validation off) in "{}"'
              .format(osp.join(self.out, 'choice.json'), yaml_path))
        return record

    def _sets_use_gpu(self) -> bool:
        """The config file or the overrides set ``use_gpu``."""
        with open(self.config_file) as f:
            raw = yaml.safe_load(f) or {}
        return 'use_gpu' in raw or 'use_gpu' in self.opts[0::2]

    @staticmethod
    def _check_dump(text: str, cfg: CN) -> None:
        """The yaml reads back (through merge_file) as ``cfg``."""
        fd, path = tempfile.mkstemp(suffix='.yaml')
        try:
            with os.fdopen(fd, 'w') as f:
                f.write(text)
            back = merge_file(get_default_config(), path)
        finally:
            os.unlink(path)
        if back.dump() != cfg.dump():  # pragma: no cover - a safety net
            raise ChooseError('chosen.yaml would not read back as the chosen '
                              'config')
