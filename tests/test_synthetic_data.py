"""The embedded synthetic dataset: deterministic, well-formed, safe to generate."""
import filecmp
import hashlib
import multiprocessing
import os

import pytest
import torchreid

import pmm_torchreid  # noqa: F401  (registers pmm_synthetic)
from pmm_torchreid.synthetic import SyntheticPersons, prepare


class Tiny(SyntheticPersons):
    dataset_dir = 'tiny_synthetic'
    num_train_ids = 4
    num_test_ids = 3
    num_cams = 3
    imgs_per_cam = 2


def _digest(folder):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            h.update(name.encode())
            with open(os.path.join(dirpath, name), 'rb') as f:
                h.update(f.read())
    return h.hexdigest()


def test_generation_is_deterministic(tmp_path):
    a = Tiny(root=str(tmp_path / 'a'), verbose=False)
    b = Tiny(root=str(tmp_path / 'b'), verbose=False)
    assert len(a.train) == 4 * 3 * 2
    assert len(a.query) == 3 * 3 and len(a.gallery) == 3 * 3
    assert _digest(a.dataset_dir) == _digest(b.dataset_dir)


def test_splits_follow_market1501_conventions(synthetic_root):
    ds = SyntheticPersons(root=synthetic_root, verbose=False)
    train = [item[:3] for item in ds.train]  # (path, pid, camid, dsetid)
    query = [item[:3] for item in ds.query]
    gallery = [item[:3] for item in ds.gallery]
    assert (len(train), len(query), len(gallery)) == (800, 400, 400)
    assert sorted({p for _, p, _ in train}) == list(range(100))
    test_ids = {p for _, p, _ in query}
    assert test_ids == {p for _, p, _ in gallery} and len(test_ids) == 100
    assert not test_ids & {p + 1 for _, p, _ in train}  # raw ids 1..100 train
    for _, pid, cam in query:  # every query has a match in another camera
        assert any(g == pid and c != cam for _, g, c in gallery)
    # one query per camera and identity
    assert len({(p, c) for _, p, c in query}) == 400


def test_datamanager_draws_identity_batches(synthetic_root):
    dm = torchreid.data.ImageDataManager(
        root=synthetic_root, sources='pmm_synthetic', height=128, width=64,
        workers=0, batch_size_train=8, train_sampler='RandomIdentitySampler',
        num_instances=2)
    batch = next(iter(dm.train_loader))
    assert batch['img'].shape == (8, 3, 128, 64)
    assert sorted(batch['pid'].bincount().tolist())[-4:] == [2, 2, 2, 2]


def _make(root):
    Tiny(root=root, verbose=False)


def test_concurrent_generation_gives_one_complete_dataset(tmp_path):
    root = str(tmp_path)
    os.makedirs(os.path.join(root, '.tiny_synthetic.tmp-1-stale'))  # leftover
    ctx = multiprocessing.get_context('fork')
    procs = [ctx.Process(target=_make, args=(root, )) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert sorted(os.listdir(root)) == ['.tiny_synthetic.lock', 'tiny_synthetic']
    ref = Tiny(root=str(tmp_path / 'ref'), verbose=False)
    cmp = filecmp.dircmp(ref.dataset_dir, os.path.join(root, 'tiny_synthetic'))
    assert not cmp.diff_files and not cmp.left_only and not cmp.right_only


def test_half_written_folder_is_refused_not_used(tmp_path):
    folder = tmp_path / 'tiny_synthetic' / 'train'
    folder.mkdir(parents=True)  # no completion marker
    with pytest.raises(RuntimeError, match='not a complete synthetic dataset'):
        Tiny(root=str(tmp_path), verbose=False)
    assert folder.is_dir()  # nothing of the user's was deleted


def test_stray_file_is_named(tmp_path):
    ds = Tiny(root=str(tmp_path), verbose=False)
    stray = os.path.join(ds.dataset_dir, 'train', 'notes.png')
    open(stray, 'w').close()
    with pytest.raises(RuntimeError, match='notes.png'):
        Tiny(root=str(tmp_path), verbose=False)


def test_prepare_returns_existing_dataset_without_regenerating(tmp_path):
    ds = Tiny(root=str(tmp_path), verbose=False)
    before = os.stat(os.path.join(ds.dataset_dir, 'COMPLETE.json')).st_mtime_ns
    config = {k: int(getattr(Tiny, k)) for k in (
        'num_train_ids', 'num_test_ids', 'num_cams', 'imgs_per_cam', 'seed')}
    assert prepare(str(tmp_path), 'tiny_synthetic', config) == ds.dataset_dir
    after = os.stat(os.path.join(ds.dataset_dir, 'COMPLETE.json')).st_mtime_ns
    assert before == after
