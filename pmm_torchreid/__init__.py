"""pmm_torchreid: Progressive Multi-stage Feature Mix (ICASSP 2021) for torchreid.

Importing the package registers the ``pmm*`` models, the baseline ``bdb*``
models, the comparison systems ``fmn*`` and ``magnifiernet*`` and the
``pmm_synthetic`` dataset with torchreid, so ``torchreid.models.build_model('pmm', ...)`` and
``torchreid.utils.FeatureExtractor(model_name='pmm', ...)`` work.
"""
try:
    import torchreid  # noqa: F401
except ModuleNotFoundError as error:  # PyPI torchreid declares no dependencies
    raise ModuleNotFoundError(
        'importing torchreid failed ({}); with the PyPI torchreid, install '
        'what it imports too: pip install "pmm-torchreid[torchreid-deps]", '
        'or the pinned stack: pip install -r requirements.txt'.format(error),
        name=error.name) from error

from .guidance import block_mask, grad_cam, hard_mix, sample_negatives
from .models import BDB, FMN, PMM, MagnifierNet
from .registry import register

__version__ = '0.2.0'

register()

__all__ = [
    'PMM', 'BDB', 'FMN', 'MagnifierNet', 'grad_cam', 'block_mask',
    'sample_negatives', 'hard_mix',
    'register', '__version__'
]
