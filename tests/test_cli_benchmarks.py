"""The benchmarks in process: the generated ranking problems
(pmm_torchreid.metrics.problems), the ranking benchmark on its smallest size
and one kill of the checkpoint writer (its child finds the package)."""
import json
import os.path as osp
import runpy
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT

from pmm_torchreid.bench import fast_path
from pmm_torchreid.cli import benchmark_eval, benchmark_fast_path, stress_checkpoints
from pmm_torchreid.metrics.problems import SIZES, _split, make_problem


def test_problems_are_seeded_and_shaped_like_the_test_sets():
    spec = SIZES['small']
    a = make_problem(seed=3, **spec)
    b = make_problem(seed=3, **spec)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    distmat, q_pids, g_pids, q_camids, g_camids = a
    assert distmat.dtype == np.float32
    assert distmat.shape == (spec['num_q'], spec['num_g'])
    assert (g_pids == 0).sum() == spec['num_distractors'] and 0 not in q_pids
    assert set(q_pids) == set(range(1, spec['num_ids'] + 1))
    assert q_camids.max() < spec['num_cams'] and g_camids.max() < spec['num_cams']
    counts = _split(100, 7, 2, np.random.default_rng(0))
    assert counts.sum() == 100 and counts.min() >= 2


def test_ranking_benchmark_smallest_size(capsys):
    assert benchmark_eval.main(['--sizes', 'small-cuhk03', '--repeats', '1',
                                '--threads', '1']) == 0
    assert 'CMC equal bit for bit: True' in capsys.readouterr().out


def test_checkpoint_stress_child_finds_the_package(capsys):
    assert stress_checkpoints.main(['--kills', '1', '--megabytes', '1',
                                    '--delay', '0.1', '0.1']) == 0
    out = capsys.readouterr().out
    assert '1 kills of a writer of 1 MB checkpoints (save_checkpoint)' in out


# --------------------------------------------------------------------------
# scripts/benchmark.py, stress_checkpoints.py and cuhk01_splits.py, run as
# scripts (in this process: runpy, as ``python scripts/NAME`` would)
# --------------------------------------------------------------------------
def _run_script(name, *args, monkeypatch):
    """``python scripts/NAME ARGS`` in this process: its exit status."""
    path = osp.join(ROOT, 'scripts', name)
    monkeypatch.setattr(sys, 'argv', [path] + [str(a) for a in args])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(path, run_name='__main__')
    return info.value.code


def test_the_benchmark_scripts_print_their_help(capsys, monkeypatch):
    options = {'benchmark.py': ['--backbones', '--repeats', '--device',
                                '--modes'],
               'benchmark_fast_path.py': ['--models', '--variants',
                                          '--force-bf16'],
               'benchmark_export.py': ['--weights', '--descriptors',
                                       '--formats', '--threads'],
               'stress_checkpoints.py': ['--kills', '--megabytes',
                                         '--unsafe'],
               'cuhk01_splits.py': ['--root', '--record']}
    for name, wanted in options.items():
        assert _run_script(name, '--help', monkeypatch=monkeypatch) == 0
        out = capsys.readouterr().out
        assert out.startswith('usage: '), (name, out)
        assert all(option in out for option in wanted), (name, out)


def test_benchmark_times_each_mode_against_none(capsys, monkeypatch):
    threads = torch.get_num_threads()
    try:
        # hard_mix alone: 'none', the yardstick, is added in front
        code = _run_script(
            'benchmark.py', '--backbones', 'resnet18', '--batch', '8',
            '--height', '64', '--width', '32', '--block', '1', '1',
            '--top-k', '1', '--repeats', '1', '--warmup', '0',
            '--threads', '1', '--modes', 'hard_mix', monkeypatch=monkeypatch)
    finally:
        torch.set_num_threads(threads)
    assert code is None  # main returns nothing: exit status 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith('torch ') and \
        lines[0].endswith('| 1 threads | device cpu')
    assert 'resnet18 | batch 8 (2 ids x 4) | 64x32 | block 1x1 top-1 | ' \
        '1 repeats, median step' in lines
    rows = [line.split() for line in lines
            if line.startswith('  ') and line.split()[0] in (
                'none', 'hard_mix', 'reference')]
    assert [r[0] for r in rows] == ['none', 'hard_mix']
    step = {r[0]: float(r[1]) for r in rows}  # printed to 1 ms
    speed = {r[0]: float(r[2]) for r in rows}
    assert all(s >= 0.002 for s in step.values())
    assert rows[0][3] == '1.000x'  # none against itself
    # images/s is the batch over the step time, "vs none" the ratio of the
    # step times (within the rounding of the printed numbers)
    low, high = ({m: s - 0.0005 for m, s in step.items()},
                 {m: s + 0.0005 for m, s in step.items()})
    for mode in step:
        assert 8 / high[mode] - 0.05 <= speed[mode] <= 8 / low[mode] + 0.05
    ratio = float(rows[1][3].rstrip('x'))
    assert low['hard_mix'] / high['none'] - 5e-4 <= ratio <= \
        high['hard_mix'] / low['none'] + 5e-4


TINY = fast_path.Preset(batch=8, height=32, width=16, block=(1, 1), top_k=1,
                        threads=1, recipe='tiny')


@pytest.mark.parametrize('name', ['pmm_resnet18', 'osnet_x0_25'])
def test_fast_path_variants_train_in_their_layout_and_precision(name):
    """Each variant's step (the plugin's engine, or torchreid's triplet
    engine for ``osnet_x0_25``) trains its model in its memory layout and
    autocast dtype, from the same initial weights."""
    seen = {}
    for variant, (cl, dtype) in fast_path.VARIANTS.items():
        engine, step = fast_path._engine(name, TINY, cl, dtype, num_classes=4)
        model = engine.model
        convs = [m for m in model.modules()
                 if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1 and
                 m.groups == 1 and m.kernel_size != (1, 1)]
        assert convs and all(
            c.weight.is_contiguous(memory_format=torch.channels_last) is cl
            for c in convs), variant
        before = convs[0].weight.detach().clone()
        seen[variant] = (before, [])
        convs[0].register_forward_hook(
            lambda m, i, o, out=seen[variant][1]: out.append(o.dtype))
        generator = torch.Generator().manual_seed(0)
        step({'img': torch.randn(8, 3, 32, 16, generator=generator),
              'pid': torch.arange(2).repeat_interleave(4)})
        assert set(seen[variant][1]) == {dtype or torch.float32}, variant
        assert not torch.equal(convs[0].weight.detach(), before), variant
    first = seen['fp32'][0]
    assert all(torch.equal(w.contiguous(), first) for w, _ in seen.values())


def test_fast_path_benchmark_skips_emulated_bfloat16(capsys, monkeypatch):
    monkeypatch.setattr(fast_path, 'native_cpu_bf16', lambda: False)
    monkeypatch.setitem(fast_path.PRESETS, 'pmm_resnet18', TINY)
    threads = torch.get_num_threads()
    try:
        assert benchmark_fast_path.main([
            '--models', 'pmm_resnet18', '--repeats', '1', '--warmup', '0',
            '--variants', 'fp32', 'cl', 'cl+bf16']) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert 'native bfloat16 (AVX512-BF16 or AMX): no' in out
    assert 'skipped cl+bf16: this CPU has no native bfloat16' in out
    rows = [line.split() for line in out.splitlines()
            if line.startswith('  ') and line.split()[0] in
            fast_path.VARIANTS]
    assert [r[0] for r in rows] == ['fp32', 'cl']
    assert rows[0][3] == '1.00x'
    step = float(rows[1][1])
    assert float(rows[1][2]) == pytest.approx(1 / step, rel=0.05, abs=0.02)


def test_cuhk01_splits_writes_the_recorded_partitions(tmp_path, capsys,
                                                      monkeypatch):
    # CUHK01's layout: 971 identities x 4 images (views 1-2 are camera A,
    # 3-4 camera B); the files are only listed, never read
    campus = tmp_path / 'cuhk01' / 'campus'
    campus.mkdir(parents=True)
    for pid in range(1, 972):
        for view in range(1, 5):
            (campus / '{:04d}{:03d}.png'.format(pid, view)).touch()
    assert _run_script('cuhk01_splits.py', '--root', tmp_path,
                       monkeypatch=monkeypatch) == 0
    target = tmp_path / 'cuhk01' / 'splits.json'
    record_path = osp.join(ROOT, 'docs', 'cuhk01_splits.json')
    assert capsys.readouterr().out.strip() == \
        'CUHK01 splits from "{}" in "{}"'.format(record_path, target)
    with open(record_path) as f:
        record = json.load(f)['splits']
    with open(target) as f:
        splits = json.load(f)
    assert len(splits) == 2 * len(record) == 6
    for i, split in enumerate(splits):
        want = record[str(i - i % 2)]
        ids = {int(osp.basename(item[0])[:4]) for item in split['train']}
        assert ids == set(want['train_identities'])
        assert sorted({item[1] for item in split['train']}) == \
            list(range(len(ids)))
        assert len(split['train']) == want['num_train_images']
        assert len(split['query']) == want['num_query']
        assert len(split['gallery']) == want['num_gallery']
        # even splits: camera A queries; odd ones swap the cameras
        query_cam = want['query_camera'][0] if i % 2 == 0 else \
            1 - want['query_camera'][0]
        assert {item[2] for item in split['query']} == {query_cam}
        assert {item[2] for item in split['gallery']} == {1 - query_cam}
        assert not ids & {int(osp.basename(item[0])[:4])
                          for item in split['query']}
    # a second run finds the same splits and leaves the file alone
    before = target.stat().st_mtime_ns
    assert _run_script('cuhk01_splits.py', '--root', tmp_path,
                       monkeypatch=monkeypatch) == 0
    assert target.stat().st_mtime_ns == before


def test_a_forced_precision_is_the_one_the_step_uses():
    """throughput(dtype=...) (--precision bf16 / fp16): the engine's step
    runs under that autocast dtype, float16 with a gradient scaler."""
    import torch

    from pmm_torchreid.bench import training
    seen = []
    real = training.PMMEngine.forward_backward

    def spy(self, data):  # the step's settings only: a float16 step on a
        seen.append((self.amp_dtype, self.scaler is not None))  # CPU is slow
        return {}
    training.PMMEngine.forward_backward = spy
    try:
        for dtype in (torch.float16, torch.bfloat16, None):
            train, extract = training.throughput(
                'pmm_resnet18', 'hard_mix', dtype is not None, 'cpu', batch=8,
                height=96, width=64, repeats=1, warmup=0, dtype=dtype)
            assert train > 0 and extract > 0
    finally:
        training.PMMEngine.forward_backward = real
    assert seen == [(torch.float16, True), (torch.bfloat16, False), (None, False)]


def test_the_device_table_has_a_row_per_model_and_precision(monkeypatch, capsys):
    """bench_device's table (what --device cuda prints), its arithmetic
    checked on made-up throughputs: fp16 twice as fast as fp32, guided
    steps 0.8 of unguided."""
    import torch

    from pmm_torchreid.bench import training
    calls = []

    def fake(name, mix, amp, device, *args, dtype=None, **kwargs):
        calls.append((name, mix, amp, dtype))
        speed = 100.0 * (2 if dtype is torch.float16 else 1) * \
            (0.8 if mix == 'hard_mix' else 1)
        return speed, 3 * speed
    monkeypatch.setattr(training, 'throughput', fake)
    results = training.bench_device('cpu', repeats=1, warmup=0,
                                    precisions=('fp32', 'fp16'))
    assert calls == [(m, mix, p == 'fp16', torch.float16 if p == 'fp16' else None)
                     for m, mix in [('pmm_resnet50', 'hard_mix'), ('pmm_resnet50', 'none'),
                                    ('bdb_resnet50', 'none')] for p in ('fp32', 'fp16')]
    assert results[('pmm_resnet50', 'hard_mix', 'fp16')][:2] == (160.0, 480.0)
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()
            if line.split()[:1] in (['pmm_resnet50'], ['bdb_resnet50'])]
    assert [(r[2], r[4]) for r in rows] == [('fp32', '1.00x'), ('fp16', '2.00x')] * 3
    assert 'peak GiB' in out
    assert 'guided / unguided training throughput, fp32: 0.800' in out
    assert 'guided / unguided training throughput, fp16: 0.800' in out
