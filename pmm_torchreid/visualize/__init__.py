"""Pictures: each PMM stage's Grad-CAM and top-K blocks, the training chain's
mix, the stages' overlap, FMN's masks and MagnifierNet's regions."""
from pmm_torchreid.visualize.drawing import (
                                             denormalize,
                                             overlay,
                                             save_png,
                                             stage_name,
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
                                             stage_overlap,
                                             summarize_overlap,
)

__all__ = [
    'stage_views', 'test_time_views', 'staged_network', 'StagePictures',
    'render_panel', 'contact_sheet', 'panel_size', 'overlay', 'upsample_cam',
    'upsample_mask', 'denormalize', 'save_png', 'stage_name', 'stage_overlap',
    'summarize_overlap', 'mask_iou', 'cam_cosine', 'chance_iou',
    'format_overlap', 'draw_partners', 'MaskPictures', 'mask_views'
]
