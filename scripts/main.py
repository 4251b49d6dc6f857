#!/usr/bin/env python
"""Train and evaluate with torchreid, PMM included: torchreid's scripts/main.py
for the plugin (the builders live in :mod:`pmm_torchreid.launch`).

Examples::

    python scripts/main.py --config-file configs/pmm_demo.yaml
    python scripts/main.py --config-file configs/pmm_cuhk03.yaml --root reid-data
    python scripts/main.py --config-file configs/pmm_cuhk03.yaml \\
        test.evaluate True test.visrank True \\
        model.load_weights log/pmm_cuhk03/model/model.pth.tar-400
"""
import os.path as osp
import sys
import time

STARTED = time.time()  # before the heavy imports: the process's wall time

try:
    import pmm_torchreid  # noqa: F401  (installed: pip install -e .)
except ImportError:  # run from a source tree that is not installed
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from pmm_torchreid.launch import main  # noqa: E402

if __name__ == '__main__':
    main(started=STARTED)
