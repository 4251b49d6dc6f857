"""Adds the plugin's models and datasets to torchreid's own tables.

torchreid (1.4 from source, or the PyPI "torchreid" 0.2.5 that moves it under
``torchreid.reid``) keeps its model table in the module-level dict
``__model_factory`` of ``torchreid.models`` and its image datasets in
``__image_datasets`` of ``torchreid.data.datasets``; it has no public call to add
a model.  :func:`register` fills both tables, is safe to call many times, and
refuses to replace a different entry under the same name.
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping

from pmm_torchreid.data.images import install_safe_image_reader
from pmm_torchreid.data.synthetic import DATASETS
from pmm_torchreid.models.factory import MODEL_FACTORY
from pmm_torchreid.utils.torchreid_internals import dataset_table, model_table

__all__ = ['register', 'register_into']


def _same(a: Callable, b: Callable) -> bool:
    # equal objects, or the same definition seen again after a module reload
    return a is b or (
        getattr(a, '__module__', None) == getattr(b, '__module__', 0)
        and getattr(a, '__qualname__', None) == getattr(b, '__qualname__', 0)
    )


def register_into(
    table: Dict[str, Callable], entries: Mapping[str, Callable], what: str
) -> None:
    """Adds ``entries`` to ``table``; raises if a name is taken by another one."""
    for name, entry in entries.items():
        present = table.get(name)
        if present is not None and not _same(present, entry):
            raise ValueError(
                'torchreid already has a different {} named {!r} ({}.{}); '
                'pmm_torchreid will not overwrite it'.format(
                    what, name, getattr(present, '__module__', '?'),
                    getattr(present, '__qualname__', repr(present))
                )
            )
    for name, entry in entries.items():
        table.setdefault(name, entry)


def register() -> None:
    """Registers the PMM models and the synthetic dataset with torchreid, and
    makes its image datasets raise on a bad image instead of retrying forever
    (:func:`pmm_torchreid.data.images.install_safe_image_reader`).

    Examples::

        >>> import torchreid, pmm_torchreid   # importing registers already
        >>> model = torchreid.models.build_model('pmm', num_classes=751,
        ...                                      pretrained=False)
    """
    register_into(model_table(), MODEL_FACTORY, 'model')
    register_into(dataset_table(), DATASETS, 'image dataset')
    install_safe_image_reader()
