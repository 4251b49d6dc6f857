"""The synthetic dataset: stray files and re-use of a finished dataset
(generation, splits and safety are in test_synthetic.py)."""
import os

import pytest

import pmm_torchreid  # noqa: F401  (registers pmm_synthetic)
from pmm_torchreid.data.synthetic import SyntheticPersons, prepare


class Tiny(SyntheticPersons):
    dataset_dir = 'tiny_synthetic'
    num_train_ids = 4
    num_test_ids = 3
    num_cams = 3
    imgs_per_cam = 2


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
