"""The body regions that MagnifierNet attends to and the region masks label:
ids 1..4 in this order, 0 for background (no region)."""
from __future__ import annotations

__all__ = ['REGION_NAMES', 'NUM_REGIONS']

#: The regions, ids 1..4 (0: background / no region).
REGION_NAMES = ('head', 'upper_body', 'lower_body', 'shoes')
NUM_REGIONS = len(REGION_NAMES)
