"""Runs scripts/main.py with one fault injected, for the interruption tests.

    python tests/fault_driver.py FAULT MARKER -- [main.py arguments]

FAULT is one of
- ``pause_mid_write:N``: the N-th checkpoint write stops half way (half the
  bytes written and flushed to disk), touches MARKER and sleeps, waiting to
  be killed;
- ``pause_before_rename:NAME``: the write of checkpoint file NAME is complete
  and fsynced but not yet renamed into place when it touches MARKER and sleeps;
- ``nan_at_epoch:E[:R]``: at the start of epoch E (1-based) a classifier bias is
  set to NaN, as a diverging run would have it (with R: on rank R only);
- ``sigkill_at:E:I:R``: rank R of a distributed run writes the time to MARKER
  and kills itself with SIGKILL at the start of epoch E, iteration I;
- ``hang_at:E:I:R``: the same, but rank R hangs (sleeps) instead;
- ``record``: the run is not disturbed; each rank records the identities of
  its batches and their losses and, at the end, a hash of its model's
  state_dict, in ``MARKER/rank<R>.json`` (MARKER is a folder).

It also runs under torchrun (``torchrun --nproc_per_node=2
tests/fault_driver.py FAULT MARKER -- ...``); ``RANK`` tells a rank apart.
"""
import hashlib
import io
import json
import os
import signal
import sys
import time


def main():
    fault, marker = sys.argv[1], sys.argv[2]
    argv = sys.argv[sys.argv.index('--') + 1:]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch

    import pmm_torchreid.utils.checkpoint as checkpoint
    from pmm_torchreid.engine import PMMEngine
    kind, _, arg = fault.partition(':')
    rank = int(os.environ.get('RANK', '0'))

    def wait_to_be_killed():
        open(marker, 'w').close()
        time.sleep(600)
        raise SystemExit('fault_driver: nobody killed me')

    if kind == 'pause_mid_write':
        real_save, calls = torch.save, [0]

        def save(obj, f, *args, **kwargs):
            calls[0] += 1
            if calls[0] != int(arg):
                return real_save(obj, f, *args, **kwargs)
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            f.write(data[:len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            wait_to_be_killed()

        checkpoint.torch.save = save
    elif kind == 'pause_before_rename':
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if os.path.basename(dst) == arg:
                wait_to_be_killed()
            return real_replace(src, dst, *args, **kwargs)

        checkpoint.os.replace = replace
    elif kind == 'nan_at_epoch':
        real_train = PMMEngine.train
        epoch, _, on_rank = arg.partition(':')

        def train(self, *args, **kwargs):
            if self.epoch + 1 == int(epoch) and on_rank in ('', str(rank)):
                net = checkpoint.unwrap(self.model)
                with torch.no_grad():
                    net.global_head.classifier.bias.fill_(float('nan'))
            return real_train(self, *args, **kwargs)

        PMMEngine.train = train
    elif kind in ('sigkill_at', 'hang_at'):
        real_step = PMMEngine.forward_backward
        epoch, step, on_rank = (int(v) for v in arg.split(':'))

        def forward_backward(self, data):
            if (rank, self.epoch + 1, self.batch_idx + 1) == (
                    on_rank, epoch, step):
                with open(marker, 'w') as f:
                    f.write(repr(time.time()))
                if kind == 'hang_at':
                    time.sleep(600)
                os.kill(os.getpid(), signal.SIGKILL)
            return real_step(self, data)

        PMMEngine.forward_backward = forward_backward
    elif kind == 'record':
        from pmm_torchreid.engine.records import RunRecordsMixin
        real_step, real_run = PMMEngine.forward_backward, RunRecordsMixin.run
        steps = []

        def forward_backward(self, data):
            summary = real_step(self, data)
            steps.append([self.epoch, self.batch_idx,
                          sorted(set(data['pid'].tolist())), summary['loss']])
            return summary

        def run(self, *args, **kwargs):
            result = real_run(self, *args, **kwargs)
            digest = hashlib.sha256()
            state = checkpoint.unwrap(self.model).state_dict()
            for key in sorted(state):
                digest.update(key.encode())
                digest.update(state[key].detach().cpu().contiguous()
                              .numpy().tobytes())
            os.makedirs(marker, exist_ok=True)
            with open(os.path.join(marker, 'rank{}.json'.format(rank)),
                      'w') as f:
                json.dump({'steps': steps, 'state_sha256': digest.hexdigest(),
                           'results': self.results}, f)
            return result

        PMMEngine.forward_backward = forward_backward
        RunRecordsMixin.run = run
    else:
        raise SystemExit('fault_driver: unknown fault {!r}'.format(fault))

    from pmm_torchreid.launch import main as run_main
    run_main(argv)


if __name__ == '__main__':
    main()
