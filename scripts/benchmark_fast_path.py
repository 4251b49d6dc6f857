#!/usr/bin/env python
"""The CPU fast path: seconds per training step of PMM, BDB and torchreid's
OSNet in float32 NCHW, channels-last (``train.channels_last``) and
channels-last + bfloat16 autocast (``train.amp``), each at its recipe's size
and threads (see :mod:`pmm_torchreid.bench.fast_path`).  Run it alone.

Examples::

    python scripts/benchmark_fast_path.py
    python scripts/benchmark_fast_path.py --models pmm_resnet50 --repeats 4
    python scripts/benchmark_fast_path.py --variants fp32 cl bf16 cl+bf16
"""
import os.path as osp
import sys
import warnings

warnings.filterwarnings('ignore', message='Cython evaluation')

try:
    import pmm_torchreid  # noqa: F401  (installed: pip install -e .)
except ImportError:  # run from a source tree that is not installed
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from pmm_torchreid.cli.benchmark_fast_path import main

if __name__ == '__main__':
    sys.exit(main())
