#!/usr/bin/env python
"""Cost of the perceptual losses (`pixeldiff_nb.perceptual`).

1. FLOPs per image added at the speedrun sizes (LPIPS-VGG on the ×0.5-resized 512/1024 px image, DINOv2-B/14-reg at
   224 px), counted with FlopCounterMode on the real architectures built on the meta device (no weights).
2. Time per call at the `cpu`-preset size (default 64 px, batch 8): LPIPS-VGG (ImageNet weights), LPIPS-alex and the
   tiny random DINOv2, forward only (target-style, no grad) and forward + backward into x0_hat.

Usage: python bench/bench_perceptual.py [--size 64] [--batch 8] [--repeats 5] [--threads N] [--device cpu|cuda]
Each section is a function returning rows, so the training benchmark can add its time-per-step section beside them.
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
        rows.append({'loss': name, f'forward ms': 1e3 * time_call(loss, x0_hat, x0, False, repeats),
                     f'fwd+bwd ms': 1e3 * time_call(loss, x0_hat, x0, True, repeats)})
    return rows


def print_rows(title, rows):
    print(f'\n## {title}\n')
    keys = list(rows[0])
    print('| ' + ' | '.join(keys) + ' |'); print('|' + '---|' * len(keys))
    for r in rows: print('| ' + ' | '.join(f'{v:.1f}' if isinstance(v, float) else str(v) for v in r.values()) + ' |')


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--size', type=int, default=64); ap.add_argument('--batch', type=int, default=8)
    ap.add_argument('--repeats', type=int, default=5); ap.add_argument('--threads', type=int, default=None)
    ap.add_argument('--device', default='cpu')
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


if __name__ == '__main__':
    main()
