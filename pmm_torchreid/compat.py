"""The flat module paths of pmm_torchreid 0.2.0, kept importing.

0.2.0 was one flat package; its modules now live in subpackages by concern
(``pmm_torchreid.records`` is :mod:`pmm_torchreid.engine.records`, and so
on).  ``import pmm_torchreid.records`` and ``from pmm_torchreid.records import
RunRecordsMixin`` still work: a finder hands out the module at its new place
(the same module object) with a ``DeprecationWarning`` naming that place.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__all__ = ['MOVED', 'install', 'moved_attribute']

#: old module path -> new module path
MOVED = {
    'pmm_torchreid.backbones': 'pmm_torchreid.models.backbones',
    'pmm_torchreid.fmn': 'pmm_torchreid.models.fmn',
    'pmm_torchreid.magnifiernet': 'pmm_torchreid.models.magnifiernet',
    'pmm_torchreid.guidance': 'pmm_torchreid.models.guidance',
    'pmm_torchreid.checkpoint': 'pmm_torchreid.utils.checkpoint',
    'pmm_torchreid.distributed': 'pmm_torchreid.utils.distributed',
    'pmm_torchreid.checks': 'pmm_torchreid.config.checks',
    'pmm_torchreid.comparison_engine': 'pmm_torchreid.engine.comparison',
    'pmm_torchreid.curves': 'pmm_torchreid.engine.curves',
    'pmm_torchreid.losses': 'pmm_torchreid.engine.losses',
    'pmm_torchreid.optim': 'pmm_torchreid.engine.optim',
    'pmm_torchreid.records': 'pmm_torchreid.engine.records',
    'pmm_torchreid.parsing': 'pmm_torchreid.data.parsing',
    'pmm_torchreid.splits': 'pmm_torchreid.data.splits',
    'pmm_torchreid.synthetic': 'pmm_torchreid.data.synthetic',
    'pmm_torchreid.mask_pictures': 'pmm_torchreid.visualize.masks',
}


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self):
        self.specs = {}  # old name -> the module's own spec

    def find_spec(self, fullname, path, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        warnings.warn('{} moved to {} (pmm_torchreid 0.3); the old path will '
                      'go'.format(spec.name, MOVED[spec.name]),
                      DeprecationWarning, stacklevel=2)
        module = importlib.import_module(MOVED[spec.name])
        self.specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module):
        # already executed at its new place; the import system has just set
        # its __spec__ to the old name's, so give it back its own
        module.__spec__ = self.specs[module.__spec__.name]


def moved_attribute(name: str):
    """``pmm_torchreid.<name>`` for an old module name (imported through the
    finder, so with its warning); AttributeError for any other name."""
    if 'pmm_torchreid.' + name in MOVED:
        return importlib.import_module('pmm_torchreid.' + name)
    raise AttributeError("module 'pmm_torchreid' has no attribute "
                         '{!r}'.format(name))


def install() -> None:
    """Puts the finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
