#!/usr/bin/env python
"""Cost of PMM's Grad-CAM guidance: the training step with ``pmm.mix hard_mix``
versus ``none``, plus the reference code's way of taking the Grad-CAM; with
``--device cuda``, GPU training throughput in float32 and with AMP (see
:mod:`pmm_torchreid.cli.benchmark`).

Examples::

    python scripts/benchmark.py                      # resnet50 and osnet_x0_25
    python scripts/benchmark.py --backbones resnet18 --repeats 5
    python scripts/benchmark.py --device cuda        # GPU throughput table
"""
import os.path as osp
import sys

try:
    import pmm_torchreid  # noqa: F401  (installed: pip install -e .)
except ImportError:  # run from a source tree that is not installed
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from pmm_torchreid.cli.benchmark import main

if __name__ == '__main__':
    sys.exit(main())
