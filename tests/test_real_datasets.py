"""The plugin on torchreid's real dataset loaders: CUHK03 and CUHK01.

CUHK03 cannot be shipped, so a tiny ``cuhk-03.mat`` (MATLAB v7.3, i.e. HDF5 with
object references, laid out as torchreid's ``cuhk03.py`` reads the real one) and
the two new-protocol files (Zhong et al., CVPR 2017) are fabricated.  The
detected and the labeled variants differ in images, image counts and split, so
the tests can tell which one ``configs/pmm_cuhk03.yaml`` selects.

CUHK01's real images sit in ``<repo>/../shared/data/cuhk01/campus``; torchreid
writes ``splits.json`` next to ``campus``, so the test links ``campus`` into a
temporary root and never writes into the shared folder.
"""
import glob
import os
import os.path as osp
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest
import scipy.io
import torch
from helpers import ENV, ROOT, SHARED
from PIL import Image

import pmm_torchreid  # noqa: F401  (registers the PMM models)
from pmm_torchreid import config as C
from pmm_torchreid import launch
from pmm_torchreid.data import Cutout, build_datamanager

REPO = ROOT
CUHK03_CONFIG = osp.join(REPO, 'configs', 'pmm_cuhk03.yaml')
CUHK01_CAMPUS = osp.join(SHARED, 'data', 'cuhk01', 'campus')


main_script = launch


# ---------------------------------------------------------------------------
# a fabricated CUHK03
# ---------------------------------------------------------------------------
NUM_PAIRS = 2  # camera pairs (the real dataset has 5)
IDS_PER_PAIR = 6  # identities per camera pair
IMAGE_SHAPE = {'detected': (24, 12), 'labeled': (20, 10)}  # H x W
# of the 10 image cells per identity (0-4 view 1, 5-9 view 2), the filled
# ones; the others are MATLAB empty arrays, which torchreid skips
SHOTS = {'detected': (0, 1, 2, 5, 6, 7), 'labeled': (0, 1, 5, 6)}
QUERY_SHOTS = (0, 5)  # new protocol: one query per view and identity
# the camera pair whose identities train; the other pair is the test set
TRAIN_PAIR = {'detected': 0, 'labeled': 1}


def image_name(campid, pid, shot):
    """torchreid's file name for a cell, all arguments 0-based."""
    return '{:d}_{:03d}_{:d}_{:02d}.png'.format(
        campid + 1, pid + 1, 1 if shot < 5 else 2, shot + 1
    )


def identity_label(campid, pid):
    """The 1-based identity label of the new protocol's ``labels``."""
    return campid * IDS_PER_PAIR + pid + 1


def fake_image(image_type, campid, pid, shot):
    code = 0 if image_type == 'detected' else 1
    rng = np.random.default_rng([code, campid, pid, shot])
    height, width = IMAGE_SHAPE[image_type]
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_cuhk03_mat(path, cells, testsets):
    """Writes a MATLAB v7.3 ``cuhk-03.mat`` as torchreid's cuhk03.py reads it.

    Args:
        path (str): file to write.
        cells (dict): ``'detected'``/``'labeled'`` -> per camera pair a list
            of identities, each a list of 10 ``H x W x 3`` uint8 arrays or
            None (empty cell).
        testsets (list): classic test sets, each a list of 1-based
            ``[campid, pid]`` pairs.

    Like MATLAB, every array is stored transposed (torchreid reads
    ``mat[ref][:].T``) and referenced objects live in ``#refs#``.
    """
    with h5py.File(path, 'w') as mat:
        refs = mat.create_group('#refs#')

        def put(array):
            dataset = refs.create_dataset(str(len(refs)), data=array)
            return dataset.ref

        def put_empty():
            # how MATLAB stores [] : its dimensions, flagged as empty
            dataset = refs.create_dataset(
                str(len(refs)), data=np.zeros(2, dtype=np.uint64)
            )
            dataset.attrs['MATLAB_class'] = np.bytes_('double')
            dataset.attrs['MATLAB_empty'] = np.uint8(1)
            return dataset.ref

        for image_type, pairs in cells.items():
            pair_refs = np.empty((1, len(pairs)), dtype=h5py.ref_dtype)
            for c, identities in enumerate(pairs):
                cell = np.empty((10, len(identities)), dtype=h5py.ref_dtype)
                for p, images in enumerate(identities):
                    for i, img in enumerate(images):
                        cell[i, p] = put_empty() if img is None else put(
                            np.ascontiguousarray(img.T)
                        )
                pair_refs[0, c] = put(cell)  # read back .T: num_pids x 10
            mat.create_dataset(image_type, data=pair_refs)

        test_refs = np.empty((1, len(testsets)), dtype=h5py.ref_dtype)
        for t, pairs in enumerate(testsets):
            test_refs[0, t] = put(np.asarray(pairs, dtype=np.float64).T)
        mat.create_dataset('testsets', data=test_refs)


def write_new_protocol(path, filelist, labels, train, query, gallery):
    """Writes a ``cuhk03_new_protocol_config_*.mat`` (MATLAB v5, 1-based).

    Indices and labels are integer arrays: torchreid indexes with them as read.
    """
    def column(idxs):  # 0-based list -> 1-based MATLAB column vector
        return np.asarray(idxs, dtype=np.int32).reshape(-1, 1) + 1

    names = np.empty((len(filelist), 1), dtype=object)  # a cell array
    for i, name in enumerate(filelist):
        names[i, 0] = name
    scipy.io.savemat(path, {
        'filelist': names,
        'labels': np.asarray(labels, dtype=np.int32).reshape(-1, 1),
        'train_idx': column(train),
        'query_idx': column(query),
        'gallery_idx': column(gallery),
    })


def fabricate_cuhk03(root):
    """Writes ``<root>/cuhk03`` and returns what each variant must load.

    Returns:
        dict: ``'detected'``/``'labeled'`` -> ``'images'`` (file name ->
        array), ``'train'``/``'query'``/``'gallery'`` (file name -> 1-based
        identity label).
    """
    dataset_dir = osp.join(root, 'cuhk03')
    os.makedirs(osp.join(dataset_dir, 'cuhk03_release'))
    cells, expected = {}, {}
    for image_type in ('detected', 'labeled'):
        pairs, images = [], {}
        filelist, labels, train, query, gallery = [], [], [], [], []
        for c in range(NUM_PAIRS):
            identities = []
            for p in range(IDS_PER_PAIR):
                row = [None] * 10
                for shot in SHOTS[image_type]:
                    row[shot] = fake_image(image_type, c, p, shot)
                    name = image_name(c, p, shot)
                    images[name] = row[shot]
                    if c == TRAIN_PAIR[image_type]:
                        subset = train
                    elif shot in QUERY_SHOTS:
                        subset = query
                    else:
                        subset = gallery
                    subset.append(len(filelist))
                    filelist.append(name)
                    labels.append(identity_label(c, p))
                identities.append(row)
            pairs.append(identities)
        cells[image_type] = pairs
        write_new_protocol(
            osp.join(dataset_dir,
                     'cuhk03_new_protocol_config_{}.mat'.format(image_type)),
            filelist, labels, train, query, gallery
        )
        expected[image_type] = {'images': images}
        for subset, idxs in (('train', train), ('query', query),
                             ('gallery', gallery)):
            expected[image_type][subset] = {
                filelist[i]: labels[i] for i in idxs
            }
    testsets = [[[1, 1], [2, 2], [2, 3]], [[1, 4], [2, 5]]]  # classic splits
    write_cuhk03_mat(
        osp.join(dataset_dir, 'cuhk03_release', 'cuhk-03.mat'), cells, testsets
    )
    return expected


def test_fabricated_variants_are_distinguishable(tmp_path):
    # guards the tests below: a wrong variant must give other files and counts
    expected = fabricate_cuhk03(str(tmp_path))
    det, lab = expected['detected'], expected['labeled']
    assert len(det['train']) != len(lab['train'])
    assert len(det['gallery']) != len(lab['gallery'])
    for subset in ('train', 'query', 'gallery'):
        assert set(det[subset].values()).isdisjoint(lab[subset].values())
    with h5py.File(str(tmp_path / 'cuhk03/cuhk03_release/cuhk-03.mat'),
                   'r') as mat:  # the layout torchreid dereferences
        camp = mat[mat['detected'][0][1]][:].T
        assert camp.shape == (IDS_PER_PAIR, 10)
        img = mat[camp[2, 5]][:].T
        assert np.array_equal(img, det['images'][image_name(1, 2, 5)])
        assert mat[camp[2, 3]][:].T.ndim < 3  # an empty cell


# ---------------------------------------------------------------------------
# helpers for scripts/main.py runs
# ---------------------------------------------------------------------------
def run_main(args, timeout):
    # one intra-op thread (on a 2-core machine shared with other jobs torch's
    # spinning OpenMP threads made these runs up to 10x slower: a 1-epoch
    # CUHK01 run took 27 s vs 6 min), and the CPU whatever GPUs there are
    env = dict(ENV)
    proc = subprocess.run(
        [sys.executable, osp.join('scripts', 'main.py')] + list(args),
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        universal_newlines=True, timeout=timeout
    )
    assert proc.returncode == 0, 'scripts/main.py failed:\n' + proc.stdout[-6000:]
    return proc.stdout


def dataset_summary(log):
    """The first dataset table of a log: subset -> (ids, images, cameras)."""
    rows = {}
    for subset in ('train', 'query', 'gallery'):
        match = re.search(
            r'^\s*{}\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*$'.format(subset),
            log, re.M
        )
        assert match, 'no "{}" row in the dataset summary'.format(subset)
        rows[subset] = tuple(int(v) for v in match.groups())
    return rows


def results(log):
    """mAP and Rank-1 (in %) of the last evaluation in a log."""
    maps = re.findall(r'^mAP: ([0-9.]+)%$', log, re.M)
    rank1 = re.findall(r'^Rank-1\s*: ([0-9.]+)%$', log, re.M)
    assert maps and rank1, 'no mAP / Rank-1 line in the log'
    return float(maps[-1]), float(rank1[-1])


def check_checkpoint(save_dir, epoch):
    path = osp.join(save_dir, 'model', 'model.pth.tar-{}'.format(epoch))
    state = torch.load(path, map_location='cpu', weights_only=True)
    assert state['epoch'] == epoch
    assert isinstance(state['rank1'], float)
    assert state['state_dict']


# ---------------------------------------------------------------------------
# CUHK03 (fabricated)
# ---------------------------------------------------------------------------
def test_cuhk03_config_loads_detected_images_and_new_protocol(tmp_path):
    expected = fabricate_cuhk03(str(tmp_path))['detected']
    cfg = main_script.setup_config(main_script.build_parser().parse_args([
        '--config-file', CUHK03_CONFIG, '--root', str(tmp_path),
        'data.workers', '0', 'use_gpu', 'False',
        # small and quick; the block grid must tile the 4x2 map
        'data.height', '64', 'data.width', '32', 'data.cutout_size', '16',
        'pmm.block_size', '[2, 1]',
        'pmm.top_k', '2', 'train.batch_size', '8', 'sampler.num_instances', '2'
    ]))
    assert cfg.cuhk03.labeled_images is False
    assert cfg.cuhk03.classic_split is False
    datamanager = build_datamanager(**C.imagedata_kwargs(cfg))

    images_dir = str(tmp_path / 'cuhk03' / 'images_detected')
    train = datamanager.train_loader.dataset.train
    query = datamanager.test_dataset['cuhk03']['query']
    gallery = datamanager.test_dataset['cuhk03']['gallery']
    for items in (train, query, gallery):
        assert {osp.dirname(item[0]) for item in items} == {images_dir}
    def names(items):
        return sorted(osp.basename(item[0]) for item in items)

    assert names(train) == sorted(expected['train'])
    assert names(query) == sorted(expected['query'])
    assert names(gallery) == sorted(expected['gallery'])

    # train ids relabelled 0..n-1 one-to-one; test ids keep the labels
    relabel = {}
    for path, pid, camid, *_ in train:
        relabel.setdefault(expected['train'][osp.basename(path)], set()).add(pid)
    assert all(len(pids) == 1 for pids in relabel.values())
    assert sorted(p for pids in relabel.values() for p in pids) \
        == list(range(IDS_PER_PAIR))
    assert datamanager.num_train_pids == IDS_PER_PAIR
    for items, subset in ((query, 'query'), (gallery, 'gallery')):
        for path, pid, camid, *_ in items:
            assert pid == expected[subset][osp.basename(path)]
    # camera = view (the third field of the name), 0-based
    for path, _, camid, *_ in train + query + gallery:
        assert camid == int(osp.basename(path).split('_')[2]) - 1

    # the pixels extracted from the .mat are the detected ones
    for path, *_ in train[:3] + query[:3]:
        stored = np.asarray(Image.open(path).convert('RGB'))
        assert np.array_equal(stored, expected['images'][osp.basename(path)])

    # a training batch: 4 identities x 2, at 64x32, Cutout from the config
    assert any(isinstance(t, Cutout)
               for t in datamanager.transform_tr.transforms)
    batch = next(iter(datamanager.train_loader))
    assert batch['img'].shape == (8, 3, 64, 32)
    counts = torch.bincount(batch['pid'])
    assert counts[counts > 0].tolist() == [2] * 4


@pytest.mark.slow
def test_cuhk03_config_trains_and_evaluates_with_main(tmp_path):
    expected = fabricate_cuhk03(str(tmp_path))['detected']
    save_dir = str(tmp_path / 'log')
    log = run_main([
        '--config-file', CUHK03_CONFIG, '--root', str(tmp_path),
        'model.name', 'pmm_osnet_x0_25', 'model.pretrained', 'False',
        'data.height', '64', 'data.width', '32', 'data.cutout_size', '16',
        'pmm.block_size', '[2, 1]',
        'pmm.top_k', '2', 'train.max_epoch', '1', 'train.batch_size', '8',
        'sampler.num_instances', '2', 'data.workers', '0',
        'train.warmup_epochs', '0', 'train.lr_scheduler', 'single_step',
        'train.stepsize', '[10]', 'data.save_dir', save_dir
    ], timeout=600)

    # detected images, new protocol: the split fabricated for them
    summary = dataset_summary(log)
    assert summary['train'] == (IDS_PER_PAIR, len(expected['train']), 2)
    assert summary['query'] == (IDS_PER_PAIR, len(expected['query']), 2)
    assert summary['gallery'] == (IDS_PER_PAIR, len(expected['gallery']), 2)
    assert 'Processing detected images' in log
    assert len(glob.glob(str(tmp_path / 'cuhk03' / 'images_detected' /
                             '*.png'))) == NUM_PAIRS * IDS_PER_PAIR * 6

    mAP, rank1 = results(log)
    assert 0 < mAP <= 100 and 0 <= rank1 <= 100
    check_checkpoint(save_dir, 1)


# ---------------------------------------------------------------------------
# CUHK01 (real images)
# ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not osp.isdir(CUHK01_CAMPUS),
                    reason='no shared CUHK01 images at ' + CUHK01_CAMPUS)
def test_cuhk01_real_images_train_and_evaluate_with_main(tmp_path):
    root = tmp_path / 'reid-data'
    (root / 'cuhk01').mkdir(parents=True)
    (root / 'cuhk01' / 'campus').symlink_to(CUHK01_CAMPUS,
                                            target_is_directory=True)
    save_dir = str(tmp_path / 'log')
    log = run_main([
        '-s', 'cuhk01', '-t', 'cuhk01', '--root', str(root),
        'model.name', 'pmm_osnet_x0_25', 'model.pretrained', 'False',
        'data.height', '128', 'data.width', '64',
        'pmm.block_size', '[2, 1]', 'pmm.top_k', '3',
        'train.max_epoch', '1', 'train.batch_size', '32',
        'sampler.num_instances', '4', 'data.workers', '0',
        'train.warmup_epochs', '0', 'train.lr_scheduler', 'single_step',
        'train.stepsize', '[10]', 'train.print_freq', '20',
        'data.save_dir', save_dir
    ], timeout=600)

    # 971 identities: 485 train (4 images, 2 views), 486 test; view A queries
    # view B (2 images each)
    assert dataset_summary(log) == {
        'train': (485, 1940, 2), 'query': (486, 972, 1),
        'gallery': (486, 972, 1)
    }
    assert osp.isfile(str(root / 'cuhk01' / 'splits.json'))
    mAP, rank1 = results(log)
    assert 0 < mAP <= 100 and 0 <= rank1 <= 100

    # the same run is in the log file, and its checkpoint loads safely
    logs = glob.glob(osp.join(save_dir, 'train.log-*'))
    assert len(logs) == 1
    with open(logs[0]) as f:
        assert results(f.read()) == (mAP, rank1)
    check_checkpoint(save_dir, 1)
