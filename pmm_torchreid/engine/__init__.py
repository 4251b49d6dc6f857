"""Training: PMMEngine (the one training step of every plugin engine),
ComparisonEngine (FMN, MagnifierNet), the losses, the learning-rate schedule
and the run records (safe checkpoints, exact resume, curves, results)."""
from pmm_torchreid.engine.comparison import ComparisonEngine, RecordedComparisonEngine, engine_class
from pmm_torchreid.engine.pmm import MAX_QUIET_SHARE, PMMEngine, RecordedPMMEngine, amp_settings
from pmm_torchreid.engine.records import RunRecordsMixin, fast_ranking, with_run_records

__all__ = ['PMMEngine', 'RecordedPMMEngine', 'ComparisonEngine',
           'RecordedComparisonEngine', 'engine_class', 'amp_settings',
           'MAX_QUIET_SHARE', 'RunRecordsMixin', 'with_run_records',
           'fast_ranking']
