#!/usr/bin/env python
"""Kill a checkpoint writer with SIGKILL at random moments; count survivors.

A child process writes model-sized checkpoints (``--megabytes``) back to back
to one path with ``save_checkpoint``; the parent kills it after a random delay
and checks that the file loads with ``torch.load(weights_only=True)`` as one
complete state.  ``--unsafe`` writes with a plain ``torch.save`` instead (see
:mod:`pmm_torchreid.bench.checkpoints`).

Example::

    python scripts/stress_checkpoints.py --kills 100 --megabytes 95
"""
import os.path as osp
import sys

try:
    import pmm_torchreid  # noqa: F401  (installed: pip install -e .)
except ImportError:  # run from a source tree that is not installed
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from pmm_torchreid.cli.stress_checkpoints import main

if __name__ == '__main__':
    sys.exit(main())
