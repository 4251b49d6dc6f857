"""The error of a bad config value, shared by every layer that checks one."""
from __future__ import annotations

__all__ = ['fail']


def fail(key: str, value, expected: str):
    """Raises the error of a bad config value: ``config KEY = VALUE: expected
    WHAT``."""
    raise ValueError('config {} = {!r}: expected {}'.format(key, value, expected))
