"""Unit tests for `pixeldiff_nb.muon`: Newton–Schulz, the grouping rule, MuonAdam against torch.optim.Muon/Adam,
checkpoint round trip, schedulers, errors, and the distributed paths (2 CPU processes, gloo) against a single process."""
import copy, math, os, tempfile

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from pixeldiff_nb.muon import (NS_COEFFS, MuonAdam, OptimConfig, assign_owners, build_optimizer, muon_param_names,
                               muon_scale, newton_schulz, ns_flops, shard_rows, split_params)


pytestmark = pytest.mark.usefixtures('one_thread')   # tests/conftest.py


def svals(x): return torch.linalg.svdvals(x.double())


def ill_conditioned(rows, cols, cond, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _, Vh = torch.linalg.svd(torch.randn(rows, cols, generator=g), full_matrices=False)
    return U @ torch.diag(torch.logspace(0, -math.log10(cond), min(rows, cols))) @ Vh


# ---------------------------------------------------------------- Newton–Schulz
@pytest.mark.parametrize('shape', [(64, 96), (96, 64), (33, 50), (1, 20)])
def test_ns_singular_values_in_band_random(shape):
    torch.manual_seed(0)
    s = svals(newton_schulz(torch.randn(shape)))
    assert 0.5 < s.min() and s.max() < 1.5


@pytest.mark.parametrize('transpose', [False, True])
def test_ns_singular_values_in_band_ill_conditioned(transpose):
    G = ill_conditioned(64, 96, cond=100)
    G = G.T if transpose else G
    s = svals(newton_schulz(G))
    assert 0.5 < s.min() and s.max() < 1.5
    # at condition 1e4 the tiniest directions are amplified but stay below the band; the rest lands in it
    G4 = ill_conditioned(64, 96, cond=1e4)
    s_in, s_out = svals(G4 / G4.norm()), svals(newton_schulz(G4))
    assert (s_out[s_in > 2e-3] > 0.5).all() and (s_out[s_in > 2e-3] < 1.5).all() and (s_out[s_in < 1e-4] < 0.5).all()


def test_ns_shapes_dtype_batch_zero():
    G = torch.randn(40, 24)
    O = newton_schulz(G)
    assert O.shape == G.shape and O.dtype == torch.float32
    assert newton_schulz(G, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert newton_schulz(G, dtype='bfloat16').dtype == torch.bfloat16
    # fp32 and fp64 agree closely; bf16 within its rounding
    O64 = newton_schulz(G.double(), dtype=torch.float64)
    assert (O.double() - O64).norm() / O64.norm() < 1e-4
    assert (newton_schulz(G, dtype=torch.bfloat16).double() - O64).norm() / O64.norm() < 0.03
    B = torch.randn(2, 3, 8, 12)
    ob = newton_schulz(B)
    for i in range(2):
        for j in range(3): torch.testing.assert_close(ob[i, j], newton_schulz(B[i, j]), atol=1e-5, rtol=1e-5)
    assert torch.equal(newton_schulz(torch.zeros(6, 9)), torch.zeros(6, 9))


def test_ns_matches_scalar_polynomial():
    "Singular values of the output are the quintic applied 5 times to the normalised input's."
    G = torch.randn(20, 30, dtype=torch.float64)
    x = svals(G / G.norm())
    a, b, c = NS_COEFFS
    for _ in range(5): x = a * x + b * x**3 + c * x**5
    torch.testing.assert_close(svals(newton_schulz(G, dtype=torch.float64)).sort().values, x.sort().values)


def test_ns_bad_input():
    with pytest.raises(ValueError, match='needs a matrix'): newton_schulz(torch.randn(7))


def test_ns_flops_and_scale():
    assert ns_flops((64, 96)) == ns_flops((96, 64)) == 2 * 5 * (2 * 64 * 64 * 96 + 64**3)
    assert muon_scale((1792, 5376)) == pytest.approx(0.2 * math.sqrt(5376))
    assert muon_scale((5376, 1792), rms_scale=False) == pytest.approx(math.sqrt(3))
    assert muon_scale((1792, 5376), rms_scale=False) == 1.0


# ---------------------------------------------------------------- against PyTorch's optimizers
def _run_pair(ns_dtype, steps=5, wd=0.0, lr=1e-2):
    torch.manual_seed(0)
    shapes_m, shapes_a = [(32, 48), (48, 32), (1, 20), (20, 20)], [(48,), (3, 4, 5)]
    init = [torch.randn(s) for s in shapes_m + shapes_a]
    ours = [nn.Parameter(t.clone()) for t in init]
    ref = [nn.Parameter(t.clone()) for t in init]
    opt = MuonAdam(ours[:4], ours[4:], lr=lr, ns_dtype=ns_dtype, weight_decay=wd)
    refs = [torch.optim.Muon(ref[:4], lr=lr, weight_decay=wd, momentum=0.95, nesterov=True, ns_coefficients=NS_COEFFS,
                             eps=1e-7, ns_steps=5, adjust_lr_fn='match_rms_adamw'),
            torch.optim.AdamW(ref[4:], lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd)]
    for _ in range(steps):
        for p, q in zip(ours, ref):
            g = torch.randn_like(p); p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        for o in refs: o.step()
    return [((p - q).norm() / (q - t0).norm()).item() for p, q, t0 in zip(ours, ref, init)]


def test_muon_group_matches_torch_muon_bf16_exactly():
    rel = _run_pair(torch.bfloat16)
    assert max(rel[:4]) == 0.0          # same operations in bf16: bit-identical parameter trajectories
    assert max(rel[4:]) < 1e-6          # Adam group vs torch.optim.AdamW


def test_muon_group_matches_torch_muon_fp32_within_bf16_noise():
    rel = _run_pair(torch.float32, wd=0.1)
    assert 0 < max(rel[:4]) < 0.03      # stated tolerance: 3% of the parameter change (torch's NS is bf16)
    assert max(rel[4:]) < 1e-6


def test_adam_group_matches_torch_adam():
    torch.manual_seed(1)
    p = nn.Parameter(torch.randn(10)); q = nn.Parameter(p.detach().clone())
    ours, ref = MuonAdam([], [p], lr=3e-3), torch.optim.Adam([q], lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(8):
        g = torch.randn(10); p.grad, q.grad = g.clone(), g.clone(); ours.step(); ref.step()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- grouping rule
class Block(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.qkv, self.out = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d)
        self.norm = nn.RMSNorm(d)
        self.mod = nn.Linear(d, 6 * d)
    def forward(self, x): return x + self.out(self.qkv(self.norm(x))[..., :x.shape[-1]]) * self.mod(x)[..., :x.shape[-1]]


class StandIn(nn.Module):
    "A small module shaped like the denoiser: embeddings outside, `blocks` ModuleList inside, head and projector outside."
    def __init__(self, d=8, depth=2):
        super().__init__()
        self.img_in = nn.Linear(12, d)
        self.time_mlp = nn.Sequential(nn.Linear(4, d), nn.SiLU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.final = nn.Linear(d, 12)
        self.repa_proj = nn.Linear(d, 5)
    def forward(self, x):
        h = self.img_in(x)
        for b in self.blocks: h = b(h)
        return self.final(h)


def test_grouping_rule():
    m = StandIn()
    names = muon_param_names(m)
    assert names == [f'blocks.{i}.{k}.weight' for i in range(2) for k in ('qkv', 'out', 'mod')]
    mu, ad = split_params(m)
    assert [id(p) for p in mu] == [id(dict(m.named_parameters())[n]) for n in names]
    ad_names = {n for n, p in m.named_parameters() if any(p is q for q in ad)}
    assert {'img_in.weight', 'final.weight', 'repa_proj.weight', 'time_mlp.0.weight', 'blocks.0.out.bias',
            'blocks.0.norm.weight', 'blocks.1.mod.bias'} <= ad_names
    assert len(mu) + len(ad) == len(list(m.parameters()))
    m.blocks[1].qkv.weight.requires_grad_(False)   # frozen params belong to no group
    mu2, ad2 = split_params(m)
    assert len(mu2) == len(mu) - 1 and len(ad2) == len(ad)
    assert len(muon_param_names(nn.ModuleDict({'module': StandIn()}))) == 6   # wrapper prefixes keep the rule


def _little_prx(depth=2):
    from pixeldiff_nb.model import PRXDenoiser, model_config
    return PRXDenoiser(model_config('tiny', depth=depth, hidden=64, heads=2, axes_dim=(16, 16), text_dim=24))


def test_grouping_rule_on_the_prx_denoiser():
    from pixeldiff_nb.training import TrainModule
    m = _little_prx()
    kinds = ('mod', 'img_qkv', 'txt_kv', 'attn_out', 'mlp.gate', 'mlp.up', 'mlp.down')
    want = {f'blocks.{i}.{k}.weight' for i in range(2) for k in kinds}
    assert set(muon_param_names(m)) == want                          # every block matrix, nothing else
    mu, ad = split_params(m)
    adam = {n for n, p in m.named_parameters() if any(p is q for q in ad)}
    assert {'img_in.proj.0.weight', 'txt_in.weight', 'time_in.0.weight', 'final.ada.weight', 'final.out.weight',
            'blocks.0.mod.bias', 'blocks.0.q_norm.scale', 'blocks.1.txt_k_norm.scale'} <= adam
    assert len(mu) + len(ad) == len(list(m.parameters()))
    # what training optimises is TrainModule (denoiser + REPA projector): the projector goes to Adam
    tm = TrainModule(m, nn.Sequential(nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 32)))
    assert set(muon_param_names(tm)) == {f'net.{n}' for n in want}


def test_cpu_preset_optimizers():
    "The optimizers of the notebook's comparison, built from the cpu preset's config as training builds them."
    from pixeldiff_nb.presets import get_preset
    m = _little_prx()
    muon = build_optimizer(m, get_preset('cpu').optim)
    assert isinstance(muon, MuonAdam) and [g['lr'] for g in muon.param_groups] == [2e-3, 2e-3]
    assert muon.param_groups[1]['eps'] == 1e-8 and muon.param_groups[1]['betas'] == (0.9, 0.95)
    adamw = build_optimizer(m, get_preset('cpu', ['optim.kind=adamw', 'optim.lr=7e-4']).optim)
    assert type(adamw) is torch.optim.AdamW and len(adamw.param_groups) == 1
    g = adamw.param_groups[0]
    assert (g['lr'], g['betas'], g['eps'], g['weight_decay']) == (7e-4, (0.9, 0.95), 1e-15, 0.0)
    assert len(g['params']) == len(list(m.parameters()))


# ---------------------------------------------------------------- optimizer mechanics
def _train(model, opt, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(4, 3, 12, generator=g)
        loss = (model(x) - x.flip(-1)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()


def test_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    a = StandIn(); oa = build_optimizer(a, OptimConfig(lr=1e-2))
    _train(a, oa, 3, seed=0)
    torch.save({'model': a.state_dict(), 'opt': oa.state_dict()}, tmp_path / 'ck.pt')
    ck = torch.load(tmp_path / 'ck.pt', weights_only=True)
    b = StandIn(); b.load_state_dict(ck['model'])
    ob = build_optimizer(b, OptimConfig(lr=1e-2)); ob.load_state_dict(ck['opt'])
    assert set(ob.state_dict()['state']) == set(oa.state_dict()['state'])
    _train(a, oa, 2, seed=5); _train(b, ob, 2, seed=5)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()): assert torch.equal(pa, pb), n


def test_zero_grad_and_scheduler_scale_both_groups():
    m = StandIn(); opt = MuonAdam(*split_params(m), lr=1e-2, adam_lr=2e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 * (s + 1))
    assert [g['lr'] for g in opt.param_groups] == pytest.approx([1e-3, 2e-3])
    _train(m, opt, 1, seed=0); sched.step()
    assert [g['lr'] for g in opt.param_groups] == pytest.approx([2e-3, 4e-3])
    opt.zero_grad()
    assert all(p.grad is None for p in m.parameters())
    # the Muon step really uses the scheduled lr: halving lr halves the change of a Muon matrix
    changes = []
    for lr in (1e-2, 5e-3):
        torch.manual_seed(0); m = StandIn(); opt = MuonAdam(*split_params(m), lr=lr)
        w0 = m.blocks[0].qkv.weight.detach().clone(); _train(m, opt, 1, seed=0)
        changes.append((m.blocks[0].qkv.weight.detach() - w0).norm().item())
    assert changes[1] == pytest.approx(changes[0] / 2, rel=1e-4)


def test_clear_errors():
    with pytest.raises(ValueError, match='put it in the Adam group'): MuonAdam([nn.Parameter(torch.zeros(4))], [])
    with pytest.raises(ValueError, match='put it in the Adam group'): MuonAdam([nn.Parameter(torch.zeros(2, 3, 4))], [])
    with pytest.raises(ValueError, match='no parameters'): MuonAdam([], [])
    with pytest.raises(ValueError, match='round_robin'): MuonAdam([nn.Parameter(torch.zeros(2, 3))], [], assignment='x')
    with pytest.raises(ValueError, match="'muon' or 'adamw'"): build_optimizer(StandIn(), OptimConfig(kind='sgd'))
    with pytest.raises(ValueError, match='muon_key'): build_optimizer(nn.Linear(3, 3))


def test_build_optimizer_kinds():
    m = StandIn()
    opt = build_optimizer(m)
    assert isinstance(opt, MuonAdam)
    g_m, g_a = opt.param_groups
    assert (g_m['use_muon'], g_m['lr'], g_m['momentum'], g_m['nesterov'], g_m['ns_steps'], g_m['rms_scale'],
            g_m['weight_decay'], g_m['ns_coeffs']) == (True, 1e-4, 0.95, True, 5, True, 0.0, NS_COEFFS)
    assert (g_a['use_muon'], g_a['lr'], g_a['betas'], g_a['eps'], g_a['weight_decay']) == (False, 1e-4, (0.9, 0.95), 1e-8, 0.0)
    base = build_optimizer(m, OptimConfig(kind='adamw'))
    assert type(base) is torch.optim.AdamW
    assert (base.param_groups[0]['eps'], base.param_groups[0]['betas'], base.param_groups[0]['weight_decay']) == (1e-15, (0.9, 0.95), 0.0)
    extra = nn.Linear(3, 3)
    assert len(build_optimizer(m, extra_params=extra.parameters()).param_groups[1]['params']) == len(g_a['params']) + 2
    o2 = build_optimizer(m, OptimConfig(lr=1e-3, muon_lr=2e-3, ns_dtype='bfloat16', betas=[0.8, 0.9]))
    assert [g['lr'] for g in o2.param_groups] == [2e-3, 1e-3] and o2.param_groups[1]['betas'] == (0.8, 0.9)


def test_owners_and_shards():
    shapes = [(8, 8)] * 5
    assert assign_owners(shapes, 2) == [0, 1, 0, 1, 0]
    big = [(64, 64), (8, 8), (8, 8), (64, 64), (8, 8)]
    own = assign_owners(big, 2, 'balanced')
    assert own[0] != own[3]                       # the two large ones go to different ranks
    assert shard_rows(5, 2) == [3, 2] and shard_rows(1, 2) == [1, 0] and shard_rows(5, 4) == [2, 2, 1, 0]
    for R in range(1, 10):
        for W in range(1, 5):
            chunks = torch.arange(R).chunk(W)
            assert shard_rows(R, W) == [len(c) for c in chunks] + [0] * (W - len(chunks))


# ---------------------------------------------------------------- distributed: 2 CPU processes
class Chain(nn.Module):
    "Awkward shapes on purpose: 5x7, 7x5, 3x9, 1x8 (1 row on 2 ranks: one shard is empty), 6x6 ... inside `blocks`."
    def __init__(self):
        super().__init__()
        dims = [7, 5, 7, 9, 3, 8, 1, 6, 6]
        self.inp = nn.Linear(4, 7)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(a, b), nn.Tanh()) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(6, 2)
    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks: x = b(x)
        return self.out(x)


def _fit(model, opt, xs, ys):
    for x, y in zip(xs, ys):
        loss = nn.functional.mse_loss(model(x), y); opt.zero_grad(); loss.backward(); opt.step()


def _worker(rank, world, store, outdir):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.distributed.device_mesh import init_device_mesh
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{store}', rank=rank, world_size=world)
    torch.manual_seed(0); base = Chain()
    xs, ys = torch.randn(3, 8 * world, 4), torch.randn(3, 8 * world, 2)      # global batches; each rank takes its slice
    mine = slice(8 * rank, 8 * (rank + 1))
    res = {}
    for ns_dtype in ('float32', 'bfloat16'):
        ref = copy.deepcopy(base)
        _fit(ref, MuonAdam(*split_params(ref), lr=0.05, ns_dtype=ns_dtype, distributed=False), xs, ys)
        want = dict(ref.named_parameters())
        ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(base))
        opt = MuonAdam(*split_params(ddp), lr=0.05, ns_dtype=ns_dtype)
        _fit(ddp, opt, xs[:, mine], ys[:, mine])
        res[f'ddp_{ns_dtype}'] = {n.removeprefix('module.'): (p.detach() - want[n.removeprefix('module.')]).abs().max().item()
                                  for n, p in ddp.named_parameters()}
        res[f'ddp_{ns_dtype}_work'] = opt.last_work
        fs = copy.deepcopy(base)
        mesh = init_device_mesh('cpu', (world,))      # explicit: on a GPU machine the default mesh would be CUDA
        for b in fs.blocks: fully_shard(b, mesh=mesh)
        fully_shard(fs, mesh=mesh)
        opt = MuonAdam(*split_params(fs), lr=0.05, ns_dtype=ns_dtype)
        _fit(fs, opt, xs[:, mine], ys[:, mine])
        res[f'fsdp_{ns_dtype}'] = {n: (p.full_tensor().detach() - want[n]).abs().max().item() for n, p in fs.named_parameters()}
        res[f'fsdp_{ns_dtype}_work'] = opt.last_work
        bufs = [s['momentum_buffer'] for s in opt.state.values() if 'momentum_buffer' in s]
        res['fsdp_momentum_sharded'] = all(isinstance(b, DTensor) for b in bufs) and len(bufs) == 8
        res['fsdp_state_dict_ok'] = len(opt.state_dict()['state']) == len(list(fs.parameters()))
    torch.save(res, os.path.join(outdir, f'rank{rank}.pt'))
    dist.destroy_process_group()
    os._exit(0)   # skip interpreter teardown, where gloo's worker threads occasionally abort the process


@pytest.fixture(scope='module')
def two_process_results():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(2, os.path.join(d, 'store'), d), nprocs=2, join=True)
        return [torch.load(os.path.join(d, f'rank{r}.pt'), weights_only=False) for r in range(2)]


@pytest.mark.parametrize('mode', ['ddp', 'fsdp'])
@pytest.mark.parametrize('ns_dtype', ['float32', 'bfloat16'])
def test_distributed_equals_single_process(two_process_results, mode, ns_dtype):
    for rank, res in enumerate(two_process_results):
        diffs = res[f'{mode}_{ns_dtype}']
        assert len(diffs) == 2 * 8 + 4                      # every parameter of Chain, Muon and Adam ones
        bad = {n: d for n, d in diffs.items() if d > 1e-5}
        assert not bad, f'rank {rank}: {bad}'


@pytest.mark.parametrize('mode', ['ddp', 'fsdp'])
def test_distributed_work_is_split(two_process_results, mode):
    "Each rank orthogonalises only the matrices it owns (round-robin), and together they cover all 8."
    works = [res[f'{mode}_float32_work'] for res in two_process_results]
    shapes = [(b, a) for a, b in zip([7, 5, 7, 9, 3, 8, 1, 6], [5, 7, 9, 3, 8, 1, 6, 6])]
    assert works[0] == shapes[0::2] and works[1] == shapes[1::2]


def test_fsdp_state_stays_sharded(two_process_results):
    for res in two_process_results: assert res['fsdp_momentum_sharded'] and res['fsdp_state_dict_ok']
