"""Pictures: each PMM stage's Grad-CAM and top-K blocks, the training chain's
mix, the stages' overlap, FMN's masks and MagnifierNet's regions."""
from pmm_torchreid.utils.io import json_safe
from pmm_torchreid.visualize.drawing import (
                                             STAGE_NAMES,
                                             colorize,
                                             denormalize,
                                             item_name,
                                             load_images,
                                             normalization_of,
                                             overlay,
                                             save_png,
                                             stage_name,
                                             tile_scale,
                                             upsample_cam,
                                             upsample_mask,
)
from pmm_torchreid.visualize.gradcam import (
                                             StagePictures,
                                             contact_sheet,
                                             draw_partners,
                                             format_overlap,
                                             panel_size,
                                             render_panel,
                                             stage_views,
                                             staged_network,
                                             test_time_views,
)
from pmm_torchreid.visualize.masks import MaskPictures, mask_views
from pmm_torchreid.visualize.overlap import (
                                             cam_cosine,
                                             chance_iou,
                                             mask_iou,
                                             pairwise,
                                             stage_overlap,
                                             summarize_overlap,
)

__all__ = [
    'stage_views', 'test_time_views', 'staged_network', 'StagePictures',
    'render_panel', 'contact_sheet', 'panel_size', 'overlay', 'upsample_cam',
    'upsample_mask', 'denormalize', 'save_png', 'stage_name', 'stage_overlap',
    'summarize_overlap', 'mask_iou', 'cam_cosine', 'chance_iou',
    'format_overlap', 'draw_partners', 'MaskPictures', 'mask_views',
    'json_safe', 'STAGE_NAMES', 'colorize', 'item_name', 'load_images',
    'normalization_of', 'tile_scale', 'pairwise'
]


def __getattr__(name: str):
    # 0.2.0's name of staged_network (it checks the stage protocol, unlike
    # pmm_torchreid.utils.checkpoint.unwrap); the old name still works, warned
    if name == 'unwrap_model':
        import warnings  # lazy: only for this deprecated name
        warnings.warn('pmm_torchreid.visualize.unwrap_model is now '
                      'staged_network (pmm_torchreid 0.3)', DeprecationWarning,
                      stacklevel=2)
        return staged_network
    raise AttributeError('module {!r} has no attribute {!r}'.format(
        __name__, name))
