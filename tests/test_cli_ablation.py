"""The ablation runner in process (pmm_torchreid.study.ablation and
pmm_torchreid.cli.ablation): settings, tables, the recipe check, a dry run.
tests/test_ablation.py runs scripts/ablation.py end to end."""
import json
import os
import re
import statistics

import pytest
from helpers import ROOT

from pmm_torchreid.cli.ablation import main
from pmm_torchreid.config import get_default_config, merge_file
from pmm_torchreid.data.check import fingerprint
from pmm_torchreid.models.capacity import InferenceCapacity
from pmm_torchreid.study.ablation import (
    AblationError,
    Setting,
    check_data,
    check_recipe,
    mean_std,
    paired_differences,
    paired_table,
    recipe_of,
    split_interval,
    table,
    write_outputs,
)

MAIN = os.path.join(ROOT, 'scripts', 'main.py')
CONFIG = os.path.join(ROOT, 'configs', 'pmm_demo.yaml')


def test_settings_by_family():
    assert Setting('pmm_resnet18:cutmix').options() == [
        'model.name', 'pmm_resnet18', 'loss.name', 'pmm', 'pmm.mix', 'cutmix']
    for model in ('bdb_resnet18', 'fmn', 'magnifiernet_osnet_x0_25'):
        assert Setting(model).options()[2:] == [
            'loss.name', 'pmm', 'pmm.mix', 'none']
    assert Setting('osnet_x0_25,model.pretrained=False').options() == [
        'model.name', 'osnet_x0_25', 'loss.name', 'triplet',
        'model.pretrained', 'False']
    assert Setting('pmm:hard_mix,a=b').slug == 'pmm-hard_mix_a=b'
    for spec, message in [('bdb:hard_mix', 'takes no mix'),
                          ('osnet_x0_25:none', 'triplet engine'),
                          ('pmm,x', 'is not KEY=VALUE'), (':none', 'expected')]:
        with pytest.raises(AblationError, match=message):
            Setting(spec)


def test_tables():
    assert mean_std([]) == '-' and mean_std([70.0]) == '70.0 (1)'
    assert mean_std([1.0, 3.0]) == '2.0 ± 1.4 (2)'
    settings = [Setting('pmm'), Setting('bdb')]
    records = [dict(setting=s, split_id=0, seed=seed, status='done', rank1=r,
                    mAP=m, train_seconds=60)
               for s, seed, r, m in [('pmm', 1, 80, 60), ('pmm', 2, 82, 62),
                                     ('bdb', 1, 79, 58), ('bdb', 2, 80, 61)]]
    lines = table(records, settings, [0]).splitlines()
    assert lines[0].endswith(' | train min/run | params at inference (M) | '
                             'descriptor |')
    assert lines[2] == '| pmm | 81.0 ± 1.4 (2) | 61.0 ± 1.4 (2) | 1.0 | - | - |'
    capacity = {'pmm': InferenceCapacity(353288, 1536, {}, 1099703)}
    lines = table(records, settings, [0], capacity).splitlines()
    assert lines[2].endswith(' | 1.0 | 0.353 | 1536 |')
    assert lines[3].endswith(' | 1.0 | - | - |')  # bdb: not measured
    paired = paired_table(records, settings, 'pmm').splitlines()
    assert paired[2] == ('| bdb | -1.5 ± 0.7 (2) | -1.5 ± 0.7 (2) | -2.0 … -1.0 '
                         '| yes | 0: -1.5 | - |')  # one split: no interval


def test_statistics_take_the_splits_as_the_unit():
    mean, low, high = split_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and abs(high - 2.0 - 4.303 / 3 ** 0.5) < 1e-9
    assert abs((mean - low) - (high - mean)) < 1e-12
    assert split_interval([5.0]) is None
    # three seeds on split 0 and one on split 2, the reference's seed 3 on
    # split 0 missing: that pair is left out; per split, then over splits
    rows = [('ref', 0, 1, 50), ('ref', 0, 2, 52), ('ref', 2, 1, 40),
            ('new', 0, 1, 53), ('new', 0, 2, 53), ('new', 0, 3, 99),
            ('new', 2, 1, 46)]
    records = [dict(setting=n, split_id=sp, seed=se, status='done', rank1=m,
                    mAP=m) for n, sp, se, m in rows]
    assert paired_differences(records, 'new', 'ref') == {0: [3.0, 1.0],
                                                         2: [6.0]}
    line = paired_table(records, [Setting('ref'), Setting('new')],
                        'ref').splitlines()[2]
    cells = [c.strip() for c in line.strip('|').split('|')]
    assert cells[2] == '+3.3 ± 2.5 (3)' and cells[5] == '0: +2.0, 2: +6.0'
    half = 12.706 * statistics.stdev([2.0, 6.0]) / 2 ** 0.5
    assert cells[6] == '+4.0 [{:+.1f}, {:+.1f}] (2 splits)'.format(
        4.0 - half, 4.0 + half)


def test_outputs_and_the_recipe_check(tmp_path):
    out = str(tmp_path / 'out')
    recipe = recipe_of(CONFIG, ['train.max_epoch', '1'])
    check_recipe(out, recipe)
    check_recipe(out, recipe)  # the same recipe: accepted
    with pytest.raises(AblationError, match='holds runs of another recipe'):
        check_recipe(out, recipe_of(CONFIG, ['train.max_epoch', '2']))
    text = write_outputs(out, [], [Setting('pmm')], [0], recipe)
    # no run finished; the network's size is known all the same (ResNet-50)
    assert '| pmm | - | - | - | 31.120 | 1536 |' in text
    assert sorted(os.listdir(out)) == [
        'recipe.json', 'results.csv', 'results.json', 'table.md']


def test_dry_run_in_process(tmp_path, capsys):
    out = str(tmp_path / 'out')
    assert main(['--config-file', CONFIG, '--out', out, '--seeds', '1', '2',
                 '--dry-run', '--settings', 'pmm_resnet18:none', 'osnet_x0_25',
                 '--', 'train.max_epoch', '1'], main_script=MAIN) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(' {} '.format(MAIN) in l for l in lines)
    assert lines[0].endswith('data.save_dir {} train.max_epoch 1'.format(
        os.path.join(out, 'pmm_resnet18-none', 'split0', 'seed1')))
    assert not os.path.exists(out)
    with pytest.raises(SystemExit, match="error: --reference 'x' is not"):
        main(['--config-file', CONFIG, '--out', out, '--settings', 'pmm',
              '--reference', 'x'], main_script=MAIN)
    with pytest.raises(TypeError, match='main_script'):
        main(['--config-file', CONFIG, '--out', out, '--settings', 'pmm'])


def test_overrides_may_not_set_what_the_runner_or_a_setting_sets(tmp_path,
                                                                  capsys):
    """The shared overrides come after the runner's per-run keys and the
    settings' keys on each command line, so they would win: they are
    refused, naming the key and where to give it, before anything starts."""
    out = str(tmp_path / 'out')
    for opts, message in [
            (['train.seed', '7'], 'the overrides set train.seed; the runner '
             'sets it for every run (give --seeds)'),
            (['data.split_id', '2'], 'sets it for every run (give --splits)'),
            (['data.save_dir', 'x'], 'the overrides set data.save_dir;'),
            (['pmm.mix', 'hard_mix'], "the overrides set pmm.mix, which "
             "setting 'pmm_resnet18:none' sets for its runs"),
            (['model.pretrained', 'False'], "setting 'osnet_x0_25,"
             "model.pretrained=True' sets"),
            (['pmm_resnet18:none,train.seed=5'], "setting "
             "'pmm_resnet18:none,train.seed=5' sets train.seed; the runner "
             "sets it for every run"),
            # every setting of a folder reads the same data (data.json)
            (['pmm_resnet18:none,data.combineall=True'], "setting "
             "'pmm_resnet18:none,data.combineall=True' sets data.combineall, "
             "which decides the images the runs read")]:
        extra, opts = (opts, []) if ':' in opts[0] else ([], opts)
        with pytest.raises(SystemExit, match=re.escape(message)):
            main(['--config-file', CONFIG, '--out', out, '--dry-run',
                  '--settings', 'pmm_resnet18:none',
                  'osnet_x0_25,model.pretrained=True'] + extra + ['--'] + opts,
                 main_script=MAIN)
    assert not os.path.exists(out)
    # a key no setting sets is an ordinary override
    assert main(['--config-file', CONFIG, '--out', out, '--dry-run',
                 '--seeds', '1', '--settings', 'pmm_resnet18:none', '--',
                 'train.max_epoch', '1'], main_script=MAIN) == 0
    assert capsys.readouterr().out.strip().endswith('train.max_epoch 1')


def test_the_splits_default_to_the_configs(tmp_path, capsys):
    """Without --splits the runs use the config's data.split_id (a
    chosen.yaml made on split 2 is tested on split 2); a --splits without
    it is noted."""
    cfg = merge_file(get_default_config(), CONFIG)
    cfg.data.split_id = 2
    config = tmp_path / 'split2.yaml'
    config.write_text(cfg.dump())
    args = ['--config-file', str(config), '--out', str(tmp_path / 'out'),
            '--dry-run', '--seeds', '1', '--settings', 'pmm_resnet18:none']
    assert main(args, main_script=MAIN) == 0
    printed = capsys.readouterr().out
    assert ' data.split_id 2 ' in printed and 'note:' not in printed
    assert main(args + ['--splits', '0'], main_script=MAIN) == 0
    printed = capsys.readouterr()
    assert printed.err.strip() == 'note: {} has data.split_id 2; these runs ' \
        'use --splits 0'.format(config)
    # stdout stays the commands alone (--dry-run | sh)
    lines = printed.out.splitlines()
    assert len(lines) == 1 and ' data.split_id 0 ' in lines[0]


def test_splits_that_are_copies_are_refused(synthetic_root, tmp_path,
                                            monkeypatch):
    """The source dataset is read once per split before any run; a dataset
    that ignores data.split_id (the synthetic one has one split) gives the
    same training set for every split id, which would pass copies off as
    independent splits: refused, naming the dataset and the split ids.
    Distinct training sets pass; a dataset that cannot be read is named."""
    from pmm_torchreid.study import ablation
    out = str(tmp_path / 'out')
    args = ['--config-file', CONFIG, '--root', synthetic_root, '--out', out,
            '--seeds', '1', '--settings', 'pmm_resnet18:none']
    with pytest.raises(SystemExit, match=re.escape(
            "--splits 0 2: 'pmm_synthetic' gives the same training data for "
            "data.split_id 0 and 2: a dataset with one split ignores")):
        main(args + ['--splits', '0', '2'], main_script=MAIN)
    assert not os.path.exists(out)
    read = []

    def by_split(names, root, split, **kwargs):
        read.append(split)
        return {(names[0], 'train'): ['{}/{}.jpg'.format(split, i)
                                      for i in range(3)]}
    monkeypatch.setattr(ablation, 'dataset_images', by_split)
    found = ablation.check_splits(CONFIG, [], synthetic_root, [0, 2, 2, 4])
    assert read == [0, 2, 4]
    # what each split reads, for the folder's data record
    assert sorted(found['splits']) == ['0', '2', '4']
    assert found['splits']['2']['pmm_synthetic/train']['images'] == 3
    assert found['splits']['0'] != found['splits']['2']

    # data.combineall trains on train + query + gallery: splits that only
    # move images between them are the same training data
    def moved(names, root, split, **kwargs):
        read.append(names)
        everything = ['{}.jpg'.format(i) for i in range(6)]
        train = everything[split:split + 3]
        rest = [p for p in everything if p not in train]
        return {(name, part): items for name in names for part, items in
                (('train', train), ('query', rest[:1]), ('gallery', rest[1:]))}
    monkeypatch.setattr(ablation, 'dataset_images', moved)
    ablation.check_splits(CONFIG, [], synthetic_root, [0, 2])
    with pytest.raises(ablation.AblationError, match='the same training data'):
        ablation.check_splits(CONFIG, ['data.combineall', 'True'],
                              synthetic_root, [0, 2])
    # every source and target is read (each may write its split file)
    del read[:]
    monkeypatch.setattr(ablation, 'check_paths', lambda cfg: None)
    ablation.check_splits(CONFIG, ['data.targets', "['pmm_synthetic', 'x']"],
                          synthetic_root, [0])
    assert read == [['pmm_synthetic', 'x']]
    monkeypatch.undo()
    market = ['data.sources', "['market1501']", 'data.targets', "['market1501']"]
    with pytest.raises(ablation.AblationError, match="cannot read split 0 of "
                       "'market1501' under \"{}\"".format(
                           re.escape(str(tmp_path / 'none')))):
        ablation.check_splits(CONFIG, market, str(tmp_path / 'none'), [0])


def test_a_folder_holds_the_runs_of_one_data(tmp_path):
    """data.json: the first run records what each split reads; the same data
    (also copied under another root) is accepted, a new split is added,
    other images for a recorded split are refused, naming the part."""
    def data(root, names):
        for name in names:
            path = root / 'd' / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b'x' * len(name))
        return {'root': str(root), 'splits': {'0': {'d/train': fingerprint(
            [str(root / 'd' / name) for name in names], str(root))}}}

    out = str(tmp_path / 'out')
    first = data(tmp_path / 'a', ['1.jpg', '2.jpg'])
    check_data(out, first)
    with open(os.path.join(out, 'data.json')) as f:
        assert json.load(f)['splits'] == first['splits']
    check_data(out, first)
    check_data(out, data(tmp_path / 'copy', ['2.jpg', '1.jpg']))  # a copy
    more = data(tmp_path / 'b', ['1.jpg', '2.jpg', '3.jpg'])
    with pytest.raises(AblationError, match=re.escape(
            'holds runs of split 0 that read other data than the data root '
            '"{}" gives now'.format(tmp_path / 'b')) + '(.|\n)*'
            + re.escape('d/train: 2 images (digest {}) there, 3 now'.format(
                first['splits']['0']['d/train']['digest']))):
        check_data(out, more)
    more['splits'] = {'2': more['splits']['0']}
    check_data(out, more)  # another split: recorded beside
    with open(os.path.join(out, 'data.json')) as f:
        assert sorted(json.load(f)['splits']) == ['0', '2']
    # an image replaced by another of another size is other data
    replaced = data(tmp_path / 'a', ['1.jpg', '2.jpg'])
    (tmp_path / 'a' / 'd' / '1.jpg').write_bytes(b'longer')
    replaced['splits']['0']['d/train'] = fingerprint(
        [str(tmp_path / 'a' / 'd' / n) for n in ('1.jpg', '2.jpg')],
        str(tmp_path / 'a'))
    with pytest.raises(AblationError, match='2 images .* there, 2 now'):
        check_data(out, replaced)


def test_a_setting_seed_or_split_given_twice_is_refused(tmp_path):
    """Each (setting, split, seed) has one run folder: a repeated --settings,
    --seeds or --splits entry would start two runs in it."""
    out = str(tmp_path / 'out')
    for extra, message in [
            (['--seeds', '1', '2', '1'], '--seeds gives 1 more than once'),
            (['--splits', '0', '0'], '--splits gives 0 more than once'),
            (['--settings', 'pmm_resnet18:none', 'pmm_resnet18:none'],
             '--settings gives pmm_resnet18:none more than once')]:
        args = ['--config-file', CONFIG, '--out', out, '--dry-run']
        if '--settings' not in extra:
            args += ['--settings', 'pmm_resnet18:none']
        with pytest.raises(SystemExit, match=re.escape(message)):
            main(args + extra, main_script=MAIN)
    assert not os.path.exists(out)


def test_the_table_says_what_the_runs_were_evaluated_on():
    """table.md's first line names the data: the test split, validation
    identities held out of the training set, or a warning when the folder's
    runs were evaluated on different data."""
    from pmm_torchreid.study.ablation import evaluated_on

    def done(kind, val_ids=0):
        return {'status': 'done', 'evaluated_on': kind, 'val_ids': val_ids}
    assert evaluated_on([done('test'), {'status': 'missing'}], [0, 2]) == \
        'on the test split of split 0, split 2'
    assert evaluated_on([done('validation', 100)] * 2, [0]) == \
        'on 100 validation identities held out of the training set of split 0'
    mixed = evaluated_on([done('test'), done('validation', 100),
                          done('validation', 100)], [0])
    assert mixed == ('on split 0; WARNING, these runs were evaluated on '
                     'different data (1 run on the test split, 2 runs on 100 '
                     'validation identities), so their differences do not '
                     'compare')
    # nothing finished: nothing to say about the data yet
    assert evaluated_on([{'status': 'missing'}], [0]) == \
        'on split 0 (no run has finished yet)'
    # records of runs finished before evaluated_on was recorded: the test split
    assert evaluated_on([{'status': 'done'}], [4]) == 'on the test split of split 4'
