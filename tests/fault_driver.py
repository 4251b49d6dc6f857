"""Runs scripts/main.py with one fault injected, for the interruption tests.

    python tests/fault_driver.py FAULT MARKER -- [main.py arguments]

FAULT is one of
- ``pause_mid_write:N``: the N-th checkpoint write stops half way (half the
  bytes written and flushed to disk), touches MARKER and sleeps, waiting to
  be killed;
- ``pause_before_rename:NAME``: the write of checkpoint file NAME is complete
  and fsynced but not yet renamed into place when it touches MARKER and sleeps;
- ``nan_at_epoch:E``: at the start of epoch E (1-based) a classifier bias is
  set to NaN, as a diverging run would have it.
"""
import io
import os
import sys
import time


def main():
    fault, marker = sys.argv[1], sys.argv[2]
    argv = sys.argv[sys.argv.index('--') + 1:]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch
    import pmm_torchreid.checkpoint as checkpoint
    from pmm_torchreid.engine import PMMEngine
    kind, _, arg = fault.partition(':')

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

        def train(self, *args, **kwargs):
            if self.epoch + 1 == int(arg):
                with torch.no_grad():
                    self.model.global_head.classifier.bias.fill_(float('nan'))
            return real_train(self, *args, **kwargs)

        PMMEngine.train = train
    else:
        raise SystemExit('fault_driver: unknown fault {!r}'.format(fault))

    from pmm_torchreid.launch import main as run_main
    run_main(argv)


if __name__ == '__main__':
    main()
