"""Kill a checkpoint writer with SIGKILL at random moments; count survivors
(scripts/stress_checkpoints.py).

A child process writes checkpoints of a model-sized state back to back to ONE
path with :func:`pmm_torchreid.utils.checkpoint.save_checkpoint`, each holding
its sequence number in every tensor.  The parent kills it after a random
delay, then loads the file: it must load with ``torch.load(weights_only=True)``
and hold one complete state (all tensors equal to its ``epoch``).  With
``unsafe`` the child writes with a plain ``torch.save(state, path)`` instead,
to show what the atomic write prevents.
"""
from __future__ import annotations

import os
import os.path as osp
import random
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, Sequence

import pmm_torchreid.utils.checkpoint as checkpoint_module
from pmm_torchreid.utils.checkpoint import load_checkpoint

__all__ = ['CHILD', 'child_program', 'check', 'stress']

#: the package folder the parent imported, which the child imports too
PACKAGE_DIR = osp.dirname(osp.dirname(osp.abspath(checkpoint_module.__file__)))

#: the writer; it imports pmm_torchreid.utils.checkpoint from PACKAGE_DIR
#: under a bare stand-in for the top package, so that the package's
#: ``__init__`` (torchreid, the models) is not imported: the child starts fast
CHILD = '''
import os, sys, types, torch
package = types.ModuleType('pmm_torchreid')
package.__path__ = [{package!r}]
sys.modules['pmm_torchreid'] = package
from pmm_torchreid.utils.checkpoint import save_checkpoint
path, n, unsafe = {path!r}, {numel}, {unsafe}
parent = os.getppid()
print('ready', flush=True)
i = 0
while os.getppid() == parent:  # never outlive the parent (killed or not)
    i += 1
    state = {{'epoch': i, 'state_dict': {{'w{{}}'.format(j): torch.full((n // 4,), float(i))
                                        for j in range(4)}}}}
    if unsafe:
        torch.save(state, path)
    else:
        save_checkpoint(state, path)
    open(path + '.count', 'w').write(str(i))
'''


def child_program(path: str, numel: int, unsafe: bool = False) -> str:
    """The writer's program text (for ``python -c``)."""
    return CHILD.format(package=PACKAGE_DIR, path=path, numel=numel,
                        unsafe=unsafe)


def check(path: str) -> str:
    """'ok' (a complete state), 'missing' or why the file is bad."""
    if not osp.exists(path):
        return 'missing'
    try:
        state = load_checkpoint(path)
    except Exception as error:  # noqa: BLE001 - we report every failure
        return 'unloadable ({})'.format(type(error).__name__)
    epoch = state['epoch']
    if not all(bool((t == epoch).all()) for t in state['state_dict'].values()):
        return 'mixed states'
    return 'ok'


def stress(kills: int = 50, megabytes: float = 95.0,
           delay: Sequence[float] = (0.0, 3.0), seed: int = 0,
           unsafe: bool = False) -> Dict[str, int]:
    """Kills the writer ``kills`` times, each a uniform ``delay`` seconds
    after it is ready, and prints the counts of :func:`check`'s results;
    returns them."""
    rng = random.Random(seed)
    numel = int(megabytes * 2 ** 20 / 4)
    results, leftovers, written = {}, 0, 0
    start = time.time()
    with tempfile.TemporaryDirectory() as folder:
        path = osp.join(folder, 'model.pth.tar-1')
        for _ in range(kills):
            code = child_program(path, numel, unsafe)
            proc = subprocess.Popen([sys.executable, '-c', code],
                                    stdout=subprocess.PIPE, text=True)
            assert proc.stdout.readline().strip() == 'ready'
            time.sleep(rng.uniform(*delay))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            if osp.exists(path + '.count'):
                written += int(open(path + '.count').read() or 0)
                os.unlink(path + '.count')
            result = check(path)
            results[result] = results.get(result, 0) + 1
            tmp = [f for f in os.listdir(folder) if f.endswith('.tmp')]
            leftovers += len(tmp)
            for f in tmp:  # what a later save would leave behind too
                os.unlink(osp.join(folder, f))
            if result != 'ok' and osp.exists(path):
                os.unlink(path)
    print('{} kills of a writer of {:.0f} MB checkpoints ({}), {:.0f} s; '
          'checkpoints written in all: {}'.format(
              kills, megabytes,
              'plain torch.save' if unsafe else 'save_checkpoint',
              time.time() - start, written))
    for result, count in sorted(results.items()):
        print('  {:<28} {}'.format(result, count))
    print('  kills that landed during a write (a temporary file was left): '
          '{}'.format(leftovers))
    return results
