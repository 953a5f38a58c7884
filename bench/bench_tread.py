"""TREAD: measured training-step time at several routing rates, next to the FLOP count's prediction.

Usage: python bench/bench_tread.py [--device cpu|cuda] [--threads N] [--rates 0 0.25 0.5 0.75] [--repeats 5]
                                   [--tiny-batch 16 ...] [--small-batch 1 ...] [--small-rates 0 0.5] [--small-repeats 2]
                                   [--small-warmup 0] [--skip-small] [--clock wall|process] [--out FILE]
                                   [--preset-steps 5 --preset-rounds 4] [--skip-tiny]

Two settings, each a complete training step (routing plan, forward, v-loss, backward; no optimizer step), the rates
interleaved so that machine noise hits them alike, median of the repeats (after one warm-up round for `tiny`):
  - `tiny` model at 64 px (64 tokens), 32-token caption of 384-d states, span 1..4 of 6 (the recipe's 2..12 of 16 scaled);
  - `small` model (the speedrun's 1.18B) at 512 px (256 tokens), 256-token caption of 2304-d states, span 2..12 of 16.
    On a CPU this takes minutes (about a minute per step on 2 busy cores, ~11 GB of memory); --skip-small skips it.
With --preset-steps N, also whole training steps of the `cpu` preset (a `runs.Run`: batch 32 of 64 px emoji with
MiniLM captions, forward, backward, grad clip, Muon step, EMA update) dense and with TREAD at each of --rates, N steps
per setting per round, settings interleaved over --preset-rounds rounds (the first is a warm-up and is dropped); each
step is split into batch + forward + backward (what routing shrinks) and clip + optimizer + EMA (what it cannot).
For each setting the measured times are fitted as time = a + b·FLOPs; `a` is the part of a step that does not scale
with the counted FLOPs, and the measured saving is about the FLOP saving × (1 − a / dense time).
Prints markdown (and writes it to --out if given). On a machine whose cores are shared with other work, use
`--threads 1 --clock process`: several threads then spend their time waiting for each other, and elapsed time counts
the time the process waited for a core; one thread's CPU time does neither.
"""
import argparse, platform, statistics, tempfile, time
import numpy as np
import torch
from pixeldiff_nb.core import seed_everything, autocast_dtype
from pixeldiff_nb.model import PRXDenoiser, model_config
from pixeldiff_nb.tread import step_times, tread_flops, scale_span, routed_count
from pixeldiff_nb.patching import token_count


def bench(size, H, B, text_len, span, rates, repeats, device, lines, warmup=1, clock='wall'):
    "Time one setting and append its markdown table to `lines`."
    seed_everything(0)
    t0 = time.perf_counter()
    model = PRXDenoiser(model_config(size)).to(device)
    build = time.perf_counter() - t0
    cfg = model.cfg
    times = step_times(model, rates, B=B, H=H, W=H, text_len=text_len, start=span[0], end=span[1], repeats=repeats, warmup=warmup, clock=clock)
    N = token_count(H, H, cfg.patch)
    med = {r: statistics.median(times[r]) for r in rates}
    fl = {r: tread_flops(cfg, H, H, text_len, r, *span) for r in rates}
    b, a = np.polyfit([fl[r]['routed'] for r in rates], [med[r] for r in rates], 1)
    dense = med[min(rates)]
    lines += [f"\n## `{size}` at {H} px, batch {B} ({N} tokens, caption {text_len}, span {span[0]}..{span[1]} of {cfg.depth}, "
              f"{sum(p.numel() for p in model.parameters())/1e6:.1f}M parameters; built in {build:.1f}s)\n",
              "| rate | kept tokens | ms/step (median) | min | max | measured saving | FLOP saving | TFLOP/s |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rates:
        lines.append(f"| {r} | {N - routed_count(N, r)} | {med[r]*1e3:.1f} | {min(times[r])*1e3:.1f} | {max(times[r])*1e3:.1f} | "
                     f"{1 - med[r]/dense:.1%} | {fl[r]['saving']:.1%} | {fl[r]['routed']*B/med[r]/1e12:.3f} |")
    lines.append(f"\nfit time = a + b·FLOPs over {len(rates)} rates: a = {a*1e3:.1f} ms = {a/dense:.1%} of the dense step "
                 f"(does not scale with the counted FLOPs); predicted measured saving at the largest rate = "
                 f"{fl[max(rates)]['saving']*(1 - a/dense):.1%}")
    print('\n'.join(lines[-len(rates) - 4:]), flush=True)
    del model
    return dict(med=med, fl=fl, a=a)


def bench_preset(rates, steps, rounds, lines, clock='process'):
    "Whole training steps of the `cpu` preset at each routing rate, interleaved in rounds; appends a markdown table."
    from pixeldiff_nb.presets import get_preset
    from pixeldiff_nb.runs import Run
    from pixeldiff_nb.ablation import StepClock
    tick = time.process_time if clock == 'process' else time.perf_counter
    tmp = tempfile.mkdtemp()
    quiet = ['sample_every=0', 'val_every=1000000', 'ckpt_every=1000000', 'log_every=1000000']
    runs = {r: Run(get_preset('cpu', quiet + [f'tread.rate={r}', f'out_dir={tmp}/rate{r}']), progress=False) for r in rates}
    times = {r: [] for r in rates}
    for i in range(rounds):
        for r in (rates if i % 2 == 0 else rates[::-1]):
            cb = StepClock(steps, tick, order=100)    # after EMA, logging, validation: part of the step
            runs[r].fit([cb])
            if i > 0: times[r] += cb.times                # round 0 is a warm-up
    run = runs[rates[0]]
    cfg, H = run.cfg, run.cfg.stages[0].image_size
    text_len = run.val_batches(0)[0]['txt'].shape[1]
    span = (cfg.tread.start, cfg.tread.end)
    med = {r: [statistics.median(x) for x in zip(*[(a, b, a + b) for a, b in times[r]])] for r in rates}
    dense = med[min(rates)]
    lines += [f"\n## `cpu` preset: whole training steps ({cfg.stages[0].global_batch} × {H} px, caption {text_len} tokens, "
              f"span {span[0]}..{span[1]} of {cfg.model.depth}, {cfg.optim.kind} + EMA; {clock}-clock seconds, "
              f"{sum(len(v) for v in times.values()) // len(rates)} steps per setting over {rounds - 1} rounds)\n",
              "| rate | batch+fwd+bwd s | clip+optimizer+EMA s | step s (median) | measured saving, fwd+bwd | measured saving, step | FLOP saving |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rates:
        fl = tread_flops(cfg.model, H, H, text_len, r, *span)['saving'] if r else 0.0
        lines.append(f"| {r} | {med[r][0]:.3f} | {med[r][1]:.3f} | {med[r][2]:.3f} | {1 - med[r][0] / dense[0]:.1%} | "
                     f"{1 - med[r][2] / dense[2]:.1%} | {fl:.1%} |")
    lines.append(f"\nthe part routing cannot shrink (clip + optimizer + EMA) is {dense[1] / dense[2]:.0%} of the dense step")
    print('\n'.join(lines[-len(rates) - 4:]), flush=True)
    return med


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch decides)')
    ap.add_argument('--clock', choices=['wall', 'process'], default='wall',
                    help="'wall': elapsed time; 'process': this process's CPU time (CPU runs on a shared machine, with --threads 1)")
    ap.add_argument('--rates', type=float, nargs='+', default=[0.0, 0.25, 0.5, 0.75])
    ap.add_argument('--repeats', type=int, default=5, help='timed rounds for the tiny model')
    ap.add_argument('--tiny-batch', type=int, nargs='+', default=[16])
    ap.add_argument('--small-batch', type=int, nargs='+', default=[1])
    ap.add_argument('--small-rates', type=float, nargs='+', default=[0.0, 0.5])
    ap.add_argument('--small-repeats', type=int, default=2, help='timed rounds for the small model')
    ap.add_argument('--small-warmup', type=int, default=0, help='untimed rounds before them (a CPU step of this size is long enough)')
    ap.add_argument('--skip-small', action='store_true', help='skip the 1.18B model at 512 px (minutes on a CPU)')
    ap.add_argument('--skip-tiny', action='store_true', help='skip the tiny-model forward+backward timing')
    ap.add_argument('--preset-steps', type=int, default=0, help='whole cpu-preset training steps per setting per round (0: skip)')
    ap.add_argument('--preset-rounds', type=int, default=4, help='rounds of --preset-steps steps; the first is a warm-up')
    ap.add_argument('--out', default=None, help='also write the markdown here')
    args = ap.parse_args()
    if args.threads: torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == 'cuda' else (platform.processor() or platform.machine())
    amp = autocast_dtype(dev)
    lines = ["# TREAD step-time benchmark\n",
             f"device {name}; torch {torch.__version__}; {torch.get_num_threads()} CPU threads; "
             f"{'bf16 autocast' if amp else 'fp32'}; {args.clock}-clock seconds; training step = plan + forward + v-loss + backward (no optimizer step)"]
    print(lines[0], lines[1], sep='\n', flush=True)
    for B in ([] if args.skip_tiny else args.tiny_batch):
        bench('tiny', 64, B, 32, scale_span(2, 12, 6), args.rates, args.repeats, dev, lines, clock=args.clock)
    for B in ([] if args.skip_small else args.small_batch):
        bench('small', 512, B, 256, (2, 12), args.small_rates, args.small_repeats, dev, lines, warmup=args.small_warmup,
              clock=args.clock)
    if args.preset_steps:
        bench_preset(args.rates, args.preset_steps, args.preset_rounds, lines, clock=args.clock)
    if args.out:
        with open(args.out, 'w') as f: f.write('\n'.join(lines) + '\n')


if __name__ == '__main__':
    main()
