import os
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), 'shared')
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


# torchreid warns at import that its Cython evaluation is not built
warnings.filterwarnings('ignore', message='Cython evaluation')


@pytest.fixture(scope='session')
def synthetic_root(tmp_path_factory):
    """A data root holding the generated ``pmm_synthetic`` dataset (once per run)."""
    import torchreid

    import pmm_torchreid  # noqa: F401  (registers the dataset)
    root = tmp_path_factory.mktemp('reid-data')
    torchreid.data.ImageDataManager(
        root=str(root), sources='pmm_synthetic', height=32, width=16,
        workers=0, batch_size_train=8, train_sampler='RandomIdentitySampler',
        num_instances=2
    )
    return str(root)
