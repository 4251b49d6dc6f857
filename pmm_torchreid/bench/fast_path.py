"""The CPU fast path measured (scripts/benchmark_fast_path.py): the whole
training step of a model, float32 in the NCHW layout against the
channels-last layout (``train.channels_last``) and channels-last with
bfloat16 autocast (``train.amp``), each at its recipe's size and threads.

Each variant trains its own copy of the same initial weights on the same
random batch; the variants take turns step by step, so that drifts of the
machine (other jobs, frequency) hit them alike, and the median step time is
reported.  The PMM and BDB rows run :meth:`PMMEngine.forward_backward`, the
``osnet_x0_25`` row torchreid's ``ImageTripletEngine`` step (the study's
baseline), under the same autocast the launcher gives it.

bfloat16 is measured only where the CPU computes it natively
(:func:`pmm_torchreid.engine.pmm.native_cpu_bf16`); elsewhere torch emulates
it about nine times slower than float32 and the variant is skipped with a
line that says so (``force_bf16`` measures it anyway).
"""
from __future__ import annotations

import contextlib
import statistics
import time
import types
from typing import Dict, Optional, Sequence

import torch
import torchreid
from torch.profiler import ProfilerActivity, profile

from pmm_torchreid.engine.pmm import PMMEngine, native_cpu_bf16
from pmm_torchreid.models.factory import MODEL_FACTORY

__all__ = ['PRESETS', 'VARIANTS', 'Preset', 'bench_fast_path', 'step_times',
           'profile_step', 'print_profile']


class Preset(types.SimpleNamespace):
    """A model's benchmark recipe: ``batch`` images (4 per identity) of
    ``height`` x ``width``, PMM's ``block`` and ``top_k``, torch ``threads``,
    and the config it stands for."""


#: the CPU study's size (configs/ablation_cuhk01.yaml: 4 of 32 blocks)
_STUDY = dict(batch=32, height=128, width=64, block=(1, 1), top_k=4,
              threads=1)

#: the recipes the targets are stated for (the config each row stands for)
PRESETS = {
    'pmm_osnet_x0_25': Preset(recipe='configs/ablation_cuhk01.yaml, 1 thread',
                              **_STUDY),
    'bdb_osnet_x0_25': Preset(recipe='configs/ablation_cuhk01.yaml, 1 thread',
                              **_STUDY),
    'osnet_x0_25': Preset(recipe='the study baseline (torchreid triplet '
                          'engine), 1 thread', **_STUDY),
    'pmm_resnet18': Preset(batch=32, height=128, width=64, block=(2, 1),
                           top_k=4, threads=2,
                           recipe='configs/pmm_demo.yaml, 2 threads'),
    'pmm_resnet50': Preset(batch=16, height=384, width=128, block=(3, 2),
                           top_k=3, threads=2,
                           recipe='the paper size 384x128, batch 16, '
                           '2 threads'),
}

#: variant -> (channels-last, autocast dtype)
VARIANTS = {'fp32': (False, None), 'cl': (True, None),
            'bf16': (False, torch.bfloat16),
            'cl+bf16': (True, torch.bfloat16)}


def _engine(name: str, preset: Preset, channels_last: bool, dtype,
            num_classes: int):
    """``(engine, step)`` of one variant: ``step(data)`` runs one training
    step of ``engine``."""
    torch.manual_seed(0)
    fake = types.SimpleNamespace(train_loader=None, test_loader={},
                                 num_train_pids=num_classes)
    if name in MODEL_FACTORY:
        model = MODEL_FACTORY[name](num_classes=num_classes, pretrained=False)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        mix = 'hard_mix' if name.startswith('pmm') else 'none'
        engine = PMMEngine(fake, model, optimizer, use_gpu=False, mix=mix,
                           block_size=preset.block, top_k=preset.top_k,
                           channels_last=channels_last)
        engine.amp_dtype = dtype  # what train.amp gives on a native CPU
        model.train()
        return engine, engine.forward_backward
    model = torchreid.models.build_model(name, num_classes=num_classes,
                                         loss='triplet', pretrained=False)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    engine = torchreid.engine.ImageTripletEngine(
        fake, model, optimizer=optimizer, margin=0.3, weight_t=1.0,
        weight_x=1.0, use_gpu=False, label_smooth=True)
    model.train()

    def step(data):
        context = torch.autocast('cpu', dtype=dtype) if dtype is not None \
            else contextlib.nullcontext()
        with context:
            return engine.forward_backward(data)
    return engine, step


def step_times(name: str, preset: Preset, variants: Sequence[str],
               repeats: int, warmup: int, num_classes: int = 400
               ) -> Dict[str, float]:
    """Median seconds per training step of ``name`` per variant, the
    variants interleaved step by step on one batch."""
    steps = {v: _engine(name, preset, *VARIANTS[v], num_classes=num_classes)[1]
             for v in variants}
    generator = torch.Generator().manual_seed(1)
    ids = preset.batch // 4
    data = {'img': torch.randn(preset.batch, 3, preset.height, preset.width,
                               generator=generator),
            'pid': torch.arange(ids).repeat_interleave(4)}
    times = {v: [] for v in variants}
    for i in range(warmup + repeats):
        for v in variants:
            start = time.perf_counter()
            steps[v](data)
            if i >= warmup:
                times[v].append(time.perf_counter() - start)
    return {v: statistics.median(t) for v, t in times.items()}


def bench_fast_path(models: Sequence[str], variants: Sequence[str],
                    repeats: int, warmup: int, force_bf16: bool = False,
                    threads: Optional[int] = None) -> Dict:
    """Prints one table per model (seconds per step, steps/s, speed-up
    against the first variant) and returns ``{model: {variant: s}}``."""
    native = native_cpu_bf16()
    print('torch {} | CPU: {} | native bfloat16 (AVX512-BF16 or AMX): {}'
          .format(torch.__version__, torch.backends.cpu.get_cpu_capability(),
                  'yes' if native else 'no'))
    measured = list(variants)
    if not native and not force_bf16:
        skipped = [v for v in variants if VARIANTS[v][1] is not None]
        measured = [v for v in variants if v not in skipped]
        if skipped:
            print('  skipped {}: this CPU has no native bfloat16 (emulated '
                  'bfloat16 runs about 9x slower than float32; '
                  '--force-bf16 measures it anyway)'.format(
                      ', '.join(skipped)))
    results = {}
    for name in models:
        preset = PRESETS[name]
        torch.set_num_threads(threads or preset.threads)
        med = step_times(name, preset, measured, repeats, warmup)
        print('\n{} | batch {} | {}x{} | {} thread(s) | {} | {} repeats, '
              'median step'.format(name, preset.batch, preset.height,
                                   preset.width, torch.get_num_threads(),
                                   preset.recipe, repeats))
        print('  {:<9} {:>10} {:>9} {:>9}'.format('variant', 'step (s)',
                                                 'steps/s', 'speed-up'))
        for v in measured:
            print('  {:<9} {:>10.3f} {:>9.2f} {:>8.2f}x'.format(
                v, med[v], 1 / med[v], med[measured[0]] / med[v]))
        results[name] = med
    return results


#: the parts of a step :func:`profile_step` reports, by the op names the
#: profiler gives (self times); the optimizer by its record-function range
PARTS = (('convolutions', ('conv',)), ('batch norm', ('batch_norm',)),
         ('matmuls (heads, losses, Grad-CAM)', ('aten::mm', 'aten::addmm',
                                                'aten::bmm')))


def profile_step(name: str, preset: Preset, variant: str, steps: int = 3,
                 warmup: int = 2) -> Dict[str, float]:
    """Where ``steps`` training steps of ``name`` in ``variant`` spend their
    CPU time (torch.profiler, self times): milliseconds per step for each of
    :data:`PARTS`, the optimizer step, everything else, and the total."""
    _, step = _engine(name, preset, *VARIANTS[variant], num_classes=400)
    ids = preset.batch // 4
    data = {'img': torch.randn(preset.batch, 3, preset.height, preset.width,
                               generator=torch.Generator().manual_seed(1)),
            'pid': torch.arange(ids).repeat_interleave(4)}
    for _ in range(warmup):
        step(data)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(data)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    parts = {}
    for part, keys in PARTS:
        parts[part] = sum(e.self_cpu_time_total for e in events
                          if any(k in e.key for k in keys)
                          and not e.key.startswith('Optimizer'))
    optimizer = sum(e.cpu_time_total for e in events
                    if e.key.startswith('Optimizer.step'))
    parts['optimizer step'] = optimizer
    parts['everything else'] = total - sum(parts.values())
    parts['total'] = total
    return {k: v / 1000.0 / steps for k, v in parts.items()}


def print_profile(name: str, preset: Preset, variant: str,
                  steps: int = 3) -> Dict[str, float]:
    """Prints :func:`profile_step` as a table (ms per step and share)."""
    torch.set_num_threads(preset.threads)
    parts = profile_step(name, preset, variant, steps)
    print('\n{} | {} | {} thread(s) | torch.profiler, self CPU time per step'
          .format(name, variant, torch.get_num_threads()))
    for part, ms in parts.items():
        print('  {:<36} {:>9.1f} ms {:>6.1f} %'.format(
            part, ms, 100.0 * ms / parts['total']))
    return parts
