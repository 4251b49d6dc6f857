"""Two or more finished studies of the ablation runner set side by side
(scripts/compare_studies.py): how each setting and each gap to a reference
setting move from one recipe to another, e.g. from 30 to 60 epochs.

A study is a folder written by :mod:`pmm_torchreid.study.ablation` (its
``results.json``: the recipe and every run).  The runs of two studies are
paired by (split, seed), as the runner pairs settings within a study: the
same seed on the same split draws the same identities and, for the same
network, the same initial weights.  Every change is the later study minus
the first, per pair; then the mean over each split's seeds and, with the
splits as the unit (the seeds of one split share its identities), the mean
over splits and its 95 % t-interval
(:func:`~pmm_torchreid.study.ablation.split_interval`).

Two tables: each setting's mAP and its change; each setting's gap to the
reference (setting minus reference, paired within the study) and the change
of that gap, which pairs four runs per (split, seed).  A pair missing in
either study is left out, and the tables count the pairs they use.
"""
from __future__ import annotations

import json
import os.path as osp
import statistics
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

from pmm_torchreid.config.files import dump_differences, flat_dump
from pmm_torchreid.study.ablation import AblationError, split_interval

__all__ = ['CompareError', 'Study', 'DATA_KEYS', 'load_study', 'by_pair',
           'gaps', 'changes', 'summarize', 'recipe_changes', 'compare']

#: a run's key in a study: (split, seed)
Pair = Tuple[int, int]


class CompareError(AblationError):
    """A folder that is not a finished study, or a comparison that cannot
    be made (the message names the folder, the setting or the file)."""


class Study(object):
    """One study: its ``label`` (for the tables), ``folder``, ``recipe``
    (``{'config': dump, 'opts': [...]}``) and finished runs (``records``)."""

    def __init__(self, label: str, folder: str, recipe: dict,
                 records: List[dict]):
        self.label, self.folder = label, folder
        self.recipe, self.records = recipe, records

    def settings(self) -> List[str]:
        return list(OrderedDict.fromkeys(r['setting'] for r in self.records))


def load_study(folder: str, label: Optional[str] = None) -> Study:
    """The finished runs of the study in ``folder`` (its ``results.json``).

    Raises:
        CompareError: no ``results.json``, one that is not JSON, or one
            without the runner's ``runs`` list.
    """
    path = osp.join(folder, 'results.json')
    if not osp.isfile(path):
        raise CompareError('"{}": no results.json there; expected a folder '
                           'written by scripts/ablation.py'.format(folder))
    try:
        with open(path) as f:
            data = json.load(f)
    except ValueError as error:
        raise CompareError('"{}": not JSON ({})'.format(path, error)) from None
    if not isinstance(data, dict) or not isinstance(data.get('runs'), list):
        raise CompareError('"{}": expected the runner\'s {{"recipe": ..., '
                           '"runs": [...]}}'.format(path))
    done = []
    for i, r in enumerate(data['runs']):
        if not isinstance(r, dict) or r.get('status') != 'done' or \
                r.get('mAP') is None:
            continue
        try:
            r = dict(r, split_id=int(r['split_id']), seed=int(r['seed']),
                     mAP=float(r['mAP']), rank1=float(r['rank1']),
                     setting=str(r['setting']))
        except (KeyError, TypeError, ValueError) as error:
            raise CompareError(
                '"{}": run {} ({}) lacks a usable {}; expected setting, '
                'split_id, seed, mAP and rank1'.format(
                    path, i, r.get('save_dir', 'no save_dir'),
                    error)) from None
        done.append(r)
    return Study(label or osp.basename(osp.normpath(folder)), folder,
                 data.get('recipe') or {}, done)


def by_pair(study: Study, setting: str, metric: str = 'mAP'
            ) -> Dict[Pair, float]:
    """``setting``'s ``metric`` in ``study`` by (split, seed)."""
    return {(r['split_id'], r['seed']): r[metric]
            for r in study.records if r['setting'] == setting}


def gaps(study: Study, setting: str, reference: str, metric: str = 'mAP'
         ) -> Dict[Pair, float]:
    """``setting`` minus ``reference`` in ``study``, by (split, seed)."""
    mine, ref = (by_pair(study, s, metric) for s in (setting, reference))
    return {k: mine[k] - ref[k] for k in mine if k in ref}


def changes(first: Dict[Pair, float], later: Dict[Pair, float]
            ) -> Dict[Pair, float]:
    """``later`` minus ``first`` on the pairs both have."""
    return {k: later[k] - first[k] for k in first if k in later}


def summarize(values: Dict[Pair, float], signed: bool = True,
              noun: str = 'pairs') -> str:
    """A table cell: with two splits or more, the mean over splits and its
    95 % interval, then each split's mean over seeds and the number of
    values (``noun``); with one split, mean ± std over its seeds; ``-``
    when empty."""
    if not values:
        return '-'
    fmt = '{:+.1f}' if signed else '{:.1f}'
    splits: 'OrderedDict[int, List[float]]' = OrderedDict()
    for (split, _), v in sorted(values.items()):
        splits.setdefault(split, []).append(v)
    means = [statistics.mean(v) for v in splits.values()]
    n = len(values)
    count = '{} {}'.format(n, noun if n > 1 else noun.rstrip('s'))
    if len(splits) == 1:
        vals = list(values.values())
        spread = ' ± {:.1f}'.format(statistics.stdev(vals)) if n > 1 else ''
        return '{}{} (split {}, {})'.format(
            fmt.format(statistics.mean(vals)), spread, next(iter(splits)),
            count)
    per_split = ', '.join('{}: {}'.format(s, fmt.format(m))
                          for s, m in zip(splits, means))
    interval = split_interval(means)
    if interval is None:  # beyond the table of t quantiles
        return '{} (no interval for {} splits; per split {}; {})'.format(
            fmt.format(statistics.mean(means)), len(means), per_split, count)
    return '{} [{}, {}] (per split {}; {})'.format(
        *(fmt.format(x) for x in interval), per_split, count)


def recipe_changes(first: dict, later: dict) -> List[str]:
    """``key: first → later`` for each config key whose value differs
    between two recipes (keys added since, at their defaults, do not
    count), and the overrides when they differ."""
    old, new = (flat_dump(r.get('config', '')) for r in (first, later))
    lines = ['{}: {} → {}'.format(key, old.get(key, '(none)'),
                                  new.get(key, '(none)'))
             for key in dump_differences(first.get('config', ''),
                                         later.get('config', ''))]
    if first.get('opts', []) != later.get('opts', []):
        lines.append('overrides: {} → {}'.format(
            ' '.join(first.get('opts', [])) or '(none)',
            ' '.join(later.get('opts', [])) or '(none)'))
    return lines


#: config keys that decide which images a study evaluates on: studies that
#: differ in one of them cannot be paired by split and seed
DATA_KEYS = ('data.sources', 'data.targets', 'data.val_ids', 'data.val_seed',
             'data.combineall')


def _common(values: Sequence[Dict[Pair, float]]
            ) -> List[Dict[Pair, float]]:
    """Each study's values on the (split, seed) pairs that all have."""
    keys = set(values[0]).intersection(*values[1:])
    return [{k: v[k] for k in keys} for v in values]


def _check(studies: Sequence[Study]) -> None:
    if len(studies) < 2:
        raise CompareError('expected two studies or more, got {}'.format(
            len(studies)))
    labels = [st.label for st in studies]
    for label in labels:
        if labels.count(label) > 1 or '|' in label or not label.strip():
            raise CompareError(
                'label {!r} (of {}): expected a distinct, non-empty label '
                'without "|" for each study; give --labels'.format(
                    label, ', '.join('"{}"'.format(st.folder)
                                     for st in studies)))
    first = studies[0]
    for st in studies[1:]:
        differ = [k for k in dump_differences(
            first.recipe.get('config', ''), st.recipe.get('config', ''))
            if k in DATA_KEYS]
        if differ:
            raise CompareError(
                '"{}" and "{}" evaluate on other data ({}): runs pair by split '
                'and seed only on the same data'.format(
                    first.folder, st.folder, '; '.join(
                        line for line in recipe_changes(first.recipe,
                                                        st.recipe)
                        if line.split(':')[0] in differ)))


def compare(studies: Sequence[Study], reference: str,
            settings: Optional[Sequence[str]] = None,
            metric: str = 'mAP') -> str:
    """Markdown: what differs between the recipes, each setting's
    ``metric`` and its change from the first study, and each setting's gap
    to ``reference`` and the change of that gap, every row on the (split,
    seed) pairs that all the studies have (so that the studies' columns and
    the change agree).  ``settings``: those to show (default: every setting
    all the studies have, in the first study's order).

    Raises:
        CompareError: fewer than two studies, labels that are not distinct,
            studies that evaluate on other data, a setting (or the
            reference) that a study has no finished run of, or no (split,
            seed) pair that all the studies have.
    """
    _check(studies)
    if settings is None:
        settings = [s for s in studies[0].settings()
                    if all(s in st.settings() for st in studies[1:])]
    for name in list(settings) + [reference]:
        for st in studies:
            if name not in st.settings():
                raise CompareError('"{}" has no finished run of setting {!r}; '
                                   'it has: {}'.format(
                                       st.folder, name,
                                       ', '.join(st.settings()) or 'none'))
    first, later = studies[0], studies[1:]
    out = ['Studies: ' + '; '.join('{} = "{}" ({} finished runs)'.format(
        st.label, st.folder, len(st.records)) for st in studies), '']
    for st in later:
        diff = recipe_changes(first.recipe, st.recipe)
        out.append('Recipe, {} → {}: {}'.format(
            first.label, st.label, '; '.join(diff) if diff else
            'the same recipe'))
    head = ['setting'] + ['{} {}'.format(st.label, metric) for st in studies] \
        + ['{} − {}, paired'.format(st.label, first.label) for st in later]
    out += ['', '{} (%) on the (split, seed) pairs that every study has: the '
            'mean over splits [95 % interval over splits] where there are two '
            'splits or more.'.format(metric), '',
            '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    rows = [(name, [by_pair(st, name, metric) for st in studies], 'runs')
            for name in settings]
    rows += [(name, [gaps(st, name, reference, metric) for st in studies],
              'pairs') for name in settings if name != reference]
    for i, (name, values, noun) in enumerate(rows):
        values = _common(values)
        if not values[0]:
            raise CompareError(
                'setting {!r}{}: no (split, seed) pair is in every study '
                '({})'.format(name, '' if noun == 'runs' else
                              ' and the reference ' + repr(reference),
                              '; '.join('{}: {}'.format(
                                  st.label, sorted(by_pair(st, name)))
                                  for st in studies)))
        if i == len(settings):
            head[0] = 'setting − {}'.format(reference)
            head[1:] = [st.label for st in studies] + \
                ['change {} − {}, paired'.format(st.label, first.label)
                 for st in later]
            out += ['', 'Gaps to {} ({}, same split and seed), and how they '
                    'change:'.format(reference, metric), '',
                    '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
        row = [name] + [summarize(v, noun == 'pairs', noun) for v in values] \
            + [summarize(changes(values[0], v)) for v in values[1:]]
        out.append('| ' + ' | '.join(row) + ' |')
    return '\n'.join(out) + '\n'
