"""Your own data (docs/OWN_DATA.md): the guide's files and commands run as
written on a tiny folder of crops (check, train, evaluate, in this process),
a Market-1501 folder reads as torchreid's own ``market1501`` reads it, a CSV
listing reads as the folder does, and every mistake the guide warns about
stops with a message that names it."""
import os
import os.path as osp
import pickle
import re
import shlex
import sys

import numpy as np
import pytest
import torchreid
import yaml
from helpers import ROOT, in_process
from PIL import Image

from pmm_torchreid import launch
from pmm_torchreid.cli import check_dataset as cli_check
from pmm_torchreid.cli import train as cli_train
from pmm_torchreid.config import checks
from pmm_torchreid.data.folder import FolderDataset, check_query_gallery, folder_dataset, read_csv
from pmm_torchreid.utils.torchreid_internals import dataset_table

GUIDE = osp.join(ROOT, 'docs', 'OWN_DATA.md')

#: the guide's recipe made tiny: ResNet-18 from scratch on 32x16 crops, one
#: epoch of two batches, one evaluation
TINY = ['use_gpu', 'False', 'model.name', 'pmm_resnet18',
        'model.pretrained', 'False', 'data.height', '32', 'data.width', '16',
        'data.cutout_size', '8', 'pmm.block_size', '[1, 1]', 'pmm.top_k', '1',
        'train.batch_size', '16', 'train.max_epoch', '1', 'data.workers', '0',
        'train.print_freq', '1', 'test.eval_freq', '1']


def crops(folder, pids, per_camera, cameras=(1, 2), seed=0, ext='.jpg'):
    """Writes small crops ``<pid>_c<camera>_<n><ext>`` (64x32, one colour per
    identity plus noise) into ``folder``; returns their paths."""
    os.makedirs(str(folder), exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for pid in pids:
        colour = np.random.default_rng(pid).integers(0, 256, 3)
        for camera in cameras:
            for n in range(per_camera):
                pixels = colour + rng.normal(0, 25, (64, 32, 3))
                path = osp.join(str(folder), '{:04d}_c{}_{:04d}{}'.format(
                    pid, camera, n, ext))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                    path)
                paths.append(path)
    return paths


def shop(root, name='shop', gallery_per_camera=5):
    """A dataset folder ``root/name``: 8 training identities (2 crops from
    each of 2 cameras), 6 test identities (a query from each camera,
    ``gallery_per_camera`` gallery crops from each)."""
    folder = osp.join(str(root), name)
    crops(osp.join(folder, 'train'), range(1, 9), 2)
    crops(osp.join(folder, 'query'), range(101, 107), 1, seed=1)
    crops(osp.join(folder, 'gallery'), range(101, 107), gallery_per_camera,
          seed=2)
    return folder


@pytest.fixture
def registry():
    """torchreid's dataset table; what a test registers is taken out after
    it, and so are the files ``--register`` imported."""
    table, names, modules = dataset_table(), set(dataset_table()), set(sys.modules)
    yield table
    for name in set(table) - names:
        del table[name]
    for name in set(sys.modules) - modules:
        if name.startswith('_pmm_register_'):
            del sys.modules[name]


# --------------------------------------------------------------------------
# the guide, as written
# --------------------------------------------------------------------------
def _guide_blocks():
    with open(GUIDE) as f:
        return re.findall(r'```(\w*)\n(.*?)```', f.read(), re.S)


def _block(language, first_line):
    found = [body for lang, body in _guide_blocks()
             if lang == language and body.startswith(first_line)]
    assert len(found) == 1, (language, first_line)
    return found[0]


def _commands():
    """Every command line of the guide's bash blocks, continuations joined."""
    lines = []
    for lang, body in _guide_blocks():
        if lang == 'bash':
            lines += [shlex.split(line) for line in
                      body.replace('\\\n', ' ').splitlines() if line.strip()]
    return lines


def _merged(tree, change):
    for key, value in change.items():
        if isinstance(value, dict):
            _merged(tree.setdefault(key, {}), value)
        else:
            tree[key] = value
    return tree


def test_the_guide_checks_trains_and_evaluates_a_folder_of_crops(
        tmp_path, registry):
    shop(tmp_path / 'reid-data', 'my_shop')
    (tmp_path / 'my_datasets.py').write_text(
        _block('python', '# my_datasets.py'))
    commands = _commands()
    copy, check, train, evaluate = commands
    assert copy[0] == 'cp' and [c[:2] for c in commands[1:]] == [
        ['python', 'scripts/check_dataset.py'], ['python', 'scripts/main.py'],
        ['python', 'scripts/main.py']]
    with open(osp.join(ROOT, copy[1])) as f:
        recipe = yaml.safe_load(f)
    config = _merged(recipe, yaml.safe_load(_block('yaml', '# my_shop.yaml')))
    (tmp_path / copy[2]).write_text(yaml.safe_dump(config))

    proc = in_process(cli_check.main, check[2:], cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for split, count in (('train', 32), ('query', 12), ('gallery', 60)):
        assert re.search(r'my_shop {}\s+{} images, 0 bad'.format(split, count),
                         proc.stdout), proc.stdout
    assert 'all images decode' in proc.stdout

    proc = in_process(cli_train.main, train[2:] + TINY, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    save_dir = tmp_path / 'log' / 'my_shop'
    record = launch.read_results(str(save_dir))
    assert set(record['results']) == {'my_shop'}
    assert record['sources'] == ['my_shop']
    assert 'Done, obtained 12-by-1536 matrix' in proc.stdout  # the queries
    trained = proc.stdout.split('mAP:')[-1].split('\n')[0]

    # the guide evaluates the recipe's last checkpoint; this run has one epoch
    weights = evaluate[evaluate.index('model.load_weights') + 1]
    assert weights == 'log/my_shop/model/model.pth.tar-{}'.format(
        config['train']['max_epoch'])
    proc = in_process(cli_train.main, evaluate[2:] + TINY + [
        'model.load_weights', 'log/my_shop/model/model.pth.tar-1'],
        cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'Loaded pretrained weights' in proc.stdout
    assert proc.stdout.split('mAP:')[1].split('\n')[0] == trained


def test_the_guides_csv_example_reads(tmp_path):
    text = _block('csv', 'path,pid,camid').replace('/data/shop', str(tmp_path))
    rows = [line.split(',') for line in text.splitlines()[1:]]
    for path, _, _ in rows:
        full = osp.join(str(tmp_path), path)
        os.makedirs(osp.dirname(full), exist_ok=True)
        Image.new('RGB', (32, 64)).save(full)
    (tmp_path / 'train.csv').write_text(text)
    assert read_csv(str(tmp_path / 'train.csv')) == [
        (osp.normpath(osp.join(str(tmp_path), path)), int(pid), int(camid))
        for path, pid, camid in rows]
    assert len(rows) == 3 and osp.isabs(rows[2][0])  # relative and absolute


# --------------------------------------------------------------------------
# what reads, and how
# --------------------------------------------------------------------------
def test_a_market1501_folder_reads_as_torchreids_market1501(tmp_path):
    folder = tmp_path / 'market1501' / 'Market-1501-v15.09.15'
    names = {
        'bounding_box_train': ['0002_c1s1_000451_03.jpg', '0002_c2s1_000301_01.jpg',
                               '0007_c3s3_077419_03.jpg', '0007_c6s4_002202_01.jpg'],
        'query': ['0003_c1s1_001051_00.jpg', '0003_c4s6_015641_00.jpg'],
        'bounding_box_test': ['0003_c2s1_000476_01.jpg', '0003_c3s2_003351_02.jpg',
                              '0000_c1s1_000151_01.jpg', '-1_c1s1_000401_03.jpg'],
    }
    for split, files in names.items():
        os.makedirs(str(folder / split))
        for name in files:
            Image.new('RGB', (16, 32)).save(str(folder / split / name))
    (folder / 'bounding_box_test' / 'Thumbs.db').write_bytes(b'\0')
    ours = FolderDataset(root=str(tmp_path), verbose=False,
                         dataset_dir='market1501/Market-1501-v15.09.15')
    theirs = torchreid.data.datasets.init_image_dataset(
        'market1501', root=str(tmp_path), verbose=False)
    for split in ('train', 'query', 'gallery'):
        assert sorted(getattr(ours, split)) == sorted(getattr(theirs, split))
    assert len(ours.gallery) == 3  # the junk crop (-1) and Thumbs.db left out


def test_a_csv_listing_reads_as_the_folder_does(tmp_path):
    folder = shop(tmp_path)
    by_folder = FolderDataset(root=str(tmp_path), dataset_dir='shop',
                              verbose=False)
    listed = tmp_path / 'listed'
    listed.mkdir()
    for split in ('train', 'query', 'gallery'):
        rows = ['path,pid,camid']
        for name in sorted(os.listdir(osp.join(folder, split))):
            pid, camera = re.match(r'(\d+)_c(\d)', name).groups()
            rows.append('{},{},{}'.format(osp.join('..', 'shop', split, name),
                                          int(pid), int(camera) - 1))
        (listed / (split + '.csv')).write_text('\n'.join(rows) + '\n')
    by_csv = FolderDataset(root=str(tmp_path), dataset_dir=str(listed),
                           verbose=False)
    for split in ('train', 'query', 'gallery'):
        assert getattr(by_csv, split) == getattr(by_folder, split)
    assert by_folder.num_train_pids == 8 and by_folder.num_train_cams == 2
    assert {pid for _, pid, _, _ in by_folder.train} == set(range(8))
    assert {pid for _, pid, _, _ in by_folder.query} == set(range(101, 107))
    # picklable, for data loader workers that are not forked
    again = pickle.loads(pickle.dumps(by_folder))
    assert again.train == by_folder.train
    assert pickle.loads(pickle.dumps(folder_dataset('shop'))).dataset_dir == \
        'shop'


# --------------------------------------------------------------------------
# mistakes, each named
# --------------------------------------------------------------------------
def test_a_missing_folder_or_split_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r'dataset folder ".*nowhere" '
                       r'not found .*train/, query/ and gallery/'):
        FolderDataset(root=str(tmp_path), dataset_dir='nowhere')
    folder = shop(tmp_path)
    os.rename(osp.join(folder, 'query'), osp.join(folder, 'queries'))
    with pytest.raises(FileNotFoundError, match=r'the query split of ".*shop" '
                       r'is missing: expected query/ or query.csv'):
        FolderDataset(root=str(tmp_path), dataset_dir='shop')
    os.rename(osp.join(folder, 'queries'), osp.join(folder, 'query'))
    (tmp_path / 'shop' / 'gallery.csv').write_text('path,pid,camid\n')
    with pytest.raises(ValueError, match=r'the gallery split of ".*shop" is '
                       r'given twice, by gallery and gallery.csv'):
        FolderDataset(root=str(tmp_path), dataset_dir='shop')
    os.remove(osp.join(folder, 'gallery.csv'))
    os.rename(osp.join(folder, 'train'), osp.join(folder, 'bounding_box_train'))
    os.makedirs(osp.join(folder, 'train'))
    with pytest.raises(ValueError, match='given twice, by train and '
                       'bounding_box_train'):
        FolderDataset(root=str(tmp_path), dataset_dir='shop')
    os.rmdir(osp.join(folder, 'train'))
    for name in os.listdir(osp.join(folder, 'bounding_box_train')):
        os.remove(osp.join(folder, 'bounding_box_train', name))
    with pytest.raises(ValueError, match=r'the train split ".*bounding_box_train"'
                       r' holds no image'):
        FolderDataset(root=str(tmp_path), dataset_dir='shop')


@pytest.mark.parametrize('name, reason', [
    ('alice_c1_0001.jpg', r'the name does not follow <pid>_c<camera>\[rest\]\.<ext>'),
    ('0001c1_0001.jpg', r'the name does not follow <pid>_c<camera>'),
    ('0001_c12345x.png', None),  # camera 12345: reads
    ('0001_c0_0001.jpg', r'camera c0: camera numbers in file names count from 1'),
    ('-2_c1_0001.jpg', r'identity -2: expected an integer >= 0'),
])
def test_a_misnamed_image_is_named_with_the_pattern(tmp_path, name, reason):
    folder = shop(tmp_path)
    Image.new('RGB', (16, 32)).save(osp.join(folder, 'train', name))
    if reason is None:
        FolderDataset(root=str(tmp_path), dataset_dir='shop', verbose=False)
        return
    with pytest.raises(ValueError, match=r'image ".*{}": {}'.format(
            re.escape(osp.join('train', name)), reason)):
        FolderDataset(root=str(tmp_path), dataset_dir='shop')


def test_several_misnamed_images_are_counted(tmp_path):
    folder = shop(tmp_path)
    for name in ('a.jpg', 'b.jpg', 'c.jpg'):
        Image.new('RGB', (16, 32)).save(osp.join(folder, 'gallery', name))
    with pytest.raises(ValueError, match=r'gallery.a\.jpg": the name does not '
                       r'follow .*\(2 more file\(s\) in ".*gallery" are '
                       r'misnamed, e.g. "b.jpg"\)'):
        FolderDataset(root=str(tmp_path), dataset_dir='shop')


@pytest.mark.parametrize('row, error, message', [
    ('train/0001_c1_0000.jpg,x,0', ValueError,
     r"line 3: pid 'x' is not an integer; expected rows \"path,pid,camid\""),
    ('train/0001_c1_0000.jpg,1,zero', ValueError,
     r"line 3: camid 'zero' is not an integer"),
    ('train/0001_c1_0000.jpg,1', ValueError,
     r"line 3: 2 value\(s\) 'train/0001_c1_0000.jpg,1'; expected 3"),
    ('train/0001_c1_0000.jpg,1,0,extra', ValueError, r'line 3: 4 value\(s\)'),
    ('train/0001_c1_0000.jpg,1,-1', ValueError,
     r'line 3: camid -1; expected an integer >= 0'),
    ('train/0001_c1_0000.jpg,-5,0', ValueError, r'line 3: pid -5'),
    ('train/missing.jpg,1,0', FileNotFoundError,
     r"line 3: image 'train/missing.jpg' not found \(.*missing.jpg\)"),
])
def test_a_bad_csv_row_names_file_line_and_value(tmp_path, row, error, message):
    shop(tmp_path)
    listing = tmp_path / 'shop' / 'train.csv'
    listing.write_text('path,pid,camid\ntrain/0001_c1_0001.jpg,1,0\n{}\n'.format(
        row))
    with pytest.raises(error, match=r'"{}", {}'.format(re.escape(str(listing)),
                                                       message)):
        read_csv(str(listing))


def test_queries_need_a_gallery_crop_from_another_camera(tmp_path):
    item = lambda pid, cam: ('x.jpg', pid, cam)  # noqa: E731
    with pytest.raises(ValueError, match='no query of "shop" has a gallery '
                       'image of its identity from another camera'):
        check_query_gallery([item(1, 0), item(2, 0)],
                            [item(1, 0), item(2, 0), item(3, 1)], '"shop"')
    with pytest.warns(UserWarning, match='1 of 2 queries of "shop" have no '
                      'gallery image'):
        assert check_query_gallery([item(1, 0), item(2, 0)],
                                   [item(1, 1), item(2, 0)], '"shop"') == 1
    # every crop on one camera: the dataset refuses to be built
    folder = osp.join(str(tmp_path), 'one')
    crops(osp.join(folder, 'train'), range(1, 5), 2, cameras=(1, ))
    crops(osp.join(folder, 'query'), range(11, 13), 1, cameras=(1, ))
    crops(osp.join(folder, 'gallery'), range(11, 13), 2, cameras=(1, ))
    with pytest.raises(ValueError, match='Check the camera ids'):
        FolderDataset(root=str(tmp_path), dataset_dir='one')


def test_identities_in_train_and_query_warn(tmp_path):
    folder = shop(tmp_path)
    crops(osp.join(folder, 'query'), [1], 1, seed=3)
    crops(osp.join(folder, 'gallery'), [1], 1, seed=4)
    with pytest.warns(UserWarning, match=r'1 identities of ".*shop" are both '
                      r'in train and in query \(e.g. \[1\]\)'):
        FolderDataset(root=str(tmp_path), dataset_dir='shop', verbose=False)


def test_register_names_a_missing_file_or_module_and_imports_once(
        tmp_path, registry, monkeypatch):
    parse = launch.build_parser().parse_args
    demo = osp.join(ROOT, 'configs', 'pmm_demo.yaml')
    with pytest.raises(FileNotFoundError, match=r'--register nothing.py: no '
                       r'such file \(.*nothing.py\)'):
        launch.setup_config(parse(['--register', 'nothing.py']))
    with pytest.raises(ModuleNotFoundError, match=r"--register no_such_mod: "
                       r"no module named 'no_such_mod' on sys.path"):
        launch.setup_config(parse(['--register', 'no_such_mod']))
    # a dataset the config names but nobody registered: the error says how
    with pytest.raises(ValueError, match=r"'my_shop' is not one of .*your own "
                       r'dataset: register it in a file given with '
                       r'--register, docs/OWN_DATA.md'):
        launch.setup_config(parse(['--config-file', demo, '-s', 'my_shop',
                                   '-t', 'my_shop']))
    code = ('import torchreid\nfrom pmm_torchreid.data.folder import '
            'folder_dataset\ntorchreid.data.register_image_dataset('
            "'{}', folder_dataset('shop'))\n")
    (tmp_path / 'as_file.py').write_text(code.format('shop_file'))
    (tmp_path / 'as_module.py').write_text(code.format('shop_module'))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, 'as_module', raising=False)
    argv = ['--config-file', demo, '--register', str(tmp_path / 'as_file.py'),
            '--register', 'as_module', '-s', 'shop_file', '-t', 'shop_module']
    for _ in range(2):  # a second run in this process registers nothing twice
        cfg = launch.setup_config(parse(argv))
        assert list(cfg.data.sources) == ['shop_file']
    assert registry['shop_file'].dataset_dir == 'shop'
    assert launch.import_user_module(str(tmp_path / 'as_file.py')) is \
        launch.import_user_module(str(tmp_path / 'as_file.py'))
    sys.modules.pop('as_module')


def test_check_dataset_exits_2_on_a_misnamed_file(tmp_path, registry):
    folder = shop(tmp_path / 'reid-data', 'my_shop')
    Image.new('RGB', (16, 32)).save(osp.join(folder, 'query', 'bob.jpg'))
    (tmp_path / 'my_datasets.py').write_text(
        _block('python', '# my_datasets.py'))
    proc = in_process(cli_check.main, [
        '--config-file', osp.join(ROOT, 'configs', 'pmm_demo.yaml'),
        '--register', 'my_datasets.py', '--root', 'reid-data', '-s', 'my_shop',
        '-t', 'my_shop'], cwd=str(tmp_path))
    assert proc.returncode == 2
    assert re.search(r'error: image ".*query.bob\.jpg": the name does not '
                     r'follow <pid>_c<camera>', proc.stderr), proc.stderr


def test_ranks_beyond_a_small_gallery_stop_before_training(tmp_path, registry):
    shop(tmp_path / 'reid-data', 'small', gallery_per_camera=1)  # 12 crops
    registry['small'] = folder_dataset('small')
    save_dir = tmp_path / 'log'
    proc = in_process(cli_train.main, [
        '--config-file', osp.join(ROOT, 'configs', 'pmm_demo.yaml'), '-s',
        'small', '-t', 'small', '--root', str(tmp_path / 'reid-data'),
        'data.save_dir', str(save_dir)] + TINY)
    assert proc.returncode == 1
    assert re.search(r'ValueError: config test.ranks = \[1, 5, 10, 20\]: '
                     r"expected ranks up to 11: the gallery of 'small' gives "
                     r'a CMC curve of 11 .* e.g. test.ranks "\[1, 5, 10\]"',
                     proc.stderr), proc.stderr[-3000:]
    assert 'epoch: [1/1]' not in proc.stdout  # before any training step
    assert not (save_dir / 'model').exists()


def test_check_ranks_refuses_curves_of_different_lengths():
    class Cfg(dict):
        __getattr__ = dict.__getitem__
    cfg = Cfg(cuhk03=Cfg(use_metric_cuhk03=False), test=Cfg(ranks=[1, 5]))
    # identity 1 has 2 own-camera gallery crops, identity 2 none: 10 and 12
    # of the 12 remain
    gallery = [('g', 1, 0), ('g', 1, 0), ('g', 1, 1), ('g', 2, 1)] + \
        [('g', 9, 1)] * 8
    query = [('q', 1, 0), ('q', 2, 0)]
    with pytest.raises(ValueError, match=r"the gallery of 'x' is too small for "
                       r"torchreid's evaluation: 12 images, .* 10 to 12 remain"):
        checks.check_ranks(cfg, {'x': {'query': query, 'gallery': gallery}})
    checks.check_ranks(cfg, {'x': {'query': query[1:], 'gallery': gallery}})
    cfg.cuhk03['use_metric_cuhk03'] = True  # a curve of its own: not checked
    checks.check_ranks(cfg, {'x': {'query': query, 'gallery': gallery}})


def test_the_runners_pass_register_to_every_run(tmp_path, registry, capsys):
    from pmm_torchreid.cli import ablation as cli_ablation  # lazy: one test
    from pmm_torchreid.cli import choose as cli_choose  # lazy: one test
    root = tmp_path / 'data'
    shop(root)
    code = tmp_path / 'shop_datasets.py'
    code.write_text('import torchreid\n'
                    'from pmm_torchreid.data.folder import folder_dataset\n'
                    "torchreid.data.register_image_dataset('shop', "
                    "folder_dataset('shop'))\n")
    config = osp.join(ROOT, 'configs', 'pmm_demo.yaml')
    data = ['data.sources', "['shop']", 'data.targets', "['shop']"]
    ablation = ['--config-file', config, '--root', str(root), '--out',
                str(tmp_path / 'ablation'), '--settings', 'pmm_resnet18:none',
                '--seeds', '1', '--dry-run']
    choose = ['--config-file', config, '--root', str(root), '--key',
              'pmm.mix_ratio', '--values', '0.1', '0.2', '--val-ids', '2',
              '--out', str(tmp_path / 'choice'), '--dry-run']
    script = osp.join(ROOT, 'scripts', 'main.py')
    # without the file the runners cannot check the plan: the name is unknown
    with pytest.raises(SystemExit, match=r"'shop' is not one of"):
        cli_ablation.main(ablation + data, main_script=script)
    with pytest.raises(SystemExit, match=r"--register nowhere.py: no such "
                       r"file"):
        cli_choose.main(choose + ['--register', 'nowhere.py'] + data)
    capsys.readouterr()
    assert cli_ablation.main(ablation + ['--register', str(code)] + data,
                             main_script=script) == 0
    assert cli_choose.main(choose + ['--register', str(code)] + data) == 0
    commands = [shlex.split(line) for line in
                capsys.readouterr().out.splitlines() if line.strip()]
    assert len(commands) == 1 + 2 * 2  # 1 ablation run, 2 values x 2 seeds
    for cmd in commands:
        at = cmd.index('--register')
        assert cmd[at + 1] == str(code) and cmd.count('--register') == 1
