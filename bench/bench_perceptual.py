#!/usr/bin/env python
"""Cost of the perceptual losses (`pixeldiff_nb.perceptual`).

1. FLOPs per image added at the speedrun sizes (LPIPS-VGG on the ×0.5-resized 512/1024 px image, DINOv2-B/14-reg at
   224 px), counted with FlopCounterMode on the real architectures built on the meta device (no weights).
2. Time per call at the `cpu`-preset size (default 64 px, batch 8): LPIPS-VGG (ImageNet weights), LPIPS-alex and the
   tiny random DINOv2, forward only (target-style, no grad) and forward + backward into x0_hat.
3. CPU seconds per training step of the `cpu` preset (tiny model, 64 px, batch 32, Muon) without perceptual terms, with
   LPIPS-VGG 0.1 (the recipe's term), with DINO 0.01 (tiny random DINOv2 at 224 px: the code path, not DINOv2-B's cost;
   `--dino-base` adds the real DINOv2-B/14-reg architecture with random weights, about a minute per step on one core),
   and with both. One model and one data stream; the variants take turns in rounds of `--round` steps so that a change
   in machine load hits them alike. Timed with `time.process_time`: at one thread, CPU seconds are compute seconds.

Usage: python bench/bench_perceptual.py [--size 64] [--batch 8] [--repeats 5] [--threads N] [--device cpu|cuda]
                                        [--train-steps 8] [--round 2] [--dino-base] [--no-train]
The reported numbers use `OMP_NUM_THREADS=1 python bench/bench_perceptual.py --threads 1`.
Each section is a function returning rows.
"""
import argparse, os, platform, statistics, time, warnings

import torch

from pixeldiff_nb.perceptual import (LPIPSLoss, DinoPerceptualLoss, dino_config, speedrun_perceptual_flops)


def flops_rows(sizes=(512, 1024)) -> list[dict]:
    "Added GFLOP per image for each recipe term and image size."
    rows = []
    for s in sizes:
        for name, v in speedrun_perceptual_flops(s).items():
            rows.append({'term': name, 'image px': s, **{k: v[k] / 1e9 for k in ('forward', 'backward', 'total')}})
    return rows


def _sync(device):
    if device.type == 'cuda': torch.cuda.synchronize()


def time_call(loss, x0_hat, x0, backward: bool, repeats: int, warmup: int = 2) -> float:
    "Median seconds of one loss call (and its backward into x0_hat when `backward`)."
    ts = []
    for i in range(warmup + repeats):
        xh = x0_hat.detach().clone().requires_grad_(backward)
        _sync(x0.device); t = time.perf_counter()
        if backward: loss(xh, x0).sum().backward()
        else:
            with torch.no_grad(): loss(xh, x0)
        _sync(x0.device)
        if i >= warmup: ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def time_rows(size=64, batch=8, repeats=5, device='cpu') -> list[dict]:
    "Milliseconds per call of each loss at `size` px and `batch` images, forward and forward+backward."
    device = torch.device(device)
    torch.manual_seed(0)
    x0 = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    x0_hat = (x0 + 0.2 * torch.randn_like(x0)).clamp(-1, 1)
    losses = {'LPIPS-VGG (resize 0.5)': LPIPSLoss('vgg', 0.5),
              'LPIPS-alex (resize 0.5)': LPIPSLoss('alex', 0.5),
              'DINO tiny random @224': DinoPerceptualLoss(dino_config('tiny'), size=224),
              'DINO tiny random @112': DinoPerceptualLoss(dino_config('tiny'), size=112)}
    rows = []
    for name, loss in losses.items():
        loss.to(device)
        rows.append({'loss': name, 'forward ms': 1e3 * time_call(loss, x0_hat, x0, False, repeats),
                     'fwd+bwd ms': 1e3 * time_call(loss, x0_hat, x0, True, repeats)})
    return rows


def train_step_rows(steps=8, round_steps=2, dino_base=False, overrides=()) -> list[dict]:
    "Median CPU seconds per training step of the `cpu` preset for each set of perceptual terms (first round not counted)."
    import tempfile
    from pixeldiff_nb.presets import get_preset
    from pixeldiff_nb.runs import Run
    from pixeldiff_nb.ablation import StepClock
    from pixeldiff_nb.training import Learner, Objective, AccelerateCB, ClipCB, SchedCB
    cfg = get_preset('cpu', ['sample_every=0', 'val_every=100000', 'ckpt_every=100000', 'log_every=100000',
                             f'out_dir={tempfile.mkdtemp()}', *overrides])
    run = Run(cfg, progress=False)
    lpips = LPIPSLoss(cfg.loss.lpips_net, cfg.loss.lpips_resize)
    dino = DinoPerceptualLoss(dino_config('tiny'), size=cfg.loss.dino_size)
    variants = {'no perceptual': {}, 'LPIPS-VGG 0.1': {'lpips': (0.1, lpips)},
                'DINO 0.01 (tiny random)': {'dino': (0.01, dino)},
                'LPIPS 0.1 + DINO 0.01 (tiny random)': {'lpips': (0.1, lpips), 'dino': (0.01, dino)}}
    if dino_base:
        variants['DINO 0.01 (DINOv2-B arch., random)'] = {'dino': (0.01, DinoPerceptualLoss(dino_config('base'), size=cfg.loss.dino_size))}
    batches, step = run.batches(run.loader(0)), 0
    times = {n: [] for n in variants}
    rounds = 1 + -(-steps // round_steps)                   # one warm-up round, then enough rounds for `steps`
    for r in range(rounds):
        for name, perceptual in variants.items():
            k = 1 if 'DINOv2-B' in name else round_steps      # the real-size DINO: one step per round
            obj = Objective(cfg.diffusion, run.null_txt, run.null_mask, perceptual, None, None, cfg.seed)
            clock = StepClock()
            cbs = [clock, AccelerateCB(run.acc), ClipCB(cfg.grad_clip), SchedCB(run.sched)]
            Learner(run.model, obj, run.opt, batches, cbs=cbs, step=step).fit(k)
            step += k
            if r: times[name] += clock.step_s
    base = statistics.median(times['no perceptual'])
    return [{'variant': n, 'steps timed': len(t), 'CPU s/step': statistics.median(t),
             'added CPU s/step': statistics.median(t) - base, 'ratio': statistics.median(t) / base} for n, t in times.items()]


def print_rows(title, rows):
    print(f'\n## {title}\n')
    keys = list(rows[0])
    print('| ' + ' | '.join(keys) + ' |'); print('|' + '---|' * len(keys))
    fmt = lambda v: (f'{v:.1f}' if abs(v) >= 10 else f'{v:.3f}' if abs(v) < 1 else f'{v:.2f}') if isinstance(v, float) else str(v)
    for r in rows: print('| ' + ' | '.join(fmt(v) for v in r.values()) + ' |')


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--size', type=int, default=64); ap.add_argument('--batch', type=int, default=8)
    ap.add_argument('--repeats', type=int, default=5); ap.add_argument('--threads', type=int, default=None)
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--train-steps', type=int, default=8, help='timed training steps per variant (section 3)')
    ap.add_argument('--round', type=int, default=2, help='steps per variant before the next one takes its turn')
    ap.add_argument('--dino-base', action='store_true', help='also time DINOv2-B/14-reg (random weights) in training')
    ap.add_argument('--no-train', action='store_true', help='skip section 3 (training steps)')
    a = ap.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    warnings.simplefilter('ignore')
    print(f'torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, '
          f'{torch.get_num_threads()} threads, device {a.device}'
          + (f' ({torch.cuda.get_device_name()})' if a.device.startswith('cuda') else '')
          + f', load average {os.getloadavg()[0]:.1f}')
    print_rows('Added GFLOP per image (speedrun sizes; LPIPS net sees the image ×0.5, DINO sees 224 px)', flops_rows())
    print_rows(f'Time per call, {a.batch} images of {a.size} px (median of {a.repeats})',
               time_rows(a.size, a.batch, a.repeats, a.device))
    if not a.no_train and a.device == 'cpu':
        print_rows(f'CPU seconds per training step, `cpu` preset (median of {a.train_steps}, {torch.get_num_threads()} thread(s))',
                   train_step_rows(a.train_steps, a.round, a.dino_base))


if __name__ == '__main__':
    main()
