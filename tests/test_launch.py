"""Launch: the presets, the checks that stop a bad launch before any process starts, the launch files, multi-stage
training, trackers, and exact resume after SIGKILL on one and two CPU processes (and of the FSDP2 state path)."""
import json, os, signal, subprocess, sys, textwrap, time

import pytest
import torch
from safetensors.torch import load_file

from pixeldiff_nb.launch import launch_cli, launch, launch_command, write_launch_files, smoke_overrides
from pixeldiff_nb.plan import image_flops
from pixeldiff_nb.config import validate_run, stage_terms
from pixeldiff_nb.presets import get_preset
from pixeldiff_nb.runs import Run
from pixeldiff_nb.checkpoints import list_checkpoints
from pixeldiff_nb.training import Callback, unwrap
from pixeldiff_nb.model import count_params

ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}   # same threads in every run: bit-equal results


def test_speedrun_preset_holds_the_recipe():
    cfg = get_preset('speedrun')
    assert abs(count_params(cfg.model) / 1e9 - 1.177) < 1e-3
    assert [(s.steps, s.image_size, s.global_batch, s.micro_batch, stage_terms(cfg, k)['repa'])
            for k, s in enumerate(cfg.stages)] == [(100_000, 512, 1024, 32, 0.5), (20_000, 1024, 512, 16, 0)]
    assert (cfg.loss.lpips_weight, cfg.loss.dino_weight, cfg.tread.rate, cfg.repa.layer, cfg.repa.weight) == (0.1, 0.01, 0.5, 7, 0.5)
    assert (cfg.optim.kind, cfg.optim.lr, cfg.warmup, cfg.grad_clip, cfg.ema_decay, cfg.ema_every) == ('muon', 1e-4, 1000, 0.2, 0.999, 10)
    assert [s['source'] for s in cfg.data.sources] == ['lehduong/flux_generated', 'LucasFang/FLUX-Reason-6M', 'brivangl/midjourney-v6-llava']
    assert (cfg.data.text_encoder, cfg.data.text_max_length, cfg.data.text_dtype) == ('t5gemma-2b', 256, 'bf16')
    validate_run(cfg, 32)
    gpu = get_preset('gpu')                                   # same structure at one-GPU size
    assert [stage_terms(gpu, k)['repa'] for k in range(2)] == [0.5, 0] and gpu.stages[1].image_size == 2 * gpu.stages[0].image_size
    assert validate_run(gpu, 1).repa.layer < gpu.model.depth


def test_plan_counts_the_denoiser_with_tread():
    from pixeldiff_nb.tread import tread_flops
    cfg = get_preset('gpu', ['loss.lpips_weight=0'])
    f = image_flops(cfg, 1)                                    # stage 2: no REPA teacher, no perceptual term
    t = tread_flops(cfg.model, 512, 512, 32, 0.5, 2, 9)
    assert f['denoiser'] == t['routed'] < t['dense']
    assert f['repa teacher'] == f['lpips'] == 0 and f['text encoder'] == 2 * 22.7e6 * 32


@pytest.mark.parametrize('argv,msg', [
    (['--preset', 'speedrn'], "Unknown preset 'speedrn' (did you mean 'speedrun'?)"),
    (['--preset', 'speedrun', '--num-processes', '24'], 'stages.0.global_batch=1024 is not divisible by 24 processes x micro-batch 32'),
    (['--preset', 'speedrun', '--num-processes', '32', 'repa.layer=16'], 'repa.layer=16 is beyond the model'),
    (['--preset', 'cpu', 'data.source=/no/such/folder'], 'data source /no/such/folder does not exist'),
])
def test_inconsistent_launch_fails_before_any_process(argv, msg, capsys, monkeypatch):
    def no_process(*a, **k): raise AssertionError('a process was started')
    monkeypatch.setattr(subprocess, 'run', no_process); monkeypatch.setattr(subprocess, 'Popen', no_process)
    assert launch_cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith('pixeldiff-launch: error:') and msg in err and len(err.strip().splitlines()) == 1


def test_launch_files(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file
    files = write_launch_files(tmp_path/'launch')
    ddp, fsdp = (load_config_from_file(str(files[k])) for k in ('ddp', 'fsdp2'))
    assert (ddp.distributed_type, ddp.num_processes, ddp.num_machines) == ('MULTI_GPU', 32, 4)
    assert fsdp.distributed_type == 'FSDP' and fsdp.fsdp_config['fsdp_version'] == 2
    assert json.loads(files['config'].read_text())['stages'][0]['global_batch'] == 1024
    slurm = files['slurm'].read_text()
    assert '#SBATCH --ntasks-per-node=1' in slurm and r'--machine_rank \$SLURM_NODEID' in slurm
    assert slurm.index('pixeldiff-launch --check') < slurm.index('srun bash -c')
    cmd = launch_command('speedrun', num_processes=32, num_machines=4)
    assert cmd[:2] == ['accelerate', 'launch'] and cmd[cmd.index('-m') + 1] == 'pixeldiff_nb.launch'


class Record(Callback):
    "What each stage starts and ends with, and what its batches and losses look like."
    order = 60
    def __init__(self): self.rows = []
    def _state(self):
        L = self.learn
        net = unwrap(L.model).net
        adam = next(st['step'] for g in L.opt.param_groups if not g['use_muon'] for p in g['params'] if (st := L.opt.state.get(p)))
        return dict(step=L.step, w=torch.cat([p.detach().flatten() for p in net.parameters()]).clone(),
                    ema=torch.cat([v.flatten() for v in self.ema.shadow.values()]).clone(), adam_step=float(adam) if adam is not None else 0.0)
    def before_fit(self): self.rows.append(('start', self.learn.stage, self._state() if self.learn.step else None))
    def after_loss(self): self.rows.append(('batch', self.learn.stage, (tuple(self.learn.batch['pixels'].shape), sorted(self.learn.parts))))
    def after_fit(self): self.rows.append(('end', self.learn.stage, self._state()))


def test_two_stage_run_carries_state_and_logs_to_trackers(tmp_path):
    from accelerate import Accelerator
    from accelerate.tracking import GeneralTracker
    class Memory(GeneralTracker):
        name, requires_logging_directory = 'memory', False
        def __init__(self): super().__init__(); self.logs = []
        @property
        def tracker(self): return self
        def store_init_configuration(self, values): self.config = values
        def log(self, values, step=None, **kw): self.logs.append((step, values))
    tracker = Memory()
    threads = torch.get_num_threads(); torch.set_num_threads(1)          # small ops: one thread is faster on a busy machine
    cfg = get_preset('gpu', smoke_overrides(tmp_path/'run', steps=(4, 3)) + ['ema_every=1'])
    run = Run(cfg, accelerator=Accelerator(cpu=True, log_with=[tracker]), progress=False)
    rec = Record(); rec.ema = run.ema
    try: run.fit([rec])
    finally: torch.set_num_threads(threads)
    starts = [r for r in rec.rows if r[0] == 'start']; ends = [r for r in rec.rows if r[0] == 'end']
    end0, start1 = ends[0][2], starts[1][2]
    assert end0['step'] == start1['step'] == 4
    assert torch.equal(end0['w'], start1['w']) and torch.equal(end0['ema'], start1['ema'])   # weights and EMA carried over
    assert start1['adam_step'] == 4                           # optimizer state carried over, not reset
    batches = [r for r in rec.rows if r[0] == 'batch']
    assert {b[2][0] for b in batches if b[1] == 0} == {(4, 3, 32, 32)}   # micro-batch 4 of a global 8: 2 accumulation steps
    assert {b[2][0] for b in batches if b[1] == 1} == {(4, 3, 64, 64)}
    assert len([b for b in batches if b[1] == 0]) == 8 and len([b for b in batches if b[1] == 1]) == 3
    assert all('repa' in b[2][1] for b in batches if b[1] == 0) and not any('repa' in b[2][1] for b in batches if b[1] == 1)
    assert [s for s, _ in tracker.logs] == [2, 4, 6, 7] and tracker.config['preset'] == 'gpu'
    assert {'mse', 'lpips', 'grad_norm', 'lr/0', 'images_per_s', 'tokens_per_s'} <= set(tracker.logs[0][1])
    assert tracker.logs[1][1]['images_per_s'] > 0 and 'repa' in tracker.logs[0][1] and 'repa' not in tracker.logs[-1][1]


# --- exact resume after SIGKILL -------------------------------------------------------------------------------------
KILL_STEPS = (10, 6)                                          # two stages; checkpoints every 3 steps and at each stage end


def _command(out, nproc, resume=False):
    ov = smoke_overrides(out, KILL_STEPS) + ['ckpt_every=3', 'log_every=5', 'ema_every=2', 'loss.lpips_weight=0']  # REPA stays
    if nproc == 1: return [sys.executable, '-m', 'pixeldiff_nb.launch', '--preset', 'gpu'] + (['--resume', 'latest'] if resume else []) + ov
    return launch('gpu', ov, num_processes=nproc, cpu=True, resume='latest' if resume else None, dry_run=True)


def _start(out, nproc):
    out.mkdir(parents=True)
    return subprocess.Popen(_command(out, nproc), env=ENV, stdout=open(out/'stdout.txt', 'w'), stderr=open(out/'stderr.txt', 'w'),
                            start_new_session=True)


def _kill_after(proc, out, n_ckpts, timeout=240):
    "SIGKILL the run (launcher and every worker) as soon as `n_ckpts` checkpoints exist; returns the checkpoints then."
    t0 = time.time()
    while len(list_checkpoints(out)) < n_ckpts:
        assert proc.poll() is None, f"run ended before it could be killed:\n{(out/'stderr.txt').read_text()[-2000:]}"
        assert time.time() - t0 < timeout
        time.sleep(0.01)
    import psutil
    tree = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)   # torchrun's workers have
    for p in tree: p.kill()                                                                  # sessions of their own
    proc.wait()                                               # our child: its exit status is -SIGKILL
    psutil.wait_procs(tree[1:], timeout=30)
    return list_checkpoints(out)


def _final(out):
    ck = list_checkpoints(out)[-1]
    assert ck.name == f'step-{sum(KILL_STEPS):08d}', ck
    return {f: load_file(ck/f) for f in ('model.safetensors', 'ema.safetensors', 'extra.safetensors')}


def _assert_equal(a, b):
    for f in a:
        assert a[f].keys() == b[f].keys()
        assert all(torch.equal(a[f][k], b[f][k]) for k in a[f]), f'{f} differs after resume'


@pytest.mark.parametrize('nproc', [1, 2])
def test_sigkill_then_resume_latest_equals_uninterrupted(tmp_path, nproc):
    ref = _start(tmp_path/'ref', nproc)                       # the uninterrupted run, side by side with the killed one
    cut = _start(tmp_path/'cut', nproc)
    n = 2 if nproc == 1 else 1                                # one process: kill after the 2nd checkpoint, then damage it
    seen = _kill_after(cut, tmp_path/'cut', n)
    assert cut.returncode == -signal.SIGKILL
    assert seen[-1].name < f'step-{sum(KILL_STEPS):08d}'      # killed before it finished
    log = (tmp_path/'cut'/'log.jsonl').read_text().splitlines() if (tmp_path/'cut'/'log.jsonl').exists() else []
    assert not log or json.loads(log[-1])['step'] < sum(KILL_STEPS)
    if nproc == 1:                                            # a damaged latest checkpoint falls back to the previous one
        f = seen[-1]/'model.safetensors'; b = bytearray(f.read_bytes()); b[-1] ^= 0xFF; f.write_bytes(bytes(b))
    res = subprocess.run(_command(tmp_path/'cut', nproc, resume=True), env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    if nproc == 1:
        assert f'Skipping {seen[-1].name}' in res.stderr and 'corrupted' in res.stderr
        assert f'resumed from {seen[-2]}' in res.stdout
    else: assert f'resumed from {seen[-1]}' in res.stdout
    assert ref.wait(timeout=300) == 0, (tmp_path/'ref'/'stderr.txt').read_text()[-3000:]
    _assert_equal(_final(tmp_path/'ref'), _final(tmp_path/'cut'))
    steps = [json.loads(l)['step'] for l in (tmp_path/'ref'/'log.jsonl').read_text().splitlines()]
    assert steps == [5, 10, 15, 16]                           # only rank 0 writes the log


FSDP_SCRIPT = textwrap.dedent('''
    import sys, torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from pixeldiff_nb.model import PRXDenoiser, model_config
    from pixeldiff_nb.training import TrainModule, EMA
    from pixeldiff_nb.muon import OptimConfig, build_optimizer
    from pixeldiff_nb.checkpoints import train_state, load_train_state
    dist.init_process_group('gloo'); rank = dist.get_rank()
    cfg = model_config('tiny', depth=2, hidden=64, heads=1, text_dim=16)
    def build():
        torch.manual_seed(0)
        m = TrainModule(PRXDenoiser(cfg))
        for b in m.net.blocks: fully_shard(b)
        fully_shard(m)
        return m, build_optimizer(m, OptimConfig(lr=1e-2)), EMA(m.net, 0.9, 1)
    def train(m, opt, ema, s0, s1):
        for s in range(s0, s1):
            g = torch.Generator().manual_seed(10 * s + rank)
            x, t, txt = torch.randn(2, 3, 16, 16, generator=g), torch.rand(2, generator=g), torch.randn(2, 4, 16, generator=g)
            ((m(x, t, txt, torch.ones(2, 4, dtype=torch.bool)) - x) ** 2).mean().backward()
            opt.step(); opt.zero_grad(); ema.update(m.net, s + 1)
    a, b = build(), build()
    assert isinstance(next(a[0].parameters()), DTensor) and isinstance(next(iter(a[2].shadow.values())), DTensor)
    train(*a, 0, 4); train(*b, 0, 2)
    state = train_state(*b)                                   # gathered on rank 0, then read back by every process
    if rank == 0: torch.save(state, sys.argv[1])
    dist.barrier()
    c = build(); load_train_state(*c, *torch.load(sys.argv[1], weights_only=False))
    train(*c, 2, 4)
    ra, rc = train_state(*a), train_state(*c)
    if rank == 0:
        for x, y, what in zip(ra, rc, ('weights', 'optimizer', 'ema')):
            flat = lambda d: {k: v for k, v in d.items()} if what != 'optimizer' else {f'{p}/{k}': v for p, s in d['state'].items() for k, v in s.items()}
            fx, fy = flat(x), flat(y)
            assert fx.keys() == fy.keys() and all(torch.equal(torch.as_tensor(fx[k]), torch.as_tensor(fy[k])) for k in fx), what
        print('FSDP2 resume exact')
    dist.destroy_process_group()
''')


def test_fsdp2_state_path_resumes_exactly(tmp_path):
    from pixeldiff_nb.launch import _free_port
    (tmp_path/'fsdp.py').write_text(FSDP_SCRIPT)
    res = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(_free_port()),
                          str(tmp_path/'fsdp.py'), str(tmp_path/'state.pt')], env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and 'FSDP2 resume exact' in res.stdout, res.stderr[-3000:]
