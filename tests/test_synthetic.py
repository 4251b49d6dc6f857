"""pmm_synthetic: deterministic, Market-1501-like splits, safe concurrent generation."""
import collections
import filecmp
import json
import multiprocessing
import os
import re

import numpy as np
import pytest
import torchreid
from PIL import Image

import pmm_torchreid  # noqa: F401  (registers pmm_synthetic)
from pmm_torchreid.data import synthetic
from pmm_torchreid.data.synthetic import SyntheticPersons


class Tiny(SyntheticPersons):
    dataset_dir = 'tiny_synthetic'
    num_train_ids = 3
    num_test_ids = 3
    num_cams = 4
    imgs_per_cam = 2


def _files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder)
                  for d, _, names in os.walk(folder) for f in names)


def _raw_pid(path):
    return int(re.match(r'(\d+)_c', os.path.basename(path)).group(1))


def test_two_roots_give_byte_identical_datasets(tmp_path):
    a = Tiny(root=str(tmp_path / 'a'), verbose=False)
    b = Tiny(root=str(tmp_path / 'b'), verbose=False)
    files = _files(a.dataset_dir)
    assert files == _files(b.dataset_dir)
    assert len(files) == 6 * 4 * 2 + 1  # images + marker
    match, mismatch, errors = filecmp.cmpfiles(a.dataset_dir, b.dataset_dir, files,
                                               shallow=False)
    assert not mismatch and not errors
    assert (len(a.train), len(a.query), len(a.gallery)) == (24, 12, 12)
    img = Image.open(a.train[0][0])
    assert img.size == (64, 128) and img.mode == 'RGB'
    # the images are not all alike: every one differs from the others
    arrays = [np.asarray(Image.open(p), np.int16) for p, *_ in a.train]
    assert all(np.abs(x - y).mean() > 1 for i, x in enumerate(arrays) for y in arrays[:i])


def test_identities_are_unique_combinations_of_shared_cues():
    idents = synthetic._identities(200, synthetic.SEED)
    assert len({tuple(sorted(d.items())) for d in idents}) == 200
    for cue, size in synthetic._CUES.items():
        counts = collections.Counter(d[cue] for d in idents)
        assert len(counts) == size  # every value is used ...
        assert min(counts.values()) >= 2  # ... and shared by several identities


def test_default_splits_follow_market1501(synthetic_root):
    ds = SyntheticPersons(root=synthetic_root, verbose=False)
    assert os.path.basename(ds.dataset_dir) == 'pmm_synthetic'
    assert (len(ds.train), len(ds.query), len(ds.gallery)) == (800, 400, 400)
    assert sorted({item[1] for item in ds.train}) == list(range(100))
    train_raw = {_raw_pid(item[0]) for item in ds.train}
    test_raw = {item[1] for item in ds.query} | {item[1] for item in ds.gallery}
    assert len(train_raw) == 100 and len(test_raw) == 100 and not train_raw & test_raw
    assert all(_raw_pid(path) == pid for path, pid, *_ in ds.query + ds.gallery)
    assert {item[2] for item in ds.train + ds.query + ds.gallery} == {0, 1, 2, 3}
    gallery = collections.defaultdict(set)
    for _, pid, cam, _ in ds.gallery:
        gallery[pid].add(cam)
    for _, pid, cam, _ in ds.query:  # true matches in every other camera
        assert gallery[pid] - {cam} == {0, 1, 2, 3} - {cam}
    assert len({(pid, cam) for _, pid, cam, _ in ds.query}) == 400


def test_image_data_manager_builds_and_draws_a_batch(synthetic_root):
    dm = torchreid.data.ImageDataManager(
        root=synthetic_root, sources='pmm_synthetic', height=128, width=64,
        workers=0, batch_size_train=8, train_sampler='RandomIdentitySampler',
        num_instances=2)
    assert dm.num_train_pids == 100 and dm.num_train_cams == 4
    batch = next(iter(dm.train_loader))
    assert batch['img'].shape == (8, 3, 128, 64)
    assert sorted(collections.Counter(batch['pid'].tolist()).values()) == [2, 2, 2, 2]
    assert 0 <= int(batch['pid'].min()) and int(batch['pid'].max()) < 100


def _generate_after(barrier, counter, root):
    real = synthetic.generate

    def counting(*args, **kwargs):
        with counter.get_lock():
            counter.value += 1
        real(*args, **kwargs)

    synthetic.generate = counting  # fork: only this child's copy
    barrier.wait()
    Tiny(root=root, verbose=False)


@pytest.mark.slow
def test_two_processes_generate_once_and_ignore_a_leftover(tmp_path):
    root = str(tmp_path / 'shared')
    leftover = os.path.join(root, '.tiny_synthetic.tmp-1-x', 'tiny_synthetic', 'train')
    os.makedirs(leftover)
    open(os.path.join(leftover, '9999_c1_00.png'), 'wb').close()
    ctx = multiprocessing.get_context('fork')
    barrier, counter = ctx.Barrier(2), ctx.Value('i', 0)
    procs = [ctx.Process(target=_generate_after, args=(barrier, counter, root))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert counter.value == 1  # the second one waited and reused the first's
    assert sorted(os.listdir(root)) == ['.tiny_synthetic.lock', 'tiny_synthetic']
    ref = Tiny(root=str(tmp_path / 'ref'), verbose=False).dataset_dir
    got = os.path.join(root, 'tiny_synthetic')
    assert _files(got) == _files(ref)
    assert not filecmp.cmpfiles(got, ref, _files(ref), shallow=False)[1]


def test_interrupted_generation_leaves_nothing_and_is_redone(tmp_path, monkeypatch):
    calls = []

    def broken(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args)

    real = synthetic._render
    monkeypatch.setattr(synthetic, '_render', broken)
    with pytest.raises(KeyboardInterrupt):
        Tiny(root=str(tmp_path), verbose=False)
    assert os.listdir(str(tmp_path)) == ['.tiny_synthetic.lock']
    monkeypatch.setattr(synthetic, '_render', real)
    assert len(Tiny(root=str(tmp_path), verbose=False).train) == 24


@pytest.mark.parametrize('marker', [None, 'other version'])
def test_foreign_or_half_folder_is_refused_and_kept(tmp_path, marker):
    folder = tmp_path / 'tiny_synthetic'
    (folder / 'train').mkdir(parents=True)
    (folder / 'train' / '0001_c1_00.png').write_bytes(b'')
    if marker:
        ds = Tiny(root=str(tmp_path / 'ok'), verbose=False)
        with open(os.path.join(ds.dataset_dir, synthetic.MARKER)) as f:
            content = dict(json.load(f), version=synthetic.FORMAT_VERSION - 1)
        (folder / synthetic.MARKER).write_text(json.dumps(content))
    with pytest.raises(RuntimeError) as info:
        Tiny(root=str(tmp_path), verbose=False)
    assert str(folder) in str(info.value) and 'Delete' in str(info.value)
    assert (folder / 'train' / '0001_c1_00.png').exists()  # nothing deleted


@pytest.mark.slow
def test_generation_killed_with_sigkill_leaves_no_dataset(tmp_path, synthetic_root):
    import glob
    import signal
    import subprocess
    import sys
    import time
    root = str(tmp_path)
    code = ('import pmm_torchreid.data.synthetic as s; '
            's.SyntheticPersons(root={!r}, verbose=False)'.format(root))
    proc = subprocess.Popen([sys.executable, '-c', code],
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    deadline = time.time() + 120
    while len(glob.glob(os.path.join(root, '.pmm_synthetic.tmp-*', '*', '*',
                                     '*.png'))) < 100:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # mid-generation, no cleanup can run
    proc.wait()
    assert not os.path.exists(os.path.join(root, 'pmm_synthetic'))
    assert glob.glob(os.path.join(root, '.pmm_synthetic.tmp-*'))  # the debris
    # the next user regenerates it whole, clears the debris, and gets the
    # same bytes as an uninterrupted generation
    got = SyntheticPersons(root=root, verbose=False).dataset_dir
    assert not glob.glob(os.path.join(root, '.pmm_synthetic.tmp-*'))
    ref = os.path.join(synthetic_root, 'pmm_synthetic')
    assert _files(got) == _files(ref)
    assert not filecmp.cmpfiles(got, ref, _files(ref), shallow=False)[1]
