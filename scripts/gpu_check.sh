#!/usr/bin/env bash
# GPU check of pmm_torchreid on one GPU (H100: ~5-6 min typical), adapted from /work/shared/tools/gpu_check.sh to
# the package's current layout (bench.training.throughput, metrics.problems, utils.distributed); checks and tolerances
# unchanged. It checks: (a) training steps/s, extraction img/s and peak memory at fp32 / bf16 / fp16 + GradScaler,
# (b) the guided (hard_mix) / unguided (none) step-time ratio, (c) one fixed batch's loss, masks and gradients in
# fp32 CPU / TF32 / bf16 / fp16 against strict fp32 on the GPU, (d) the GPU ranking path against the CPU one
# (Market-1501 size; ties, NaN/inf, chunks, dtypes), (e) a one-rank NCCL DDP + SyncBN step, then an end-to-end epoch of
# scripts/main.py and its resume, torchrun with 2 ranks (only with >= 2 GPUs) and scripts/benchmark.py --device cuda.
# Run from the repo root: WHEELS=gpu_wheels bash scripts/gpu_check.sh   (logs in $OUT, default ./gpu_check_out;
# SKIP_CLI=1 skips the benchmark.py table)
# gpu_wheels/ (carried): torchreid-0.2.5, yacs-0.1.8 + what torchreid imports and the machine lacks (scipy, cv2...)
set -u; OUT=${OUT:-$PWD/gpu_check_out}; W=${WHEELS:-gpu_wheels}; mkdir -p "$OUT"; export PYTHONPATH=$PWD
imports() { python -c "import torchvision, yaml, yacs, torchreid, pmm_torchreid" 2>"$OUT/import.err"; }
imports || { pip install -q --no-index --no-deps "$W"/*.whl; imports; } || { tail -n 3 "$OUT/import.err"; exit 1; }
python -c "import torch as t; p = t.cuda.get_device_properties(0); print(t.__version__, t.version.cuda, p.name,
p.total_memory >> 30, 'GiB, sm%d%d,' % (p.major, p.minor), t.cuda.device_count(), 'GPU(s), is_bf16_supported:',
t.cuda.is_bf16_supported(), '(sm80+ has it natively; older GPUs only emulate it)')" || exit 1
run() { local name=$1 limit=$2 t0=$SECONDS; shift 2; echo "=== $name (limit ${limit}s)"; timeout "$limit" \
  "$@" >"$OUT/$name.log" 2>&1; local rc=$?; tail -n "${TAIL:-12}" "$OUT/$name.log"; echo "=== rc=$rc $((SECONDS-t0))s"; }
cat >"$OUT/check.py" <<'EOF'
import copy, gc, os, sys, time, traceback, types, warnings; import numpy as np, torch  # noqa: E702
sys.path[:0] = [os.getcwd()]
from pmm_torchreid.bench import training as B  # what scripts/benchmark.py runs
from pmm_torchreid.metrics import problems as BE  # the problems of scripts/benchmark_eval.py
from pmm_torchreid import config as C, engine as E
from pmm_torchreid.utils import distributed as D
from pmm_torchreid.models import MODEL_FACTORY
from pmm_torchreid.metrics import evaluate_rank_details as erd
torch.backends.cudnn.benchmark = True  # as launch.py and benchmark.py set it
DEV, S, BAD = 'cuda', dict(n=32, h=384, w=128, problem='market'), []
FAKE, GROUPS = types.SimpleNamespace(train_loader=None, test_loader={}), ('backbone', 'part_trunk', 'global_head',
                                                                         'part_heads')
PREC = {'fp32': (None, False), 'bf16': (torch.bfloat16, False), 'fp16': (torch.float16, True)}
def check(ok, text):
    print(('PASS ' if ok else 'FAIL ') + text, flush=True); BAD.extend([] if ok else [text])
def c():  # (c) one fixed batch, cross-entropy only (batch-hard triplet picks pairs by argmax, which rounding flips)
    torch.manual_seed(0); base, g = MODEL_FACTORY['pmm'](num_classes=751, pretrained=False).train(), torch.Generator()
    batch = {'img': torch.randn(S['n'], 3, S['h'], S['w'], generator=g.manual_seed(0)),
             'pid': torch.arange(S['n'] // 4).repeat_interleave(4)}
    def step(prec, mix, dev=DEV, tf32=False):
        torch.backends.cudnn.allow_tf32 = tf32  # matmul TF32 stays off (torch's default)
        m, seen = copy.deepcopy(base).to(dev), []
        eng = E.PMMEngine(FAKE, m, torch.optim.SGD(m.parameters(), lr=0.0), use_gpu=dev == 'cuda', mix=mix, seed=1,
                          channels_last=dev == 'cuda', weight_triplet=0.0)
        eng.amp_dtype, scaled = PREC[prec]  # set directly: the engine would pick bf16 on an H100
        eng.scaler = torch.amp.GradScaler(dev, init_scale=256.0) if scaled else None
        if eng.mixer is not None:  # keep the masks the rule builds
            rule = eng.mixer; eng.mixer = lambda *a: seen.append(rule(*a)) or seen[-1]
        loss = eng.forward_backward(batch)['loss']
        grad = {k: torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).double().flatten().cpu()
                              for n, p in m.named_parameters() if n.startswith(k)]) for k in GROUPS}
        return loss, grad, [x.mask.float().cpu() for x in seen]
    ref = {mix: step('fp32', mix) for mix in ('none', 'hard_mix')}  # strict fp32 on the GPU
    for prec, dev, tf32, ltol, cmin in (('fp32', 'cpu', False, 1e-4, 0.9999), ('fp32', DEV, True, 5e-3, 0.999),
                                        ('bf16', DEV, False, 2e-2, 0.98), ('fp16', DEV, False, 5e-3, 0.995)):
        for mix in ('none', 'hard_mix'):
            loss, grad, masks = step(prec, mix, dev, tf32)
            rel = abs(loss - ref[mix][0]) / abs(ref[mix][0])
            cos = {k: float(torch.nn.functional.cosine_similarity(grad[k], ref[mix][1][k], dim=0)) for k in GROUPS}
            same = min([float((a == b).float().mean()) for a, b in zip(masks, ref[mix][2])] or [1.0])
            check(rel < ltol and min(cos['global_head'], cos['part_heads']) > cmin and same >= 0.97,
                  '(c) {} {} TF32={} {}: loss {:.4f} (rel {:.1e}), mask cells equal {:.4f}, grad cosine {}'.format(
                      prec, dev, tf32, mix, loss, rel, same, ' '.join('%s %.4f' % kv for kv in cos.items())))
    torch.backends.cudnn.allow_tf32 = True
def a_b():  # (a) steps/s and peak memory: fp32 / bf16 / fp16 + GradScaler; (b) guided vs unguided
    sps = {}
    for prec in PREC:  # an H100 always gets bf16 from train.amp: dtype= forces fp16 (+ a GradScaler) here
        for mix in ('hard_mix', 'none'):
            gc.collect(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
            tr, ex = B.throughput('pmm_resnet50', mix, prec != 'fp32', DEV, repeats=15, warmup=5, dtype=PREC[prec][0])
            sps[prec, mix] = tr / 64
            print('(a) pmm 384x128 b64 {} {:8}: {:5.2f} steps/s ({:6.1f} img/s), extract {:6.1f} img/s, peak {:5.2f} GiB'
                  .format(prec, mix, tr / 64, tr, ex, torch.cuda.max_memory_allocated() / 2**30), flush=True)
    for prec in PREC:
        print('(b) {}: step time hard_mix / none = {:.3f}'.format(prec, sps[prec, 'none'] / sps[prec, 'hard_mix']))
def d():  # (d) the GPU ranking path against the CPU one, Market-1501 size (3,368 x 15,913)
    dm, *rest = BE.make_problem(seed=0, **BE.SIZES[S['problem']])
    noisy, r = dm.copy(), np.random.default_rng(0).random(dm.shape)
    noisy[r < 0.01], noisy[r > 0.995] = np.nan, np.inf
    t = lambda a: torch.from_numpy(a).to(DEV)
    for name, cpu, gpu, kw in [('float32', dm, t(dm), {}), ('4 MiB chunks', dm, t(dm), {'memory_budget': 2**22}),
                               ('integer-valued (ties)', np.round(dm), t(np.round(dm)), {}),
                               ('NaN/inf', noisy, t(noisy), {}),
                               ('float64', dm.astype(np.float64), t(dm.astype(np.float64)), {}),
                               ('float16', dm.astype(np.float16), t(dm).half(), {}),
                               ('bfloat16', torch.from_numpy(dm).bfloat16(), t(dm).bfloat16(), {})]:
        t0 = time.time(); a = erd(cpu, *rest); t1 = time.time(); b = erd(gpu, *rest, **kw); t2 = time.time()
        check(np.array_equal(a.cmc, b.cmc) and a.mAP == b.mAP and a.num_exact_sorts == b.num_exact_sorts,
              '(d) {}: mAP {:.4f}, R1 {:.4f}, exactly sorted rows {}/{}, CPU {:.2f} s, GPU {:.2f} s'.format(
                  name, b.mAP, b.cmc[0], a.num_exact_sorts, b.num_exact_sorts, t1 - t0, t2 - t1))
def e():  # (e) DDP on one GPU (NCCL, world 1) built as launch.py builds it; 2 ranks need 2 GPUs
    os.environ.setdefault('MASTER_ADDR', '127.0.0.1'); os.environ.setdefault('MASTER_PORT', '29531')
    cfg = C.get_default_config(); cfg.train.sync_bn = True
    D.init(cfg, D.LaunchInfo(1, 0, 0)); torch.manual_seed(0)
    net = MODEL_FACTORY['pmm'](num_classes=751, pretrained=False).cuda().to(memory_format=torch.channels_last)
    model = D.wrap_model(net, cfg)  # SyncBN, then DDP
    eng = E.PMMEngine(FAKE, model, torch.optim.Adam(model.parameters(), lr=1e-4), amp=True, channels_last=True)
    batch = {'img': torch.randn(64, 3, 384, 128).pin_memory(), 'pid': torch.arange(16).repeat_interleave(4)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always'); losses = [eng.forward_backward(batch)['loss'] for _ in range(3)]
    odd = [str(w.message)[:90] for w in caught if 'stride' in str(w.message) or 'bucket' in str(w.message)]
    check(bool(np.isfinite(losses).all()), '(e) DDP/NCCL world 1 + SyncBN + channels-last + {} + hard_mix: losses '
          '{}; stride warnings (1x1 convs: spurious, perf only) {}'.format(eng.amp_dtype, ['%.3f' % x for x in losses], odd))
    D.finish()
    if torch.cuda.device_count() > 1:  # nn.DataParallel's threads: is the bf16 autocast dtype kept?
        seen, dp = [], torch.nn.DataParallel(torch.nn.Linear(8, 8).cuda())
        dp.module.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        with torch.autocast('cuda', dtype=torch.bfloat16): dp(torch.randn(8, 8, device='cuda'))  # noqa: E701
        check(set(seen) == {torch.bfloat16}, '(e) nn.DataParallel replicas under bf16 autocast: {}'.format(seen))
if __name__ == '__main__':
    for fn in (c, a_b, d, e):
        t0 = time.time()
        try: fn()  # noqa: E701
        except Exception: traceback.print_exc(); BAD.append('section {} raised'.format(fn.__name__))  # noqa: E701
        print('--- section {}: {:.0f} s'.format(fn.__name__, time.time() - t0), flush=True)
    print('SUMMARY: {} failure(s)'.format(len(BAD))); sys.exit(1 if BAD else 0)
EOF
TAIL=45 run checks 270 python "$OUT/check.py"
E2E=(--config-file configs/pmm_demo.yaml --root "$OUT/reid-data" -m pmm data.height 384 data.width 128 pmm.block_size
     '[3, 2]' pmm.top_k 3 train.batch_size 64 train.amp True test.eval_freq 1 data.save_dir "$OUT/e2e")
run e2e 100 python scripts/main.py "${E2E[@]}" train.max_epoch 1  # launch.py: DataParallel(1 GPU), synthetic data
run e2e_resume 80 python scripts/main.py "${E2E[@]}" train.max_epoch 2 model.resume "$OUT/e2e/model/model.pth.tar-1"
if [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  run ddp2 150 torchrun --standalone --nproc_per_node=2 scripts/main.py --config-file configs/pmm_demo.yaml \
    --root "$OUT/reid-data" data.save_dir "$OUT/ddp2" train.max_epoch 1 train.amp True train.sync_bn True
else echo "SKIP (needs >= 2 GPUs): torchrun 2-process DDP/NCCL, SyncBatchNorm sync, DataParallel autocast dtype"; fi
[ -n "${SKIP_CLI:-}" ] || TAIL=8 run benchmark_cli 90 python scripts/benchmark.py --device cuda --precision fp32 amp
grep -h "^FAIL\|Traceback\|bucket view" "$OUT"/*.log; echo "logs: $OUT"
