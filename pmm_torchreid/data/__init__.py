"""Data: the data manager builder (Cutout, validation identities, image
checks), image reading that never hangs, the embedded synthetic dataset,
your own data from a folder or CSV files, validation splits and body-region
masks."""
from pmm_torchreid.data.datamanager import build_datamanager
from pmm_torchreid.data.folder import FolderDataset, folder_dataset
from pmm_torchreid.data.images import (
                                       BadImageError,
                                       drop_bad_images,
                                       find_bad_images,
                                       install_safe_image_reader,
                                       read_image,
)
from pmm_torchreid.data.transforms import Cutout

__all__ = ['Cutout', 'build_datamanager', 'BadImageError', 'read_image',
           'install_safe_image_reader', 'find_bad_images', 'drop_bad_images',
           'FolderDataset', 'folder_dataset']
