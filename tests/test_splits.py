"""Validation identities carved out of a training set, and CUHK01 splits
written from the recorded identities."""
import json
import os
import os.path as osp
import shutil

import numpy as np
import pytest
from helpers import ROOT, SHARED, fake_campus
from hypothesis import given, settings
from hypothesis import strategies as st

import pmm_torchreid  # noqa: F401  (registers the datasets)
from pmm_torchreid import config as C
from pmm_torchreid.config import checks
from pmm_torchreid.data import build_datamanager
from pmm_torchreid.data.splits import carve_validation, write_cuhk01_splits


def _train(num_ids, cams_per_id, per_cam):
    return [('img_{:03d}_{}_{}.png'.format(p, c, i), p, c, 0)
            for p in range(num_ids) for c in range(cams_per_id[p % len(
                cams_per_id)]) for i in range(per_cam)]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(num_ids=st.integers(3, 30), held=st.integers(1, 28),
       cams=st.lists(st.integers(1, 4), min_size=1, max_size=5),
       per_cam=st.integers(1, 3), seed=st.integers(0, 5))
def test_carved_validation_is_disjoint_complete_and_matchable(
        num_ids, held, cams, per_cam, seed):
    train = _train(num_ids, cams, per_cam)
    if not 1 <= held <= num_ids - 2:
        with pytest.raises(ValueError, match='data.val_ids'):
            carve_validation(train, held, seed)
        return
    try:
        rest, query, gallery = carve_validation(train, held, seed)
    except ValueError as error:  # only when no held identity has 2 cameras
        assert 'two cameras' in str(error)
        import random
        drawn = random.Random(seed).sample(range(num_ids), held)
        assert all(cams[p % len(cams)] == 1 for p in drawn)
        return
    # every image lands in exactly one list; identities do not straddle
    assert sorted(x[0] for x in rest + query + gallery) == \
        sorted(x[0] for x in train)
    val_pids = {x[1] for x in query + gallery}
    assert len(val_pids) == held
    rest_paths = {x[0] for x in rest}
    assert not any(x[0] in rest_paths for x in query + gallery)
    # training labels renumbered 0..P-1, validation labels kept
    assert sorted({x[1] for x in rest}) == list(range(num_ids - held))
    original = {x[0]: x[1] for x in train}
    assert all(original[x[0]] == x[1] for x in query + gallery)
    # a query identity shows all its query images from one camera, and has
    # a gallery image from another camera (a valid match)
    for pid in {x[1] for x in query}:
        qcams = {x[2] for x in query if x[1] == pid}
        held_cams = {x[2] for x in gallery if x[1] == pid}
        assert len(qcams) == 1 and held_cams and not qcams & held_cams
    # the same seed draws the same split
    assert carve_validation(train, held, seed) == (rest, query, gallery)


def test_the_draw_follows_the_file_names_not_the_numbers():
    """torchreid numbers DukeMTMC-reID's training identities in the order
    its folder is listed in: the same files numbered otherwise (a copy on
    another disk) hold out the same people, with the same queries."""
    train = _train(40, [2, 3], 2)
    perm = list(range(40))
    np.random.RandomState(0).shuffle(perm)
    renumbered = [(x[0], perm[x[1]]) + x[2:] for x in train]

    def people(carved):
        return [sorted(x[0] for x in part) for part in carved]
    for held, seed in [(10, 0), (7, 3)]:
        assert people(carve_validation(renumbered, held, seed)) == \
            people(carve_validation(train, held, seed))


def test_the_seed_changes_the_held_identities():
    train = _train(50, [2], 2)
    draws = {tuple(sorted({x[1] for x in carve_validation(train, 10, s)[1]}))
             for s in range(5)}
    assert len(draws) == 5


def test_data_val_ids_trains_on_the_rest_and_evaluates_the_held_out(
        synthetic_root, capsys):
    kwargs = dict(root=synthetic_root, sources='pmm_synthetic',
                  targets='pmm_synthetic', height=32, width=16, workers=0,
                  batch_size_train=8, train_sampler='RandomIdentitySampler',
                  num_instances=2)
    full = build_datamanager(**kwargs)
    held = build_datamanager(val_ids=20, val_seed=0, **kwargs)
    out = capsys.readouterr().out
    assert 'validation, not the test split: 20 training identities held out' \
        in out
    assert full.num_train_pids == 100 and held.num_train_pids == 80
    train_paths = {x[0] for x in held.train_loader.dataset.data}
    test = held.test_dataset['pmm_synthetic']
    val_paths = {x[0] for x in list(test['query']) + list(test['gallery'])}
    full_train = {x[0] for x in full.train_loader.dataset.data}
    # validation images come from the training split, never from the test
    assert val_paths <= full_train and not val_paths & train_paths
    assert train_paths | val_paths == full_train
    full_test = full.test_dataset['pmm_synthetic']
    assert not val_paths & {x[0] for x in list(full_test['query']) +
                            list(full_test['gallery'])}


def test_val_ids_config_checks():
    def check(*opts):
        cfg = C.get_default_config()
        C.merge_file(cfg, osp.join(ROOT, 'configs', 'pmm_demo.yaml'))
        C.merge_list(cfg, list(opts))
        checks.check_config(cfg)

    check('data.val_ids', '10')
    with pytest.raises(ValueError, match='data.val_ids = -1'):
        check('data.val_ids', '-1')
    with pytest.raises(ValueError, match='one dataset, the same for both'):
        check('data.val_ids', '10', 'data.targets', "['cuhk01']")
    with pytest.raises(ValueError, match='data.combineall = True'):
        check('data.val_ids', '10', 'data.combineall', 'True')


# --------------------------------------------------------------------------
# CUHK01 splits from the record
# --------------------------------------------------------------------------
def _torchreid_splits(root):
    import torchreid
    np.random.seed(4)
    torchreid.data.datasets.init_image_dataset('cuhk01', root=root,
                                               mode='train')
    with open(osp.join(root, 'cuhk01', 'splits.json')) as f:
        return json.load(f)


def _record(splits, path, ids=(0, 2, 4)):
    record = {'splits': {}}
    for i in ids:
        # torchreid's labels 0..P-1 follow the sorted 0-based identities
        pids = sorted({int(osp.basename(p)[:4]) for p, _, _ in
                       splits[i]['train']})
        record['splits'][str(i)] = {'train_identities': pids}
    with open(path, 'w') as f:
        json.dump(record, f)
    return path


def _relative(splits, root):
    return [{k: ([[osp.relpath(p, root), l, c] for p, l, c in v]
                 if isinstance(v, list) else v) for k, v in s.items()}
            for s in splits]


def test_written_splits_equal_torchreids_own_for_the_same_identities(
        tmp_path):
    theirs_root, ours_root = str(tmp_path / 'a'), str(tmp_path / 'b')
    fake_campus(osp.join(theirs_root, 'cuhk01', 'campus'))
    shutil.copytree(osp.join(theirs_root, 'cuhk01', 'campus'),
                    osp.join(ours_root, 'cuhk01', 'campus'))
    theirs = _torchreid_splits(theirs_root)
    record = _record(theirs, str(tmp_path / 'record.json'))
    path = write_cuhk01_splits(ours_root, record)
    with open(path) as f:
        ours = json.load(f)
    assert len(ours) == 6
    assert _relative(ours, ours_root) == _relative(theirs[:6], theirs_root)
    # torchreid reads it as its own
    import torchreid
    ds = torchreid.data.datasets.init_image_dataset(
        'cuhk01', root=ours_root, split_id=3, mode='query')
    assert len(ds.query) == len(theirs[3]['query'])
    # the same record again is fine; other splits in place are refused
    assert write_cuhk01_splits(ours_root, record) == path
    other = _record(theirs, str(tmp_path / 'other.json'), ids=(2, 0, 4))
    with open(other) as f:
        swapped = json.load(f)
    swapped['splits']['0'], swapped['splits']['2'] = \
        swapped['splits']['2'], swapped['splits']['0']
    with open(other, 'w') as f:
        json.dump(swapped, f)
    if swapped['splits']['0'] != swapped['splits']['2']:
        with pytest.raises(ValueError, match='already holds other splits'):
            write_cuhk01_splits(ours_root, other)


def test_cuhk01_record_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match='no CUHK01 images'):
        write_cuhk01_splits(str(tmp_path), osp.join(ROOT, 'docs',
                                                    'cuhk01_splits.json'))
    fake_campus(str(tmp_path / 'cuhk01' / 'campus'))
    bad = tmp_path / 'gap.json'
    bad.write_text(json.dumps({'splits': {'0': {'train_identities': [1]},
                                          '4': {'train_identities': [1]}}}))
    with pytest.raises(ValueError, match='expected the even ids'):
        write_cuhk01_splits(str(tmp_path), str(bad))


@pytest.mark.skipif(not osp.isdir(osp.join(SHARED, 'data', 'cuhk01',
                                           'campus')),
                    reason='needs ../shared/data/cuhk01/campus')
def test_recorded_splits_of_the_real_images(tmp_path):
    os.makedirs(str(tmp_path / 'cuhk01'))
    os.symlink(osp.join(SHARED, 'data', 'cuhk01', 'campus'),
               str(tmp_path / 'cuhk01' / 'campus'))
    record = osp.join(ROOT, 'docs', 'cuhk01_splits.json')
    with open(write_cuhk01_splits(str(tmp_path), record)) as f:
        splits = json.load(f)
    with open(record) as f:
        wanted = json.load(f)['splits']
    for split_id in (0, 2, 4):
        ids = sorted({int(osp.basename(p)[:4]) for p, _, _ in
                      splits[split_id]['train']})
        assert ids == wanted[str(split_id)]['train_identities']
        assert len(splits[split_id]['train']) == \
            wanted[str(split_id)]['num_train_images'] == 1940
        assert len(splits[split_id]['query']) == 972
        assert splits[split_id + 1]['query'] == splits[split_id]['gallery']
