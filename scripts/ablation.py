#!/usr/bin/env python
"""Run (model, mix) settings with one recipe and the same seeds; tabulate them.

Each run is scripts/main.py in a child process, in
``<out>/<setting>/split<K>/seed<S>/``; rerunning skips finished runs.  The
runner writes ``table.md``, ``results.json`` and ``results.csv`` in ``--out``
(see :mod:`pmm_torchreid.study.ablation`).

Example::

    python scripts/ablation.py --config-file configs/ablation_cuhk01.yaml \\
        --root reid-data --out log/ablation_cuhk01 --seeds 1 2 3 --splits 0 \\
        --settings osnet_x0_25 bdb_osnet_x0_25 pmm_osnet_x0_25:hard_mix \\
        pmm_osnet_x0_25:none pmm_osnet_x0_25:cutout pmm_osnet_x0_25:cutmix
"""
import os.path as osp
import sys

try:
    import pmm_torchreid  # noqa: F401  (installed: pip install -e .)
except ImportError:  # run from a source tree that is not installed
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from pmm_torchreid.cli.ablation import main

#: the launcher every run goes through (a user's own run is the same command)
MAIN = osp.join(osp.dirname(osp.abspath(__file__)), 'main.py')

if __name__ == '__main__':
    sys.exit(main(main_script=MAIN))
