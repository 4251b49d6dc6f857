"""The body regions that MagnifierNet attends to and the region masks label:
ids 1..4 in this order, 0 for background (no region); and the fixed
horizontal bands that stand in for them without masks (MagnifierNet's
fallback on real data, and BDB's band branch, ``bdb.bands``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ['REGION_NAMES', 'NUM_REGIONS', 'BANDS', 'band_rows', 'band_shares']

#: The regions, ids 1..4 (0: background / no region).
REGION_NAMES = ('head', 'upper_body', 'lower_body', 'shoes')
NUM_REGIONS = len(REGION_NAMES)

#: The fallback without masks: ``(region, top, bottom)`` as shares of the
#: image height (head 0-15 %, upper body 15-50 %, lower body 50-90 %, shoes
#: 90-100 %), the usual proportions of a pedestrian crop.
BANDS = ((1, 0.0, 0.15), (2, 0.15, 0.5), (3, 0.5, 0.9), (4, 0.9, 1.0))


def band_rows(height: int) -> torch.Tensor:
    """The region id (uint8, 1..4) of every pixel row of an image ``height``
    rows tall under :data:`BANDS` (a band runs from ``round(top * height)``
    to ``round(bottom * height)``, exclusive)."""
    rows = torch.zeros(int(height), dtype=torch.uint8)
    for region, top, bottom in BANDS:
        rows[int(round(top * height)):int(round(bottom * height))] = region
    return rows


def band_shares(image_height: int, map_height: int) -> torch.Tensor:
    """``len(BANDS) x map_height`` float: the share of each feature-map
    row's pixels that each band covers, for a map ``map_height`` rows tall
    computed from an image ``image_height`` rows tall.

    The rows of :func:`band_rows` pooled as
    :func:`pmm_torchreid.models.magnifiernet.region_shares` pools a region
    map (adaptive average pooling), so these are exactly the targets
    MagnifierNet's parsing head learns on images whose regions are the
    bands.  Every column of the result sums to 1.
    """
    onehot = F.one_hot(band_rows(image_height).long(), len(BANDS) + 1)
    shares = F.adaptive_avg_pool1d(onehot.t().float()[None], int(map_height))
    return shares[0, 1:]
