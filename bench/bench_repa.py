"""REPA costs: the teacher's FLOPs per image at the speedrun's resolutions, and the time REPA adds to a forward+backward pass.

Usage: python bench/bench_repa.py [--device cpu|cuda] [--batch 16] [--seconds 2] [--gpu-batch 32] [--skip-flops]
                                  [--skip-parts] [--preset-steps 5 --preset-rounds 4]

1. FLOPs (meta device, `FlopCounterMode`, no weights needed): forward FLOPs per image of DINOv3 ViT-S/B/L/16 and DINOv2
   ViT-B/L/14 (with registers) on the aspect-ratio buckets of the 512 px stage (teacher input = image × 16/32) and on the
   square 1024 px bucket, next to the training FLOPs (3 × forward) of the `small` denoiser, dense and with TREAD (50% of
   the tokens through blocks 2..12).
2. CPU time at the `cpu`-preset size (tiny denoiser, 64 px, patch 8, batch 16, REPA on block 2): the VGG16 relu4_3 and
   relu3_3 STAND-IN teachers (forward, no grad; random weights, which cost the same), the projector 256 -> 512 -> 512 -> 512 (forward+backward), and a denoiser
   forward+backward without and with REPA (no optimizer step), interleaved so both see the same machine load.
3. With --device cuda, the same comparison for the `small` denoiser at 512 px under bf16 autocast, with a randomly
   initialised DINOv3 ViT-L/16 teacher (the real architecture; the weights do not change the cost) kept in fp32, stored
   in bf16 (the default), and stored in bf16 and compiled.
4. With --preset-steps N: whole training steps of the `cpu` preset (a `runs.Run`: batch 32 of 64 px emoji with MiniLM
   captions, forward, backward, grad clip, Muon step, EMA update) without REPA and with REPA (weight 0.5, block 2, the
   pretrained VGG16 relu4_3 and relu3_3 STAND-IN teachers), N steps per setting per round, settings interleaved over
   --preset-rounds rounds (the first is a warm-up and is dropped), in CPU seconds of this process: run it with
   OMP_NUM_THREADS=1 on a shared machine.
Prints markdown (median and best wall-clock ms over the repetitions for 2-3; CPU seconds for 4).
"""
import argparse, os, platform, statistics, tempfile, time
os.environ.setdefault('HF_HUB_OFFLINE', '1')

import torch
import transformers
from pixeldiff_nb.core import Timer, autocast, seed_everything
from pixeldiff_nb.buckets import bucket_sizes
from pixeldiff_nb.model import PRXDenoiser, RoutePlan, model_config, denoiser_flops
from pixeldiff_nb.repa import RepaConfig, VGGStandIn, build_repa, dinov2_config, dinov3_config, teacher_size
from pixeldiff_nb.repa_probe import teacher_flops

TEACHERS = [('DINOv3 ViT-S/16', lambda: dinov3_config('vits16')), ('DINOv3 ViT-B/16', lambda: dinov3_config('vitb16')),
            ('DINOv3 ViT-L/16 (recipe)', lambda: dinov3_config('vitl16')),
            ('DINOv2 ViT-B/14-reg', lambda: dinov2_config('base')), ('DINOv2 ViT-L/14-reg', lambda: dinov2_config('large'))]


def flops_tables():
    small = model_config('small')
    print('## Teacher forward FLOPs per image (GFLOP)\n')
    print('Denoiser = the `small` model\'s training step (3 × forward, 256 text tokens); TREAD = 50% of the tokens through '
          'blocks 2..12. The teacher runs forward only, without gradients.\n')
    sizes = [(512, 512), (704, 352), (384, 672), (1024, 1024)]
    print('| teacher | ' + ' | '.join(f'{H}×{W} (teacher {"×".join(map(str, teacher_size(H, W, 32, 16)))})' for H, W in sizes) + ' |')
    print('|---|' + '---:|' * len(sizes))
    for name, cfg in TEACHERS:
        c = cfg()
        print(f'| {name} | ' + ' | '.join(f'{teacher_flops(c, H, W, 32)/1e9:.1f}' for H, W in sizes) + ' |')
    print("| STAND-IN VGG16 relu4_3 | " + ' | '.join(f"{teacher_flops('vgg16', H, W, 32)/1e9:.1f}" for H, W in sizes) + ' |')
    row = lambda **kw: ' | '.join(f"{denoiser_flops(small, H, W, text_len=256, **kw)['train']/1e9:,.0f}" for H, W in sizes)
    n = lambda H, W: (H // 32) * (W // 32)
    print('| small denoiser, train, dense | ' + row() + ' |')
    print('| small denoiser, train, TREAD 50% | ' + ' | '.join(
        f"{denoiser_flops(small, H, W, text_len=256, keep=n(H, W) // 2, span=(2, 12))['train']/1e9:,.0f}" for H, W in sizes) + ' |')
    vitl = dinov3_config('vitl16')
    print('\nDINOv3-L/16 over every bucket of the 512 px stage: ' + ', '.join(
        f'{H}×{W}: {teacher_flops(vitl, H, W, 32)/1e9:.0f}' for H, W in bucket_sizes(512, 32)) + ' GFLOP.')
    f, d = teacher_flops(vitl, 512, 512, 32), denoiser_flops(small, 512, 512, text_len=256, keep=128, span=(2, 12))['train']
    print(f'\nAt 512 px the recipe\'s teacher adds {100*f/d:.1f}% to the FLOPs of a TREAD training step '
          f'({100*f/denoiser_flops(small, 512, 512, text_len=256)["train"]:.1f}% of a dense one).\n')
    print(f"cpu preset (64 px, patch 8): STAND-IN VGG16 relu4_3 {teacher_flops('vgg16', 64, 64, 8)/1e9:.2f} GFLOP/image, "
          f"relu3_3 (input 32 px) {teacher_flops('vgg16:relu3_3', 64, 64, 8)/1e9:.2f}; "
          f"tiny denoiser train {denoiser_flops(model_config('tiny'), 64, 64, text_len=16)['train']/1e9:.2f} GFLOP/image.\n")


def interleaved(fns: dict, seconds: float, min_reps: int = 3) -> dict:
    "(median, best) seconds per call of each function, calling them in turn (after one warm-up each) until `seconds` have passed."
    for f in fns.values(): f()
    times = {k: [] for k in fns}
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or min(len(v) for v in times.values()) < min_reps:
        for k, f in fns.items():
            with Timer() as t: f()
            times[k].append(t.elapsed)
    return {k: (statistics.median(v), min(v), len(v)) for k, v in times.items()}


def step_fns(model, repa, x0, txt, mask, keep, span, device):
    "Closures: denoiser forward+backward without REPA, with REPA, the teacher alone and the projector alone."
    B = x0.shape[0]
    def run(with_repa):
        model.zero_grad(set_to_none=True); repa.zero_grad(set_to_none=True)
        t = torch.rand(B, device=device)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * torch.randn_like(x0)
        with autocast(device):
            if with_repa:
                x0_hat, feats, idx = model(x_t, t, txt, mask, route=RoutePlan(keep, *span), return_block=repa.layer)
                loss = (x0_hat.float() - x0).pow(2).mean() + repa.weight * repa(feats, x0, idx)
            else:
                x0_hat = model(x_t, t, txt, mask, route=RoutePlan(keep, *span))
                loss = (x0_hat.float() - x0).pow(2).mean()
        loss.backward()
    feats = torch.randn(B, keep.shape[1], model.cfg.hidden, device=device)
    y = repa.teacher_features(x0)
    def teacher():
        with autocast(device): repa.teacher_features(x0)
    def projector():
        repa.zero_grad(set_to_none=True)
        with autocast(device): l = repa.loss(feats, keep, y)
        l.backward()
    return {'denoiser fwd+bwd, no REPA': lambda: run(False), 'denoiser fwd+bwd + REPA': lambda: run(True),
            'teacher forward': teacher, 'projector fwd+bwd + loss': projector}


def report(title, ms, B):
    print(f'## {title}\n\n| part | median ms / batch | best ms / batch | median ms / image | runs |\n|---|---:|---:|---:|---:|')
    for k, (med, best, n) in ms.items(): print(f'| {k} | {med*1e3:.1f} | {best*1e3:.1f} | {med*1e3/B:.2f} | {n} |')
    m0, b0, _ = ms['denoiser fwd+bwd, no REPA']
    for k, (m1, b1, _) in ms.items():
        if k.startswith('denoiser fwd+bwd + REPA'):
            print(f'\n{k[len("denoiser fwd+bwd + "):]} adds {100*(m1/m0 - 1):+.0f}% (medians; {100*(b1/b0 - 1):+.0f}% best of each) '
                  f'to the forward+backward pass (no optimizer step).')
    print()


def bench_preset(steps, rounds):
    "Whole training steps of the `cpu` preset without and with REPA, interleaved in rounds; prints a markdown table."
    from pixeldiff_nb.presets import get_preset
    from pixeldiff_nb.runs import Run
    from pixeldiff_nb.ablation import StepClock
    tmp = tempfile.mkdtemp()
    quiet = ['sample_every=0', 'val_every=1000000', 'ckpt_every=1000000', 'log_every=1000000']
    variants = {'no REPA': [], 'REPA, VGG16 relu4_3 (stand-in)': ['repa.weight=0.5'],
                'REPA, VGG16 relu3_3 (stand-in)': ['repa.weight=0.5', 'repa.teacher=vgg16:relu3_3']}
    runs = {k: Run(get_preset('cpu', quiet + v + [f'out_dir={tmp}/{i}']), progress=False) for i, (k, v) in enumerate(variants.items())}
    names, times = list(variants), {k: [] for k in variants}
    for i in range(rounds):
        for k in (names if i % 2 == 0 else names[::-1]):
            cb = StepClock(steps, order=100)    # after EMA, logging, validation: part of the step
            runs[k].fit([cb])
            if i > 0: times[k] += cb.times                # round 0 is a warm-up
    cfg = runs[names[0]].cfg
    med = {k: [statistics.median(x) for x in zip(*[(a, b, a + b) for a, b in times[k]])] for k in names}
    base = med[names[0]]
    print(f"## `cpu` preset: whole training steps ({cfg.stages[0].global_batch} × {cfg.stages[0].image_size} px, REPA on block "
          f"{runs[names[1]].cfg.repa.layer} of {cfg.model.depth}, {cfg.optim.kind} + EMA; CPU seconds, {torch.get_num_threads()} "
          f"thread(s), {len(times[names[0]])} steps per setting over {rounds - 1} rounds)\n")
    print('| setting | batch+fwd+bwd s | clip+optimizer+EMA s | step s (median) | added per step |\n|---|---:|---:|---:|---:|')
    for k in names:
        m = med[k]
        add = f'{m[2] - base[2]:+.3f} s ({m[2] / base[2] - 1:+.0%})' if k != names[0] else '–'
        print(f'| {k} | {m[0]:.3f} | {m[1]:.3f} | {m[2]:.3f} | {add} |')
    print()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--batch', type=int, default=16, help='cpu-preset batch')
    ap.add_argument('--gpu-batch', type=int, default=32, help='batch of the small model at 512 px (cuda only)')
    ap.add_argument('--seconds', type=float, default=2.0, help='timed seconds per comparison')
    ap.add_argument('--skip-flops', action='store_true')
    ap.add_argument('--skip-parts', action='store_true', help='skip the forward+backward part timings (sections 2-3)')
    ap.add_argument('--preset-steps', type=int, default=0, help='whole cpu-preset training steps per setting per round (0: skip)')
    ap.add_argument('--preset-rounds', type=int, default=4, help='rounds of --preset-steps steps; the first is a warm-up')
    args = ap.parse_args()
    seed_everything(0)
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name() if dev.type == 'cuda' else platform.processor() or platform.machine()
    print(f'# REPA benchmark\n\ndevice {name}; torch {torch.__version__}, transformers {transformers.__version__}, '
          f'{torch.get_num_threads()} CPU threads\n')
    if not args.skip_flops: flops_tables()
    if args.preset_steps: bench_preset(args.preset_steps, args.preset_rounds)
    if args.skip_parts: return

    # cpu preset: tiny denoiser at 64 px, stand-in teacher, REPA on block 2, TREAD 50% over blocks 1..4
    mcfg, B = model_config('tiny'), args.batch
    stand_in = lambda layer: lambda: build_repa(RepaConfig(layer=2, teacher='vgg16', proj_width=512), mcfg, device=dev,
                                                teacher=VGGStandIn(layer, pretrained=False))   # random weights: same cost
    # relu3_3 has stride 4: it sees the image at 32 px for the same 8×8 grid
    fns = teacher_comparison(mcfg, B, 64, 16, (1, 4), {f'VGG16 {l}': stand_in(l) for l in ('relu4_3', 'relu3_3')}, dev)
    ms = interleaved(fns, args.seconds)
    report(f'cpu preset on {dev.type}: tiny denoiser, 64 px, batch {B}, STAND-IN VGG16 teacher, TREAD 50% over blocks 1-4', ms, B)

    if dev.type == 'cuda':
        mcfg, B = model_config('small'), args.gpu_batch
        dino = lambda **kw: lambda: build_repa(RepaConfig(**kw), mcfg, teacher=dinov3_config('vitl16'), device=dev)  # random DINOv3-L
        fns = teacher_comparison(mcfg, B, 512, 256, (2, 12), {'fp32 teacher': dino(teacher_bf16=False), 'bf16 teacher': dino(),
                                                              'bf16 compiled teacher': dino(compile_teacher=True)}, dev)
        ms = interleaved(fns, args.seconds)
        report(f'speedrun stage 1 on {name}: small denoiser, 512 px, batch {B}, bf16 autocast, DINOv3-L/16 (random init) '
               f'teacher at 256 px, TREAD 50% over blocks 2-12', ms, B)
        print(f'peak GPU memory {torch.cuda.max_memory_allocated()/2**30:.1f} GiB\n')


def teacher_comparison(mcfg, B, H, text_len, span, repas: dict, dev) -> dict:
    "Timing functions: the denoiser's fwd+bwd without REPA and with each REPA of `repas` {label: builder}, each teacher alone, the projector."
    N = (H // mcfg.patch) ** 2
    x0 = torch.rand(B, 3, H, H, device=dev) * 2 - 1
    txt, mask = torch.randn(B, text_len, mcfg.text_dim, device=dev), torch.ones(B, text_len, dtype=torch.bool, device=dev)
    keep = torch.rand(B, N, device=dev).argsort(1)[:, :N // 2].sort(1).values      # TREAD 50%: the kept tokens
    fns, model = {}, PRXDenoiser(mcfg).to(dev)
    for label, build in repas.items():
        f = step_fns(model, build(), x0, txt, mask, keep, span, dev)
        if not fns: fns['denoiser fwd+bwd, no REPA'] = f['denoiser fwd+bwd, no REPA']
        fns[f'denoiser fwd+bwd + REPA, {label}'] = f['denoiser fwd+bwd + REPA']
        fns[f'teacher forward, {label}'] = f['teacher forward']
    fns['projector fwd+bwd + loss'] = f['projector fwd+bwd + loss']
    return fns

if __name__ == '__main__':
    main()
