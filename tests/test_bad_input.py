"""Bad input gets a clear error, never a hang: broken images (in the reader,
in real runs, in scripts/check_dataset.py) and broken configs."""
import os
import os.path as osp
import shutil
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
import torchreid
from helpers import ENV as HELPERS_ENV
from helpers import ROOT
from PIL import Image

import pmm_torchreid  # noqa: F401  (installs the reader)
from pmm_torchreid import launch
from pmm_torchreid.config import checks
from pmm_torchreid.data import BadImageError, drop_bad_images, find_bad_images, read_image
from pmm_torchreid.models.backbones import build_backbone, feature_map_size

MAIN = launch
FAST = [
    'use_gpu', 'False', 'data.height', '32', 'data.width', '16',
    'pmm.block_size', '[1, 1]', 'pmm.top_k', '1', 'train.batch_size', '16',
    'train.print_freq', '10', 'train.max_epoch', '1',
]
ENV = dict(HELPERS_ENV, PYTHONWARNINGS='default')


def good_png(path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 16, 3), dtype=np.uint8)).save(path)
    return str(path)


def bad_files(folder):
    """One file of each kind of damage; returns kind -> path."""
    folder = str(folder)
    src = good_png(osp.join(folder, 'good.png'))
    data = open(src, 'rb').read()
    files = {}
    files['corrupt'] = osp.join(folder, 'corrupt.png')
    with open(files['corrupt'], 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n' + os.urandom(300))
    files['truncated'] = osp.join(folder, 'truncated.png')
    with open(files['truncated'], 'wb') as f:
        f.write(data[:len(data) // 2])
    files['empty'] = osp.join(folder, 'empty.jpg')
    open(files['empty'], 'wb').close()
    files['text'] = osp.join(folder, 'text.jpg')
    with open(files['text'], 'w') as f:
        f.write('not an image')
    files['directory'] = osp.join(folder, 'directory.png')
    os.mkdir(files['directory'])
    return src, files


# --------------------------------------------------------------------------
# the reader
# --------------------------------------------------------------------------
def test_every_kind_of_bad_image_raises_at_once_naming_the_file(tmp_path):
    good, files = bad_files(tmp_path)
    assert read_image(good).size == (16, 32)
    for kind, path in files.items():
        start = time.time()
        with pytest.raises(BadImageError) as info:
            read_image(path)
        assert time.time() - start < 2, kind
        assert path in str(info.value) and 'check_dataset.py' in str(info.value)
    with pytest.raises(FileNotFoundError, match='missing.png'):
        read_image(str(tmp_path / 'missing.png'))


def test_torchreid_datasets_read_through_the_safe_reader(tmp_path):
    good, files = bad_files(tmp_path)
    items = [(good, 0, 0), (files['truncated'], 1, 0)]

    class Tiny(torchreid.data.ImageDataset):
        def __init__(self):
            super().__init__(items, items, items, mode='query', verbose=False)

    dataset = Tiny()
    assert dataset[0]['img'].size == (16, 32)
    with pytest.raises(BadImageError, match='truncated.png'):
        dataset[1]  # torchreid's own reader would retry this forever


def test_find_bad_images_lists_exactly_the_bad_ones_in_order(tmp_path):
    good, files = bad_files(tmp_path)
    paths = [good, files['text'], good, files['corrupt']]
    bad = find_bad_images(paths, workers=3)
    assert [p for p, _ in bad] == [files['text'], files['corrupt']]
    assert all(reason for _, reason in bad)


def test_drop_bad_images_filters_relabels_and_warns(tmp_path):
    good, files = bad_files(tmp_path)
    other = good_png(tmp_path / 'other.png')
    train = [(good, 0, 0), (files['empty'], 1, 0), (other, 2, 1)]
    query = [(good, 5, 0), (files['corrupt'], 6, 1)]
    gallery = [(other, 5, 1)]

    class Tiny(torchreid.data.ImageDataset):
        def __init__(self):
            super().__init__(train, query, gallery, mode='train', verbose=False)

    dataset = Tiny()
    assert dataset.num_train_pids == 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        bad = drop_bad_images(dataset)
    assert [p for p, _ in bad] == sorted([files['empty'], files['corrupt']])
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert any(files['empty'] in m for m in messages)
    assert any(files['corrupt'] in m for m in messages)
    # identity 1 lost its only image: labels stay contiguous for the classifier
    # (torchreid appends the dataset index to every item)
    assert dataset.train == [(good, 0, 0, 0), (other, 1, 1, 0)]
    assert dataset.num_train_pids == 2 and len(dataset) == 2
    assert dataset.query == [(good, 5, 0, 0)]
    assert dataset.gallery == [(other, 5, 1, 0)]


# --------------------------------------------------------------------------
# real runs on a damaged copy of the synthetic dataset
# --------------------------------------------------------------------------
@pytest.fixture(scope='module')
def damaged_root(synthetic_root, tmp_path_factory):
    root = tmp_path_factory.mktemp('damaged')
    shutil.copytree(osp.join(synthetic_root, 'pmm_synthetic'),
                    osp.join(str(root), 'pmm_synthetic'))
    folder = osp.join(str(root), 'pmm_synthetic')
    train = sorted(os.listdir(osp.join(folder, 'train')))
    query = sorted(os.listdir(osp.join(folder, 'query')))
    bad_train = osp.join(folder, 'train', train[5])
    bad_query = osp.join(folder, 'query', query[3])
    with open(bad_train, 'r+b') as f:  # truncated
        f.truncate(200)
    with open(bad_query, 'wb') as f:  # garbage
        f.write(os.urandom(500))
    return str(root), bad_train, bad_query


def run(script, *args, timeout=300):
    start = time.time()
    proc = subprocess.run(
        [sys.executable, osp.join('scripts', script)] + list(args), cwd=ROOT,
        capture_output=True, text=True, timeout=timeout, env=ENV
    )
    return proc, time.time() - start


@pytest.mark.slow
def test_bad_images_stop_the_run_before_training_listing_all(
        damaged_root, tmp_path):
    root, bad_train, bad_query = damaged_root
    proc, seconds = run(
        'main.py', '--config-file', 'configs/pmm_demo.yaml', '--root', root,
        'data.save_dir', str(tmp_path), 'data.workers', '2', *FAST
    )
    assert proc.returncode != 0
    assert 'BadImageError: 2 bad image(s) in dataset' in proc.stderr
    assert bad_train in proc.stderr and bad_query in proc.stderr
    assert 'epoch: [1/1]' not in proc.stdout  # stopped before any training
    print('stopped after {:.1f} s'.format(seconds))


@pytest.mark.slow
def test_without_the_check_a_bad_image_stops_the_run_when_read(
        damaged_root, tmp_path):
    root, _, bad_query = damaged_root
    # two loader workers: the error must cross the process boundary intact
    proc, _ = run(
        'main.py', '--config-file', 'configs/pmm_demo.yaml', '--root', root,
        'data.save_dir', str(tmp_path), 'data.workers', '2',
        'data.check_images', 'False', 'test.evaluate', 'True', *FAST
    )
    assert proc.returncode != 0
    assert 'BadImageError: cannot read image "{}"'.format(bad_query) \
        in proc.stderr
    assert 'Will redo' not in proc.stdout  # torchreid's endless retry


@pytest.mark.slow
def test_skip_bad_images_leaves_them_out_and_trains(damaged_root, tmp_path):
    root, bad_train, bad_query = damaged_root
    proc, _ = run(
        'main.py', '--config-file', 'configs/pmm_demo.yaml', '--root', root,
        'data.save_dir', str(tmp_path), 'data.workers', '0',
        'data.skip_bad_images', 'True', *FAST
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert bad_train in proc.stderr and bad_query in proc.stderr
    assert proc.stderr.count('UserWarning: skipping bad image') == 2  # one each
    assert ('pmm_synthetic: left out 2 bad image(s) (1 train, 1 query, 0 '
            'gallery)') in proc.stdout
    assert 'mAP:' in proc.stdout
    assert osp.isfile(osp.join(str(tmp_path), 'model', 'model.pth.tar-1'))


def test_check_dataset_reports_every_bad_file(damaged_root, synthetic_root,
                                             capsys):
    from pmm_torchreid.cli.check_dataset import main
    root, bad_train, bad_query = damaged_root
    config = osp.join(ROOT, 'configs', 'pmm_demo.yaml')
    assert main(['--config-file', config, '--root', root]) == 1
    out = capsys.readouterr().out
    assert '2 bad image(s)' in out
    assert bad_train in out and bad_query in out
    assert 'pmm_synthetic train        800 images, 1 bad' in out
    assert main(['--config-file', config, '--root', synthetic_root]) == 0
    assert 'all images decode' in capsys.readouterr().out
    assert main(['--config-file', config, '--root', synthetic_root,
                 'pmm.top_kk', '3']) == 2
    assert "did you mean 'pmm.top_k'" in capsys.readouterr().err


# --------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------
def setup(*opts, config='configs/pmm_demo.yaml'):
    args = MAIN.build_parser().parse_args(
        ['--config-file', osp.join(ROOT, config)] + list(opts))
    return MAIN.setup_config(args)


@pytest.mark.parametrize('opts, words', [
    (['pmm.mix', 'hardmix'], ['pmm.mix', "'hardmix'", 'hard_mix']),
    (['train.batch_size', '30'], ['train.batch_size', '(30, 4)', 'multiple']),
    (['train.batch_size', '4'], ['(4, 4)', 'at least 2 identities']),
    (['sampler.train_sampler', 'RandomSampler'],
     ['sampler.train_sampler', 'RandomIdentitySampler', 'partner']),
    (['pmm.block_size', '[3, 1]'],
     ['pmm.block_size', '8x4 feature map', 'block heights that divide 8 are '
      '[1, 2, 4, 8]']),
    (['pmm.top_k', '17'], ['pmm.top_k = 17', 'has 16 blocks']),
    (['data.height', '100'], ['100x64', 'gives a 7x4 feature map',
                              'block heights that divide 7 are [1, 7]']),
    (['model.name', 'pmm_resnet19'], ['model.name', 'pmm_resnet18']),
    (['data.sources', "['market']"], ['data.sources', "'market'", 'market1501']),
    (['data.transforms', "['random_flip', 'cutuot']"], ["'cutuot'"]),
    (['train.lr', '0.0'], ['train.lr', 'positive']),
    (['train.optim', 'adamw'], ['train.optim', 'amsgrad']),
    (['train.lr_scheduler', 'step'], ['train.lr_scheduler', 'multi_step']),
    (['test.eval_freq', '0'], ['test.eval_freq', '-1']),
    (['train.checkpoint_freq', '-1'], ['train.checkpoint_freq', '-1', '>= 1',
                                       'or 0']),
    (['test.visrank', 'True'], ['test.visrank', 'test.evaluate']),
    (['loss.name', 'triplet'], ['loss.name', "'pmm' exactly"]),
    (['data.cutout_prob', '1.5'], ['data.cutout_prob', '[0, 1]']),
    (['pmm.label_smooth', '1.0'], ['pmm.label_smooth', '[0, 1)']),
    (['data.norm_std', '[0.2, 0.2]'], ['data.norm_std', '3 values']),
])
def test_bad_values_are_refused_naming_key_value_and_expectation(opts, words):
    with pytest.raises(ValueError) as info:
        setup(*opts)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_unknown_keys_are_refused_with_the_closest_names(tmp_path):
    with pytest.raises(KeyError) as info:
        setup('train.batchsize', '32')
    assert str(info.value).startswith(
        "command line: unknown config key 'train.batchsize'; did you mean "
        "'train.batch_size' or")
    bad = tmp_path / 'bad.yaml'
    bad.write_text('model:\n  name: pmm\npmm:\n  topk: 3\n')
    with pytest.raises(KeyError) as info:
        setup(config=str(bad))
    assert str(bad) in str(info.value) and "'pmm.topk'" in str(info.value)
    assert "'pmm.top_k'" in str(info.value)
    bad.write_text('train:\n  batch_size: many\n')
    with pytest.raises(ValueError, match='bad.yaml.*many.*train.batch_size'):
        setup(config=str(bad))
    bad.write_text('train: [unclosed\n')
    with pytest.raises(ValueError, match='bad.yaml" is not valid yaml'):
        setup(config=str(bad))


def test_missing_dataset_names_the_expected_layout(tmp_path):
    cfg = setup('--root', str(tmp_path), config='configs/pmm_market1501.yaml')
    with pytest.raises(FileNotFoundError) as info:
        checks.check_paths(cfg)
    message = str(info.value)
    assert "dataset 'market1501'" in message and str(tmp_path) in message
    assert osp.join('Market-1501-v15.09.15', 'bounding_box_train') in message
    os.makedirs(tmp_path / 'market1501' / 'bounding_box_train')
    os.makedirs(tmp_path / 'market1501' / 'query')
    with pytest.raises(FileNotFoundError, match='bounding_box_test'):
        checks.check_paths(cfg)
    os.makedirs(tmp_path / 'market1501' / 'bounding_box_test')
    checks.check_paths(cfg)  # the layout without the version folder is fine too
    cfg = setup('--root', str(tmp_path), config='configs/pmm_cuhk03.yaml')
    with pytest.raises(FileNotFoundError, match='cuhk03_release/cuhk-03.mat'):
        checks.check_paths(cfg)
    cfg = setup('--root', str(tmp_path), 'model.load_weights', 'nope.pth')
    with pytest.raises(FileNotFoundError, match="model.load_weights = 'nope.pth'"):
        checks.check_paths(cfg)


@pytest.mark.slow
def test_main_refuses_a_missing_dataset_before_any_work(tmp_path):
    proc, seconds = run('main.py', '--config-file', 'configs/pmm_market1501.yaml',
                        '--root', str(tmp_path / 'nowhere'),
                        'data.save_dir', str(tmp_path / 'log'))
    assert proc.returncode != 0
    assert 'FileNotFoundError' in proc.stderr and 'nowhere' in proc.stderr
    assert 'root folder itself does not exist' in proc.stderr
    assert not osp.exists(tmp_path / 'nowhere')  # no download was attempted
    assert not osp.exists(tmp_path / 'log')  # nothing written


@pytest.mark.parametrize('backbone', ['resnet18', 'osnet_x0_25'])
def test_feature_map_size_is_what_the_backbone_gives(backbone):
    body = build_backbone(backbone, pretrained=False).body
    body.eval()
    for height, width in [(64, 32), (60, 30), (100, 44), (130, 66)]:
        with torch.no_grad():
            real = body(torch.zeros(1, 3, height, width)).shape[2:]
        assert feature_map_size(backbone, height, width) == tuple(real)
