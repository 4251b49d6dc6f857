"""Fast exact ranking: torchreid's CMC and mAP, the same numbers, much faster
(:func:`evaluate_rank`)."""
from pmm_torchreid.metrics.rank import (
                                        DEFAULT_MEMORY_BUDGET,
                                        RankResult,
                                        evaluate_rank,
                                        evaluate_rank_details,
)

__all__ = ['evaluate_rank', 'evaluate_rank_details', 'RankResult',
           'DEFAULT_MEMORY_BUDGET']
