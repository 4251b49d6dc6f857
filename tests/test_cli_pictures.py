"""scripts/visualize_gradcam.py: the query choice, and the refusal of a
model family without pictures (pmm_torchreid.cli.pictures), called in-process
(the script itself runs as a subprocess in other test files)."""
import os

import pytest
from helpers import ROOT

from pmm_torchreid.cli import pictures as cli_pictures
from pmm_torchreid.data.queries import choose_queries

CONFIG = os.path.join(ROOT, 'configs', 'pmm_demo.yaml')


def test_choose_queries():
    query = list(range(10))
    assert choose_queries(query, 'd', 3, seed=1) == \
        choose_queries(query, 'd', 3, seed=1)
    assert len(set(choose_queries(query, 'd', 10))) == 10
    assert choose_queries(query, 'd', 3, indices=[4, 0]) == [4, 0]
    with pytest.raises(ValueError, match=r'--indices \[10\]: the query set of '
                       r'd has 10 images \(0 to 9\)'):
        choose_queries(query, 'd', 3, indices=[0, 10])
    with pytest.raises(ValueError, match='--num 11: the query set of d'):
        choose_queries(query, 'd', 11)


def test_pictures_refuse_a_model_without_pictures(synthetic_root):
    with pytest.raises(ValueError, match="model.name = 'bdb_resnet18': "
                       'Grad-CAM stage pictures need a PMM model'):
        cli_pictures.pictures(['--config-file', CONFIG, '--root',
                               synthetic_root, '-m', 'bdb_resnet18',
                               'pmm.mix', 'none'])
