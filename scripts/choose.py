#!/usr/bin/env python
"""Choose a config value on validation identities carved out of the training set.

``--val-ids N`` training identities are held out (``data.val_ids``); every
value is trained with every seed on the rest (scripts/main.py in a child
process, through the ablation runner: ``<out>/<KEY>=<VALUE>/split<K>/seed<S>/``,
finished runs skipped on a rerun) and evaluated on them, never on the test
split.  The best mean validation mAP wins; ``--out`` receives ``choice.json``
and ``chosen.yaml`` (see :mod:`pmm_torchreid.study.choose`).

Example::

    python scripts/choose.py --config-file configs/pmm_cuhk01.yaml \\
        --root reid-data --key pmm.mix_ratio --values 0.0625 0.125 0.25 \\
        --val-ids 100 --seeds 1 2 --out log/choose_share
    python scripts/main.py --config-file log/choose_share/chosen.yaml \\
        --root reid-data
"""
import os.path as osp
import sys

try:
    import pmm_torchreid  # noqa: F401  (installed: pip install -e .)
except ImportError:  # run from a source tree that is not installed
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from pmm_torchreid.cli.choose import main

#: the launcher every run goes through (a user's own run is the same command)
MAIN = osp.join(osp.dirname(osp.abspath(__file__)), 'main.py')

if __name__ == '__main__':
    sys.exit(main(main_script=MAIN))
