"""pmm_torchreid: Progressive Multi-stage Feature Mix (ICASSP 2021) for torchreid.

Importing the package registers the ``pmm*`` models, the baseline ``bdb*``
models, the comparison systems ``fmn*`` and ``magnifiernet*`` and the
``pmm_synthetic`` dataset with torchreid, so ``torchreid.models.build_model('pmm', ...)`` and
``torchreid.utils.FeatureExtractor(model_name='pmm', ...)`` work.

The subpackages, by concern: :mod:`~pmm_torchreid.models` (networks, backbones,
the mixing rules), :mod:`~pmm_torchreid.data`, :mod:`~pmm_torchreid.config`,
:mod:`~pmm_torchreid.engine` (training step, losses, run records),
:mod:`~pmm_torchreid.metrics` (fast exact ranking),
:mod:`~pmm_torchreid.visualize`, :mod:`~pmm_torchreid.deploy` (export),
:mod:`~pmm_torchreid.study` (the ablation runner), :mod:`~pmm_torchreid.bench`
and :mod:`~pmm_torchreid.utils`; :mod:`~pmm_torchreid.launch` builds a run from
a config as torchreid's ``scripts/main.py`` does.
"""
try:
    import torchreid  # noqa: F401
except ModuleNotFoundError as error:  # PyPI torchreid declares no dependencies
    raise ModuleNotFoundError(
        'importing torchreid failed ({}); with the PyPI torchreid, install '
        'what it imports too: pip install "pmm-torchreid[torchreid-deps]", '
        'or the pinned stack: pip install -r requirements.txt'.format(error),
        name=error.name) from error

from pmm_torchreid import compat
from pmm_torchreid.models import BDB, FMN, PMM, MagnifierNet
from pmm_torchreid.models.guidance import HardMix, block_mask, grad_cam, hard_mix, sample_negatives
from pmm_torchreid.registry import register

__version__ = '0.3.0'

register()
compat.install()


def __getattr__(name: str):
    # ``pmm_torchreid.models.guidance`` and the other 0.2.0 module names, reached as
    # attributes without an import (0.2.0's __init__ imported several)
    return compat.moved_attribute(name)

__all__ = [
    'PMM', 'BDB', 'FMN', 'MagnifierNet', 'grad_cam', 'block_mask',
    'sample_negatives', 'hard_mix', 'HardMix',
    'register', '__version__'
]
