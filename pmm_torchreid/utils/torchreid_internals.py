"""Every reach into torchreid's internals, in one place.

torchreid (deep-person-reid 1.4 from source, or the PyPI ``torchreid`` 0.2.x
that moves the same code under ``torchreid.reid``) offers no public call to add
a model or a dataset, to read images without retrying forever, or to rank with
another function.  The plugin needs each of these; this module does them, so
that a change in torchreid's layout is mended here alone.  Everything else in
the plugin uses torchreid's public attributes (``torchreid.models``,
``torchreid.data``, ``torchreid.engine``, ``torchreid.utils``,
``torchreid.metrics``), which both installs provide.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
from typing import Callable, Dict, Iterator

import torchreid

__all__ = ['model_table', 'dataset_table', 'point_read_image_at',
           'dataset_factory_hook', 'engine_metrics_swapped', 'submodule']


def _table(module, attr: str) -> Dict[str, Callable]:
    table = vars(module).get(attr)
    if not isinstance(table, dict):
        raise RuntimeError(
            'this torchreid ({}) has no {} table; pmm_torchreid supports '
            'deep-person-reid 1.4 and the PyPI torchreid 0.2.x'.format(
                module.__name__, attr
            )
        )
    return table


def model_table() -> Dict[str, Callable]:
    """torchreid's model table (``__model_factory`` of ``torchreid.models``)."""
    return _table(torchreid.models, '__model_factory')


def dataset_table() -> Dict[str, Callable]:
    """torchreid's image dataset table (``__image_datasets`` of
    ``torchreid.data.datasets``)."""
    return _table(torchreid.data.datasets, '__image_datasets')


def point_read_image_at(read_image: Callable) -> None:
    """Makes torchreid's image datasets (and ``torchreid.utils.read_image``)
    call ``read_image``: its ``ImageDataset.__getitem__`` calls the name bound
    in its own module, and that name is replaced.  Idempotent; DataLoader
    workers started with ``fork`` inherit it."""
    dataset_module = sys.modules[torchreid.data.ImageDataset.__module__]
    tools_module = sys.modules[torchreid.utils.set_random_seed.__module__]
    for module in (dataset_module, tools_module, torchreid.utils):
        if hasattr(module, 'read_image'):
            module.read_image = read_image


@contextlib.contextmanager
def dataset_factory_hook(wrap: Callable[[Callable], Callable]) -> Iterator[None]:
    """Within the block, the data manager builds its datasets through
    ``wrap(original_init_image_dataset)``; restored afterwards."""
    module = sys.modules[torchreid.data.ImageDataManager.__module__]
    original = module.init_image_dataset
    module.init_image_dataset = wrap(original)
    try:
        yield
    finally:
        module.init_image_dataset = original


class _MetricsWith(object):
    """torchreid's ``metrics`` package with ``evaluate_rank`` swapped."""

    def __init__(self, metrics, evaluate_rank: Callable):
        self._metrics = metrics
        self._evaluate_rank = evaluate_rank

    def __getattr__(self, name):
        if name == 'evaluate_rank':
            return self._evaluate_rank
        return getattr(self._metrics, name)


@contextlib.contextmanager
def engine_metrics_swapped(evaluate_rank: Callable) -> Iterator[None]:
    """Within the block, torchreid's engines rank with ``evaluate_rank``.
    Only the name ``metrics`` in torchreid's engine module is replaced (by a
    view of the same package), so nothing else of torchreid changes, and it
    is restored afterwards."""
    module = sys.modules[torchreid.engine.Engine.__module__]
    original = module.metrics
    module.metrics = _MetricsWith(original, evaluate_rank)
    try:
        yield
    finally:
        module.metrics = original


def submodule(name: str):
    """torchreid's module ``name`` (e.g. ``'metrics.rank'``) under either
    layout: ``torchreid.<name>`` (source install) or ``torchreid.reid.<name>``
    (PyPI 0.2.x)."""
    for base in ('torchreid.reid', 'torchreid'):
        try:
            return importlib.import_module('{}.{}'.format(base, name))
        except ModuleNotFoundError:
            continue
    raise ModuleNotFoundError('torchreid has no module {!r}'.format(name))
