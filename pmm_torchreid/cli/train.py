"""Train and evaluate with torchreid, PMM included (the ``pmm-train`` command;
``scripts/main.py`` runs :func:`pmm_torchreid.launch.main` the same way)."""
from __future__ import annotations

import time
from typing import Optional, Sequence

# when this module was imported: the package (torch, torchreid) is imported by
# then, so a run started as pmm-train counts a few seconds less wall time in
# results.json than one started as scripts/main.py
STARTED = time.time()

from pmm_torchreid.launch import main as launch_main  # noqa: E402

__all__ = ['main']


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs :func:`pmm_torchreid.launch.main`; 0 once it ends (an error
    raises, as for ``scripts/main.py``)."""
    launch_main(argv, started=STARTED)
    return 0
