"""The query images a command works on: the query set of a target dataset
(``--dataset``), and the queries chosen by index or drawn with a seed
(``--indices`` / ``--num`` / ``--seed``)."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

__all__ = ['query_set', 'choose_queries']


def query_set(datamanager, name: str) -> list:
    """The query items ``(path, pid, camid, ...)`` of target ``name``.

    Raises:
        ValueError: ``name`` is not one of the data manager's targets.
    """
    if name not in datamanager.test_dataset:
        raise ValueError('--dataset {!r}: expected one of data.targets '
                         '{}'.format(name, list(datamanager.test_dataset)))
    return list(datamanager.test_dataset[name]['query'])


def choose_queries(query: Sequence, name: str, num: int, seed: int = 0,
                   indices: Optional[Sequence[int]] = None) -> List[int]:
    """The query indices to use: ``indices`` when given (checked), else
    ``num`` distinct ones drawn with ``seed``, sorted.

    Raises:
        ValueError: an index outside the query set of ``name``, or ``num``
            larger than it.
    """
    if indices:
        bad = [i for i in indices if not 0 <= i < len(query)]
        if bad:
            raise ValueError('--indices {}: the query set of {} has {} images '
                             '(0 to {})'.format(bad, name, len(query),
                                                len(query) - 1))
        return list(indices)
    if num > len(query):
        raise ValueError('--num {}: the query set of {} has {} images'.format(
            num, name, len(query)))
    gen = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(len(query), generator=gen)[:num].tolist())
