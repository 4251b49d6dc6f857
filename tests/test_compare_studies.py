"""Studies side by side (pmm_torchreid.study.compare,
scripts/compare_studies.py): runs paired by split and seed across studies,
the change of a setting and of a gap (four runs a pair), the interval with
the splits as the unit, the recipe's differences, and the refusals."""
import json
import os
import statistics

import pytest
from helpers import CONFIG

from pmm_torchreid.cli.compare_studies import main
from pmm_torchreid.study.ablation import T95, recipe_of
from pmm_torchreid.study.compare import (
    CompareError,
    by_pair,
    changes,
    compare,
    gaps,
    load_study,
    recipe_changes,
    summarize,
)

REF, OTHER = 'pmm_resnet18:hard_mix', 'bdb_resnet18'


def write_study(folder, maps, opts=()):
    """A runner's results.json: ``maps[(setting, split, seed)] = mAP``."""
    os.makedirs(folder, exist_ok=True)
    runs = [{'setting': setting, 'split_id': split, 'seed': seed,
             'status': 'done', 'mAP': m, 'rank1': m - 2.0}
            for (setting, split, seed), m in maps.items()]
    runs.append({'setting': REF, 'split_id': 9, 'seed': 9,
                 'status': 'missing'})  # unfinished: never read
    with open(os.path.join(folder, 'results.json'), 'w') as f:
        json.dump({'recipe': recipe_of(CONFIG, list(opts)), 'runs': runs}, f)
    return str(folder)


def short_and_long(tmp_path):
    """Two studies on splits 0, 2 (seeds 1, 2): at 60 epochs the reference
    gains 2 + split/2 + seed/10, the other setting 1 on every pair; one pair
    of the long study lacks its reference run."""
    short, long = {}, {}
    for split in (0, 2):
        for seed in (1, 2):
            base = 50.0 + split + seed
            short[(REF, split, seed)] = base
            short[(OTHER, split, seed)] = base + 1.0
            long[(REF, split, seed)] = base + 2 + split / 2 + seed / 10
            long[(OTHER, split, seed)] = base + 2.0
    del long[(REF, 2, 2)]
    return (write_study(tmp_path / 'e30', short),
            write_study(tmp_path / 'e60', long,
                        ['train.max_epoch', '60', 'train.stepsize', '[40]']))


def test_the_gap_change_pairs_four_runs(tmp_path):
    a, b = (load_study(f) for f in short_and_long(tmp_path))
    assert len(a.records) == 8 and len(b.records) == 7  # finished runs only
    assert by_pair(a, REF)[(2, 1)] == 53.0
    # the gap: OTHER - REF, +1 at 30 epochs; at 60: -(split/2 + seed/10)
    assert gaps(a, OTHER, REF) == {k: 1.0 for k in by_pair(a, REF)}
    change = changes(gaps(a, OTHER, REF), gaps(b, OTHER, REF))
    assert set(change) == {(0, 1), (0, 2), (2, 1)}  # (2, 2) lacks a run
    for (split, seed), v in change.items():
        assert v == pytest.approx(-1.0 - split / 2 - seed / 10)


def test_summaries_use_the_splits_as_the_unit():
    values = {(0, 1): 1.0, (0, 2): 2.0, (2, 1): 4.0, (4, 1): 6.0,
              (4, 2): 7.0}
    means = [1.5, 4.0, 6.5]
    half = T95[2] * statistics.stdev(means) / 3 ** 0.5
    cell = summarize(values)
    assert cell == '{:+.1f} [{:+.1f}, {:+.1f}] (per split 0: +1.5, 2: +4.0, ' \
        '4: +6.5; 5 pairs)'.format(4.0, 4.0 - half, 4.0 + half)
    one_split = {(0, 1): 50.0, (0, 2): 52.0}
    assert summarize(one_split, False, 'runs') == '51.0 ± 1.4 (split 0, 2 runs)'
    assert summarize({(3, 1): -0.5}) == '-0.5 (split 3, 1 pair)'
    assert summarize({}) == '-'
    # 12 splits: past the table of t quantiles, the mean without an interval
    many = {(split, 1): float(split) for split in range(12)}
    assert summarize(many).startswith('+5.5 (no interval for 12 splits; '
                                      'per split 0: +0.0, 1: +1.0,')


def test_the_recipes_differences_are_named():
    first = recipe_of(CONFIG, [])
    later = recipe_of(CONFIG, ['train.max_epoch', '60'])
    lines = recipe_changes(first, later)
    assert lines[0].startswith('train.max_epoch: ') and \
        lines[0].endswith(' → 60')
    assert lines[-1] == 'overrides: (none) → train.max_epoch 60'
    assert recipe_changes(first, first) == []


def test_the_tables(tmp_path):
    studies = [load_study(f, label) for f, label in
               zip(short_and_long(tmp_path), ['30 ep', '60 ep'])]
    text = compare(studies, REF)
    assert 'train.max_epoch: ' in text and 'train.stepsize: ' in text
    rows = {line.split(' | ')[0]: line for line in text.splitlines()
            if line.startswith('| ')}
    # the reference's own change: 2 + split/2 + seed/10 on three pairs
    assert '(per split 0: +2.2, 2: +3.1; 3 pairs)' in rows['| ' + REF]
    gap_rows = [line for line in text.splitlines()
                if line.startswith('| ' + OTHER)]
    assert len(gap_rows) == 2  # its mAP row, then its gap row
    assert gap_rows[1].split(' | ')[1].startswith('+1.0 [+1.0, +1.0]')
    assert '(per split 0: -1.2, 2: -2.1; 3 pairs)' in gap_rows[1]


def test_refusals(tmp_path):
    with pytest.raises(CompareError, match='no results.json'):
        load_study(str(tmp_path))
    bad = tmp_path / 'bad'
    bad.mkdir()
    (bad / 'results.json').write_text('{"runs": ')
    with pytest.raises(CompareError, match='not JSON'):
        load_study(str(bad))
    (bad / 'results.json').write_text('[]')
    with pytest.raises(CompareError, match='"runs"'):
        load_study(str(bad))
    (bad / 'results.json').write_text(json.dumps({'runs': [
        {'setting': REF, 'split_id': 0, 'seed': 'x', 'status': 'done',
         'mAP': 1.0, 'rank1': 1.0, 'save_dir': 'log/x'}]}))
    with pytest.raises(CompareError, match=r'run 0 \(log/x\) lacks a usable'):
        load_study(str(bad))
    a, b = (load_study(f) for f in short_and_long(tmp_path))
    with pytest.raises(CompareError, match="label 'e30'"):
        compare([a, load_study(a.folder)], REF)
    other = load_study(write_study(
        tmp_path / 'val', {(REF, 0, 1): 1.0}, ['data.val_ids', '100']))
    with pytest.raises(CompareError, match='evaluate on other data '
                       r'\(data.val_ids: 0 → 100\)'):
        compare([a, other], REF)
    apart = load_study(write_study(tmp_path / 'apart', {(REF, 4, 1): 1.0}))
    with pytest.raises(CompareError, match='no .split, seed. pair is in every '
                       r'study \(e30: \[\(0, 1\)'):
        compare([a, apart], REF)
    with pytest.raises(CompareError, match='two studies or more'):
        compare([a], REF)
    with pytest.raises(CompareError, match="no finished run of setting "
                       "'fmn_resnet18'; it has: " + REF):
        compare([a, b], REF, settings=['fmn_resnet18'])


def test_the_command_line(tmp_path, capsys):
    folders = short_and_long(tmp_path)
    out = str(tmp_path / 'tables.md')
    assert main(['--studies', *folders, '--labels', '30', '60',
                 '--reference', REF, '--metric', 'rank1', '--out', out]) == 0
    printed = capsys.readouterr().out
    with open(out) as f:
        assert f.read() == printed
    assert printed.startswith('Studies: 30 = ') and 'rank1 (%)' in printed
    with pytest.raises(SystemExit, match='1 labels for 2 studies'):
        main(['--studies', *folders, '--labels', '30', '--reference', REF])
    with pytest.raises(SystemExit, match='no results.json'):
        main(['--studies', folders[0], str(tmp_path), '--reference', REF])
