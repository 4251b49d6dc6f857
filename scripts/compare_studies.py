#!/usr/bin/env python
"""Set finished studies of scripts/ablation.py side by side, paired by split
and seed: each setting's mAP and its gap to a reference, and how both change
from the first study's recipe to the others' (see
:mod:`pmm_torchreid.study.compare`).  Trains nothing.

Example (the gap against length)::

    python scripts/compare_studies.py --studies log/controls_e30 \\
        log/length_e60 --labels "30 epochs" "60 epochs" \\
        --reference pmm_osnet_x0_25:hard_mix
"""
import os.path as osp
import sys

try:
    import pmm_torchreid  # noqa: F401  (installed: pip install -e .)
except ImportError:  # run from a source tree that is not installed
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from pmm_torchreid.cli.compare_studies import main

if __name__ == '__main__':
    sys.exit(main())
