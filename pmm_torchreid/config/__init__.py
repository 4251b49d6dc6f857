"""Configuration: the default keys (torchreid's plus the plugin's), merging
with errors that name the file and the key, the checks, and the adapters that
turn a config into the builders' arguments."""
from pmm_torchreid.config.checks import check_config, check_paths
from pmm_torchreid.config.defaults import add_comparison_config, add_pmm_config, get_default_config
from pmm_torchreid.config.files import ConfigKeyError, dump_differences, merge_file, merge_list
from pmm_torchreid.config.kwargs import (
                                           channels_last,
                                           comparison_engine_kwargs,
                                           engine_kwargs,
                                           engine_run_kwargs,
                                           imagedata_kwargs,
                                           lr_scheduler_kwargs,
                                           mixed_blocks,
                                           model_kwargs,
                                           optimizer_kwargs,
                                           resolved_top_k,
)
from pmm_torchreid.models.families import (
                                           is_bdb_model,
                                           is_comparison_model,
                                           is_fmn_model,
                                           is_magnifiernet_model,
                                           is_pmm_model,
                                           takes_no_mix,
                                           uses_pmm_engine,
)

__all__ = [
    'get_default_config', 'add_pmm_config', 'add_comparison_config',
    'is_pmm_model', 'is_bdb_model', 'is_fmn_model', 'is_magnifiernet_model',
    'is_comparison_model', 'takes_no_mix', 'uses_pmm_engine', 'resolved_top_k',
    'mixed_blocks', 'merge_file', 'merge_list', 'ConfigKeyError',
    'imagedata_kwargs', 'model_kwargs', 'optimizer_kwargs',
    'lr_scheduler_kwargs', 'engine_kwargs', 'comparison_engine_kwargs',
    'engine_run_kwargs', 'dump_differences', 'check_config', 'check_paths',
    'channels_last'
]
