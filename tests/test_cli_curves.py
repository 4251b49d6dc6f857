"""scripts/plot_curves.py: the command line (pmm_torchreid.cli.curves) and
the stage columns of pmm_torchreid.visualize.curves, called in-process
(the script itself runs as a subprocess in other test files)."""
import os

import pytest

from pmm_torchreid.cli import curves as cli_curves
from pmm_torchreid.engine.curves import CurveLog, curve_columns
from pmm_torchreid.visualize.curves import stage_suffixes


def test_curves_plot_from_the_command_line(tmp_path, capsys):
    pytest.importorskip('matplotlib')
    log = CurveLog(str(tmp_path / 'curves.csv'),
                   curve_columns(['loss', 'loss_t1', 'loss_x1', 'acc1']))
    for epoch in (1, 2):
        log.write({'kind': 'train', 'epoch': epoch, 'step': epoch * 10,
                   'lr': 1e-3, 'loss': 2.0, 'loss_t1': 1.0, 'loss_x1': 1.0,
                   'acc1': 50.0})
    log.close()
    assert cli_curves.main([str(tmp_path)]) is None
    assert os.path.isfile(str(tmp_path / 'curves.png'))
    assert 'curves.png" (2 rows)' in capsys.readouterr().out
    assert stage_suffixes([{'loss_x1': 1, 'loss_x2': 1}]) == ['1', '2']
    assert stage_suffixes([{'loss_t': 1}]) == [''] and stage_suffixes([]) == []
