"""The speedrun end to end on one GPU through `Run`, in one prepared call: throughput by part at
512 and 1024 px, FSDP2 with exact resume, sampling speed and the `#| gpu` notebook cells.
`--cpu-smoke` runs the same code at tiny sizes on the CPU (CI, tests/test_bench.py).

On a lent GPU (one H200 or H100; ~8 of the 15 device minutes, leaving room for a rerun):
  1. here, once: `bash bench/gpu_wheels.sh` (~1 MB of wheels the image lacks, into .whl/, ignored)
  2. the device tool's `run` with carry=[".whl"], timeout_s=540, kind="nvidia-h200" (or none), and
     command (one line):
       python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site
       .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
       && python3 bench/gpu_check.py --out $OUT --budget 450
  3. a second call with `--variants all` (or a comma list of VARIANTS) times the optimisation
     candidates side by side at 512 px; `--phases speedrun,sample` reruns some phases only.

Writes to --out (default $OUT): results.json (every number), results.md (tables), gpu_check.log.
Weights, data and checkpoints go to --work (a temp folder). Results are rewritten after every
phase, so a run cut short still returns what it measured.

Phases, in order, each in its own process with a time cap (past it, it is stopped and says so):
  speedrun  the `speedrun` preset through `Run`: bf16 autocast over fp32 weights, compiled blocks
            and teacher; stage 1 = `small` model, micro-batch 32 at 512 px with LPIPS-VGG,
            DINOv2-B/14-reg and REPA to DINOv3-L/16; stage 2 = 1024 px, micro-batch 16. Per stage
            after warm-up: images/s, step time by part (CUDA events), peak memory, MFU.
  resume    FSDP2 through `accelerate launch` on one process (the CPU: in-process, no FSDP): a run
            with a checkpoint, `--resume latest` from it twice, compared to the uninterrupted run.
  sample    images/s at 512 px, 50 Euler steps, classifier-free and TREAD self-guidance, bf16.
  nbdev     `nbdev-test --flags gpu` on the `#| gpu` notebooks whose weights and packages exist.

Stand-ins (throughput does not depend on weights; nothing is downloaded): DINOv2-B, DINOv3-L and
the LPIPS VGG16 have random weights of the real architectures, read by the real loading code; the
text tower is one random layer of T5Gemma-2B's width (2304) over the recipe's 256 tokens; images
are the procedural shapes at 512 px. The optimizer is the full Muon + Adam step on one process
(on 32 GPUs each rank orthogonalises 1/32 of the matrices); it is reported as its own part.
"""

import argparse, gc, json, math, os, platform, shutil, signal, subprocess, sys, tempfile, time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

PHASES = ('speedrun', 'resume', 'sample', 'nbdev')
SHARES = {
    'speedrun': 0.55,
    'resume': 0.22,
    'sample': 0.10,
    'nbdev': 0.13,
}  # of the time left, among phases to run
DATASHEET_BF16 = 989.4e12  # H100/H200 SXM dense bf16 FLOP/s
GPU_NOTEBOOKS = {
    '02_text': ('minilm',),
    '06_perceptual': ('lpips_weights',),
    '12_launch': ('minilm', 'resvg'),
}
VARIANTS = {  # name: (change, predicted effect); measured effect is filled in by the run
    'baseline': (
        'the speedrun preset as is',
        'reference; timed twice (first and last) for the spread',
    ),
    'no-compile': (
        'compile=False, repa.compile_teacher=False',
        'slower: eager blocks ~137 ms fwd+bwd (RESULTS §5) and eager teacher 30 vs 16 ms',
    ),
    'teacher-fp32': (
        'repa.teacher_bf16=False',
        '+5 ms/step (eager fp32 vs bf16 teacher 35 vs 30 ms, RESULTS §5)',
    ),
    'sdpa-cudnn': (
        'SDPA backend cuDNN only',
        '< 2% of the step: attention is ~4% of the denoiser FLOPs',
    ),
    'sdpa-efficient': ('SDPA backend memory-efficient only', 'as sdpa-cudnn'),
    'lpips-cl-bf16': (
        'LPIPS VGG in channels-last with bf16 weights',
        '-10 to -20 ms/step: LPIPS runs at ~93 TFLOP/s today (41 ms, RESULTS §3)',
    ),
    'dino-bf16': (
        'DINOv2 perceptual net stored in bf16',
        '-1 to -3 ms/step (no per-call weight casts)',
    ),
    'micro-48': ('micro-batch 48 (global 48)', '+3 to +8% images/s; +50% activation memory'),
    'micro-64': ('micro-batch 64 (global 64)', '+5 to +10% images/s; +100% activation memory'),
}
NOT_SWITCHED = [  # candidates without a cheap switch: a row in the table, measured effect empty
    (
        'no host sync in the step',
        'grad-norm float() and per-part .item() logging wait for the GPU every step',
        'up to the measured GPU idle time per step (column "idle" of the speedrun table)',
    ),
    (
        'CUDA graphs / fewer graph breaks',
        'compile mode reduce-overhead, one graph per block pass',
        'launch-bound parts only; see graph breaks in results.json',
    ),
    (
        'fused norms / modulation',
        'one kernel for layer-norm + adaLN shift/scale',
        'inside compile already; small',
    ),
    ('overlapped DDP all-reduce, bf16 grads', '32 GPUs only', 'not measurable on one GPU'),
]


_LOG = []  # the open log file of the main process


def log(*a):
    line = ' '.join([time.strftime('%H:%M:%S')] + [str(x) for x in a])
    print(line, flush=True)
    for f in _LOG:
        f.write(line + '\n')
        f.flush()


# --------------------------------------------------------------------------- sizes and assets
def sizes(smoke: bool) -> dict:
    "Every size the check uses; `smoke` shrinks each to seconds on a CPU."
    if smoke:
        return dict(
            model=('tiny', dict(depth=4, hidden=64, heads=1, bottleneck=16)),
            res=(32, 32),
            micro=(2, 2),
            text_dim=64,
            text_len=16,
            dino='tiny',
            dino_size=56,
            teacher='tiny',
            n_images=16,
            image_px=64,
            steps=((1, 1), (1, 1)),
            resume=dict(depth=None, res=32, micro=2, steps=2, every=1, repeat=False),
            sample=dict(res=32, batch=1, steps=2),
        )
    return dict(
        model=('small', {}),
        res=(512, 1024),
        micro=(32, 16),
        text_dim=2304,
        text_len=256,
        dino='base',
        dino_size=224,
        teacher='vitl16',
        n_images=1000,
        image_px=512,
        steps=((3, 10), (3, 8)),
        resume=dict(
            depth=4, hidden=1024, heads=16, res=256, micro=8, steps=4, every=2, repeat=True
        ),
        sample=dict(res=512, batch=8, steps=50),
    )


def make_assets(work: Path, sz: dict) -> dict:
    "Random-init DINOv2/DINOv3 folders, a random LPIPS VGG, the stand-in text tower and the images."
    import torchvision
    from transformers import AutoModel, BertConfig, BertModel
    from pixeldiff_nb.perceptual import dino_config, _BACKBONES
    from pixeldiff_nb.repa import dinov3_config
    from pixeldiff_nb.text import tiny_tokenizer
    from pixeldiff_nb.shapes import shapes_dataset

    a = {k: str(work / k) for k in ('dino', 'teacher', 'lpips', 'text', 'data')}
    torch.manual_seed(0)
    for key, cfg in (('dino', dino_config(sz['dino'])), ('teacher', dinov3_config(sz['teacher']))):
        if not Path(a[key], 'config.json').exists():
            AutoModel.from_config(cfg).save_pretrained(a[key])
    Path(a['lpips']).mkdir(parents=True, exist_ok=True)
    vgg = torchvision.models.vgg.make_layers(
        torchvision.models.vgg.cfgs['D']
    )  # VGG16's convs, random weights,
    keep = {
        f'{j}.{w}' for j in _BACKBONES['vgg'][2] for w in ('weight', 'bias')
    }  # under the names the loader reads
    from safetensors.torch import save_file

    save_file(
        {f'features.{k}': v.contiguous() for k, v in vgg.state_dict().items() if k in keep},
        str(Path(a['lpips']) / 'lpips_vgg.safetensors'),
    )
    if not Path(a['text'], 'config.json').exists():
        D, L = sz['text_dim'], sz['text_len']
        tok = tiny_tokenizer(model_max_length=L)
        BertModel(
            BertConfig(
                vocab_size=len(tok),
                hidden_size=D,
                num_hidden_layers=1,
                num_attention_heads=max(1, D // 64),
                intermediate_size=D,
                max_position_embeddings=L,
            )
        ).save_pretrained(a['text'])
        tok.save_pretrained(a['text'])
    if not Path(a['data'], 'train.parquet').exists():
        Path(a['data']).mkdir(parents=True, exist_ok=True)
        import datasets  # 96 drawn images, repeated up to n_images rows

        ds = shapes_dataset(min(96, sz['n_images']), sz['image_px'])
        ds = datasets.concatenate_datasets([ds] * math.ceil(sz['n_images'] / len(ds))).select(
            range(sz['n_images'])
        )
        ds.to_parquet(str(Path(a['data']) / 'train.parquet'))
    return a


def speedrun_config(spec: dict, out_dir: str, variant: str = 'baseline'):
    "The `speedrun` preset on the local stand-ins, shortened, with `variant` applied."
    from pixeldiff_nb.config import StageConfig
    from pixeldiff_nb.presets import get_preset
    from pixeldiff_nb.model import model_config

    sz, a = spec['sizes'], spec['assets']
    cfg = get_preset('speedrun')
    cfg.out_dir, cfg.seed = out_dir, 0
    cfg.data.sources, cfg.data.source, cfg.data.streaming = None, a['data'], False
    cfg.data.text_encoder, cfg.data.text_max_length = a['text'], sz['text_len']
    cfg.data.text_cache, cfg.data.num_workers = str(Path(out_dir) / 'text-cache'), (
        0 if spec['smoke'] else 12
    )
    cfg.loss.dino_model, cfg.loss.dino_size = a['dino'], sz['dino_size']
    cfg.repa.teacher = a['teacher']
    if spec['smoke']:
        cfg.model = model_config(sz['model'][0], **sz['model'][1])
        cfg.tread, cfg.repa = cfg.tread.for_depth(cfg.model.depth), cfg.repa.for_depth(
            cfg.model.depth
        )
        cfg.compile, cfg.repa.compile_teacher = (
            spec['compile_backend'],
            spec['compile_backend'] == 'inductor',
        )
    st = cfg.stages
    for k, (res, micro) in enumerate(
        zip(sz['res'], sz['micro'])
    ):  # one GPU's share: global batch = micro-batch
        w, t = sz['steps'][k]
        st[k] = StageConfig(
            st[k].name,
            steps=w + t,
            image_size=res,
            global_batch=micro,
            micro_batch=micro,
            repa_weight=st[k].repa_weight,
            warmup=st[k].warmup,
        )
    cfg.val_every = cfg.sample_every = cfg.ckpt_every = 0
    if variant == 'no-compile':
        cfg.compile, cfg.repa.compile_teacher = False, False
    if variant == 'teacher-fp32':
        cfg.repa.teacher_bf16 = False
    if variant.startswith('micro-'):
        m = int(variant.split('-')[1]) if not spec['smoke'] else 2 * sz['micro'][0]
        st[0].global_batch = st[0].micro_batch = m
    return cfg


# --------------------------------------------------------------------------- timing
class Stamp:
    "A point on the device's queue: a CUDA event, or the host clock on a CPU (synchronous there)."

    def __init__(self, cuda: bool):
        self.cuda = cuda
        if cuda:
            self.ev = torch.cuda.Event(enable_timing=True)
            self.ev.record()
        else:
            self.t = time.perf_counter()

    def ms_to(self, other) -> float:
        return self.ev.elapsed_time(other.ev) if self.cuda else (other.t - self.t) * 1e3


class _Mark(torch.autograd.Function):
    "Identity whose backward calls `fn` when the gradient reaches it: a stamp inside backward."

    @staticmethod
    def forward(ctx, x, fn):
        ctx.fn = fn
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.fn()
        return g, None


class PhaseDeadline(Exception):
    "The phase's time cap was reached."


class PartTimer:
    "Callback stamping each part of every step: forward and backward of the denoiser and each loss."

    order = 100  # after EMA, logging and checkpoints: the whole step is inside

    def __init__(self, cuda: bool, warmup: list, deadline: float, on_stage_end=None):
        self.cuda, self.warmup, self.deadline, self.on_stage_end = (
            cuda,
            warmup,
            deadline,
            on_stage_end,
        )
        self.records, self.stages, self._hooks, self.checks = [], [], [], {}

    def stamp(self, name: str):
        self.cur[name] = Stamp(self.cuda)

    def before_fit(self):
        from pixeldiff_nb.training import unwrap
        from pixeldiff_nb.callbacks import CheckpointCB

        L = self.learn
        L.cbs = [
            c for c in L.cbs if not isinstance(c, CheckpointCB)
        ]  # checkpoints are timed in the resume phase
        self.k, self.n, self.t_stage = L.stage, 0, time.perf_counter()
        m = unwrap(L.model)
        self._hooks = [m.register_forward_pre_hook(self._pre), m.register_forward_hook(self._post)]
        obj = L.objective
        self._saved = (dict(obj.perceptual), obj.repa)
        obj.perceptual = {n: (w, self._timed_loss(n, fn)) for n, (w, fn) in obj.perceptual.items()}
        if obj.repa is not None:
            inner = type(obj.repa).teacher_features.__get__(obj.repa)

            def teacher(x0):
                self.stamp('teacher_start')
                f = inner(x0)
                self.stamp('teacher_end')
                return f

            obj.repa.teacher_features = teacher

    def _timed_loss(self, name, fn):
        def run(x0_hat, x0):
            self.stamp(f'{name}_fwd_start')
            x = _Mark.apply(x0_hat, lambda: self.stamp(f'{name}_bwd_end'))
            out = fn(x, x0)
            self.stamp(f'{name}_fwd_end')
            return _Mark.apply(out, lambda: self.stamp(f'{name}_bwd_start'))

        return run

    def _pre(self, module, args):
        self.host_data = time.perf_counter() - self.t0  # batch fetched, text states on the device
        if self.cuda:
            self.checks['autocast'] = (
                str(torch.get_autocast_dtype('cuda'))
                if torch.is_autocast_enabled('cuda')
                else 'off'
            )
        else:
            self.checks['autocast'] = (
                str(torch.get_autocast_dtype('cpu')) if torch.is_autocast_enabled('cpu') else 'off'
            )
        self.stamp('den_fwd_start')

    def _post(self, module, args, out):
        self.stamp('den_fwd_end')
        mark = lambda: self.stamp(
            'den_bwd_start'
        )  # dL/dx0_hat complete: the losses' backward is done
        if isinstance(out, tuple):
            return (_Mark.apply(out[0], mark),) + tuple(out[1:])
        return _Mark.apply(out, mark)

    def before_step(self):
        self.cur, self.host_data = {}, float('nan')
        if self.cuda and self.n == self.warmup[self.k]:
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()

    def after_loss(self):
        self.stamp('bwd_start')

    def after_backward(self):
        self.stamp('bwd_end')

    def after_step(self):
        self.stamp('step_end')
        self.records.append(
            dict(
                stage=self.k,
                i=self.n,
                host_ms=(time.perf_counter() - self.t0) * 1e3,
                data_ms=self.host_data * 1e3,
                stamps=self.cur,
            )
        )
        self.n += 1
        if time.monotonic() > self.deadline:
            raise PhaseDeadline(f'time cap reached at step {self.learn.step}')

    def after_fit(self):
        for h in self._hooks:
            h.remove()
        obj = self.learn.objective
        obj.perceptual, repa = self._saved
        if repa is not None:
            repa.__dict__.pop('teacher_features', None)
        self.stages.append(self.summary(self.k))
        if self.on_stage_end:
            self.on_stage_end(self)

    def summary(self, k: int) -> dict:
        "Medians of every part over the timed steps of stage k (after its warm-up)."
        if self.cuda:
            torch.cuda.synchronize()
        recs = [r for r in self.records if r['stage'] == k and r['i'] >= self.warmup[k]]
        L = self.learn
        out = dict(
            stage=k,
            warmup_steps=self.warmup[k],
            timed_steps=len(recs),
            first_steps_s=[round(r['host_ms'] / 1e3, 2) for r in self.records if r['stage'] == k][
                : self.warmup[k]
            ],
        )
        if not recs:
            return out
        parts = [_parts(r) for r in recs]
        med = lambda xs: sorted(xs)[len(xs) // 2]
        out['parts_ms'] = {p: med([x[p] for x in parts]) for p in parts[0]}
        host = [r['host_ms'] for r in recs]
        out.update(
            step_ms_median=med(host),
            step_ms_mean=sum(host) / len(host),
            step_ms_min=min(host),
            step_ms_max=max(host),
            losses={n: v.item() for n, v in L.parts.items()},
            loss=L.loss.item(),
        )
        if self.cuda:
            out['peak_mem_gib'] = torch.cuda.max_memory_allocated() / 2**30
            out['peak_reserved_gib'] = torch.cuda.max_memory_reserved() / 2**30
        return out


def _parts(r: dict) -> dict:
    "Milliseconds per part of one step from its stamps."
    s = r['stamps']
    d = lambda a, b: s[a].ms_to(s[b]) if a in s and b in s else 0.0
    p = {
        'data_host': r['data_ms'],
        'denoiser_fwd': d('den_fwd_start', 'den_fwd_end'),
        'lpips_fwd': d('lpips_fwd_start', 'lpips_fwd_end'),
        'dino_fwd': d('dino_fwd_start', 'dino_fwd_end'),
        'repa_teacher': d('teacher_start', 'teacher_end'),
        'lpips_bwd': d('lpips_bwd_start', 'lpips_bwd_end'),
        'dino_bwd': d('dino_bwd_start', 'dino_bwd_end'),
        'denoiser_bwd': d('den_bwd_start', 'bwd_end'),
        'optimizer': d('bwd_end', 'step_end'),
    }
    fwd_all = d('den_fwd_start', 'bwd_start')
    p['other_losses'] = max(
        0.0,
        fwd_all
        - p['denoiser_fwd']
        - p['lpips_fwd']
        - p['dino_fwd']
        - p['repa_teacher']
        + d('bwd_start', 'den_bwd_start')
        - p['lpips_bwd']
        - p['dino_bwd'],
    )
    p['device_step'] = d('den_fwd_start', 'step_end')
    p['idle'] = max(0.0, r['host_ms'] - p['device_step'])
    return p


def flops_per_image(cfg, k: int, sz: dict) -> dict:
    "Training FLOPs per image of stage k by part, counted on the meta device for the sizes run."
    import warnings
    from pixeldiff_nb.tread import tread_flops
    from pixeldiff_nb.perceptual import LPIPSLoss, DinoPerceptualLoss, dino_config, perceptual_flops
    from pixeldiff_nb.repa import dinov3_config
    from pixeldiff_nb.repa_probe import teacher_flops
    from pixeldiff_nb.config import stage_terms

    s = cfg.stages[k].image_size
    rate = stage_terms(cfg, k)['tread']
    den = tread_flops(cfg.model, s, s, sz['text_len'], rate, cfg.tread.start, cfg.tread.end)
    out = {
        'denoiser': den['routed'] if rate else den['dense'],
        'repa_teacher': 0.0,
        'lpips': 0.0,
        'dino': 0.0,
    }
    with torch.device('meta'), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        lw, dw = stage_terms(cfg, k)['lpips'], stage_terms(cfg, k)['dino']
        if lw:
            out['lpips'] = perceptual_flops(
                LPIPSLoss('vgg', cfg.loss.lpips_resize, pretrained=False).to('meta'), s
            )['total']
        if dw:
            out['dino'] = perceptual_flops(
                DinoPerceptualLoss(dino_config(sz['dino']), cfg.loss.dino_size).to('meta'), s
            )['total']
    if stage_terms(cfg, k)['repa']:
        out['repa_teacher'] = teacher_flops(dinov3_config(sz['teacher']), s, s, cfg.model.patch)
    return out


def matmul_ceiling() -> float:
    "Measured bf16 FLOP/s of an 8192³ product on random data (3 warm-ups, median of 10)."
    a, b = (torch.randn(8192, 8192, device='cuda', dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    ts = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    return 2 * 8192**3 / sorted(ts)[5]


# --------------------------------------------------------------------------- phases
def phase_speedrun(spec: dict, res: dict, write):
    "Stage 1 (512 px) and stage 2 (1024 px) of the speedrun preset through Run, timed by part."
    from pixeldiff_nb.runs import Run

    variant = spec.get('variant', 'baseline')
    cuda = torch.cuda.is_available() and not spec['smoke']
    if cuda:
        res['matmul_tflops'] = matmul_ceiling() / 1e12
    work = Path(spec['work']) / f'speedrun-{variant}'
    shutil.rmtree(work, ignore_errors=True)
    cfg = speedrun_config(spec, str(work), variant)
    if spec.get('only_stage0'):
        cfg.stages = cfg.stages[:1]
    t0 = time.perf_counter()
    run = Run(cfg, progress=False)
    res['build_s'] = time.perf_counter() - t0
    res['autocast_precision'], res['compile'] = run.acc.mixed_precision, cfg.compile
    _apply_runtime_variant(run, variant)
    warm = [s.steps - t for s, (_, t) in zip(cfg.stages, spec['sizes']['steps'])]
    peak = DATASHEET_BF16 if cuda else None

    def stage_done(timer):
        st = timer.stages[-1]
        stage = cfg.stages[st['stage']]
        st.update(
            name=stage.name,
            res=stage.image_size,
            micro_batch=stage.micro_batch,
            seconds=time.perf_counter() - timer.t_stage,
        )
        st['flops_per_image'] = f = flops_per_image(cfg, st['stage'], spec['sizes'])
        st['checks'] = dict(timer.checks)
        if 'step_ms_mean' in st:
            B, p = stage.micro_batch, st['parts_ms']
            st['images_per_s'] = B / (st['step_ms_mean'] / 1e3)
            st['images_per_s_without_optimizer'] = B / (
                (st['step_ms_median'] - p['optimizer']) / 1e3
            )
            st['tokens_per_s'] = st['images_per_s'] * (stage.image_size // cfg.model.patch) ** 2
            if res.get('matmul_tflops'):  # against the measured bf16 matmul ceiling too
                st['mfu_step_vs_matmul'] = (
                    sum(f.values()) * st['images_per_s'] / (res['matmul_tflops'] * 1e12)
                )
            if peak:
                st['mfu_denoiser'] = f['denoiser'] * st['images_per_s'] / peak
                st['mfu_step'] = sum(f.values()) * st['images_per_s'] / peak
                st['mfu_denoiser_own_time'] = (
                    f['denoiser'] * B / ((p['denoiser_fwd'] + p['denoiser_bwd']) / 1e3) / peak
                )
        res.setdefault('stages', []).append(st)
        write()

    timer = PartTimer(cuda, warm, spec['deadline'], stage_done)
    try:
        with _sdpa_context(variant):
            run.fit(extra_cbs=[timer])
    finally:
        from torch._dynamo.utils import counters

        res['dynamo'] = dict(
            unique_graphs=int(counters['stats']['unique_graphs']),
            graph_breaks=int(sum(counters['graph_break'].values())),
            break_reasons=sorted(counters['graph_break'])[:8],
        )


def _apply_runtime_variant(run, variant: str):
    "Variants that change a built module rather than the config."
    if variant not in ('lpips-cl-bf16', 'dino-bf16'):
        return
    for k in range(len(run.cfg.stages)):
        run.objective(k)  # builds the loss networks once (cached by the Run)
    if variant == 'lpips-cl-bf16' and 'lpips' in run._perceptual:
        run._perceptual['lpips'].net.to(memory_format=torch.channels_last, dtype=torch.bfloat16)
    if variant == 'dino-bf16' and 'dino' in run._perceptual:
        run._perceptual['dino'].net.to(torch.bfloat16)


def _sdpa_context(variant: str):
    from contextlib import nullcontext

    if not variant.startswith('sdpa-'):
        return nullcontext()
    from torch.nn.attention import sdpa_kernel, SDPBackend

    return sdpa_kernel(
        [
            {
                'sdpa-cudnn': SDPBackend.CUDNN_ATTENTION,
                'sdpa-efficient': SDPBackend.EFFICIENT_ATTENTION,
            }[variant]
        ]
    )


def phase_resume(spec: dict, res: dict, write):
    "Run A uninterrupted; B and C resume from A's middle checkpoint; final weights must match A's."
    from safetensors.torch import load_file
    from pixeldiff_nb.runs import Run
    from pixeldiff_nb.checkpoints import list_checkpoints

    r = spec['sizes']['resume']
    root = Path(spec['work']) / 'resume'
    shutil.rmtree(root, ignore_errors=True)

    def config(name):
        cfg = speedrun_config(spec, str(root / name))
        cfg.compile = cfg.repa.compile_teacher = False  # checkpoint/resume exactness, not speed
        if r['depth']:  # a narrower model: checkpoints of ~1 GB, not 14
            cfg.model.depth, cfg.model.hidden, cfg.model.heads = r['depth'], r['hidden'], r['heads']
            cfg.tread, cfg.repa = cfg.tread.for_depth(r['depth']), cfg.repa.for_depth(r['depth'])
        st = cfg.stages[0]
        st.steps, st.image_size, st.global_batch, st.micro_batch = (
            r['steps'],
            r['res'],
            r['micro'],
            r['micro'],
        )
        cfg.stages, cfg.ckpt_every, cfg.keep_last, cfg.warmup = [st], r['every'], 3, 2
        return cfg

    def fit(name, resume=None):
        run = Run(config(name), resume=resume, progress=False)
        saves, inner = [], run.save

        def save(learn):
            t = time.perf_counter()
            inner(learn)
            saves.append(time.perf_counter() - t)

        run.save = save
        t = time.perf_counter()
        run.fit()
        out = dict(
            seconds=time.perf_counter() - t,
            save_s=saves,
            distributed=str(run.acc.distributed_type),
            sharded=run.sharded,
            processes=run.acc.num_processes,
            steps=run.step,
        )
        if torch.cuda.is_available():
            out['peak_mem_gib'] = torch.cuda.max_memory_allocated() / 2**30
        del run
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return out

    res['A'] = fit('A')
    gc.collect()
    write()
    mid = next(p for p in list_checkpoints(root / 'A') if p.name.endswith(f"{r['every']:08d}"))
    for name in (
        ('B', 'C') if r['repeat'] else ('B',)
    ):  # C: the noise floor of nondeterministic GPU kernels
        if name == 'C' and time.monotonic() + res['B']['seconds'] + 20 > spec['deadline']:
            break
        (root / name / 'checkpoints').mkdir(parents=True)
        shutil.copytree(mid, root / name / 'checkpoints' / mid.name)
        res[name] = fit(name, resume='latest')
        gc.collect()
        write()
    final = lambda n: list_checkpoints(root / n)[-1]

    def diff(a, b):
        worst = 0.0
        for f in ('model.safetensors', 'ema.safetensors', 'extra.safetensors'):
            if not (final(a) / f).exists():
                continue
            x, y = load_file(str(final(a) / f)), load_file(str(final(b) / f))
            worst = max([worst] + [(x[k].float() - y[k].float()).abs().max().item() for k in x])
        return worst

    res['final_step'] = int(final('A').name.split('-')[1])
    res['max_abs_diff_resume'] = diff('A', 'B')  # resumed vs uninterrupted
    res['max_abs_diff_repeat'] = (
        diff('B', 'C') if 'C' in res else None
    )  # the same steps twice: kernel noise
    res['tolerance'] = (
        'bit-exact (0) on the CPU; on a GPU resumed-vs-uninterrupted must not exceed 2x the '
        'difference between two identical resumed runs (nondeterministic kernels) plus 1e-6'
    )
    d, noise = res['max_abs_diff_resume'], res['max_abs_diff_repeat']
    res['passed'] = (
        d == 0.0
        if spec['smoke']
        else d <= 2 * noise + 1e-6 if noise is not None else d == 0.0 or None
    )


def phase_sample(spec: dict, res: dict, write):
    "Images/s of Euler sampling, classifier-free and TREAD self-guidance, bf16 autocast."
    from pixeldiff_nb.model import PRXDenoiser, model_config
    from pixeldiff_nb.text import TextEncoder
    from pixeldiff_nb.tread import TreadConfig, tread_flops
    from pixeldiff_nb.callbacks import generate

    sz, s = spec['sizes'], spec['sizes']['sample']
    cuda = torch.cuda.is_available() and not spec['smoke']
    dev = torch.device('cuda' if cuda else 'cpu')
    enc = TextEncoder(spec['assets']['text'], max_length=sz['text_len'], device=dev)
    mcfg = model_config(sz['model'][0], **{**sz['model'][1], 'text_dim': enc.dim})
    torch.manual_seed(0)
    net = PRXDenoiser(mcfg)
    with torch.no_grad():  # zero-initialised layers get small values: no products of zeros
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    net = net.to(dev).eval()
    tread = TreadConfig(rate=0.5).for_depth(mcfg.depth)
    prompts = [
        f'{n} red circles on a white background' for n in ('one', 'two', 'three', 'four') * 4
    ][: s['batch']]
    fl = tread_flops(mcfg, s['res'], s['res'], sz['text_len'], tread.rate, tread.start, tread.end)
    fwd, routed = fl['dense'] / 3, fl['routed'] / 3  # one forward pass per image
    res['rows'] = []
    for mode, compiled in (('cfg', False), ('self', False)) + (
        (('cfg', True),) if not spec['smoke'] else ()
    ):
        if time.monotonic() > spec['deadline'] - 10:
            res['rows'].append(dict(mode=mode, compiled=compiled, skipped='time'))
            continue
        if compiled:
            for b in net.blocks:
                b.compile()
        run = lambda steps: generate(
            net, enc, prompts, (s['res'], s['res']), steps, 3.5, mode, 0, 3.0, tread
        )
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            t = time.perf_counter()
            run(min(2, s['steps']))
            if cuda:
                torch.cuda.synchronize()
            warm = time.perf_counter() - t
            t = time.perf_counter()
            imgs = run(s['steps'])
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t
        passes = (
            2 * fwd if mode == 'cfg' else fwd + routed
        )  # cfg: cond + uncond; self: dense + routed pass
        row = dict(
            mode=mode,
            compiled=compiled,
            res=s['res'],
            batch=len(prompts),
            steps=s['steps'],
            seconds=dt,
            warmup_s=warm,
            images_per_s=len(prompts) / dt,
            finite=bool(torch.isfinite(imgs).all()),
        )
        if cuda:
            row['mfu'] = passes * s['steps'] * len(prompts) / dt / DATASHEET_BF16
        res['rows'].append(row)
        write()


def notebook_needs() -> dict:
    "Which needs of the `#| gpu` notebooks this machine meets (nothing can be downloaded)."
    import importlib.util

    have = {}
    try:
        from pixeldiff_nb.text import minilm_dir

        minilm_dir()
        have['minilm'] = True
    except Exception:
        have['minilm'] = False
    saved = os.environ.pop('PIXELDIFF_LPIPS_DIR', None)  # the check's random weights don't count
    try:
        from pixeldiff_nb.perceptual import lpips_backbone_weights

        lpips_backbone_weights('vgg', download=False)
        have['lpips_weights'] = True
    except Exception:
        have['lpips_weights'] = False
    finally:
        if saved is not None:
            os.environ['PIXELDIFF_LPIPS_DIR'] = saved
    have['resvg'] = importlib.util.find_spec('resvg_py') is not None
    have['nbdev'] = shutil.which('nbdev-test') is not None
    return have


def phase_nbdev(spec: dict, res: dict, write):
    "nbdev-test --flags gpu on each notebook whose needs are met, while time remains."
    have = res['have'] = notebook_needs()
    res['notebooks'] = {}
    env = {k: v for k, v in os.environ.items() if k != 'PIXELDIFF_LPIPS_DIR'}
    for nb, needs in GPU_NOTEBOOKS.items():
        missing = [n for n in needs + ('nbdev',) if not have[n]]
        left = spec['deadline'] - time.monotonic()
        if spec['smoke']:
            res['notebooks'][nb] = dict(status='not run (no GPU)', missing=missing)
            continue
        if missing or left < 60:
            res['notebooks'][nb] = dict(status='not run', missing=missing, seconds_left=left)
            continue
        t, out = time.perf_counter(), Path(spec['work']) / f'nbdev-{nb}.log'
        with open(out, 'w') as f:
            rc = _run_group(['nbdev-test', '--flags', 'gpu', '--path', f'nbs/{nb}.ipynb'], left - 5,
                            cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        status = {0: 'passed', None: 'stopped at the time cap'}.get(rc, 'failed')
        res['notebooks'][nb] = dict(status=status, seconds=time.perf_counter() - t,
                                    tail=out.read_text()[-1500:])
        write()


PHASE_FNS = {
    'speedrun': phase_speedrun,
    'resume': phase_resume,
    'sample': phase_sample,
    'nbdev': phase_nbdev,
}


def run_phase(name: str, spec: dict) -> dict:
    "Run one phase here; its results, partial ones too, go to the phase file as they come."
    res = dict(status='running')
    path = Path(spec['work']) / spec.get('phase_file', f'phase-{name}.json')
    write = lambda: path.write_text(json.dumps(res, indent=1, default=str))
    t, c = time.perf_counter(), time.process_time()
    if spec['smoke']:  # in-process phases: each compiles afresh, counts afresh
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
    try:
        PHASE_FNS[name](spec, res, write)
        res['status'] = 'ok'
    except PhaseDeadline as e:
        res.update(status='time cap', error=str(e))
    except Exception as e:
        res.update(
            status='error',
            error=f'{type(e).__name__}: {e}',
            traceback=traceback.format_exc()[-3000:],
        )
        log(f'{name}: {res["error"]}')
    res['seconds'], res['cpu_s'] = time.perf_counter() - t, time.process_time() - c
    write()
    return res


# --------------------------------------------------------------------------- orchestration
def _run_group(cmd: list, timeout: float, **kw) -> int | None:
    "Run `cmd` in its own process group; past `timeout`, kill the group (launchers fork workers)."
    proc = subprocess.Popen(cmd, start_new_session=True, **kw)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def _child(name: str, spec: dict, cap: float, logf) -> dict:
    "Run a phase in a fresh process (FSDP2 resume: under accelerate launch), killed past its cap."
    spec = dict(spec, deadline_in=cap - 15)
    sp = Path(spec['work']) / f'spec-{spec.get("phase_file", name + ".json")}'
    sp.write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(__file__).resolve()), '--phase', name, '--spec', str(sp)]
    if name == 'resume' and torch.cuda.is_available():
        from pixeldiff_nb.launch import accelerate_config, write_yaml, _free_port

        y = write_yaml(
            accelerate_config(1, 1, fsdp=True, main_process_port=_free_port()),
            Path(spec['work']) / 'fsdp2.yaml',
        )
        cmd = [
            sys.executable,
            '-m',
            'accelerate.commands.launch',
            '--config_file',
            str(y),
            '--num_processes',
            '1',
            '--num_machines',
            '1',
            '--mixed_precision',
            'bf16',
            '--dynamo_backend',
            'no',
        ] + cmd[1:]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get('PYTHONPATH')] if p]),
    )
    pf = Path(spec['work']) / spec.get('phase_file', f'phase-{name}.json')
    pf.unlink(missing_ok=True)
    _run_group(cmd, cap, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT)
    res = json.loads(pf.read_text()) if pf.exists() else {}
    if res.get('status') in (None, 'running'):
        res['status'] = f'killed at its cap ({cap:.0f} s)'
    return res


def machine_info(smoke: bool) -> dict:
    import transformers, accelerate

    info = dict(
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        accelerate=accelerate.__version__,
        cpu=platform.processor() or platform.machine(),
        cores=os.cpu_count(),
        smoke=smoke,
        date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
        command=' '.join(sys.argv),
    )
    try:
        info['commit'] = subprocess.run(
            ['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        pass
    if torch.cuda.is_available() and not smoke:
        info.update(
            gpu=torch.cuda.get_device_name(),
            gpu_mem_gib=torch.cuda.get_device_properties(0).total_memory / 2**30,
        )
    return info


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument(
        '--out', default=None, help='results folder (default: $OUT, else ./gpu_check_out)'
    )
    p.add_argument(
        '--work',
        default=None,
        help='folder for weights, data and checkpoints (default: a temp folder)',
    )
    p.add_argument(
        '--cpu-smoke', action='store_true', help='the same code at tiny sizes on the CPU (CI)'
    )
    p.add_argument(
        '--budget', type=float, default=None, help='seconds for everything (default 450; smoke 300)'
    )
    p.add_argument('--phases', default=','.join(PHASES), help=f'comma list of {PHASES}')
    p.add_argument(
        '--variants',
        default=None,
        help=f"'all' or a comma list of {list(VARIANTS)}: time them at 512 px",
    )
    p.add_argument(
        '--compile-backend',
        default='aot_eager',
        help="smoke only: torch.compile backend (inductor: minutes)",
    )
    p.add_argument(
        '--in-process', action='store_true', help='run phases in this process (default on the CPU)'
    )
    p.add_argument(
        '--isolate', action='store_true', help='run phases in child processes (default on a GPU)'
    )
    p.add_argument('--phase', default=None, help=argparse.SUPPRESS)
    p.add_argument('--spec', default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.phase:  # a child process: one phase from a spec file
        spec = json.loads(Path(a.spec).read_text())
        spec['deadline'] = time.monotonic() + spec.pop('deadline_in')
        if spec['smoke']:
            torch.set_num_threads(1)
        return run_phase(a.phase, spec)
    smoke = a.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        sys.exit('No GPU found: run with --cpu-smoke for the CPU path.')
    phases = [x for x in a.phases.split(',') if x]
    bad = [x for x in phases if x not in PHASES]
    if bad:
        sys.exit(f'Unknown phase(s) {bad}: choose from {PHASES}.')
    variants = None
    if a.variants:
        variants = (
            list(VARIANTS)
            if a.variants == 'all'
            else ['baseline'] + [v for v in a.variants.split(',') if v != 'baseline']
        )
        bad = [v for v in variants if v not in VARIANTS]
        if bad:
            sys.exit(f'Unknown variant(s) {bad}: choose from {list(VARIANTS)}.')
    out = Path(a.out or os.environ.get('OUT') or 'gpu_check_out')
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work or tempfile.mkdtemp(prefix='gpu_check-'))
    work.mkdir(parents=True, exist_ok=True)
    budget = a.budget or (300 if smoke else 450)
    t_end = time.monotonic() + budget
    results = dict(info=machine_info(smoke), phases={}, variants=[])
    results['info'].update(budget_s=budget, work=str(work))
    logf = open(out / 'gpu_check.log', 'a')
    _LOG.append(logf)

    def save():
        (out / 'results.json').write_text(json.dumps(results, indent=1, default=str))
        (out / 'results.md').write_text(markdown(results))

    sz = sizes(smoke)
    t, c = time.perf_counter(), time.process_time()
    log('assets ->', work)
    assets = make_assets(work, sz)
    old_lpips = os.environ.get('PIXELDIFF_LPIPS_DIR')
    os.environ['PIXELDIFF_LPIPS_DIR'] = assets['lpips']  # the random VGG16 (children inherit it)
    results['info']['setup_s'], results['info']['setup_cpu_s'] = (
        time.perf_counter() - t,
        time.process_time() - c,
    )
    save()
    try:
        return _run_jobs(
            a, results, spec_of(smoke, work, assets, sz, a), phases, variants, t_end, logf, save
        )
    finally:  # leave the environment as found (tests run in-process)
        if old_lpips is None:
            os.environ.pop('PIXELDIFF_LPIPS_DIR', None)
        else:
            os.environ['PIXELDIFF_LPIPS_DIR'] = old_lpips
        _LOG.remove(logf)
        logf.close()


def spec_of(smoke, work, assets, sz, a) -> dict:
    return dict(
        smoke=smoke, work=str(work), assets=assets, sizes=sz, compile_backend=a.compile_backend
    )


def _run_jobs(a, results, spec, phases, variants, t_end, logf, save) -> dict:
    "Each phase (or variant) in turn, with a cap from the time left; results saved after each."
    smoke, in_process = spec['smoke'], a.in_process or (spec['smoke'] and not a.isolate)
    if variants:
        jobs = [('speedrun', v) for v in variants] + [('speedrun', 'baseline')]
    else:
        jobs = [(ph, 'baseline') for ph in phases]
    for j, (name, variant) in enumerate(jobs):
        left, rest = t_end - time.monotonic(), jobs[j:]
        cap = (
            left / len(rest) if variants else left * SHARES[name] / sum(SHARES[n] for n, _ in rest)
        )
        key = f'{name}:{variant}:{j}' if variants else name
        if cap < (5 if smoke else 30):
            results['phases'][key] = dict(status=f'skipped: {cap:.0f} s left')
            save()
            continue
        log(f'{key}: cap {cap:.0f} s')
        s = dict(
            spec,
            variant=variant,
            phase_file=f'phase-{name}-{variant}-{j}.json',
            only_stage0=bool(variants),
        )
        if in_process:
            s['deadline'] = time.monotonic() + cap
            r = run_phase(name, s)
        else:
            r = _child(name, s, cap, logf)
        results['phases'][key] = r
        log(f'{key}: {r.get("status")} in {r.get("seconds", float("nan")):.0f} s')
        if variants:
            results['variants'] = variant_rows(results)
        save()
    if not variants:
        results['variants'] = variant_rows(results)
    save()
    print(markdown(results))
    return results


# --------------------------------------------------------------------------- report
def variant_rows(results: dict) -> list:
    "Change, predicted and measured effect of each variant against the mean of the baseline runs."
    runs = {}
    for key, r in results['phases'].items():
        if not key.startswith('speedrun:') or not r.get('stages'):
            continue
        st = r['stages'][0]
        if 'step_ms_mean' in st:
            runs.setdefault(key.split(':')[1], []).append(st)
    base = runs.get('baseline', [])
    b_ms = sum(s['step_ms_mean'] for s in base) / len(base) if base else None
    rows = []
    for name, (change, pred) in VARIANTS.items():
        got = runs.get(name)
        m = ''
        if got and b_ms:
            ms = sum(s['step_ms_mean'] for s in got) / len(got)
            ips = got[-1]['images_per_s']
            m = f"{ms:.1f} ms/step ({(ms / b_ms - 1) * 100:+.1f}%), {ips:.1f} images/s"
            if name == 'baseline' and len(got) > 1:
                spread = abs(got[0]['step_ms_mean'] - got[-1]['step_ms_mean'])
                m += f"; spread {spread:.1f} ms"
        rows.append(dict(name=name, change=change, predicted=pred, measured=m))
    rows += [dict(name=n, change=c, predicted=p, measured='') for n, c, p in NOT_SWITCHED]
    return rows


def markdown(results: dict) -> str:
    "The results as markdown tables."
    i = results['info']
    dev = i.get('gpu', f"CPU ({i['cpu']}, {i['cores']} cores)")
    L = [
        f"# gpu_check.py — {'CPU smoke (not performance)' if i['smoke'] else dev}",
        '',
        f"{i['date']}, commit {i.get('commit', '?')}, torch {i['torch']}, "
        f"transformers {i['transformers']}, accelerate {i['accelerate']}, Python {i['python']}; "
        f"budget {i['budget_s']:.0f} s; `{i['command']}`",
        '',
    ]
    ph = results['phases']
    g3 = lambda x: '-' if x is None else f'{x:.3g}'
    sr = [(k, r) for k, r in ph.items() if k.startswith('speedrun') and r.get('stages')]
    if sr:
        L += [
            '| run | stage | px | micro | images/s | step ms (median) | data+host | den fwd '
            '| den bwd | LPIPS f/b | DINO f/b | teacher | other | optim | idle | peak GiB '
            '| MFU den | MFU step |',
            '|' + '---|' * 18,
        ]
        f1 = lambda x: '-' if x is None else f'{x:.1f}'
        pc = lambda x: '-' if x is None else f'{100 * x:.1f}%'
        for k, r in sr:
            for st in r['stages']:
                if 'parts_ms' not in st:
                    continue
                p = st['parts_ms']
                cells = [k, st.get('name'), st.get('res'), st.get('micro_batch')]
                cells += [f1(st['images_per_s']), f1(st['step_ms_median'])]
                cells += [f1(p[x]) for x in ('data_host', 'denoiser_fwd', 'denoiser_bwd')]
                cells += [f"{p[x + '_fwd']:.1f}/{p[x + '_bwd']:.1f}" for x in ('lpips', 'dino')]
                cells += [f1(p[x]) for x in ('repa_teacher', 'other_losses', 'optimizer', 'idle')]
                cells += [f1(st.get('peak_mem_gib'))]
                cells += [pc(st.get('mfu_denoiser')), pc(st.get('mfu_step'))]
                L.append('| ' + ' | '.join(str(c) for c in cells) + ' |')
        L.append('')
    for k, r in ph.items():
        extra = ''
        if k == 'resume' and 'passed' in r:
            A = r['A']
            saves = ', '.join(f'{x:.1f}' for x in A.get('save_s', []))
            d_ab, d_bc = g3(r['max_abs_diff_resume']), g3(r['max_abs_diff_repeat'])
            extra = (f"passed={r['passed']}: max |A−B| {d_ab} (resumed vs uninterrupted), "
                     f"max |B−C| {d_bc} (two resumes), {A.get('distributed')}, "
                     f"sharded={A.get('sharded')}, checkpoint save {saves} s")
        if k == 'sample':
            extra = '; '.join(
                f"{x['mode']}{' compiled' if x.get('compiled') else ''}: "
                + (
                    f"{x['images_per_s']:.2f} images/s"
                    if 'images_per_s' in x
                    else x.get('skipped', '')
                )
                for x in r.get('rows', [])
            )
        if k == 'nbdev':
            extra = '; '.join(
                f"{nb}: {v['status']}" + (f" (missing {v['missing']})" if v.get('missing') else '')
                for nb, v in r.get('notebooks', {}).items()
            )
        if k.startswith('speedrun') and r.get('dynamo'):
            extra = f"graphs {r['dynamo']['unique_graphs']}, breaks {r['dynamo']['graph_breaks']}"
        L.append(
            f"- **{k}**: {r.get('status')} ({r.get('seconds', 0):.0f} s)"
            + (f': {extra}' if extra else '')
            + (f" — {r['error']}" if r.get('error') else '')
        )
    if results.get('variants'):
        L += ['', '| variant | change | predicted effect | measured effect |', '|---|---|---|---|']
        L += [
            f"| {v['name']} | {v['change']} | {v['predicted']} | {v['measured']} |"
            for v in results['variants']
        ]
    return '\n'.join(L) + '\n'


if __name__ == '__main__':
    main()
