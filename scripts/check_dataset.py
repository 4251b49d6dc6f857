#!/usr/bin/env python
"""Read every image of the configured datasets once and list the bad ones.

Takes the same arguments as scripts/main.py (config file, flags, KEY VALUE
overrides) plus --workers, decodes each train/query/gallery image of the
sources and targets exactly as training would (PIL, RGB), and reports every
file that fails.  Exit status: 0 when all images decode, 1 when some do not,
2 on a bad configuration or a missing dataset (:mod:`pmm_torchreid.cli.check_dataset`).

Examples::

    python scripts/check_dataset.py --config-file configs/pmm_cuhk03.yaml \\
        --root reid-data
    python scripts/check_dataset.py --config-file configs/pmm_demo.yaml \\
        --workers 8
"""
import os.path as osp
import sys

try:
    import pmm_torchreid  # noqa: F401  (installed: pip install -e .)
except ImportError:  # run from a source tree that is not installed
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from pmm_torchreid.cli.check_dataset import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main())
