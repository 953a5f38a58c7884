"""Unit tests for `pixeldiff_nb.repa`: the teacher's grid matches the denoiser's on every aspect-ratio bucket (tiny random
DINOv3 and DINOv2, the VGG16 stand-in), patch tokens in row-major order, the kept-token gather under TREAD, gradient flow
(projector and student yes, teacher never), a switched-off config building no teacher, loss values, the one-line
missing-weights error, the FLOP count of DINOv3-L, and the alignment measurements (block tokens at fixed noise, the
linear probe)."""
import pytest
import torch
import torch.nn.functional as F

import pixeldiff_nb.repa as repa_mod
from pixeldiff_nb.core import MissingWeightsError
from pixeldiff_nb.buckets import bucket_sizes
from pixeldiff_nb.model import PRXDenoiser, RoutePlan, model_config, gather_tokens
from pixeldiff_nb.repa import (DINOV3_L, IMAGENET_MEAN, IMAGENET_STD, DinoTeacher, Repa, RepaConfig, RepaProjector,
                               VGGStandIn, build_repa, build_teacher, dinov2_config, dinov3_config, repa_loss,
                               resize_for_teacher, teacher_size)
from pixeldiff_nb.repa_probe import pca_rgb, teacher_flops, block_tokens, fit_linear_probe
from pixeldiff_nb.training import TrainModule

BIG_BUCKETS = [(b, 32) for b in bucket_sizes(512, 32) + bucket_sizes(1024, 32)]          # the speedrun's stages
SMALL_BUCKETS = [(b, 8) for b in bucket_sizes(64, 8)] + [(b, 16) for b in bucket_sizes(128, 16)] + [((64, 64), 32)]


pytestmark = pytest.mark.usefixtures('one_thread')   # tests/conftest.py


@pytest.fixture(scope='module')
def teachers():
    torch.manual_seed(0)
    return {'dinov3': DinoTeacher(dinov3_config('tiny', num_hidden_layers=1)),
            'dinov2-reg': DinoTeacher(dinov2_config('tiny', num_hidden_layers=1)),
            'dinov2': DinoTeacher(dinov2_config('tiny', registers=False, num_hidden_layers=1))}


# ---------------------------------------------------------------- grid matching
@pytest.mark.parametrize('name', ['dinov3', 'dinov2-reg', 'dinov2'])
def test_grid_matches_every_bucket(teachers, name):
    t = teachers[name]
    for (H, W), p in BIG_BUCKETS + SMALL_BUCKETS:
        f = t(torch.rand(1, 3, H, W) * 2 - 1, p)
        assert f.shape == (1, (H // p) * (W // p), 32), (name, H, W, p)
        assert f.dtype == torch.float32


def test_teacher_size_rule():
    for (H, W), p in BIG_BUCKETS:
        assert teacher_size(H, W, p, 16) == (H // 2, W // 2)          # DINOv3/16 with patch 32: the recipe's factor 1/2
        assert teacher_size(H, W, p, 14) == (H // p * 14, W // p * 14)
    with pytest.raises(ValueError, match='not divisible by the patch size'): teacher_size(500, 512, 32, 16)


def test_vgg_standin_grid_on_small_buckets():
    for layer, buckets in (('relu3_3', SMALL_BUCKETS), ('relu4_3', SMALL_BUCKETS[:3])):
        t = VGGStandIn(layer, pretrained=False)
        for (H, W), p in buckets:
            assert t(torch.zeros(1, 3, H, W), p).shape == (1, (H // p) * (W // p), t.dim)
    assert t.stand_in and 'STAND-IN' in repr(t) and t.dim == 512 and t.stride == 8


@pytest.mark.parametrize('cfg', [dinov3_config('tiny', num_hidden_layers=0), dinov2_config('tiny', num_hidden_layers=0),
                                 dinov2_config('tiny', registers=False, num_hidden_layers=0)])
def test_patch_tokens_in_row_major_order(cfg):
    t = DinoTeacher(cfg)   # no transformer layer: each token depends on its own patch only
    H, W, p = 96, 160, 32  # 3×5 grid
    base = t(torch.zeros(1, 3, H, W), p)
    for r, c in [(0, 0), (1, 3), (2, 4)]:
        x = torch.zeros(1, 3, H, W); x[:, :, r*p:(r+1)*p, c*p:(c+1)*p] = 1
        changed = (t(x, p) - base).abs().sum(-1)[0].nonzero().flatten().tolist()
        assert changed == [r * 5 + c]


def test_teacher_input_is_normalised_resized_patch_tokens(teachers):
    t = teachers['dinov3']
    x0 = torch.rand(2, 3, 96, 64) * 2 - 1
    x = F.interpolate((x0 + 1) / 2, size=(48, 32), mode='nearest')
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    ref = t.net(pixel_values=x).last_hidden_state[:, 1 + 4:]           # skip CLS and 4 registers
    torch.testing.assert_close(t(x0, 32), ref)


def test_resize_modes():
    x = torch.rand(1, 3, 64, 64)
    assert resize_for_teacher(x, (64, 64)) is x
    assert torch.equal(resize_for_teacher(x, (32, 32)), x[:, :, ::2, ::2])
    aa = resize_for_teacher(x, (32, 32), 'bilinear')                     # antialiased: a low-pass filter, not a pick
    assert aa.shape == (1, 3, 32, 32) and not torch.equal(aa, x[:, :, ::2, ::2]) and aa.std() < x.std()
    c = torch.full((1, 3, 64, 48), 0.3)
    for m in ('nearest', 'bilinear', 'bicubic', 'area'): torch.testing.assert_close(resize_for_teacher(c, (28, 21), m), c[:, :, :28, :21])
    with pytest.raises(ValueError, match='resize_mode'): RepaConfig(resize_mode='lanczos')


# ---------------------------------------------------------------- frozen, outside the module tree
def test_teacher_frozen_and_not_saved(teachers):
    t = teachers['dinov3']
    assert list(t.parameters()) == [] and t.state_dict() == {}
    assert not t.net.training and not any(p.requires_grad for p in t.net.parameters())
    t.train()
    assert not t.training and not t.net.training
    x0 = torch.rand(1, 3, 64, 64, requires_grad=True)
    assert not t(x0, 32).requires_grad


def test_to_moves_hidden_network():
    t = DinoTeacher(dinov3_config('tiny'))
    t.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in t.net.parameters()) and t.mean.dtype == torch.float64


def test_repa_state_dict_is_projector_only():
    r = build_repa(RepaConfig(layer=1, proj_width=16), model_config('tiny'), teacher=dinov3_config('tiny'))
    assert sorted(r.state_dict()) == sorted(f'projector.{i}.{w}' for i in (0, 2, 4) for w in ('weight', 'bias'))
    assert {id(p) for p in r.parameters()} == {id(p) for p in r.projector.parameters()}
    assert not any('blocks.' in n for n, _ in r.named_parameters())      # the Adam group in the Muon split
    assert r.projector[0].in_features == 256 and r.projector[-1].out_features == 32 and r.projector[2].in_features == 16


def test_projector_recipe_size():
    with torch.device('meta'): p = RepaProjector(1792, 1024)
    assert sum(q.numel() for q in p.parameters()) == 3_935_232
    assert [type(m).__name__ for m in p] == ['Linear', 'SiLU', 'Linear', 'SiLU', 'Linear']
    r = Repa(RepaConfig(), 64, 32, teacher=dinov3_config('tiny'))       # proj_width None = the teacher's width
    assert r.projector[0].out_features == 32


# ---------------------------------------------------------------- switched off
def test_disabled_builds_no_teacher(monkeypatch):
    def boom(*a, **k): raise AssertionError('a teacher was built')
    for name in ('build_teacher', 'DinoTeacher', 'VGGStandIn', 'load_vit'): monkeypatch.setattr(repa_mod, name, boom)
    assert build_repa(RepaConfig(weight=0.0), model_config('small')) is None
    assert build_repa(None, model_config('small')) is None
    with pytest.raises(AssertionError, match='a teacher was built'): build_repa(RepaConfig(), model_config('small'))


def test_disabled_repa_refuses_to_build():
    with pytest.raises(ValueError, match='build_repa'): Repa(RepaConfig(weight=0.0), 64, 8)


def test_layer_outside_model():
    with pytest.raises(ValueError, match='outside the denoiser'):
        build_repa(RepaConfig(layer=7), model_config('tiny'), teacher=dinov3_config('tiny'))


# ---------------------------------------------------------------- the loss
def test_loss_values():
    torch.manual_seed(0)
    a = torch.randn(3, 10, 16)
    torch.testing.assert_close(repa_loss(a, a), torch.tensor(-1.0))
    torch.testing.assert_close(repa_loss(2.5 * a, a), torch.tensor(-1.0))
    torch.testing.assert_close(repa_loss(-a, a), torch.tensor(1.0))
    e = torch.eye(16)
    torch.testing.assert_close(repa_loss(e[None, :8], e[None, 8:]), torch.tensor(0.0))
    half = torch.cat([a[:, :5], -a[:, 5:]], 1)                          # half aligned, half opposite: mean 0
    torch.testing.assert_close(repa_loss(half, a), torch.tensor(0.0), atol=1e-6, rtol=0)
    assert repa_loss(a.bfloat16(), a.bfloat16()).dtype == torch.float32


def test_loss_shape_errors():
    a = torch.randn(2, 10, 8)
    with pytest.raises(ValueError, match='kept-token indices'): repa_loss(a[:, :4], a)
    with pytest.raises(ValueError, match='differ'): repa_loss(torch.randn(2, 10, 4), a)


def test_kept_token_gather():
    torch.manual_seed(0)
    teacher = torch.randn(2, 12, 8)
    idx = torch.tensor([[1, 4, 7, 11], [0, 2, 3, 9]])
    kept = gather_tokens(teacher, idx)
    torch.testing.assert_close(repa_loss(kept, teacher, idx), torch.tensor(-1.0))
    assert repa_loss(kept, teacher[:, :4]) > -0.9                      # the first K tokens are the wrong ones


def test_kept_token_gather_through_denoiser():
    torch.manual_seed(0)
    mcfg = model_config('tiny')
    model = PRXDenoiser(mcfg)
    r = build_repa(RepaConfig(layer=2, proj_width=32), mcfg, teacher=dinov3_config('tiny'))
    B, N, K = 2, 64, 20
    x0 = torch.rand(B, 3, 64, 64) * 2 - 1
    txt, mask = torch.randn(B, 3, mcfg.text_dim), torch.ones(B, 3, dtype=torch.bool)
    t = torch.rand(B)
    keep = torch.rand(B, N).argsort(1)[:, :K].sort(1).values
    _, feats, idx = model(x0, t, txt, mask, route=RoutePlan(keep, 1, 4), return_block=r.layer)
    assert feats.shape == (B, K, mcfg.hidden) and torch.equal(idx, keep)
    y = r.teacher_features(x0)
    assert y.shape == (B, N, 32)
    ref = -F.cosine_similarity(r.projector(feats), torch.stack([y[b, keep[b]] for b in range(B)]), dim=-1).mean()
    torch.testing.assert_close(r(feats, x0, idx), ref)
    torch.testing.assert_close(r.loss(feats, idx, y), ref)
    _, feats_all, idx_all = model(x0, t, txt, mask, route=RoutePlan(keep, 3, 4), return_block=r.layer)
    assert idx_all is None and feats_all.shape == (B, N, mcfg.hidden)  # block 2 before the route: all tokens
    r(feats_all, x0, idx_all)


# ---------------------------------------------------------------- gradients
def test_gradient_flow():
    torch.manual_seed(0)
    mcfg = model_config('tiny')
    model = PRXDenoiser(mcfg)
    r = build_repa(RepaConfig(layer=2, proj_width=32), mcfg, teacher=dinov3_config('tiny'))
    B = 2
    x0 = torch.rand(B, 3, 64, 64) * 2 - 1
    keep = torch.rand(B, 64).argsort(1)[:, :32].sort(1).values
    _, feats, idx = model(x0, torch.rand(B), torch.randn(B, 3, mcfg.text_dim), torch.ones(B, 3, dtype=torch.bool),
                          route=RoutePlan(keep, 1, 4), return_block=r.layer)
    r(feats, x0, idx).backward()
    gn = lambda m: sum(p.grad.abs().sum().item() for p in m.parameters() if p.grad is not None)
    assert all(p.grad is not None for p in r.projector.parameters()) and gn(r.projector) > 0
    assert gn(model.img_in) > 0 and all(gn(model.blocks[i]) > 0 for i in range(3))
    assert all(gn(model.blocks[i]) == 0 for i in range(3, 6)) and gn(model.final) == 0
    assert all(p.grad is None and not p.requires_grad for p in r.teacher.net.parameters())


# ---------------------------------------------------------------- loading
def test_missing_weights_error_is_one_line(monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.delenv('PIXELDIFF_MODEL_DIR', raising=False)
    with pytest.raises(MissingWeightsError) as e: build_teacher(DINOV3_L)
    assert '\n' not in str(e.value) and DINOV3_L in str(e.value) and 'PIXELDIFF_MODEL_DIR' in str(e.value)
    with pytest.raises(MissingWeightsError): build_repa(RepaConfig(), model_config('small'))


def test_local_folder_and_built_model(tmp_path):
    from transformers import AutoModel
    net = AutoModel.from_config(dinov2_config('tiny'))
    net.save_pretrained(tmp_path)
    x0 = torch.rand(1, 3, 64, 96) * 2 - 1
    a = build_teacher(str(tmp_path))(x0, 32)
    torch.testing.assert_close(a, build_teacher(net)(x0, 32))
    with pytest.raises(ValueError, match='DINOv3 ViT or DINOv2'): build_teacher(torch.nn.Linear(2, 2))


def test_vgg_standin_loads_imagenet_weights():
    from pixeldiff_nb.perceptual import lpips_backbone_weights
    try: sd = lpips_backbone_weights('vgg', download=False)
    except MissingWeightsError: pytest.skip('VGG16 weights not cached (see 06_perceptual)')
    t = VGGStandIn('relu3_3', download=False)
    torch.testing.assert_close(t.net[14].weight, sd['features.14.weight'])
    assert len(t.net) == 16 and t.stride == 4


# ---------------------------------------------------------------- pictures and FLOPs
def test_pca_rgb():
    torch.manual_seed(0)
    f = torch.randn(2, 12, 8)
    f[1, 5] = f[0, 3]
    img = pca_rgb(f, (3, 4))
    assert img.shape == (2, 3, 3, 4) and img.min() >= -1 and img.max() <= 1
    torch.testing.assert_close(img[1, :, 1, 1], img[0, :, 0, 3])      # same feature, same colour
    with pytest.raises(ValueError, match='cannot fill'): pca_rgb(f, (4, 4))


def test_teacher_flops_match_analytic_count():
    D, L, T, N = 1024, 24, 256 + 5, 256                                  # ViT-L/16 at 256 px: 256 patches + CLS + 4 registers
    analytic = L * (24 * T * D * D + 4 * T * T * D) + 2 * N * (3 * 16 * 16) * D
    assert teacher_flops(dinov3_config('vitl16'), 512, 512, 32) == analytic
    assert teacher_flops(dinov3_config('vitl16'), 384, 640, 32) == L * (24 * 245 * D * D + 4 * 245**2 * D) + 2 * 240 * 768 * D


def test_precision_and_compile_settings():
    r = build_repa(RepaConfig(layer=1, compile_teacher=True, teacher_bf16=False), model_config('tiny'),
                   teacher=dinov3_config('tiny'))
    assert r.teacher.compile and not r.teacher.bf16
    t = DinoTeacher(dinov3_config('tiny'))
    assert t.bf16 and not t.compile                                      # defaults: bf16 on a GPU, eager
    assert t.runner(torch.device('cpu')) == t.tokens                      # CPU: eager ...
    assert all(p.dtype == torch.float32 for p in t.net.parameters())     # ... and fp32


def test_for_depth_scales_the_block():
    assert [RepaConfig().for_depth(d).layer for d in (16, 6, 4, 1)] == [7, 2, 1, 0]
    assert RepaConfig(layer=15).for_depth(6).layer == 5                  # the last block stays the last
    cfg = RepaConfig(weight=0.3).for_depth(6)
    assert cfg.weight == 0.3 and cfg.teacher == DINOV3_L


# ---------------------------------------------------------------- alignment measurements
def _micro_batches(n_batches=2, B=2, L=3, text_dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{'pixels': torch.rand(B, 3, 32, 32, generator=g) * 2 - 1, 'txt': torch.randn(B, L, text_dim, generator=g),
             'mask': torch.ones(B, L, dtype=torch.bool)} for _ in range(n_batches)]


def test_block_tokens_fixed_noise_and_projector():
    torch.manual_seed(0)
    net = PRXDenoiser(model_config('tiny', depth=3, hidden=64, heads=2, axes_dim=(16, 16), text_dim=32, bottleneck=16))
    batches = _micro_batches()
    tok = block_tokens(net, batches, layer=1, ts=(0.2, 0.8))
    assert tok.shape == (2, 4, 16, 64)                                   # (len(ts), all images, N = (32/8)², hidden)
    assert torch.equal(block_tokens(net, batches, layer=1, ts=(0.2, 0.8)), tok)        # same seed: same noise
    assert not torch.equal(block_tokens(net, batches, layer=1, ts=(0.2, 0.8), seed=1), tok)
    # the first batch at the first t equals the block output on x_t built by hand from the same noise
    x0 = batches[0]['pixels']
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, ref, _ = net(0.8 * x0 + 0.2 * eps, torch.full((2,), 0.2), batches[0]['txt'], batches[0]['mask'], return_block=1)
    torch.testing.assert_close(tok[0, :2], ref)
    head = RepaProjector(64, 24, 32)
    torch.testing.assert_close(block_tokens(TrainModule(net, head), batches, layer=1, ts=(0.2, 0.8)), head(tok).detach())
    net.train()
    block_tokens(net, batches, layer=1)
    assert net.training                                                   # the mode is restored


def test_linear_probe_recovers_directions_of_a_linear_map():
    g = torch.Generator().manual_seed(0)
    A, b = torch.randn(12, 6, generator=g), torch.randn(6, generator=g)
    X = torch.randn(2000, 12, generator=g)
    Y = X @ A + b
    probe = fit_linear_probe(X, Y, ridge=0.0)
    # fitted to the *normalised* targets, the probe points the same way as a scaled copy of the map where norms vary little
    Yn = F.normalize(Y, dim=-1)
    resid_lin = (probe(X) - Yn).pow(2).mean()
    W = torch.linalg.lstsq(torch.cat([X, torch.ones(len(X), 1)], 1).double(), Yn.double()).solution   # reference solver
    ref = torch.cat([X, torch.ones(len(X), 1)], 1).double() @ W
    torch.testing.assert_close(probe(X).double(), ref, atol=1e-4, rtol=1e-4)
    assert resid_lin < Yn.pow(2).mean()
    # targets that are exactly linear with unit norm are recovered exactly
    Q = torch.linalg.qr(torch.randn(6, 6, generator=g)).Q
    Xu = F.normalize(torch.randn(500, 6, generator=g), dim=-1)
    torch.testing.assert_close(fit_linear_probe(Xu, Xu @ Q, ridge=0.0)(Xu), Xu @ Q, atol=1e-4, rtol=1e-4)


def test_linear_probe_finds_nothing_in_noise_and_checks_shapes():
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(2000, 16, generator=g), torch.randn(2000, 8, generator=g)
    probe = fit_linear_probe(X[:1000], Y[:1000])
    assert F.cosine_similarity(probe(X[1000:]), Y[1000:], dim=-1).mean().abs() < 0.05
    assert isinstance(probe, torch.nn.Linear) and probe.weight.dtype == torch.float32
    with pytest.raises(ValueError, match=r'need X \(M, D\) and Y \(M, C\)'): fit_linear_probe(X, Y[:10])
    with pytest.raises(ValueError, match='need X'): fit_linear_probe(X[0], Y[0])
