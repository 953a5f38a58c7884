"""Benchmark Muon for the PRX `small` model (16 blocks, hidden 1792, MLP 6272).

Prints three tables:
  1. Newton–Schulz time per block-matrix shape (and, with --svd, the exact SVD polar factor for comparison);
  2. one optimizer step over one block's parameters: MuonAdam vs AdamW (measured), and x16 for the whole model (extrapolated);
  3. the distributed split for 8 and 32 ranks: matrices and Newton–Schulz FLOPs per rank (round-robin and balanced), the
     busiest rank's estimated time (sum of the measured single-matrix times of what it owns) and approximate traffic.

    python bench/bench_muon.py                         # CPU, fp32, full size (minutes on 2 cores)
    python bench/bench_muon.py --hidden 448 --mlp 1568  # a quick CPU run at 1/4 width
    python bench/bench_muon.py --device cuda            # GPU, bf16 Newton–Schulz as in the recipe

With --train-steps N a fourth table times whole training steps of the `cpu` preset (tiny model, 64 px, batch 32) with the
PRX AdamW baseline and with Muon + Adam: CPU seconds (time.process_time) per step and in clipping + optimizer, the two
optimizers taking turns on one model and data stream. The reported numbers use
    OMP_NUM_THREADS=1 python bench/bench_muon.py --only-train --train-steps 8
"""
import argparse, platform, statistics, tempfile, time

import torch
from torch import nn

from pixeldiff_nb.muon import MuonAdam, assign_owners, newton_schulz, ns_flops


def block_shapes(h, mlp):
    "(out, in) of every nn.Linear weight in one PRX block (recipe §1.2-1.3), in block order."
    return {'img_qkv': (3 * h, h), 'attn_out': (h, h), 'txt_kv': (2 * h, h), 'mlp_gate': (mlp, h), 'mlp_up': (mlp, h),
            'mlp_down': (h, mlp), 'modulation': (6 * h, h)}


def block_vectors(h, heads=28):
    "The block's Adam parameters: QK-norm and text-K-norm scales (head dim), the modulation bias."
    hd = h // heads
    return {'q_norm': (hd,), 'k_norm': (hd,), 'txt_k_norm': (hd,), 'modulation.bias': (6 * h,)}


def sync(dev):
    if dev.type == 'cuda': torch.cuda.synchronize()


def timeit(fn, dev, repeats):
    "Best-of-`repeats` wall time of fn() in seconds (after one warm-up call)."
    fn(); sync(dev)
    best = float('inf')
    for _ in range(repeats):
        t = time.perf_counter(); fn(); sync(dev); best = min(best, time.perf_counter() - t)
    return best


def check_against_torch(shapes, dev, dtype, steps=3):
    "Relative difference of the parameter change after `steps` steps: MuonAdam vs torch.optim.Muon (bf16 NS inside)."
    torch.manual_seed(0)
    init = [torch.randn(s, device=dev) * 0.02 for s in shapes.values()]
    ours, ref = [nn.Parameter(t.clone()) for t in init], [nn.Parameter(t.clone()) for t in init]
    o = MuonAdam(ours, [], lr=1e-2, ns_dtype=dtype)
    r = torch.optim.Muon(ref, lr=1e-2, weight_decay=0.0, adjust_lr_fn='match_rms_adamw')
    for _ in range(steps):
        for p, q in zip(ours, ref): g = torch.randn_like(p); p.grad, q.grad = g.clone(), g.clone()
        o.step(); r.step()
    rel = [((p - q).norm() / (q - t0).norm()).item() for p, q, t0 in zip(ours, ref, init)]
    print(f'\ncheck vs torch.optim.Muon ({steps} steps, our NS in {dtype}): max relative difference of the change '
          f'{max(rel):.2e} ' + ('(bit-identical)' if max(rel) == 0 else ''))


def train_step_table(steps=8, round_steps=2, adamw_lr=2e-3):
    "Median CPU seconds per `cpu`-preset training step (and in the optimizer): AdamW baseline vs Muon + Adam."
    from pixeldiff_nb.muon import OptimConfig, build_optimizer
    from pixeldiff_nb.presets import get_preset
    from pixeldiff_nb.runs import Run
    from pixeldiff_nb.ablation import StepClock
    from pixeldiff_nb.training import Learner, Objective, AccelerateCB, ClipCB
    cfg = get_preset('cpu', ['sample_every=0', 'val_every=100000', 'ckpt_every=100000', 'log_every=100000',
                             f'out_dir={tempfile.mkdtemp()}'])
    run = Run(cfg, progress=False)                                   # its optimizer: Muon + Adam at the preset's lr
    opts = {f'AdamW (lr {adamw_lr:g})': build_optimizer(run.model, OptimConfig(kind='adamw', lr=adamw_lr)),
            f'Muon + Adam (lr {cfg.optim.lr:g})': run.opt}
    obj = Objective(cfg.diffusion, run.null_txt, run.null_mask, {}, None, None, cfg.seed)
    batches, step = run.batches(run.loader(0)), 0
    times = {n: ([], []) for n in opts}
    for r in range(1 + -(-steps // round_steps)):                    # one warm-up round, then the timed ones
        for name, opt in opts.items():
            clock = StepClock()
            cbs = [clock, AccelerateCB(run.acc), ClipCB(cfg.grad_clip)]
            Learner(run.model, obj, opt, batches, cbs=cbs, step=step).fit(round_steps)
            step += round_steps
            if r: times[name][0].extend(clock.step_s); times[name][1].extend(clock.rest_s)
    print(f'\n4. Training step of the `cpu` preset ({sum(p.numel() for p in run.model.parameters())/1e6:.1f}M params, batch '
          f'{cfg.stages[0].global_batch} at {cfg.stages[0].image_size} px), CPU seconds, median of {steps}, '
          f'{torch.get_num_threads()} thread(s)')
    print(f'{"optimizer":22}{"s/step":>9}{"optimizer s":>13}{"optimizer share":>17}')
    for name, (st, op) in times.items():
        s, o = statistics.median(st), statistics.median(op)
        print(f'{name:22}{s:9.3f}{o:13.3f}{o / s:17.1%}')


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--dtype', default=None, help='Newton–Schulz dtype (default: bfloat16 on cuda, float32 on cpu)')
    ap.add_argument('--hidden', type=int, default=1792)
    ap.add_argument('--mlp', type=int, default=6272)
    ap.add_argument('--depth', type=int, default=16)
    ap.add_argument('--repeats', type=int, default=1, help='timed repeats after one warm-up (best is reported)')
    ap.add_argument('--ranks', type=int, nargs='+', default=[8, 32])
    ap.add_argument('--svd', action='store_true', help='also time the exact polar factor through torch.linalg.svd')
    ap.add_argument('--check', action='store_true', help='also compare 3 steps with torch.optim.Muon on these shapes')
    ap.add_argument('--train-steps', type=int, default=0, help='also time N training steps of the cpu preset per optimizer')
    ap.add_argument('--only-train', action='store_true', help='only the training-step table (implies --train-steps 8 if unset)')
    a = ap.parse_args()
    if a.only_train:
        print(f'torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads')
        train_step_table(a.train_steps or 8)
        return
    dev = torch.device(a.device)
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if dev.type == 'cuda' else torch.float32)
    shapes = block_shapes(a.hidden, a.mlp)
    print(f'torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, '
          f'device {dev}{" (" + torch.cuda.get_device_name() + ")" if dev.type == "cuda" else ""}, NS dtype {dtype}')
    print(f'model: hidden {a.hidden}, MLP {a.mlp}, {a.depth} blocks, {len(shapes)} Muon matrices per block\n')

    # 1. Newton–Schulz per shape
    print('1. Newton–Schulz (5 steps) per matrix')
    print(f'{"matrix":12}{"shape":>14}{"GFLOP":>9}{"ms":>10}{"TFLOP/s":>9}' + (f'{"SVD ms":>10}' if a.svd else ''))
    ns_ms = {}
    for name, s in shapes.items():
        G = torch.randn(s, device=dev)
        t = timeit(lambda: newton_schulz(G, dtype=dtype), dev, a.repeats)
        ns_ms[s] = t * 1e3
        row = f'{name:12}{str(s):>14}{ns_flops(s)/1e9:9.1f}{t*1e3:10.1f}{ns_flops(s)/t/1e12:9.2f}'
        if a.svd:
            def polar():
                U, _, Vh = torch.linalg.svd(G, full_matrices=False); return U @ Vh
            row += f'{timeit(polar, dev, a.repeats)*1e3:10.1f}'
        print(row)
    per_block_ms = sum(ns_ms[s] for s in shapes.values())
    print(f'{"one block":12}{"":>14}{sum(map(ns_flops, shapes.values()))/1e9:9.1f}{per_block_ms:10.1f}')

    # 2. optimizer step, one block, measured; whole model extrapolated
    print('\n2. One optimizer step over one block (7 matrices -> Muon, 4 vectors -> Adam)')
    torch.manual_seed(0)
    mats = [nn.Parameter(torch.randn(s, device=dev) * 0.02) for s in shapes.values()]
    vecs = [nn.Parameter(torch.zeros(s, device=dev)) for s in block_vectors(a.hidden).values()]
    for p in mats + vecs: p.grad = torch.randn_like(p) * 1e-3
    muon = MuonAdam(mats, vecs, lr=1e-4, ns_dtype=dtype)
    adamw = torch.optim.AdamW(mats + vecs, lr=1e-4, betas=(0.9, 0.95), eps=1e-15, weight_decay=0.0)
    t_muon = timeit(muon.step, dev, a.repeats)
    t_adamw = timeit(adamw.step, dev, a.repeats)
    n = sum(p.numel() for p in mats + vecs)
    print(f'{"optimizer":14}{"params/block":>14}{"ms/block (measured)":>22}{f"ms x{a.depth} blocks (extrapolated)":>32}')
    for name, t in [('Muon + Adam', t_muon), ('AdamW', t_adamw)]:
        print(f'{name:14}{n/1e6:13.2f}M{t*1e3:22.1f}{t*1e3*a.depth:32.1f}')
    print(f'Muon + Adam / AdamW: x{t_muon/t_adamw:.1f}; Newton–Schulz is {per_block_ms/(t_muon*1e3):.0%} of the Muon step')

    if a.check: check_against_torch(shapes, dev, dtype)

    # 3. distributed split
    print(f'\n3. Distributed split of the {a.depth * len(shapes)} Muon matrices (owner rank orthogonalises; estimate = sum of '
          f'the measured single-matrix NS times above)')
    model = [s for _ in range(a.depth) for s in shapes.values()]
    nbytes = torch.finfo(dtype).bits // 8
    print(f'{"ranks":>5} {"assignment":12}{"matrices/rank":>15}{"TFLOP/rank max":>16}{"min":>8}{"max/min":>9}'
          f'{"busiest ms (est.)":>19}{"vs 1 rank":>10}{"DDP MB in":>11}{"FSDP MB":>9}')
    total_ms = sum(ns_ms[s] for s in model)
    for W in a.ranks:
        for how in ('round_robin', 'balanced'):
            own = assign_owners(model, W, how)
            cnt, fl, ms = [0] * W, [0.0] * W, [0.0] * W
            ddp_in, fsdp = [0.0] * W, [0.0] * W
            for s, r in zip(model, own):
                cnt[r] += 1; fl[r] += ns_flops(s) / 1e12; ms[r] += ns_ms[s]
                size = s[0] * s[1] * nbytes / 1e6
                for q in range(W):
                    if q != r: ddp_in[q] += size                       # DDP: every other rank receives the broadcast
                    fsdp[q] += 2 * size * ((W - 1) / W if q == r else 1 / W)   # FSDP: gather + scatter of the shards
            print(f'{W:5d} {how:12}{f"{min(cnt)}-{max(cnt)}":>15}{max(fl):16.2f}{min(fl):8.2f}{max(fl)/min(fl):9.2f}'
                  f'{max(ms):19.0f}{total_ms/max(ms):9.1f}x{max(ddp_in):11.0f}{max(fsdp):9.0f}')
    print('(MB: largest per-rank volume per step in the NS dtype; DDP = received broadcasts, FSDP = gather + scatter sent and '
          'received)')
    if a.train_steps and dev.type == 'cpu': train_step_table(a.train_steps)


if __name__ == '__main__':
    main()
