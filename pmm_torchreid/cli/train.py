"""Train and evaluate with torchreid, PMM included (the ``pmm-train`` command;
``scripts/main.py`` runs :func:`pmm_torchreid.launch.main` the same way)."""
from __future__ import annotations

import time
from typing import Optional, Sequence

STARTED = time.time()  # before the heavy imports below: the process's wall time

from pmm_torchreid.launch import main as launch_main  # noqa: E402

__all__ = ['main']


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs :func:`pmm_torchreid.launch.main`; 0 once it ends (an error
    raises, as for ``scripts/main.py``)."""
    launch_main(argv, started=STARTED)
    return 0
