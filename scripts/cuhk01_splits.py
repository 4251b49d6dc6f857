#!/usr/bin/env python
"""Write torchreid's CUHK01 splits.json from docs/cuhk01_splits.json, so that
split ids 0-5 are the identity partitions of docs/RESULTS.md.

torchreid draws CUHK01's splits without a seed on first use; run this before
the first run on a new data root (it refuses to replace other splits).

Examples::

    mkdir -p reid-data/cuhk01 && ln -s /path/to/campus reid-data/cuhk01/campus
    python scripts/cuhk01_splits.py --root reid-data
"""
import os.path as osp
import sys

try:
    import pmm_torchreid  # noqa: F401  (installed: pip install -e .)
except ImportError:  # run from a source tree that is not installed
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from pmm_torchreid.cli.cuhk01_splits import main

RECORD = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'docs',
                  'cuhk01_splits.json')

if __name__ == '__main__':
    sys.exit(main(record=RECORD))
