"""The one place that knows the plugin's model families.

Every plugin model name is ``<family>`` or ``<family>_<backbone>``.  What the
rest of the plugin needs to know of a family (which engine trains it, whether
it takes a mixing rule, which config section holds its constructor arguments,
which pictures show what it learnt) stands in :data:`FAMILIES`; the ``is_*``
helpers read it.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

from pmm_torchreid.models.bdb import BDB
from pmm_torchreid.models.fmn import FMN
from pmm_torchreid.models.magnifiernet import MagnifierNet
from pmm_torchreid.models.pmm import PMM

__all__ = ['Family', 'FAMILIES', 'family_of', 'is_pmm_model', 'is_bdb_model',
           'is_fmn_model', 'is_magnifiernet_model', 'is_comparison_model',
           'takes_no_mix', 'uses_pmm_engine']


class Family(NamedTuple):
    name: str
    #: 'pmm' (PMMEngine) or 'comparison' (ComparisonEngine: FMN, MagnifierNet)
    engine: str
    #: trains with a ``pmm.mix`` rule (BDB drops its own block; the comparison
    #: systems have their own mechanisms)
    mixes: bool
    #: the config section of its constructor arguments ('' for none) and the
    #: keys taken from it, spelled like the arguments
    options: str
    option_keys: str
    #: what scripts/visualize_gradcam.py draws: 'gradcam' (stage Grad-CAMs),
    #: 'masks' (learnt masks or regions) or '' (nothing of its own)
    pictures: str
    #: the network class (built on every backbone by models.factory)
    network: type


FAMILIES = {
    'pmm': Family('pmm', 'pmm', True, 'pmm', 'embedding_dim num_stages',
                  'gradcam', PMM),
    'bdb': Family('bdb', 'pmm', False, 'bdb', 'bands band_dim', '', BDB),
    'fmn': Family('fmn', 'comparison', False, 'fmn', 'embedding_dim', 'masks',
                  FMN),
    'magnifiernet': Family(
        'magnifiernet', 'comparison', False, 'magnifiernet',
        'embedding_dim region_dim occluded_regions occlusion_share fusion',
        'masks',
        MagnifierNet),
}


def family_of(name: str) -> Optional[Family]:
    """The family of a plugin model name (``'pmm_resnet18'`` -> PMM's), or
    None for a name that is not the plugin's."""
    for prefix, family in FAMILIES.items():
        if name == prefix or name.startswith(prefix + '_'):
            return family
    return None


def _is(name: str, prefix: str) -> bool:
    family = family_of(name)
    return family is not None and family.name == prefix


def is_pmm_model(name: str) -> bool:
    return _is(name, 'pmm')


def is_bdb_model(name: str) -> bool:
    return _is(name, 'bdb')


def is_fmn_model(name: str) -> bool:
    return _is(name, 'fmn')


def is_magnifiernet_model(name: str) -> bool:
    return _is(name, 'magnifiernet')


def is_comparison_model(name: str) -> bool:
    """The comparison systems FMN and MagnifierNet
    (:class:`~pmm_torchreid.engine.ComparisonEngine`)."""
    family = family_of(name)
    return family is not None and family.engine == 'comparison'


def takes_no_mix(name: str) -> bool:
    """The plugin's models that train with ``pmm.mix 'none'`` only (BDB drops
    its own block; FMN and MagnifierNet have their own mechanisms)."""
    family = family_of(name)
    return family is not None and not family.mixes


def uses_pmm_engine(name: str) -> bool:
    """The plugin's models (PMM, its baseline BDB and the comparison systems
    FMN and MagnifierNet) train with ``loss.name 'pmm'``
    (:class:`~pmm_torchreid.engine.PMMEngine` and its subclass
    :class:`~pmm_torchreid.engine.ComparisonEngine`)."""
    return family_of(name) is not None
