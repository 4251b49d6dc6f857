"""Merging yaml files and ``KEY VALUE`` overrides into a config, with errors
that name the file, the key and the value; comparing two config dumps."""
from __future__ import annotations

import difflib
import os.path as osp
from typing import List, Sequence

import yaml
from yacs.config import CfgNode as CN

from pmm_torchreid.config.defaults import get_default_config

__all__ = ['merge_file', 'merge_list', 'flat_dump', 'dump_differences',
           'ConfigKeyError', 'AUTO_BOOL_KEYS', 'auto_bool']


#: keys that take ``'auto'``, True or False.  yacs keeps one type per key, so
#: they are stored as the strings ``'auto'``, ``'True'`` and ``'False'``
AUTO_BOOL_KEYS = ('train.channels_last',)


def auto_bool(key: str, value) -> str:
    """``value`` of an :data:`AUTO_BOOL_KEYS` key as stored: ``'auto'``,
    ``'True'`` or ``'False'`` (a bool, or any capitalisation of the three).

    Examples::

        >>> auto_bool('train.channels_last', True), auto_bool('k', 'AUTO')
        ('True', 'auto')

    Raises:
        ValueError: naming the key and the value.
    """
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, str):
        spelled = {'auto': 'auto', 'true': 'True', 'false': 'False'}
        if value.strip().lower() in spelled:
            return spelled[value.strip().lower()]
    raise ValueError("config {} = {!r}: expected 'auto', True or False".format(
        key, value))


def _auto_bools_in_tree(tree: CN, where: str) -> None:
    for full in AUTO_BOOL_KEYS:
        node = tree
        *parents, leaf = full.split('.')
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            try:
                # quoted: yacs reads the file's strings as Python literals
                node[leaf] = repr(auto_bool(full, node[leaf]))
            except ValueError as error:
                raise ValueError('{}: {}'.format(where, error)) from None


def _all_keys(cfg: CN, prefix: str = '') -> List[str]:
    keys = []
    for key, value in cfg.items():
        full = prefix + key
        keys += _all_keys(value, full + '.') if isinstance(value, CN) else [full]
    return keys


def _flat(tree: dict, prefix: str = '') -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, prefix + key + '.'))
        else:
            flat[prefix + key] = value
    return flat


def flat_dump(text: str) -> dict:
    """A config dump (``cfg.dump()`` YAML) as ``{'section.key': value}``."""
    return _flat(yaml.safe_load(text) or {})


def dump_differences(old: str, new: str) -> List[str]:
    """The keys whose values differ between two config dumps (``cfg.dump()``
    YAML), sorted.  A key only ``new`` has counts as the same when its value
    there is the current default: a key added to the plugin later, whose
    default keeps the old behaviour, does not make an older recipe another
    one.  A key only ``old`` has (one removed since) always differs."""
    old_flat, new_flat = flat_dump(old), flat_dump(new)
    defaults = flat_dump(get_default_config().dump())
    missing = object()
    differ = []
    for key in set(old_flat) | set(new_flat):
        before = old_flat.get(key, missing)
        after = new_flat.get(key, missing)
        if before is missing and after == defaults.get(key, missing):
            continue
        if before != after:
            differ.append(key)
    return sorted(differ)


class ConfigKeyError(KeyError):
    """An unknown config key (``str`` gives the message without quotes)."""

    def __str__(self):
        return str(self.args[0]) if self.args else ''


def _explain(error: Exception, cfg: CN, where: str) -> Exception:
    message = str(error).strip('"\'')
    if 'Non-existent' in message and ':' in message:  # yacs: file / list
        key = message.split(':', 1)[1].strip()
        close = difflib.get_close_matches(key, _all_keys(cfg), n=3)
        return ConfigKeyError(
            '{}: unknown config key {!r}{}'.format(
                where, key, '; did you mean {}?'.format(
                    ' or '.join(repr(c) for c in close)) if close else
                ' (no key of that name exists; see pmm_torchreid/config/defaults.py)'
            )
        )
    return type(error)('{}: {}'.format(where, message))


def merge_file(cfg: CN, path: str) -> CN:
    """``cfg.merge_from_file(path)`` with errors naming the file and the key.

    Raises:
        FileNotFoundError: no such file.
        KeyError: an unknown key (with the closest existing keys).
        ValueError: a value of the wrong type, or a file that is not yaml.
    """
    if not osp.isfile(path):
        raise FileNotFoundError('config file "{}" does not exist'.format(path))
    where = 'config file "{}"'.format(path)
    try:
        with open(path) as f:
            loaded = cfg.load_cfg(f)
        _auto_bools_in_tree(loaded, where)
        cfg.merge_from_other_cfg(loaded)
    except yaml.YAMLError as error:
        raise ValueError('{} is not valid yaml: {}'.format(where, error)) \
            from None
    except (KeyError, ValueError, AssertionError, AttributeError) as error:
        raise _explain(error, cfg, where) from None
    return cfg


def merge_list(cfg: CN, opts: Sequence[str]) -> CN:
    """``cfg.merge_from_list(opts)`` with errors naming the key and value."""
    opts = list(opts)
    if len(opts) % 2:
        raise ValueError(
            'command-line overrides come as KEY VALUE pairs; got an odd '
            'number of items: {}'.format(opts)
        )
    for i in range(0, len(opts), 2):
        if opts[i] in AUTO_BOOL_KEYS:
            value = opts[i + 1]
            if isinstance(value, str) and value.strip() in ('True', 'False'):
                value = value.strip() == 'True'
            try:
                opts[i + 1] = repr(auto_bool(opts[i], value))
            except ValueError as error:
                raise ValueError('command line: {}'.format(error)) from None
    try:
        cfg.merge_from_list(opts)
    except (KeyError, ValueError, AssertionError, AttributeError) as error:
        raise _explain(error, cfg, 'command line') from None
    return cfg
