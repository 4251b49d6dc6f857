#!/usr/bin/env python
"""Kill a checkpoint writer with SIGKILL at random moments; count survivors.

A child process writes checkpoints of a model-sized state (``--megabytes``)
back to back to ONE path with :func:`pmm_torchreid.checkpoint.save_checkpoint`,
each holding its sequence number in every tensor.  The parent kills it after
a random delay, then loads the file: it must load with
``torch.load(weights_only=True)`` and hold one complete state (all tensors
equal to its ``epoch``).  With ``--unsafe`` the child writes with a plain
``torch.save(state, path)`` instead, to show what the atomic write prevents.

Example::

    python scripts/stress_checkpoints.py --kills 100 --megabytes 95
"""
import argparse
import os
import os.path as osp
import random
import signal
import subprocess
import sys
import tempfile
import time

try:
    import pmm_torchreid  # noqa: F401  (installed: pip install -e .)
except ImportError:  # run from a source tree that is not installed
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))


from pmm_torchreid.checkpoint import load_checkpoint  # noqa: E402

CHILD = '''
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location(  # without importing torchreid
    'checkpoint', {module!r})
checkpoint = importlib.util.module_from_spec(spec)
spec.loader.exec_module(checkpoint)
save_checkpoint = checkpoint.save_checkpoint
path, n, unsafe = {path!r}, {numel}, {unsafe}
import os
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


def check(path):
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--kills', type=int, default=50)
    parser.add_argument('--megabytes', type=float, default=95.0,
                        help='checkpoint size (ResNet-50 PMM: about 95 MB)')
    parser.add_argument('--delay', type=float, nargs=2, default=[0.0, 3.0],
                        help='kill a uniform [MIN, MAX] s after the writer '
                        'is ready (its imports done)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--unsafe', action='store_true',
                        help='write with plain torch.save (for comparison)')
    args = parser.parse_args()
    rng = random.Random(args.seed)
    numel = int(args.megabytes * 2 ** 20 / 4)
    results, leftovers, written = {}, 0, 0
    start = time.time()
    with tempfile.TemporaryDirectory() as folder:
        path = osp.join(folder, 'model.pth.tar-1')
        for _ in range(args.kills):
            code = CHILD.format(module=osp.join(osp.dirname(osp.dirname(
                osp.abspath(__file__))), 'pmm_torchreid', 'checkpoint.py'),
                path=path, numel=numel, unsafe=args.unsafe)
            proc = subprocess.Popen([sys.executable, '-c', code],
                                    stdout=subprocess.PIPE, text=True)
            assert proc.stdout.readline().strip() == 'ready'
            time.sleep(rng.uniform(*args.delay))
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
              args.kills, args.megabytes,
              'plain torch.save' if args.unsafe else 'save_checkpoint',
              time.time() - start, written))
    for result, count in sorted(results.items()):
        print('  {:<28} {}'.format(result, count))
    print('  kills that landed during a write (a temporary file was left): '
          '{}'.format(leftovers))
    return 0 if set(results) <= {'ok', 'missing'} else 1


if __name__ == '__main__':
    sys.exit(main())
