"""The ablation runner in process (pmm_torchreid.study.ablation and
pmm_torchreid.cli.ablation): settings, tables, the recipe check, a dry run.
tests/test_ablation.py runs scripts/ablation.py end to end."""
import csv
import json
import os
import re
import statistics

import pytest
from helpers import ROOT, fake_campus

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
    # periodic checkpoints do not change the runs: they may be added later
    check_recipe(out, recipe_of(CONFIG, ['train.max_epoch', '1',
                                         'train.checkpoint_freq', '5']))
    with pytest.raises(AblationError, match='holds runs of another recipe'):
        check_recipe(out, recipe_of(CONFIG, ['train.checkpoint_freq', '5',
                                             'train.max_epoch', '2']))
    text = write_outputs(out, [], [Setting('pmm')], [0], recipe)
    # no run finished; the network's size is known all the same (ResNet-50)
    assert '| pmm | - | - | - | 31.120 | 1536 |' in text
    assert sorted(os.listdir(out)) == [
        'recipe.json', 'results.csv', 'results.json', 'table.md']
    # a row of results.csv says what its run was evaluated on
    done = dict(setting='pmm', split_id=0, seed=1, status='done', rank1=80.0,
                mAP=60.0, train_seconds=60, evaluated_on='validation',
                val_ids=100)
    write_outputs(out, [done], [Setting('pmm')], [0], recipe)
    with open(os.path.join(out, 'results.csv')) as f:
        row = next(csv.DictReader(f))
    assert (row['evaluated_on'], row['val_ids']) == ('validation', '100')


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
        return {(names[0], 'train'): [('{}/{}.jpg'.format(split, i), i, 0)
                                      for i in range(3)]}
    monkeypatch.setattr(ablation, 'dataset_items', by_split)
    monkeypatch.setattr(ablation, 'fingerprint', lambda items, sizes: {
        'images': len(items), 'digest': ' '.join(i[0] for i in items)})
    found = ablation.check_splits(CONFIG, [], synthetic_root, [0, 2, 2, 4])
    assert read == [0, 2, 4]
    # what each split reads, for the folder's data record
    assert list(found) == ['0', '2', '4']
    assert found['2'] == {'root': synthetic_root, 'parts': {
        'pmm_synthetic/train': {'images': 3,
                                'digest': '2/0.jpg 2/1.jpg 2/2.jpg'}}}

    # data.combineall trains on train + query + gallery: splits that only
    # move images between them are the same training data
    def moved(names, root, split, **kwargs):
        read.append(names)
        everything = [('{}.jpg'.format(i), i, 0) for i in range(6)]
        train = everything[split:split + 3]
        rest = [p for p in everything if p not in train]
        return {(name, part): items for name in names for part, items in
                (('train', train), ('query', rest[:1]), ('gallery', rest[1:]))}
    monkeypatch.setattr(ablation, 'dataset_items', moved)
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


def test_a_folder_holds_the_runs_of_one_data(tmp_path, capsys):
    """data.json: the first command records what each split reads; the
    same data (also copied under another root, or linked) is accepted, a
    new split is added, other images or labels for a recorded split are
    refused, naming the part, the counts and the way out."""
    def data(root, names, pids=None):
        items = []
        for i, name in enumerate(names):
            path = root / 'd' / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                path.write_bytes(b'x' * len(name))
            items.append((str(path), (pids or range(len(names)))[i], 0))
        return {'0': {'root': str(root), 'parts': {'d/train': fingerprint(
            items)}}}

    out = str(tmp_path / 'out')
    record = os.path.join(out, 'data.json')
    first = data(tmp_path / 'a', ['1.jpg', '2.jpg'])
    more = data(tmp_path / 'b', ['1.jpg', '2.jpg', '3.jpg'])
    # recorded by a command that left no run of the split (a wrong root,
    # stopped at once): recorded again, with a note
    check_data(out, more)
    capsys.readouterr()
    check_data(out, first)
    assert 'but holds no run of it: recorded again from "{}"'.format(
        tmp_path / 'a') in capsys.readouterr().err
    with open(record) as f:
        assert json.load(f) == {'splits': first}
    os.makedirs(os.path.join(out, 'pmm', 'split0', 'seed1'))  # a run
    check_data(out, first)
    # a copy, listed in another order, its identities numbered otherwise
    # (torchreid numbers DukeMTMC-reID's in the order its folder is listed)
    check_data(out, data(tmp_path / 'copy', ['2.jpg', '1.jpg'], pids=[5, 7]))
    os.symlink(tmp_path / 'a', tmp_path / 'link')
    check_data(out, data(tmp_path / 'link', ['1.jpg', '2.jpg']))  # a link
    with pytest.raises(AblationError) as info:
        check_data(out, more)
    assert str(info.value) == (
        '"{out}" holds runs of split 0 that read other data than the data '
        'root "{b}" gives now (recorded in "{record}", from the root "{a}"):'
        '\n  d/train: 2 images (digest {d}) there, 3 now (digest {d3})\n'
        'use another --out, or the data those runs read; if you know the '
        'runs compare (the same images fetched again), move "{record}" away '
        'and it is recorded again'.format(
            out=out, b=tmp_path / 'b', a=tmp_path / 'a', record=record,
            d=first['0']['parts']['d/train']['digest'],
            d3=more['0']['parts']['d/train']['digest']))
    more['2'] = more.pop('0')
    check_data(out, more)  # another split: recorded beside, with its root
    with open(record) as f:
        assert json.load(f)['splits'] == dict(first, **more)
    # the same files with other identities, or replaced by others of another
    # size, are other data
    relabelled = data(tmp_path / 'a', ['1.jpg', '2.jpg'], pids=[0, 0])
    (tmp_path / 'c' / 'd').mkdir(parents=True)
    (tmp_path / 'c' / 'd' / '1.jpg').write_bytes(b'longer')
    replaced = data(tmp_path / 'c', ['1.jpg', '2.jpg'])
    for other in (relabelled, replaced):
        with pytest.raises(AblationError, match='2 images .* there, 2 now '
                           '.*; the same count, other files, labels or sizes'):
            check_data(out, other)
    # a missing image is named by the fingerprint itself
    with pytest.raises(FileNotFoundError, match='1 of the 2 images listed are '
                       'missing, e.g. "{}"'.format(tmp_path / 'nowhere.jpg')):
        fingerprint([(str(tmp_path / 'a' / 'd' / '1.jpg'), 0, 0),
                     (str(tmp_path / 'nowhere.jpg'), 1, 0)])
    # a record that is not one is refused, naming the file, not a traceback
    for text in ['[]', 'null', '{"splits": {"0": []}}',
                 '{"splits": {"0": {"root": "r", "parts": {"d": {"images": 3}}}}}']:
        with open(record, 'w') as f:
            f.write(text)
        with pytest.raises(AblationError, match='"{}" is not a data record of '
                           'this runner'.format(re.escape(record))):
            check_data(out, first)
    # commands on one folder take turns: while another holds the folder's
    # lock, the record waits, then adds its split to what is there
    import fcntl  # lazy: POSIX only, as the lock
    import threading  # lazy: only this check runs a second command
    os.remove(record)
    check_data(out, first)
    lock = os.open(os.path.join(out, '.data.lock'), os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)
    later = {'4': first['0']}
    waiting = threading.Thread(target=check_data, args=(out, later))
    waiting.start()
    waiting.join(0.5)
    assert waiting.is_alive()  # blocked by the lock
    os.close(lock)
    waiting.join(10)
    with open(record) as f:
        assert sorted(json.load(f)['splits']) == ['0', '4']
    # a folder written before the records: noted, then recorded
    old = str(tmp_path / 'old')
    os.makedirs(os.path.join(old, 'pmm', 'split0', 'seed1'))
    open(os.path.join(old, 'pmm', 'split0', 'seed1', 'results.json'), 'w').close()
    capsys.readouterr()
    check_data(old, first)
    assert capsys.readouterr().err == (
        'note: "{}" holds 1 finished run but no data.json: it records the data '
        'of this command from now on; check that those runs read the same '
        'data\n'.format(old))
    check_data(old, first)
    assert capsys.readouterr().err == ''


def test_cuhk01_copied_or_linked_is_the_same_data(tmp_path):
    """CUHK01's split file names the images under the root where torchreid
    wrote it: a copy of that root, or a link to it, lists the same images
    and gives the same fingerprints; once the original is gone, the copy's
    split file names missing images, and the check says so."""
    import shutil  # lazy: only this test copies a dataset

    import torchreid

    from pmm_torchreid.data.check import dataset_items
    first = tmp_path / 'a'
    fake_campus(str(first / 'cuhk01' / 'campus'))
    torchreid.data.datasets.init_image_dataset('cuhk01', root=str(first),
                                               mode='train', verbose=False)

    def prints(root):
        return {key: fingerprint(items) for key, items in dataset_items(
            ['cuhk01'], str(root), 2).items()}
    original = prints(first)
    assert original[('cuhk01', 'train')]['images'] == 24  # 6 ids x 4 shots
    os.symlink(first, tmp_path / 'link')
    assert prints(tmp_path / 'link') == original
    # a copy reads the original's images through the copied split file...
    shutil.copytree(first, tmp_path / 'copy')
    assert prints(tmp_path / 'copy') == original
    # ...and its own once the split file names them: the same data
    splits = tmp_path / 'copy' / 'cuhk01' / 'splits.json'
    splits.write_text(splits.read_text().replace(str(first),
                                                 str(tmp_path / 'copy')))
    assert prints(tmp_path / 'copy') == original
    shutil.copytree(tmp_path / 'copy', tmp_path / 'stale')
    shutil.rmtree(tmp_path / 'copy')
    with pytest.raises(FileNotFoundError, match='24 of the 24 images listed '
                       'are missing, e.g. "{}(.|\n)*scripts/cuhk01_splits.py'
                       .format(re.escape(str(tmp_path / 'copy' / 'cuhk01')))):
        prints(tmp_path / 'stale')


def test_the_runner_checks_the_data_record_before_any_run(synthetic_root,
                                                         tmp_path,
                                                         monkeypatch):
    """scripts/ablation.py compares the folder's data.json with what the
    command reads, after the recipe check and before any run: a record of
    other data stops it, and the record is left as it was."""
    from pmm_torchreid.study.ablation import Ablation
    monkeypatch.setattr(Ablation, 'run', lambda *args: pytest.fail(
        'a run started on other data'))
    out = tmp_path / 'out'
    (out / 'pmm_resnet18-none' / 'split0' / 'seed1').mkdir(parents=True)
    record = out / 'data.json'
    record.write_text(json.dumps({'splits': {'0': {'root': '/elsewhere', 'parts': {
        'pmm_synthetic/train': {'images': 1, 'digest': '0123456789abcdef'}}}}}))
    before = record.read_bytes()
    with pytest.raises(SystemExit, match='holds runs of split 0 that read other '
                       'data(.|\n)*pmm_synthetic/train: 1 images'):
        main(['--config-file', CONFIG, '--root', synthetic_root, '--out',
              str(out), '--seeds', '1', '--settings', 'pmm_resnet18:none'],
             main_script=MAIN)
    assert record.read_bytes() == before
    assert sorted(os.listdir(out)) == ['.data.lock', 'data.json',
                                       'pmm_resnet18-none', 'recipe.json']


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
