"""Training throughput of the speedrun configuration on one GPU (or a seconds-long CPU smoke run of the same path).

Builds the `small` PRX denoiser (~1.18B) and the full loss of the recipe — x-prediction v-loss + LPIPS-VGG (x0.5) +
DINOv2-B/14-reg perceptual loss (224 px) + REPA to a DINOv3-L/16 teacher at block 7 + TREAD 50% over blocks 2..12 —
and the Muon + Adam step, with randomly initialised auxiliary networks of the real architectures (throughput does not
depend on their weights) and synthetic pixels and T5Gemma-shaped text latents (256 tokens x 2304). Reports, per
resolution at the speedrun's per-GPU batch: images/s, tokens/s, the step split into forward, backward and optimizer,
the cost of each auxiliary network, peak memory, and model FLOP utilisation (denoiser alone and whole step) from the
analytic FLOP counts.

  python bench/gpu_throughput.py                       # GPU: 512 px batch 32 and 1024 px batch 16
  python bench/gpu_throughput.py --cpu-smoke           # CPU: the `tiny` model, tiny auxiliary nets, seconds
  python bench/gpu_throughput.py --res 512 --no-aux    # denoiser + optimizer only
"""
import argparse, json, platform, sys, time
from contextlib import nullcontext

import torch

from pixeldiff_nb.model import PRXDenoiser, model_config
from pixeldiff_nb.diffusion import DiffusionConfig
from pixeldiff_nb.perceptual import LPIPSLoss, DinoPerceptualLoss, dino_config, perceptual_flops
from pixeldiff_nb.repa import RepaConfig, build_repa, dinov3_config
from pixeldiff_nb.repa_probe import teacher_flops
from pixeldiff_nb.tread import TreadConfig, Router, tread_flops
from pixeldiff_nb.muon import OptimConfig, build_optimizer
from pixeldiff_nb.training import Objective, TrainModule

PEAK_BF16 = 989.4e12  # H100/H200 SXM dense bf16 (datasheet); MFU is reported against it


class Clock:
    "Wall-clock timer that synchronises CUDA around the measured region."
    def __init__(self, dev): self.cuda = dev.type == 'cuda'
    def __enter__(self):
        if self.cuda: torch.cuda.synchronize()
        self.t0 = time.perf_counter(); return self
    def __exit__(self, *a):
        if self.cuda: torch.cuda.synchronize()
        self.s = time.perf_counter() - self.t0


def build(args, dev):
    "Model, optimizer, objective and the auxiliary modules for the configuration in `args`."
    smoke = args.cpu_smoke
    cfg = model_config('tiny' if smoke else 'small', text_dim=384 if smoke else 2304)
    tread = TreadConfig(rate=0.0 if args.no_tread else 0.5)
    if smoke: tread = tread.for_depth(cfg.depth)
    repa_cfg = RepaConfig(weight=0.0 if (args.no_aux or args.no_repa) else 0.5, teacher=dinov3_config('tiny' if smoke else 'vitl16'),
                          layer=2 if smoke else 7, compile_teacher=args.compile)
    repa = build_repa(repa_cfg, cfg, device=dev)
    net = PRXDenoiser(cfg)
    model = TrainModule(net, repa.projector if repa is not None else None).to(dev)
    if args.compile:
        for b in net.blocks: b.compile()
    perceptual = {}
    if not (args.no_aux or args.no_lpips): perceptual['lpips'] = (0.1, LPIPSLoss('vgg', 0.5, pretrained=False).to(dev))
    if not (args.no_aux or args.no_dino):
        perceptual['dino'] = (0.01, DinoPerceptualLoss(dino_config('tiny' if smoke else 'base'), size=56 if smoke else 224).to(dev))
    opt = build_optimizer(model, OptimConfig(kind=args.optim))
    L = 32 if smoke else 256
    null_txt, null_mask = torch.zeros(1, L, cfg.text_dim, device=dev), torch.zeros(1, L, dtype=torch.bool, device=dev)
    null_mask[:, :2] = True
    router = Router(tread, cfg.depth) if tread.rate > 0 else None
    obj = Objective(DiffusionConfig(), null_txt, null_mask, perceptual, repa, router, seed=0)
    return cfg, model, opt, obj, perceptual, repa, tread, L


def batch_for(B, H, W, cfg, L, dev, seed=0):
    g = torch.Generator(device='cpu').manual_seed(seed)
    x0 = (torch.rand(B, 3, H, W, generator=g) * 2 - 1).to(dev)
    txt = torch.randn(B, L, cfg.text_dim, generator=g).to(dev)
    lens = torch.randint(8, L + 1, (B,), generator=g)
    mask = (torch.arange(L)[None] < lens[:, None]).to(dev)
    return {'pixels': x0, 'txt': txt, 'mask': mask}


def measure(args, dev, res, B):
    cfg, model, opt, obj, perceptual, repa, tread, L = build(args, dev)
    H = W = res
    batch = batch_for(B, H, W, cfg, L, dev)
    amp = torch.autocast('cuda', dtype=torch.bfloat16) if dev.type == 'cuda' else nullcontext()
    params = [p for p in model.parameters() if p.requires_grad]

    def step(i, phases=None):
        with Clock(dev) as c_f, amp: loss, parts = obj(model, batch, i)
        with Clock(dev) as c_b: loss.backward()
        with Clock(dev) as c_o:
            torch.nn.utils.clip_grad_norm_(params, 0.2); opt.step(); opt.zero_grad(set_to_none=True)
        if phases is not None:
            for k, c in (('forward', c_f), ('backward', c_b), ('optimizer', c_o)): phases[k].append(c.s)
        return float(loss.detach())

    for i in range(args.warmup): step(i)
    if dev.type == 'cuda': torch.cuda.reset_peak_memory_stats()
    phases = {'forward': [], 'backward': [], 'optimizer': []}
    with Clock(dev) as c_all:
        for i in range(args.steps): loss = step(args.warmup + i, phases)
    step_s = c_all.s / args.steps
    med = {k: sorted(v)[len(v) // 2] for k, v in phases.items()}

    # each auxiliary network alone, on tensors of the real shapes: prediction branch forward + backward, target forward
    aux = {}
    x0 = batch['pixels']
    for name, (w, m) in perceptual.items():
        xh = x0.detach().clone().requires_grad_(True)
        def run():
            with amp: l = m(xh, x0).sum()
            l.backward()
        run()
        with Clock(dev) as c:
            for _ in range(3): run()
        aux[name] = c.s / 3
    if repa is not None:
        with Clock(dev) as c:
            for _ in range(3):
                with amp, torch.no_grad(): repa.teacher_features(x0)
        aux['repa_teacher'] = c.s / 3

    N = (H // cfg.patch) * (W // cfg.patch)
    den = tread_flops(cfg, H, W, L, tread.rate, tread.start, tread.end)['routed' if tread.rate > 0 else 'dense']
    aux_flops = 0.0
    if 'lpips' in perceptual: aux_flops += perceptual_flops(perceptual['lpips'][1], H, 1)['total']
    if 'dino' in perceptual: aux_flops += perceptual_flops(perceptual['dino'][1], H, 1)['total']
    if repa is not None: aux_flops += teacher_flops(repa.teacher, H, W, cfg.patch)
    ips = B / step_s
    out = dict(res=res, batch=B, step_s=step_s, images_per_s=ips, tokens_per_s=ips * N, **{f'{k}_s': v for k, v in med.items()},
               **{f'aux_{k}_s': v for k, v in aux.items()}, loss=loss,
               denoiser_tflop_per_image=den / 1e12, step_tflop_per_image=(den + aux_flops) / 1e12,
               peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if dev.type == 'cuda' else None)
    if dev.type == 'cuda':
        out['mfu_denoiser'] = den * ips / PEAK_BF16
        out['mfu_step'] = (den + aux_flops) * ips / PEAK_BF16
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--cpu-smoke', action='store_true', help='tiny model and tiny auxiliary nets on the CPU (seconds)')
    p.add_argument('--res', type=int, nargs='+', default=None, help='resolutions (default 512 1024; smoke: 64)')
    p.add_argument('--batch', type=int, nargs='+', default=None, help='per-GPU batch per resolution (default 32 16; smoke: 2)')
    p.add_argument('--steps', type=int, default=5)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--optim', default='muon', choices=['muon', 'adamw'])
    p.add_argument('--compile', action='store_true', help='torch.compile the blocks (and the REPA teacher)')
    for k in ('aux', 'lpips', 'dino', 'repa', 'tread'): p.add_argument(f'--no-{k}', action='store_true')
    p.add_argument('--json', default=None, help='also write the results to this file')
    a = p.parse_args(argv)
    dev = torch.device('cpu' if a.cpu_smoke or not torch.cuda.is_available() else 'cuda')
    if dev.type == 'cpu' and not a.cpu_smoke: sys.exit('No GPU found: run with --cpu-smoke for the CPU path.')
    res = a.res or ([64] if a.cpu_smoke else [512, 1024])
    bs = a.batch or ([2] * len(res) if a.cpu_smoke else [32, 16][:len(res)])
    if len(bs) != len(res): sys.exit('--batch needs one value per --res.')
    if dev.type == 'cuda': torch.backends.cuda.matmul.allow_tf32 = True
    info = dict(torch=torch.__version__, python=platform.python_version(),
                device=torch.cuda.get_device_name() if dev.type == 'cuda' else platform.processor() or 'cpu',
                args=vars(a))
    rows = []
    for r, b in zip(res, bs):
        rows.append(measure(a, dev, r, b))      # its model, optimizer and nets are freed on return
        if dev.type == 'cuda': torch.cuda.empty_cache()
    print(json.dumps(info))
    hdr = f"{'res':>5} {'batch':>5} {'img/s':>8} {'tok/s':>9} {'step ms':>8} {'fwd':>7} {'bwd':>7} {'opt':>7} {'mem GiB':>8} {'MFU den':>8} {'MFU all':>8}  aux ms"
    print(hdr)
    for r in rows:
        auxs = ' '.join(f"{k[4:-2]}={v*1e3:.1f}" for k, v in r.items() if k.startswith('aux_'))
        mem = f"{r['peak_mem_gib']:.1f}" if r['peak_mem_gib'] is not None else '-'
        mfu = (f"{r['mfu_denoiser']:8.1%} {r['mfu_step']:8.1%}" if 'mfu_step' in r else f"{'-':>8} {'-':>8}")
        print(f"{r['res']:>5} {r['batch']:>5} {r['images_per_s']:8.2f} {r['tokens_per_s']:9.0f} {r['step_s']*1e3:8.1f} "
              f"{r['forward_s']*1e3:7.1f} {r['backward_s']*1e3:7.1f} {r['optimizer_s']*1e3:7.1f} {mem:>8} {mfu}  {auxs}")
    if a.json:
        with open(a.json, 'w') as f: json.dump(dict(info=info, rows=rows), f, indent=1)
    return rows


if __name__ == '__main__': main()
