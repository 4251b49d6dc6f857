#!/usr/bin/env python
"""What each PMM stage looks at: Grad-CAM pictures of query images, and the
mean pairwise overlap between the stages over the query set.

Same flags and trailing KEY VALUE overrides as scripts/main.py (options of this
script go before the KEY VALUE pairs).  Writes one PNG per chosen query image,
a contact sheet and ``overlap.json``; for FMN and MagnifierNet models their
masks and ``masks.json`` instead; BDB and torchreid's models are refused
(:mod:`pmm_torchreid.cli.pictures`, docs/PICTURES.md).

Examples::

    python scripts/visualize_gradcam.py --config-file configs/pmm_demo.yaml \\
        model.load_weights log/pmm_demo/model/model.pth.tar-24
    python scripts/visualize_gradcam.py --config-file configs/pmm_demo.yaml \\
        --num 16 --seed 3 --output log/pmm_demo/gradcam-q --sheet 8 \\
        model.load_weights log/pmm_demo/model/model.pth.tar-24
    python scripts/visualize_gradcam.py --config-file configs/pmm_demo.yaml \\
        --indices 0 1 2 --sheet 3 \\
        model.load_weights log/pmm_demo/model/model.pth.tar-24
"""
import os.path as osp
import sys

try:
    import pmm_torchreid  # noqa: F401  (installed: pip install -e .)
except ImportError:  # run from a source tree that is not installed
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from pmm_torchreid.cli.pictures import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main())
