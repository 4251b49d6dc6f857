"""Session fixtures: the generated dataset and one trained demo run, each
made once per test run and shared by pytest-xdist's workers (a file lock
makes one worker build it while the other waits)."""
import os
import shutil
import sys
import warnings

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from helpers import ROOT, main_args, script  # noqa: E402

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

if os.environ.get('PYTEST_XDIST_WORKER'):
    # the workers share the machine's cores: one thread each, set before
    # any test builds a network
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    import torch
    torch.set_num_threads(1)

# torchreid warns at import that its Cython evaluation is not built
warnings.filterwarnings('ignore', message='Cython evaluation')


#: what this run collected before any -m/-k selection: the counts
#: docs/DEVELOPING.md states (tests/test_suite.py compares them)
COLLECTED = {}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session, config, items):
    import glob
    tests = os.path.join(ROOT, 'tests')
    files = {str(i.path) for i in items}
    COLLECTED.update(
        # all of tests/, and every test file gave tests (none skipped whole
        # at import, none left out by --ignore)
        whole=all(os.path.abspath(str(a)) in (tests, ROOT) for a in config.args)
        and len(files) == len(glob.glob(os.path.join(tests, 'test_*.py'))),
        tests=len(items), slow=sum(1 for i in items if i.get_closest_marker('slow')),
        files=len(files))


@pytest.fixture(scope='session')
def collected():
    """``{'whole', 'tests', 'slow', 'files'}`` of this run's collection
    (``whole``: the run collected all of tests/)."""
    return dict(COLLECTED)


def once(tmp_path_factory, name, make):
    """The folder ``name`` filled by ``make(folder)`` once per test run.

    Under pytest-xdist the folder lies beside the workers' own temporary
    folders and a lock makes the first worker that asks build it; a build
    that failed half way is thrown away and tried again.
    """
    from filelock import FileLock
    if not os.environ.get('PYTEST_XDIST_WORKER'):
        folder = tmp_path_factory.mktemp(name, numbered=False)
        make(str(folder))
        return str(folder)
    folder = tmp_path_factory.getbasetemp().parent / name
    with FileLock(str(folder) + '.lock'):
        done = folder / '.complete'
        if not done.exists():
            shutil.rmtree(str(folder), ignore_errors=True)
            folder.mkdir()
            make(str(folder))
            done.touch()
    return str(folder)


@pytest.fixture(scope='session')
def synthetic_root(tmp_path_factory):
    """A data root holding the generated ``pmm_synthetic`` dataset."""
    def make(root):
        import torchreid

        import pmm_torchreid  # noqa: F401  (registers the dataset)
        torchreid.data.ImageDataManager(
            root=root, sources='pmm_synthetic', height=32, width=16,
            workers=0, batch_size_train=8, train_sampler='RandomIdentitySampler',
            num_instances=2
        )
    return once(tmp_path_factory, 'reid-data', make)


@pytest.fixture(scope='session')
def demo_run(synthetic_root, tmp_path_factory):
    """One trained run of scripts/main.py with the demo config, SMALL
    (helpers.SMALL), 2 epochs, one thread: ``(save_dir, printed output)``.
    Its checkpoints are ``save_dir/model/model.pth.tar-{1,2}``."""
    def make(folder):
        proc = script('main.py', *main_args(synthetic_root, folder,
                                            'train.max_epoch', '2'))
        with open(os.path.join(folder, 'stdout.txt'), 'w') as f:
            f.write(proc.stdout)
    folder = once(tmp_path_factory, 'demo-run', make)
    with open(os.path.join(folder, 'stdout.txt')) as f:
        return folder, f.read()
