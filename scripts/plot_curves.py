#!/usr/bin/env python
"""Draws the training curves a run writes to <save_dir>/curves.csv (PMM, BDB or
a torchreid engine run through scripts/main.py).

Four plots in one PNG: the loss of every stage (triplet and cross-entropy),
the training accuracy of every stage, the learning rate, and the evaluation
mAP / Rank-1 (:mod:`pmm_torchreid.cli.curves`, :mod:`pmm_torchreid.visualize.curves`).

Examples::

    python scripts/plot_curves.py log/pmm_demo                 # -> log/pmm_demo/curves.png
    python scripts/plot_curves.py log/pmm_demo/curves.csv -o curves.png
"""
import os.path as osp
import sys

try:
    import pmm_torchreid  # noqa: F401  (installed: pip install -e .)
except ImportError:  # run from a source tree that is not installed
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from pmm_torchreid.cli.curves import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main())
