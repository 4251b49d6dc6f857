"""Files written whole or not at all, plain values for safe pickles and
strict JSON, and file digests."""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import tempfile
from collections import OrderedDict
from typing import IO, Any, Iterator

import numpy as np

__all__ = ['to_plain', 'atomic_write', 'json_safe', 'sha256']


def to_plain(obj: Any) -> Any:
    """Turns NumPy scalars and arrays nested in dicts, lists and tuples into
    Python numbers and lists, so ``torch.load(weights_only=True)`` accepts them."""
    if type(obj) in (dict, OrderedDict):
        return type(obj)((k, to_plain(v)) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(to_plain(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'wb') -> Iterator[IO]:
    """Opens a temporary file next to ``path`` for writing; when the block
    ends without an error, the file is flushed, fsynced and renamed onto
    ``path`` (atomic on POSIX).  On an error it is deleted; a process killed
    at any moment leaves ``path`` as it was, plus at most a hidden
    ``.<name>.*.tmp``, which the next write to ``path`` removes.  The file
    gets the usual mode (``0666`` minus the umask), not ``mkstemp``'s 0600.

    Examples::

        >>> with atomic_write('log/overlap.json', 'w') as f:
        ...     json.dump(report, f)
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    prefix = '.' + os.path.basename(path) + '.'
    for name in os.listdir(folder):  # debris of a writer that was killed
        if name.startswith(prefix) and name.endswith('.tmp'):
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix='.tmp', dir=folder)
    try:
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def json_safe(obj):
    """``obj`` with NaN/inf floats turned into ``None`` (strict JSON)."""
    if isinstance(obj, dict):
        return type(obj)((k, json_safe(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def sha256(path: str) -> str:
    """The SHA-256 digest of a file, in hex."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()
