"""Patching and the PRX denoiser: exact patchify round trips on every bucket, RoPE, zero-init identity, text masking,
the routing and block-output seams, parameter and FLOP counts, and the one-line errors."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pixeldiff_nb.buckets import bucket_sizes
from pixeldiff_nb.patching import (patchify, unpatchify, token_count, BottleneckPatchEmbed, grid_positions, rope_cos_sin,
                                   apply_rope)
from pixeldiff_nb.model import (PRXDenoiser, RoutePlan, model_config, count_params, denoiser_flops, gather_tokens,
                                scatter_tokens)


@pytest.mark.parametrize('base', [512, 1024])
def test_patchify_round_trip_every_bucket(base):
    for H, W in bucket_sizes(base, 32):
        x = torch.randn(1, 3, H, W)
        tok = patchify(x, 32)
        assert tok.shape == (1, token_count(H, W, 32), 3072)
        assert torch.equal(unpatchify(tok, 32, H, W), x)


def test_patchify_matches_unfold_order():
    x = torch.randn(2, 3, 64, 96)
    ref = torch.nn.functional.unfold(x, kernel_size=16, stride=16).transpose(1, 2)
    assert torch.equal(patchify(x, 16), ref)


def test_token_counts_of_the_recipe():
    assert token_count(512, 512, 32) == 256 and token_count(1024, 1024, 32) == 1024
    assert len(bucket_sizes(512, 32)) == 13 and len(bucket_sizes(1024, 32)) == 27


def test_size_not_divisible_by_patch_is_one_line():
    with pytest.raises(ValueError, match='not divisible by the patch size 32: resize it'):
        patchify(torch.randn(1, 3, 500, 512), 32)


def test_bottleneck_is_rank_limited_and_linear():
    emb = BottleneckPatchEmbed(patch=8, hidden=128, bottleneck=16)
    a, b = torch.randn(4, 192), torch.randn(4, 192)
    with torch.no_grad():
        lin = lambda v: emb(v) - emb(torch.zeros_like(v))
        torch.testing.assert_close(lin(a + b), lin(a) + lin(b), atol=1e-5, rtol=1e-5)   # no nonlinearity
        W = emb.proj[1].weight @ emb.proj[0].weight
    assert torch.linalg.matrix_rank(W) == 16


def test_rope_relative_positions():
    q, k = torch.randn(1, 1, 1, 64), torch.randn(1, 1, 1, 64)
    def score(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([pq])); ck, sk = rope_cos_sin(torch.tensor([pk]))
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()
    torch.testing.assert_close(score((1, 2), (4, 0)), score((6, 9), (9, 7)), atol=1e-4, rtol=1e-4)
    assert grid_positions(2, 2).tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]


def _inputs(cfg, B=2, H=64, W=64, L=8):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, 3, H, W, generator=g), torch.rand(B, generator=g), torch.randn(B, L, cfg.text_dim, generator=g),
            torch.arange(L)[None].expand(B, -1) < torch.tensor([[3], [L]]))


def _perturbed(cfg):
    torch.manual_seed(0)
    m = PRXDenoiser(cfg)
    with torch.no_grad():
        for p in m.parameters():
            if p.abs().sum() == 0: p.normal_(std=0.02)
    return m


def test_zero_init_identity():
    cfg = model_config('tiny', depth=2)
    m = PRXDenoiser(cfg)
    x, t, txt, mask = _inputs(cfg)
    with torch.no_grad(): assert torch.equal(m(x, t, txt, mask), torch.zeros_like(x))   # x0_hat = 0 at init


def test_padding_tokens_are_ignored():
    cfg = model_config('tiny', depth=2)
    m = _perturbed(cfg)
    x, t, txt, mask = _inputs(cfg)
    junk = torch.where(mask[..., None], txt, torch.randn_like(txt) * 100)
    with torch.no_grad(): torch.testing.assert_close(m(x, t, junk, mask), m(x, t, txt, mask), atol=1e-5, rtol=1e-5)


def test_routing_and_block_seams():
    cfg = model_config('tiny', depth=3)
    m = _perturbed(cfg)
    x, t, txt, mask = _inputs(cfg)
    N = 64
    with torch.no_grad():
        dense = m(x, t, txt, mask)
        every = RoutePlan(torch.arange(N).expand(2, N), 1, 1)
        torch.testing.assert_close(m(x, t, txt, mask, route=every), dense, atol=1e-5, rtol=1e-5)
        keep = torch.stack([torch.sort(torch.randperm(N)[:20]).values for _ in range(2)])
        out, h, idx = m(x, t, txt, mask, route=RoutePlan(keep, 1, 1), return_block=1)
    assert h.shape == (2, 20, cfg.hidden) and torch.equal(idx, keep)
    assert (out - dense).abs().max() > 1e-5
    with pytest.raises(ValueError, match='Routing span 1..3'):
        m(x, t, txt, mask, route=RoutePlan(keep, 1, 3))


def test_gather_scatter_identity():
    full, idx = torch.randn(2, 7, 3), torch.tensor([[0, 3, 6], [1, 2, 5]])
    assert torch.equal(scatter_tokens(full, idx, gather_tokens(full, idx)), full)


def test_wrong_text_width_is_one_line():
    cfg = model_config('tiny', depth=1)
    x, t, txt, mask = _inputs(cfg)
    with pytest.raises(ValueError, match='expects text_dim=384'):
        PRXDenoiser(cfg)(x, t, torch.randn(2, 8, 768), mask)


def test_small_has_the_recipe_parameter_count():
    total, parts = count_params(model_config('small'), by_part=True)
    assert 1.17e9 < total < 1.19e9
    assert abs(parts['per_block'] - 72.26e6) < 0.01e6


def test_flops_match_flop_counter():
    cfg = model_config('small')
    with torch.device('meta'): m = PRXDenoiser(cfg)
    args = (torch.randn(1, 3, 384, 672, device='meta'), torch.rand(1, device='meta'), torch.randn(1, 256, 2304, device='meta'),
            torch.ones(1, 256, dtype=torch.bool, device='meta'))
    with FlopCounterMode(display=False) as fc: m(*args)
    ours = denoiser_flops(cfg, 384, 672, 256)['forward']
    assert abs(ours / fc.get_total_flops() - 1) < 0.01
