"""The value chooser (pmm_torchreid.study.choose, scripts/choose.py): values
read with the config's types, the choice (best mean validation mAP, the first
value on equal means, the seed spread), the refusals, the run records it reads
(validation only), and, end to end on the synthetic data, two tiny runs,
a rerun that starts none, and the chosen.yaml trained by scripts/main.py."""
import json
import os
import subprocess
import sys

import pytest
from helpers import CONFIG, ENV, ROOT, SMALL, in_process

from pmm_torchreid.cli.choose import main
from pmm_torchreid.config import check_config, get_default_config, merge_file
from pmm_torchreid.study.choose import (
    LAUNCHER,
    ChooseError,
    Chooser,
    chosen_config,
    format_table,
    held_out_note,
    parse_value,
    pick,
    portable_dump,
    read_validation,
    summarize,
    verdict,
)

MAIN = os.path.join(ROOT, 'scripts', 'main.py')
#: SMALL without its data.val_ids (the chooser sets it), one epoch
TINY = [x for pair in zip(SMALL[0::2], SMALL[1::2])
        if pair[0] != 'data.val_ids' for x in pair] + ['train.max_epoch', '1']
VAL_IDS = 90  # of pmm_synthetic's 100 training identities: 10 train


def demo_config():
    cfg = get_default_config()
    merge_file(cfg, CONFIG)
    return cfg


def choose_args(root, out, key, values, *extra, seeds=('1', '2')):
    return (['--config-file', CONFIG, '--root', root, '--out', out, '--key', key,
             '--values'] + list(values) + ['--val-ids', str(VAL_IDS), '--seeds']
            + list(seeds) + list(extra) + ['--'] + TINY)


def fake_record(save_dir, mAP, rank1, evaluated_on='validation',
                val_ids=VAL_IDS):
    """A finished run's results.json as scripts/main.py writes it."""
    os.makedirs(save_dir, exist_ok=True)
    with open(os.path.join(save_dir, 'results.json'), 'w') as f:
        json.dump({'model': 'pmm_resnet18', 'mix': 'hard_mix', 'seed': 1,
                   'evaluated_on': evaluated_on, 'val_ids': val_ids,
                   'results': {'pmm_synthetic': {'epoch': 1, 'rank1': rank1,
                                                 'mAP': mAP}},
                   'train_seconds': 1.0, 'run_seconds': 2.0,
                   'wall_seconds': 3.0}, f)


def test_tiny_overrides_leave_validation_to_the_chooser():
    assert 'data.val_ids' not in TINY and len(TINY) == len(SMALL)


def test_values_are_read_with_the_configs_types():
    cfg = demo_config()
    assert parse_value(cfg, 'pmm.mix_ratio', '0.0625') == (0.0625, '0.0625')
    assert parse_value(cfg, 'pmm.mix_ratio', '1') == (1.0, '1.0')  # a float key
    assert parse_value(cfg, 'train.lr', '1e-4') == (0.0001, '0.0001')
    assert parse_value(cfg, 'train.max_epoch', '30') == (30, '30')
    assert parse_value(cfg, 'pmm.block_size', '[1, 1]') == ([1, 1], '[1, 1]')
    assert parse_value(cfg, 'pmm.block_size', '(2,1)') == ([2, 1], '[2, 1]')
    assert parse_value(cfg, 'pmm.mix', 'cutmix') == ('cutmix', 'cutmix')
    assert parse_value(cfg, 'pmm.soft_margin', 'false') == (False, 'False')
    assert parse_value(cfg, 'train.channels_last', 'true') == ('True', 'True')
    assert parse_value(cfg, 'train.channels_last', 'auto') == ('auto', 'auto')
    for key, text, message in [
            ('train.max_epoch', '30.5', "expected a int like the config's 24"),
            ('pmm.mix_ratio', 'much', 'expected a float'),
            ('pmm.mix_ration', '0.1', "did you mean 'pmm.mix_ratio'"),
            ('pmm', '0.1', 'is a section of the config'),
            ('data.val_ids', '5', 'the chooser sets it'),
            ('train.seed', '5', 'the chooser sets it'),
            # the images read are no choice (every value would see others)
            ('cuhk03.classic_split', 'True', 'changes the validation set'),
            ('train.channels_last', 'maybe', "expected 'auto', True or False")]:
        with pytest.raises(ChooseError, match=message.replace('(', r'\(')):
            parse_value(cfg, key, text)


def test_the_chosen_config_reads_back(tmp_path):
    # train.channels_last is stored as a text ('auto', 'True', 'False')
    chooser = Chooser(CONFIG, str(tmp_path / 'out'), 'train.channels_last',
                      ['auto', 'false'], VAL_IDS, opts=TINY)
    assert chooser.values == ['auto', 'False']
    cfg = chosen_config(CONFIG, TINY, chooser.settings[1], save_dir='log/x')
    path = tmp_path / 'chosen.yaml'
    path.write_text(cfg.dump())
    back = merge_file(get_default_config(), str(path))
    assert back.dump() == cfg.dump() and back.train.channels_last == 'False'
    assert back.data.val_ids == 0 and back.data.save_dir == 'log/x'


def market_folder(root, cams):
    """Empty files in Market-1501's layout under ``root``: training
    identities 1-5, each seen by ``cams``, and identity 7 to test."""
    for folder, pids in [('bounding_box_train', range(1, 6)),
                         ('query', [7]), ('bounding_box_test', [7])]:
        path = root / 'market1501' / folder
        path.mkdir(parents=True)
        for pid in pids:
            for cam in cams:
                (path / '{:04d}_c{}s1_000001_00.jpg'.format(pid, cam)).touch()
    return root


def test_a_market1501_layout_folder(tmp_path):
    """Any torchreid dataset: the training identities of a folder laid out
    as Market-1501 are counted before any run."""
    root = market_folder(tmp_path / 'data', (1, 2))
    opts = TINY + ['data.sources', "['market1501']", 'data.targets', "['market1501']"]
    ok = Chooser(CONFIG, str(tmp_path / 'a'), 'train.lr', ['0.1', '0.2'], 3,
                 opts=opts, root=str(root))
    assert ok.check_ids() == 5
    # every identity has two cameras: 3 held out, each with a query camera
    assert ok.queries == {'query_ids': 3, 'query': 3, 'gallery': 3}
    # the folder records the training images it chooses on: the same data
    # under another root is accepted, other training images are refused
    ok.check_folder()
    copy = market_folder(tmp_path / 'copy', (1, 2))
    again = Chooser(CONFIG, str(tmp_path / 'a'), 'train.lr', ['0.1', '0.2'], 3,
                    opts=opts, root=str(copy))
    again.check_ids()
    again.check_folder()
    (copy / 'market1501' / 'bounding_box_train' / '0006_c1s1_000001_00.jpg').touch()
    again.check_ids()
    os.makedirs(again.run_dir(0, 1))  # a run of the recorded data
    with pytest.raises(ChooseError, match='market1501/train: 10 images .* '
                       'there, 11 now'):
        again.check_folder()
    with pytest.raises(ChooseError, match="--val-ids 4: expected 2 to 3 validation "
                       "identities \\(market1501's training set has 5 identities"):
        Chooser(CONFIG, str(tmp_path / 'b'), 'train.lr', ['0.1', '0.2'], 4,
                opts=opts, root=str(root)).check_ids()
    with pytest.raises(ChooseError, match="dataset 'market1501' not found"):
        Chooser(CONFIG, str(tmp_path / 'c'), 'train.lr', ['0.1', '0.2'], 3,
                opts=opts, root=str(tmp_path / 'nowhere')).check_ids()
    # one camera only: no held-out identity could have a query; refused
    # before any run, naming the option and the dataset
    one_cam = market_folder(tmp_path / 'one_cam', (1,))
    with pytest.raises(ChooseError, match="--val-ids 3 on market1501's training "
                       "set: data.val_ids = 3: none of the held-out identities "
                       "is seen by two cameras"):
        Chooser(CONFIG, str(tmp_path / 'd'), 'train.lr', ['0.1', '0.2'], 3,
                opts=opts, root=str(one_cam)).check_ids()


def test_the_held_out_share_is_told_and_a_large_one_warned():
    """The chooser says how many identities it holds out and how many each
    run trains on; more than a third held out draws a warning that names
    both counts (a third exactly does not)."""
    assert held_out_note(100, 485) == [
        'validation: 100 of 485 training identities held out (21 %); each '
        'run trains on 385']
    assert held_out_note(100, 485, {'query_ids': 60, 'query': 120,
                                    'gallery': 300})[1] == (
        'validation queries: 60 of the 100 held-out identities are seen by two '
        'cameras or more (120 query and 300 gallery images); the others are '
        'gallery distractors')
    lines = held_out_note(100, 200)
    assert lines[0].endswith('(50 %); each run trains on 100')
    assert len(lines) == 2 and 'train on 100 where the chosen config will ' \
        'train on 200' in lines[1]
    assert len(held_out_note(100, 300)) == 1
    assert len(held_out_note(101, 300)) == 2


def test_the_best_mean_wins_and_the_spread_is_told():
    # the best mean (second) is neither the best single seed (first), nor
    # the first or last value, nor the best Rank-1 (third)
    rows = summarize(['max-seed', 'best-mean', 'last'],
                     [[60.0, 40.0], [50.5, 51.5], [49.0, 49.5]],
                     [[70.0, 70.0], [60.0, 60.0], [90.0, 90.0]])
    choice = pick(rows)
    assert choice['best'] == 1 and choice['tied_with'] == []
    # behind by 1.0 within max(0.71, 14.1); 'last' behind by 1.75 > 0.71
    assert choice['within_spread_of'] == ['max-seed'] and choice['within_spread']
    assert choice['runner_up'] == 0
    lines = verdict('k', rows, choice, [1, 2])
    assert lines[0] == 'chosen: k = best-mean (mean validation mAP 51.00 ± 0.71 over 2 seeds)'
    assert lines[1].startswith('the best is within the seed spread of max-seed: '
                               'treat the choice as a tie')
    table = format_table('k', rows, [1, 2]).splitlines()
    assert table[0] == '| k | mAP mean ± std | mAP per seed (1, 2) | Rank-1 mean |'
    assert table[3] == '| best-mean | 51.00 ± 0.71 | 50.50, 51.50 | 60.00 |'
    # a lead larger than both spreads
    rows = summarize(['a', 'b'], [[50.0, 51.0], [70.0, 71.0]], [[1, 1], [2, 2]])
    choice = pick(rows)
    assert choice['best'] == 1 and not choice['within_spread']
    assert verdict('k', rows, choice, [1, 2])[1] == (
        'the best is ahead of the runner-up, a, by 20.00 mAP, more than the '
        'larger of their seed spreads (0.71)')
    # equal means: the first value given, said so
    rows = summarize(['a', 'b', 'c'], [[40.0, 41.0], [50.0, 52.0], [52.0, 50.0]],
                     [[1, 1]] * 3)
    choice = pick(rows)
    assert choice['best'] == 1 and choice['tied_with'] == ['c']
    lines = verdict('k', rows, choice, [1, 2])
    assert lines[1] == ('tie: b, c have the same mean validation mAP; the first '
                        'value given, b, is chosen')
    assert 'within the seed spread of c' in lines[2]
    # one seed: no spread measured, and said so
    rows = summarize(['a', 'b'], [[50.0], [49.0]], [[1], [1]])
    lines = verdict('k', rows, pick(rows), [1])
    assert lines[0] == 'chosen: k = a (mean validation mAP 50.00 over 1 seed)'
    assert lines[1].startswith('one seed: no seed spread is measured')
    assert format_table('k', rows, [1]).splitlines()[2] == '| a | 50.00 | 50.00 | 1.00 |'


def test_only_validation_records_are_read(tmp_path):
    folder = str(tmp_path / 'run')
    assert read_validation(folder, VAL_IDS) is None  # not finished
    fake_record(folder, 12.5, 30.0)
    assert read_validation(folder, VAL_IDS) == {'mAP': 12.5, 'rank1': 30.0,
                                                'epoch': 1}
    with pytest.raises(ChooseError, match='holds 50 out'):
        read_validation(folder, 50)
    fake_record(folder, 12.5, 30.0, evaluated_on='test', val_ids=0)
    with pytest.raises(ChooseError, match="was evaluated on 'test'; the "
                       "chooser reads validation results only"):
        read_validation(folder, VAL_IDS)


def test_a_choice_from_finished_runs(synthetic_root, tmp_path, capsys):
    """Every run finished (records written here): nothing is started, the
    best mean is chosen, choice.json and chosen.yaml are written; a record
    measured on the test split is refused."""
    out = str(tmp_path / 'out')
    values = ['1', '0.5', '2.0']
    maps = {'1.0': [20.0, 24.0], '0.5': [23.0, 23.5], '2.0': [12.0, 13.0]}
    chooser = Chooser(CONFIG, out, 'pmm.weight_ce', values, VAL_IDS, [1, 2],
                      TINY, root=synthetic_root, main_script=MAIN)
    assert chooser.run_dir(1, 2) == os.path.join(
        out, 'pmm.weight_ce=0.5', 'split0', 'seed2')
    for i, text in enumerate(['1.0', '0.5', '2.0']):
        for j, seed in enumerate((1, 2)):
            fake_record(chooser.run_dir(i, seed), maps[text][j], 50.0 + i)
    argv = choose_args(synthetic_root, out, 'pmm.weight_ce', values)
    assert main(argv, main_script=MAIN) == 0
    printed = capsys.readouterr().out
    assert 'start:' not in printed and printed.count('skip (finished)') == 6
    assert ('validation: 90 of 100 training identities held out (90 %); each '
            'run trains on 10') in printed and 'warning: more than a third' in printed
    assert 'validation queries: ' in printed
    assert '| 0.5 | 23.25 ± 0.35 | 23.00, 23.50 | 51.00 |' in printed
    assert 'chosen: pmm.weight_ce = 0.5' in printed
    assert 'the best is within the seed spread of 1.0' in printed
    with open(os.path.join(out, 'choice.json')) as f:
        choice = json.load(f)
    assert choice['chosen'] == 0.5 and choice['chosen_text'] == '0.5'
    assert choice['key'] == 'pmm.weight_ce' and choice['values'] == [1.0, 0.5, 2.0]
    assert choice['val_ids'] == VAL_IDS and choice['seeds'] == [1, 2]
    assert choice['within_spread'] and choice['within_spread_of'] == ['1.0']
    assert not choice['tie'] and choice['overrides'] == TINY
    assert choice['per_value'][1]['mAP'] == {'1': 23.0, '2': 23.5}
    assert choice['per_value'][1]['run_dirs']['2'] == chooser.run_dir(1, 2)
    assert choice['per_value'][1]['options'] == [
        'model.name', 'pmm_resnet18', 'loss.name', 'pmm', 'pmm.mix',
        'hard_mix', 'pmm.weight_ce', '0.5']
    # chosen.yaml: the recipe with the chosen value, validation off
    path = os.path.join(out, 'chosen.yaml')
    with open(path) as f:
        head = f.read().split('\n', 1)[0]
    assert head.startswith('# Chosen by scripts/choose.py on ')
    cfg = merge_file(get_default_config(), path)
    check_config(cfg)
    assert cfg.pmm.weight_ce == 0.5 and cfg.data.val_ids == 0
    assert cfg.data.save_dir == 'log/pmm_demo_pmm.weight_ce=0.5'
    assert cfg.data.root == synthetic_root and cfg.data.height == 32
    assert cfg.train.channels_last == 'auto'
    # a run measured on the test split is refused, and nothing is chosen
    fake_record(chooser.run_dir(2, 1), 99.0, 99.0, evaluated_on='test', val_ids=0)
    os.remove(os.path.join(out, 'choice.json'))
    with pytest.raises(SystemExit, match="evaluated on 'test'"):
        main(argv, main_script=MAIN)
    assert not os.path.exists(os.path.join(out, 'choice.json'))


def test_plans_the_chooser_refuses(synthetic_root, tmp_path):
    out = str(tmp_path / 'out')

    def refused(argv, message):
        with pytest.raises(SystemExit) as info:
            main(argv, main_script=MAIN)
        assert message in str(info.value), (message, str(info.value))

    args = choose_args(synthetic_root, out, 'pmm.weight_ce', ['0.125', '0.25'])
    at = args.index('--val-ids') + 1
    refused(choose_args(synthetic_root, out, 'pmm.mix_ratio', ['0.125', '0.5']),
            "setting 'pmm.mix_ratio=0.125': config pmm.block_size = [1, 1] / "
            "pmm.mix_ratio = 0.125: at input 32x16")
    refused(choose_args(synthetic_root, out, 'pmm.weight_ce', ['0.125']),
            'expected 2 values or more')
    refused(choose_args(synthetic_root, out, 'pmm.weight_ce', ['0.5', '5e-1']),
            "'0.5' and '5e-1' are the same value")
    refused(choose_args(synthetic_root, out, 'pmm.weight_cee', ['0.1', '0.2']),
            "unknown config key 'pmm.weight_cee'; did you mean 'pmm.weight_ce'")
    refused(args[:at] + ['1'] + args[at + 1:],
            '--val-ids 1: expected 2 validation identities or more')
    refused(args[:at] + ['99'] + args[at + 1:],  # 100 training identities
            "--val-ids 99: expected 2 to 98 validation identities "
            "(pmm_synthetic's training set has 100")
    refused(args + ['data.val_ids', '5'], 'the overrides set data.val_ids themselves')
    refused(args + ['pmm.weight_ce', '0.5'], 'the overrides set pmm.weight_ce')
    refused(args + ['train.seed', '3'], 'the overrides set train.seed')
    own = str(tmp_path / 'own.yaml')
    cfg = demo_config()
    cfg.data.val_ids = 5
    with open(own, 'w') as f:
        f.write(cfg.dump())
    refused([own if a == CONFIG else a for a in args],
            'sets data.val_ids = 5; the chooser holds the validation '
            'identities out itself')
    assert not os.path.exists(out)  # nothing was started or written
    # a folder holds one plan: another key, values or recipe is refused
    Chooser(CONFIG, out, 'pmm.weight_ce', ['0.125', '0.25'], VAL_IDS,
            opts=TINY).check_folder()
    for key, values, opts, message in [
            ('pmm.weight_ce', ['0.125', '0.5'], TINY, 'holds the choice of '
             "pmm.weight_ce among ['0.125', '0.25'] on 90 validation identities; "
             "this command chooses pmm.weight_ce among ['0.125', '0.5']"),
            ('train.lr', ['0.1', '0.2'], TINY, 'holds the choice of pmm.weight_ce'),
            ('pmm.weight_ce', ['0.125', '0.25'], TINY + ['train.lr', '0.1'],
             'holds runs of another recipe')]:
        with pytest.raises(ChooseError, match=message.replace('[', r'\[')):
            Chooser(CONFIG, out, key, values, VAL_IDS, opts=opts).check_folder()
    ablation = str(tmp_path / 'ablation')
    os.makedirs(ablation)
    with open(os.path.join(ablation, 'recipe.json'), 'w') as f:
        json.dump({'config': '', 'opts': []}, f)
    with pytest.raises(ChooseError, match='holds runs of an ablation'):
        Chooser(CONFIG, ablation, 'pmm.weight_ce', ['0.1', '0.2'], VAL_IDS,
                opts=TINY).check_folder()


def test_dry_run(tmp_path, capsys):
    out = str(tmp_path / 'out')
    argv = ['--config-file', CONFIG, '--root', 'data', '--out', out, '--key',
            'pmm.block_size', '--values', '[1, 1]', '(2, 1)', '--val-ids', '90',
            '--dry-run', 'train.max_epoch', '1']
    assert main(argv, main_script=MAIN) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and not os.path.exists(out)
    for line, (value, seed) in zip(lines, [('[1, 1]', 1), ('[2, 1]', 1),
                                           ('[1, 1]', 2), ('[2, 1]', 2)]):
        assert line.split()[1] == MAIN
        assert "pmm.block_size '{}' train.seed {} ".format(value, seed) in line
        assert line.endswith('train.max_epoch 1 data.val_ids 90')
    # pmm-choose (no scripts/main.py): each run is pmm-train's main
    assert main(argv) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.split(' ', 1)[1].startswith('-c ' + repr(LAUNCHER[1]))


def test_models_are_chosen_as_the_runner_trains_them(tmp_path):
    """--key model.name: PMM keeps the config's mix, BDB trains with
    pmm.mix none, a torchreid model with torchreid's triplet engine; each
    value's chosen config passes the config check."""
    cfg = demo_config()
    values = ['pmm_resnet18', 'bdb_resnet18', 'resnet18']
    chooser = Chooser(CONFIG, str(tmp_path / 'out'), 'model.name', values,
                      VAL_IDS, opts=TINY)
    by_model = {}
    for value, setting in zip(values, chooser.settings):
        chosen = chosen_config(CONFIG, TINY, setting)
        by_model[value] = (chosen.model.name, chosen.loss.name,
                           chosen.pmm.mix, setting.spec)
    assert by_model == {
        'pmm_resnet18': ('pmm_resnet18', 'pmm', cfg.pmm.mix,
                         'model.name=pmm_resnet18'),
        'bdb_resnet18': ('bdb_resnet18', 'pmm', 'none',
                         'model.name=bdb_resnet18'),
        'resnet18': ('resnet18', 'triplet', cfg.pmm.mix,
                     'model.name=resnet18')}
    assert cfg.pmm.mix != 'none'  # else the BDB row would prove nothing
    # a torchreid value trains with torchreid's triplet engine, as in the
    # runner, whatever torchreid loss the config names
    plain = cfg.clone()
    plain.model.name, plain.loss.name = 'resnet18', 'softmax'
    path = str(tmp_path / 'softmax.yaml')
    with open(path, 'w') as f:
        f.write(plain.dump())
    chooser = Chooser(path, str(tmp_path / 'out'), 'model.name',
                      ['resnet18', 'pmm_resnet18'], VAL_IDS, opts=TINY)
    assert [(c.model.name, c.loss.name) for c in (
        chosen_config(path, TINY, s) for s in chooser.settings)] == [
        ('resnet18', 'triplet'), ('pmm_resnet18', 'pmm')]
    # a BDB config has pmm.mix none: its PMM value would not mix at all
    bdb = cfg.clone()
    bdb.model.name, bdb.pmm.mix = 'bdb_resnet18', 'none'
    path = str(tmp_path / 'bdb.yaml')
    with open(path, 'w') as f:
        f.write(bdb.dump())
    with pytest.raises(ChooseError, match='config file "{}" trains bdb_'
                       'resnet18, which takes no mix .*would not mix at all'
                       .format(path)):
        Chooser(path, str(tmp_path / 'out'), 'model.name',
                ['bdb_resnet18', 'pmm_resnet18'], VAL_IDS, opts=TINY)


def test_a_model_value_carries_its_options(tmp_path):
    """--key model.name with the runner's ,KEY=VALUE options: BDB with its
    bands competes with BDB; the option reaches the runs' command lines and
    the chosen config, and its own folder; options that set what the chooser
    sets, the images read, the model itself, or what the overrides set are
    refused, and so is an option that is not KEY=VALUE."""
    values = ['bdb_resnet18', 'bdb_resnet18,bdb.bands=4']
    chooser = Chooser(CONFIG, str(tmp_path / 'out'), 'model.name', values,
                      VAL_IDS, opts=TINY)
    assert chooser.texts == values
    assert chooser.values == ['bdb_resnet18', 'bdb_resnet18']  # the model
    assert chooser.options == [[], ['bdb.bands', '4']]
    plain, bands = chooser.settings
    assert [chosen_config(CONFIG, TINY, s).bdb.bands for s in (plain, bands)
            ] == [0, 4]
    assert (chosen_config(CONFIG, TINY, bands).model.name,
            chosen_config(CONFIG, TINY, bands).pmm.mix) == ('bdb_resnet18',
                                                            'none')
    assert plain.slug != bands.slug
    commands = chooser.commands()
    assert len(commands) == 4  # 2 values x 2 seeds
    for command in commands:
        folder = command[command.index('data.save_dir') + 1]
        with_bands = os.sep + bands.slug + os.sep in folder
        assert with_bands == (os.sep + plain.slug + os.sep not in folder)
        assert ('bdb.bands' in command) == with_bands
        if with_bands:
            assert command[command.index('bdb.bands') + 1] == '4'
    # the choice records the model, its options and the text; chosen.yaml
    # trains BDB with the bands
    for (seed, value), mAP in zip([(s, v) for v in (0, 1) for s in (1, 2)],
                                  [30.0, 31.0, 40.0, 41.0]):
        fake_record(chooser.run_dir(value, seed), mAP, mAP)
    choice = chooser.choose()
    assert (choice['chosen'], choice['chosen_text'],
            choice['chosen_options']) == ('bdb_resnet18',
                                          'bdb_resnet18,bdb.bands=4',
                                          ['bdb.bands', '4'])
    assert [v['value_options'] for v in choice['per_value']] == [
        [], ['bdb.bands', '4']]
    cfg = demo_config()
    merge_file(cfg, str(tmp_path / 'out' / 'chosen.yaml'))
    assert (cfg.model.name, cfg.bdb.bands, cfg.pmm.mix) == ('bdb_resnet18', 4,
                                                            'none')
    refused = {
        'bdb_resnet18,bdb.bands': 'is not KEY=VALUE',
        'bdb_resnet18,bdb.bands=4,bdb.bands=0': 'sets bdb.bands twice',
        'bdb_resnet18,bdb.bands=0': 'give the same config',
        ',bdb.bands=4': 'no model before the options',
        'pmm_resnet18:random_mix': r'pmm_resnet18,pmm.mix=random_mix',
        'bdb_resnet18, bdb.bands=4': 'has a space',
        'bdb_resnet18,data.root=x': 'sets data.root',
        'bdb_resnet18,train.seed=3': 'sets train.seed',
        'bdb_resnet18,model.name=pmm_resnet18': 'sets model.name',
        'bdb_resnet18,train.max_epoch=2': 'so do the overrides',
        'bdb_resnet18,pmm.block_size=[1, 1]': 'cannot hold a comma',
        'pmm_resnet18,bdb.bands=4': "the band branch is BDB's",
    }
    for value, message in refused.items():
        with pytest.raises(ChooseError, match=message):
            Chooser(CONFIG, str(tmp_path / 'out'), 'model.name',
                    ['bdb_resnet18', value], VAL_IDS, opts=TINY)
    assert 'train.max_epoch' in TINY[0::2]  # the overrides' case above
    # options go with model.name only; a list value keeps its comma
    with pytest.raises(ChooseError, match='go with --key model.name only'):
        Chooser(CONFIG, str(tmp_path / 'out'), 'pmm.mix',
                ['hard_mix', 'cutmix,pmm.top_k=2'], VAL_IDS, opts=TINY)
    assert Chooser(CONFIG, str(tmp_path / 'out'), 'train.stepsize',
                   ['[5, 10]', '[6, 12]'], VAL_IDS, opts=TINY).values == [
        [5, 10], [6, 12]]
    # under a BDB config, a PMM value that brings its own mix is accepted
    bdb = demo_config()
    bdb.model.name, bdb.pmm.mix = 'bdb_resnet18', 'none'
    path = str(tmp_path / 'bdb.yaml')
    with open(path, 'w') as f:
        f.write(bdb.dump())
    chooser = Chooser(path, str(tmp_path / 'out2'), 'model.name',
                      ['bdb_resnet18', 'pmm_resnet18,pmm.mix=hard_mix'],
                      VAL_IDS, opts=TINY)
    assert chosen_config(path, TINY, chooser.settings[1]).pmm.mix == 'hard_mix'


# --------------------------------------------------------------------------
# end to end: two tiny runs, a rerun, the chosen config trained
# --------------------------------------------------------------------------
LRS = ['0.0005', '0.002']


@pytest.fixture(scope='module')
def chosen(synthetic_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('choose'))
    argv = choose_args(synthetic_root, out, 'train.lr', LRS, seeds=['1'])
    # the runner forks its runs: a child process, not a test worker's thread
    first = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'choose.py')]
                           + argv, cwd=ROOT, env=ENV, capture_output=True,
                           text=True, timeout=500)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    runs = [os.path.join(out, 'train.lr=' + lr, 'split0', 'seed1') for lr in LRS]
    mtimes = [os.stat(os.path.join(r, 'results.json')).st_mtime_ns for r in runs]
    from pmm_torchreid.cli.choose import main as choose_main
    again = in_process(choose_main, argv, main_script=MAIN)
    return dict(out=out, first=first, again=again, runs=runs, mtimes=mtimes)


@pytest.mark.slow
def test_choice_on_validation_runs_and_its_resume(chosen):
    first, again = chosen['first'], chosen['again']
    assert first.stdout.count('start: ') == 2
    records = []
    for run in chosen['runs']:  # every run evaluated the held-out identities
        with open(os.path.join(run, 'results.json')) as f:
            records.append(json.load(f))
        assert records[-1]['evaluated_on'] == 'validation'
        assert records[-1]['val_ids'] == VAL_IDS
    maps = [r['results']['pmm_synthetic']['mAP'] for r in records]
    best = LRS[maps.index(max(maps))]
    with open(os.path.join(chosen['out'], 'choice.json')) as f:
        choice = json.load(f)
    assert choice['chosen_text'] == best and choice['chosen'] == float(best)
    assert [v['mAP']['1'] for v in choice['per_value']] == maps
    assert 'chosen: train.lr = {}'.format(best) in first.stdout
    assert 'one seed: no seed spread is measured' in first.stdout
    # the rerun starts nothing, leaves the runs alone and chooses the same
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert 'start:' not in again.stdout
    assert again.stdout.count('skip (finished)') == 2
    assert 'chosen: train.lr = {}'.format(best) in again.stdout
    assert [os.stat(os.path.join(r, 'results.json')).st_mtime_ns
            for r in chosen['runs']] == chosen['mtimes']


@pytest.mark.slow
def test_chosen_yaml_trains_and_tests(chosen, tmp_path):
    from pmm_torchreid.cli.train import main as train_main
    path = os.path.join(chosen['out'], 'chosen.yaml')
    with open(os.path.join(chosen['out'], 'choice.json')) as f:
        value = json.load(f)['chosen']
    cfg = merge_file(get_default_config(), path)
    assert cfg.train.lr == value and cfg.data.val_ids == 0
    save_dir = str(tmp_path / 'final')
    proc = in_process(train_main, ['--config-file', path, 'data.save_dir', save_dir])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(save_dir, 'results.json')) as f:
        record = json.load(f)
    assert record['evaluated_on'] == 'test' and record['val_ids'] == 0
    assert '  lr: {}\n'.format(value) in proc.stdout


def test_chosen_yaml_leaves_the_device_to_the_machine_that_runs_it(tmp_path):
    """use_gpu defaults to whether torch sees a GPU: chosen.yaml leaves it
    out at that default (a CPU machine's choice trains on a GPU elsewhere),
    keeps it where it was set against the default, and reads back whole."""
    cfg = demo_config()
    text = portable_dump(cfg)
    assert 'use_gpu' not in text and 'use_gpu:' in cfg.dump()
    path = tmp_path / 'chosen.yaml'
    path.write_text(text)
    assert merge_file(get_default_config(), str(path)).dump() == cfg.dump()
    # set on purpose (named in the config file or the overrides): kept
    assert 'use_gpu: {}'.format(str(cfg.use_gpu).lower()) in portable_dump(
        cfg, set_on_purpose=True)
    cfg.use_gpu = not cfg.use_gpu
    assert 'use_gpu: {}'.format(str(cfg.use_gpu).lower()) in portable_dump(cfg)
