#!/usr/bin/env python
"""Speed and memory of :func:`pmm_torchreid.metrics.evaluate_rank` against
torchreid's ``evaluate_rank`` on generated problems the size of Market-1501,
MSMT17 and CUHK03 (see :mod:`pmm_torchreid.bench.ranking`); exits 1 when the
outputs differ.

Examples::

    python scripts/benchmark_eval.py                          # both sizes
    python scripts/benchmark_eval.py --sizes market --repeats 5
    python scripts/benchmark_eval.py --sizes msmt17 --threads 2 --skip-torchreid
    python scripts/benchmark_eval.py --sizes cuhk03 --repeats 1
"""
import os.path as osp
import sys
import warnings

warnings.filterwarnings('ignore', message='Cython evaluation')

try:
    import pmm_torchreid  # noqa: F401  (installed: pip install -e .)
except ImportError:  # run from a source tree that is not installed
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from pmm_torchreid.cli.benchmark_eval import main

if __name__ == '__main__':
    sys.exit(main())
