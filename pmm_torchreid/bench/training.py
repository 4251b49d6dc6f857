"""Cost of PMM's Grad-CAM guidance in training (scripts/benchmark.py).

:func:`bench_backbone`: the training step with ``pmm.mix hard_mix`` versus
``none`` (same model, same batch), plus the reference code's way of taking the
Grad-CAM (:class:`ReferenceHardMix`: a full ``backward(retain_graph=True)``
through the whole network, then zeroing the parameter gradients), on the CPU.
It runs the real ``PMMEngine.forward_backward`` on random images; the modes
are interleaved so that drifts of the machine hit them alike, and the median
step time is reported.

:func:`bench_device`: training throughput on a GPU: images/s of
``pmm_resnet50`` (``hard_mix`` and ``none``) and ``bdb_resnet50`` at 384x128,
batch 64 (16 x 4), in float32 and with ``train.amp`` (bfloat16 autocast, or
float16 with a gradient scaler), channels-last, plus the images/s of feature
extraction for evaluation (:func:`throughput`).
"""
import statistics
import time
import types

import torch

from pmm_torchreid.engine.pmm import PMMEngine
from pmm_torchreid.models.factory import MODEL_FACTORY
from pmm_torchreid.models.guidance import (
    MIX_MODES,
    HardMix,
    Mixed,
    block_mask,
    build_mixer,
    hard_mix,
    sample_negatives,
)

__all__ = ['ReferenceHardMix', 'bench_backbone', 'throughput', 'bench_device',
           'PRECISIONS']


class ReferenceHardMix(HardMix):
    """A-Hard-Mix with the Grad-CAM taken the reference code's way."""

    name = 'reference'

    def __init__(self, model, **kwargs):
        super().__init__(**kwargs)
        self.model = model

    def __call__(self, part_map, cam_map, cam_logits, labels):
        grads = []
        handle = cam_map.register_hook(lambda g: grads.append(g))
        score = cam_logits.gather(1, labels.view(-1, 1)).sum()
        score.backward(retain_graph=True)  # through the whole network
        handle.remove()
        self.model.zero_grad(set_to_none=True)
        with torch.no_grad():
            weights = grads[0].mean(dim=(2, 3), keepdim=True)
            cam = torch.relu((weights * cam_map).sum(dim=1))
        mask = block_mask(cam, self.block, self.k).to(part_map.dtype)
        negatives = sample_negatives(labels, self.generator)
        return Mixed(hard_mix(part_map, mask, negatives), mask, negatives,
                     part_map.new_zeros(part_map.shape[0]))


def bench_backbone(backbone, batch, height, width, block, top_k, repeats,
                   warmup, modes):
    torch.manual_seed(0)
    ids, per_id = batch // 4, 4
    model = MODEL_FACTORY['pmm_' + backbone](
        num_classes=max(ids, 2) * 10, pretrained=False
    )
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    fake_dm = types.SimpleNamespace(train_loader=None, test_loader={})
    engine = PMMEngine(fake_dm, model, optimizer, use_gpu=False, mix='none',
                       block_size=block, top_k=top_k)
    gen = torch.Generator().manual_seed(1)
    mixers = {mode: build_mixer(mode, block, top_k, gen)
              for mode in MIX_MODES}
    mixers['reference'] = ReferenceHardMix(model, block=block, k=top_k,
                                           generator=gen)
    data = {
        'img': torch.randn(batch, 3, height, width),
        'pid': torch.arange(ids).repeat_interleave(per_id),
    }
    times = {m: [] for m in modes}
    for i in range(warmup + repeats):
        for mode in modes:
            engine.mixer = mixers[mode]
            start = time.perf_counter()
            engine.forward_backward(data)
            if i >= warmup:
                times[mode].append(time.perf_counter() - start)
    med = {m: statistics.median(t) for m, t in times.items()}
    print('\n{} | batch {} ({} ids x {}) | {}x{} | block {}x{} top-{} | '
          '{} repeats, median step'.format(
              backbone, batch, ids, per_id, height, width, block[0], block[1],
              top_k, repeats))
    print('  {:<10} {:>10} {:>10} {:>14}'.format(
        'mix', 'step (s)', 'images/s', 'vs none'))
    for m in modes:
        print('  {:<10} {:>10.3f} {:>10.1f} {:>13.3f}x'.format(
            m, med[m], batch / med[m], med[m] / med['none']))
    return med


#: ``--precision`` of the GPU table -> (train.amp, forced autocast dtype)
PRECISIONS = {'fp32': (False, None), 'amp': (True, None),
              'bf16': (True, torch.bfloat16), 'fp16': (True, torch.float16)}


def throughput(name, mix, amp, device, batch=64, height=384, width=128,
               block=(3, 2), top_k=3, repeats=20, warmup=5, dtype=None):
    """Training images/s of ``name`` with ``mix`` and ``amp`` on ``device``
    (the real engine step; channels-last for ResNets on CUDA), and the
    images/s of feature extraction (eval mode, no gradients).  ``dtype``
    forces the autocast dtype of ``amp`` (float16 comes with a gradient
    scaler) instead of what the GPU is given by default."""
    torch.manual_seed(0)
    cuda = device == 'cuda'
    ids = batch // 4
    model = MODEL_FACTORY[name](num_classes=751, pretrained=False).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    fake_dm = types.SimpleNamespace(train_loader=None, test_loader={})
    engine = PMMEngine(fake_dm, model, optimizer, use_gpu=cuda, mix=mix,
                       block_size=block, top_k=top_k, amp=amp,
                       channels_last=cuda and 'resnet' in name)
    if amp and dtype is not None:
        engine.amp_dtype = dtype
        engine.scaler = torch.amp.GradScaler(engine.device_type) \
            if dtype is torch.float16 else None
    images = torch.randn(batch, 3, height, width)
    data = {'img': images.pin_memory() if cuda else images,
            'pid': torch.arange(ids).repeat_interleave(batch // ids)}

    def timed(step, n):
        for _ in range(warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            step()
        if cuda:
            torch.cuda.synchronize()
        return n * batch / (time.perf_counter() - start)

    model.train()
    train = timed(lambda: engine.forward_backward(data), repeats)
    model.eval()
    gpu_images = images.to(device)
    if engine.channels_last:
        gpu_images = gpu_images.contiguous(memory_format=torch.channels_last)

    def extract():
        with torch.no_grad(), torch.autocast(
                engine.device_type, dtype=engine.amp_dtype,
                enabled=engine.amp_dtype is not None):
            model(gpu_images)

    return train, timed(extract, repeats)


def bench_device(device, repeats, warmup, batch=64, height=384, width=128,
                 precisions=('fp32', 'amp')):
    """The GPU table: training and extraction images/s and the peak memory
    of training, per precision (:data:`PRECISIONS`: ``amp`` is what
    ``train.amp`` picks on this GPU; ``bf16``/``fp16`` force one)."""
    rows = [('pmm_resnet50', 'hard_mix'), ('pmm_resnet50', 'none'),
            ('bdb_resnet50', 'none')]
    cuda = device == 'cuda'
    name = torch.cuda.get_device_name() if cuda else 'cpu'
    print('torch {} | device {} | batch {} ({} ids x 4) | {}x{}'.format(
        torch.__version__, name, batch, batch // 4, height, width))
    print('  {:<14} {:<9} {:<5} {:>12} {:>8} {:>13} {:>10}'.format(
        'model', 'mix', 'prec', 'train img/s', 'vs fp32', 'extract img/s',
        'peak GiB'))
    results = {}
    for model_name, mix in rows:
        for prec in precisions:
            amp, dtype = PRECISIONS[prec]
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            train, extract = throughput(model_name, mix, amp, device, batch,
                                        height, width, repeats=repeats,
                                        warmup=warmup, dtype=dtype)
            peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda \
                else float('nan')
            results[(model_name, mix, prec)] = (train, extract, peak)
            base = results.get((model_name, mix, precisions[0]))[0]
            print('  {:<14} {:<9} {:<5} {:>12.1f} {:>7.2f}x {:>13.1f} {:>10.2f}'
                  .format(model_name, mix, prec, train, train / base, extract,
                          peak))
    for prec in precisions:
        guided = results[('pmm_resnet50', 'hard_mix', prec)][0]
        plain = results[('pmm_resnet50', 'none', prec)][0]
        print('  guided / unguided training throughput, {}: {:.3f}'.format(
            prec, guided / plain))
    return results
