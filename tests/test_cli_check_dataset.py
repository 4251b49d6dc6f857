"""scripts/check_dataset.py: listing and reading a config's images
(pmm_torchreid.data.check) and the exit status of a bad config, called in-process
(the script itself runs as a subprocess in other test files)."""
import os

from helpers import ROOT

from pmm_torchreid.cli import check_dataset as cli_check
from pmm_torchreid.data.check import check_dataset, dataset_images

CONFIG = os.path.join(ROOT, 'configs', 'pmm_demo.yaml')


def test_check_dataset_lists_and_reads(synthetic_root, capsys):
    lists = dataset_images(['pmm_synthetic', 'pmm_synthetic'], synthetic_root)
    assert sorted(lists) == [('pmm_synthetic', s)
                             for s in ('gallery', 'query', 'train')]
    paths, bad = check_dataset(lists, workers=2)
    assert len(paths) == sum(len(v) for v in lists.values()) and not bad
    assert cli_check.main(['--config-file', CONFIG, '--root', synthetic_root,
                           'pmm.top_kk', '3']) == 2
    assert "did you mean 'pmm.top_k'" in capsys.readouterr().err
