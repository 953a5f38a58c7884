"""Unit tests for pixeldiff_nb.tread: routing plans, the router, the model seam under routing, self-guidance, FLOPs."""
import pytest
import torch
from pixeldiff_nb.model import PRXDenoiser, RoutePlan, model_config, denoiser_flops
from pixeldiff_nb.patching import patchify
from pixeldiff_nb.diffusion import euler_sample, v_loss
from pixeldiff_nb.tread import (TreadConfig, scale_span, route_seed, routed_count, make_route_plan, Router,
                                self_guidance_denoiser, tread_flops, step_times, grey_out_routed)

B, L, H = 3, 5, 32          # batch, caption length, image side (patch 8 -> 16 tokens)
N = (H // 8) ** 2


def micro_model(depth=6, seed=0, std=0.05):
    "A very small PRX denoiser whose zero-initialised layers get random weights, so no block is the identity."
    torch.manual_seed(seed)
    m = PRXDenoiser(model_config('tiny', depth=depth, hidden=64, heads=2, axes_dim=(16, 16), text_dim=32, bottleneck=16))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.abs().sum() == 0: p.copy_(torch.randn(p.shape, generator=g) * std)
    return m


pytestmark = pytest.mark.usefixtures('one_thread')   # tests/conftest.py


@pytest.fixture(scope='module')
def model(): return micro_model()


@pytest.fixture(scope='module')
def batch():
    g = torch.Generator().manual_seed(1)
    x_t, t = torch.randn(B, 3, H, H, generator=g), torch.rand(B, generator=g)
    txt = torch.randn(B, L, 32, generator=g)
    mask = torch.arange(L)[None] < torch.tensor([[2], [5], [1]])
    return x_t, t, txt, mask


def states_around_span(model, plan, *args):
    "All-token hidden states just before block plan.start and just after block plan.end (after the scatter)."
    seen = {}
    before = model.blocks[plan.start - 1] if plan.start > 0 else model.img_in
    after = model.blocks[plan.end + 1] if plan.end + 1 < len(model.blocks) else model.final
    def keep_output(m, a, out): seen['in'] = out
    def keep_input(m, a): seen['out'] = a[0]
    hooks = [before.register_forward_hook(keep_output), after.register_forward_pre_hook(keep_input)]
    try:
        with torch.no_grad(): model(*args, route=plan)
    finally:
        for h in hooks: h.remove()
    return seen['in'], seen['out']


# ---------------------------------------------------------------- plans

@pytest.mark.parametrize('n', [2, 3, 16, 64, 256])
@pytest.mark.parametrize('rate', [0.01, 0.25, 0.5, 0.75, 0.99])
def test_plan_shape_sorted_and_count(n, rate):
    p = make_route_plan(4, n, rate, 1, 3, step=3, rank=1, seed=5)
    k = min(max(round(n * rate), 1), n - 1)
    assert routed_count(n, rate) == k
    assert p.keep.shape == (4, n - k) and p.keep.dtype == torch.int64
    assert (p.start, p.end) == (1, 3)
    assert (p.keep.diff(dim=1) > 0).all()                              # sorted, unique
    assert p.keep.min() >= 0 and p.keep.max() < n
    if min(k, n - k) >= 4: assert len({tuple(r.tolist()) for r in p.keep}) == 4   # an independent choice per sample


def test_rate_zero_gives_no_plan():
    assert routed_count(16, 0.0) == 0
    assert make_route_plan(4, 16, 0.0, 1, 3, step=0) is None


def test_same_seed_step_rank_same_plan_else_different():
    ref = make_route_plan(4, 64, 0.5, 2, 12, step=10, rank=2, seed=42).keep
    assert torch.equal(make_route_plan(4, 64, 0.5, 2, 12, step=10, rank=2, seed=42).keep, ref)
    for kw in (dict(step=11, rank=2, seed=42), dict(step=10, rank=3, seed=42), dict(step=10, rank=2, seed=43)):
        assert not torch.equal(make_route_plan(4, 64, 0.5, 2, 12, **kw).keep, ref), kw
    assert route_seed(42, 10, 2) == route_seed(42, 10, 2) < 2**63
    assert len({route_seed(0, s, r) for s in range(50) for r in range(4)}) == 200


def test_plan_independent_of_global_rng():
    torch.manual_seed(0); a = make_route_plan(2, 64, 0.5, 1, 4, step=1).keep
    torch.manual_seed(123); torch.rand(10); b = make_route_plan(2, 64, 0.5, 1, 4, step=1).keep
    assert torch.equal(a, b)


def test_plan_is_uniform_over_tokens():
    counts = torch.zeros(16)
    for s in range(400): counts.index_add_(0, make_route_plan(4, 16, 0.25, 1, 4, step=s).keep.flatten(), torch.ones(4 * 12))
    freq = counts / (400 * 4)
    assert torch.allclose(freq, torch.full((16,), 0.75), atol=0.05)


# ---------------------------------------------------------------- config, span, router

def test_scale_span():
    assert scale_span(2, 12, 16) == (2, 12)
    assert scale_span(2, 12, 6) == (1, 4)
    assert scale_span(2, 12, 3) == (1, 1)
    assert TreadConfig().for_depth(6) == TreadConfig(start=1, end=4)
    for d in range(3, 40):                                              # a dense block stays on each side
        s, e = scale_span(2, 12, d)
        assert 1 <= s <= e <= d - 2


@pytest.mark.parametrize('make, msg', [
    (lambda: TreadConfig(rate=1.0), 'must be in [0, 1)'),
    (lambda: TreadConfig(rate=-0.1), 'must be in [0, 1)'),
    (lambda: TreadConfig(rate=1.5), 'must be in [0, 1)'),
    (lambda: TreadConfig(start=5, end=3), 'start <= end'),
    (lambda: TreadConfig(start=-1, end=3), 'start <= end'),
    (lambda: TreadConfig().check(6), 'does not fit a 6-block model'),
    (lambda: TreadConfig(start=0, end=2).check(2), 'does not fit a 2-block model'),
    (lambda: Router(TreadConfig(), depth=12), 'does not fit a 12-block model'),
    (lambda: scale_span(2, 12, 2), 'too shallow'),
    (lambda: scale_span(2, 16, 8), 'ref_depth=16'),
    (lambda: routed_count(1, 0.5), 'at least 2 image tokens'),
    (lambda: routed_count(16, 1.0), 'must be in [0, 1)'),
    (lambda: route_seed(0, -1, 0), 'must all be >= 0'),
    (lambda: make_route_plan(2, 16, 0.5, 4, 2, step=0), 'start <= end'),
])
def test_invalid_configs_fail_with_one_line(make, msg):
    with pytest.raises(ValueError) as e: make()
    assert msg in str(e.value) and '\n' not in str(e.value)


def test_router_training_only():
    r = Router(TreadConfig(start=1, end=4), depth=6)
    p = r(B, N, step=4, rank=1)
    assert isinstance(p, RoutePlan) and p.keep.shape == (B, N // 2) and (p.start, p.end) == (1, 4)
    assert torch.equal(p.keep, make_route_plan(B, N, 0.5, 1, 4, step=4, rank=1, seed=42).keep)   # the config's seed
    assert r(B, N, step=4, training=False) is None
    assert Router(TreadConfig(start=1, end=4, train_only=False), 6)(B, N, step=4, training=False) is not None
    assert Router(TreadConfig(rate=0.0, start=1, end=4, train_only=False), 6)(B, N, step=4, training=False) is None
    assert Router(TreadConfig(rate=0.0, start=1, end=4), 6)(B, N, step=4) is None


# ---------------------------------------------------------------- the model under routing

def test_rate_zero_equals_dense_exactly(model, batch):
    router = Router(TreadConfig(rate=0.0, start=1, end=4), depth=6)
    with torch.no_grad():
        assert torch.equal(model(*batch, route=router(B, N, step=0)), model(*batch))


def test_plan_keeping_every_token_is_bit_identical(model, batch):
    with torch.no_grad():
        dense = model(*batch)
        for s, e in [(0, 5), (1, 4), (3, 3)]:
            assert torch.equal(model(*batch, route=RoutePlan(torch.arange(N).expand(B, N), s, e)), dense)


@pytest.mark.parametrize('span', [(1, 4), (0, 2), (2, 5), (0, 5)])
def test_routed_tokens_leave_the_span_bit_identical(model, batch, span):
    plan = make_route_plan(B, N, 0.5, *span, step=1)
    h_in, h_out = states_around_span(model, plan, *batch)
    kept = torch.zeros(B, N, dtype=torch.bool).scatter(1, plan.keep, True)
    assert h_in.shape == h_out.shape == (B, N, 64)
    assert torch.equal(h_out[~kept], h_in[~kept])
    assert (h_out[kept] - h_in[kept]).abs().amax(-1).min() > 0         # every kept token was processed
    with torch.no_grad(): assert (model(*batch, route=plan) - model(*batch)).abs().max() > 1e-4


def test_gradients_reach_every_parameter_and_routed_pixels(batch):
    m = micro_model(seed=3)
    x_t, t, txt, mask = batch
    x = x_t.clone().requires_grad_()
    plan = make_route_plan(B, N, 0.5, 1, 4, step=0)
    v_loss(m(x, t, txt, mask, route=plan), x_t.tanh(), x, t).backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    kept = torch.zeros(B, N, dtype=torch.bool).scatter(1, plan.keep, True)
    assert (patchify(x.grad, 8).abs().sum(-1)[~kept] > 0).all()        # routed tokens are not detached


def test_repa_seam_under_routing(model, batch):
    plan = make_route_plan(B, N, 0.5, 2, 4, step=2)
    with torch.no_grad():
        for i in (2, 3, 4):                                             # inside the span: kept tokens and their indices
            _, f, idx = model(*batch, route=plan, return_block=i)
            assert f.shape == (B, N // 2, 64) and torch.equal(idx, plan.keep)
        for i in (0, 1):                                                # before the span: the dense features, all tokens
            _, f, idx = model(*batch, route=plan, return_block=i)
            _, f_dense, _ = model(*batch, return_block=i)
            assert idx is None and torch.equal(f, f_dense)
        _, f, idx = model(*batch, route=plan, return_block=5)            # after the span: all tokens again
        assert f.shape == (B, N, 64) and idx is None


# ---------------------------------------------------------------- self-guidance

def test_self_guidance_scale_one_is_dense_and_zero_is_routed(model, batch):
    x_t, t, txt, mask = batch
    plan = make_route_plan(B, N, 0.5, 1, 4, step=0, seed=9)
    with torch.no_grad():
        dense, routed = model(x_t, t, txt, mask), model(x_t, t, txt, mask, route=plan)
        assert torch.equal(self_guidance_denoiser(model, txt, mask, scale=1.0, seed=9)(x_t, t), dense)
        assert torch.equal(self_guidance_denoiser(model, txt, mask, scale=0.0, seed=9)(x_t, t), routed)
        s3 = self_guidance_denoiser(model, txt, mask, scale=3.0, seed=9)(x_t, t)
        assert torch.allclose(s3, routed + 3.0 * (dense - routed)) and torch.allclose(s3, 3 * dense - 2 * routed, atol=1e-5)
        assert not torch.allclose(s3, self_guidance_denoiser(model, txt, mask, scale=3.0, seed=10)(x_t, t))
        explicit = self_guidance_denoiser(model, txt, mask, scale=0.0, rate=0.25, start=2, end=3, seed=9)(x_t, t)
        assert torch.equal(explicit, model(x_t, t, txt, mask, route=make_route_plan(B, N, 0.25, 2, 3, step=0, seed=9)))


def test_self_guidance_with_the_sampler_is_seeded(model, batch):
    _, _, txt, mask = batch
    noise = torch.randn(B, 3, H, H, generator=torch.Generator().manual_seed(0))
    run = lambda seed: euler_sample(self_guidance_denoiser(model, txt, mask, scale=2.0, seed=seed), noise, steps=3)
    a = run(1)
    assert a.shape == noise.shape and torch.equal(a, run(1)) and not torch.equal(a, run(2))


def test_self_guidance_rejects_bad_span(model, batch):
    _, _, txt, mask = batch
    with pytest.raises(ValueError, match='does not fit a 6-block model'): self_guidance_denoiser(model, txt, mask, start=2, end=12)
    with pytest.raises(ValueError, match=r'must be in \[0, 1\)'): self_guidance_denoiser(model, txt, mask, rate=1.0)


def test_self_guidance_refuses_rate_zero(model, batch):
    "Rate 0 routes nothing: routed == dense, so 'guidance' would silently be the unguided model; it must fail loudly."
    _, _, txt, mask = batch
    for scale in (0.0, 1.0, 3.5):
        with pytest.raises(ValueError, match='needs a routing rate > 0'): self_guidance_denoiser(model, txt, mask, scale=scale, rate=0.0)


# ---------------------------------------------------------------- FLOPs, timing, picture

def test_tread_flops():
    c = model_config('small')
    f0, f5 = tread_flops(c, 512, 512, 256, 0.0), tread_flops(c, 512, 512, 256, 0.5)
    assert f0['saving'] == 0 and f0['routed'] == f0['dense'] == denoiser_flops(c, 512, 512, 256)['train']
    assert f5['kept'] == make_route_plan(1, 256, 0.5, 2, 12, step=0).keep.shape[1] == 128
    assert f5['routed'] == denoiser_flops(c, 512, 512, 256, keep=128, span=(2, 12))['train']
    savings = [tread_flops(c, 512, 512, 256, r)['saving'] for r in (0.0, 0.25, 0.5, 0.75)]
    assert savings == sorted(savings)
    assert 0 < f5['saving'] < 0.5 * 11 / 16                              # the caption K/V projections do not shrink
    with pytest.raises(ValueError, match='does not fit'): tread_flops(model_config('tiny'), 64, 64, 32, 0.5, 2, 12)


def test_step_times_returns_per_rate_seconds():
    m = micro_model(depth=3)
    times = step_times(m, rates=(0.0, 0.5), B=2, H=16, W=16, text_len=4, start=1, end=1, repeats=2, warmup=1)
    assert set(times) == {0.0, 0.5} and all(len(v) == 2 and min(v) > 0 for v in times.values())
    assert all(p.grad is None for p in m.parameters())                  # gradients are cleared after each step
    cpu = step_times(m, rates=(0.5,), B=2, H=16, W=16, text_len=4, start=1, end=1, repeats=1, warmup=0, clock='process')
    assert len(cpu[0.5]) == 1 and cpu[0.5][0] >= 0
    with pytest.raises(ValueError, match="clock='gpu'"): step_times(m, clock='gpu')


def test_grey_out_routed():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    p = make_route_plan(2, 16, 0.5, 1, 2, step=0)
    g, kept = patchify(grey_out_routed(x, p.keep, 8), 8), torch.zeros(2, 16, dtype=torch.bool).scatter(1, p.keep, True)
    assert torch.equal(g[kept], patchify(x, 8)[kept])
    assert torch.allclose(g[~kept], 0.2 * patchify(x, 8)[~kept] + 0.8 * 0.6)
