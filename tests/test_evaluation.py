"""Evaluation: the Fréchet distance and CMMD's MMD against direct computations and closed forms, the encoders' shapes and
errors, the shapes prompt parser and pixel scorer on ground-truth and deliberately wrong images, and the evaluate loop."""
import os
os.environ.setdefault('HF_HUB_OFFLINE', '1')

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from pixeldiff_nb.core import MissingWeightsError
from pixeldiff_nb.shapes import shapes_sample, BACKGROUNDS, SHAPE_COLORS
from pixeldiff_nb.evaluation import (gaussian_stats, frechet_from_stats, frechet_distance, mmd, torchmetrics_uint8_quirk,
                                     VGGEncoder, CLIPEncoder, DinoEncoder, encode_images, distribution_metrics,
                                     parse_shapes_prompt, components, read_shapes, judge_shapes, prompt_following,
                                     evaluate, SCORED, CLIP_L336)

ATTRS = ('count', 'size', 'color', 'shape', 'position', 'background')


def _g(seed=0): return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- Fréchet distance
def test_gaussian_stats_match_numpy():
    x = torch.randn(40, 7, generator=_g())
    mu, s = gaussian_stats(x)
    assert mu.dtype == torch.float64
    np.testing.assert_allclose(mu.numpy(), x.double().mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(s.numpy(), np.cov(x.double().numpy(), rowvar=False), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match='at least 2'): gaussian_stats(x[:1])


def test_frechet_closed_forms():
    assert frechet_from_stats([1.], [[4.]], [3.], [[9.]]) == pytest.approx((1 - 3) ** 2 + (2 - 3) ** 2, rel=1e-12)
    a, b = torch.tensor([1., 4., 9., 0.25]), torch.tensor([4., 4., 1., 1.])
    want = 4 * 0.5 ** 2 + float((a.sqrt() - b.sqrt()).square().sum())
    assert frechet_from_stats(torch.zeros(4), torch.diag(a), torch.full((4,), 0.5), torch.diag(b)) == pytest.approx(want, rel=1e-12)
    # a pure shift δ of the same set: d² = ‖δ‖², also with fewer samples than dimensions
    x = torch.relu(torch.randn(48, 256, generator=_g(1), dtype=torch.float64)) * 5
    assert frechet_distance(x, x + 0.3) == pytest.approx(0.09 * 256, rel=1e-9)
    assert abs(frechet_distance(x, x)) < 1e-9


def test_frechet_matches_reference_square_roots():
    g = _g(2)
    A, B = torch.randn(10, 10, generator=g, dtype=torch.float64), torch.randn(10, 10, generator=g, dtype=torch.float64)
    s1, s2 = A @ A.T + 0.5 * torch.eye(10, dtype=torch.float64), B @ B.T + 0.5 * torch.eye(10, dtype=torch.float64)
    m1, m2 = torch.randn(10, generator=g, dtype=torch.float64), torch.randn(10, generator=g, dtype=torch.float64)
    base = float((m1 - m2).square().sum() + s1.trace() + s2.trace())
    ref_scipy = base - 2 * float(np.trace(scipy.linalg.sqrtm((s1 @ s2).numpy())).real)
    ref_eig = base - 2 * float(torch.linalg.eigvals(s1 @ s2).sqrt().real.sum())
    got = frechet_from_stats(m1, s1, m2, s2)
    assert got == pytest.approx(ref_scipy, rel=1e-6) and got == pytest.approx(ref_eig, rel=1e-9)
    assert got == pytest.approx(frechet_from_stats(m2, s2, m1, s1), rel=1e-9)            # symmetric


def test_frechet_from_samples_converges_to_the_gaussians():
    g, d, n = _g(3), 4, 40_000
    L1 = torch.tensor([[1., 0, 0, 0], [0.5, 1, 0, 0], [0, 0.3, 2, 0], [0, 0, 0, 0.5]])
    L2 = torch.tensor([[2., 0, 0, 0], [0, 1, 0, 0], [0.4, 0, 1, 0], [0, 0, 0.2, 1]])
    mu2 = torch.tensor([1., 0, -1, 0.5])
    x, y = torch.randn(n, d, generator=g) @ L1.T, torch.randn(n, d, generator=g) @ L2.T + mu2
    exact = frechet_from_stats(torch.zeros(d), L1 @ L1.T, mu2, L2 @ L2.T)
    assert frechet_distance(x, y) == pytest.approx(exact, rel=0.03)


def test_frechet_rejects_mismatched_features():
    with pytest.raises(ValueError, match='same encoder'): frechet_distance(torch.randn(5, 3), torch.randn(5, 4))


def test_torchmetrics_uint8_quirk_inverts():
    v = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(torchmetrics_uint8_quirk(v).long(), (256 - v.long()) % 256)
    with pytest.raises(ValueError, match='uint8'): torchmetrics_uint8_quirk(v.float())


# ---------------------------------------------------------------- MMD
def _mmd_loops(x, y, sigma=10.0, scale=1000.0, unbiased=False):
    x, y = x.double(), y.double()
    k = lambda a, b: float(torch.exp(-(a - b).square().sum() / (2 * sigma ** 2)))
    n, m = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if not (unbiased and i == j))
    syy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if not (unbiased and i == j))
    sxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m))
    dx, dy = (n * (n - 1), m * (m - 1)) if unbiased else (n * n, m * m)
    return scale * (sxx / dx + syy / dy - 2 * sxy / (n * m))


def test_mmd_matches_direct_computation():
    x, y = torch.randn(9, 4, generator=_g(4)) * 6, torch.randn(7, 4, generator=_g(5)) * 6 + 2
    for unbiased in (False, True):
        assert mmd(x, y, unbiased=unbiased) == pytest.approx(_mmd_loops(x, y, unbiased=unbiased), rel=1e-10)
    assert mmd(x, y, sigma=3.0, scale=1.0) == pytest.approx(_mmd_loops(x, y, sigma=3.0, scale=1.0), rel=1e-10)
    assert mmd(x, y) == pytest.approx(mmd(y, x), rel=1e-12)
    assert mmd(x, x) == 0.0 and mmd(x, x, unbiased=True) < 0                  # biased: exactly 0; unbiased: below


def test_mmd_shifted_gaussians_closed_form():
    d, s, sigma, shift, n = 6, 1.5, 10.0, 4.0, 2000
    x, y = torch.randn(n, d, generator=_g(6)) * s, torch.randn(n, d, generator=_g(7)) * s
    y[:, 1] += shift
    v = sigma ** 2 + 2 * s ** 2
    exact = 1000 * 2 * (sigma ** 2 / v) ** (d / 2) * (1 - np.exp(-shift ** 2 / (2 * v)))
    assert mmd(x, y, unbiased=True) == pytest.approx(exact, rel=0.06)
    assert abs(mmd(x, torch.randn(n, d, generator=_g(8)) * s, unbiased=True)) < 0.05 * exact   # same distribution: ~0


def test_mmd_errors():
    with pytest.raises(ValueError, match='same encoder'): mmd(torch.randn(3, 2), torch.randn(3, 5))
    with pytest.raises(ValueError, match='at least 2'): mmd(torch.randn(1, 2), torch.randn(3, 2), unbiased=True)


# ---------------------------------------------------------------- encoders
def test_encoders_shapes_and_errors():
    from transformers import CLIPVisionConfig, Dinov2WithRegistersConfig
    ims = torch.rand(2, 3, 30, 44) * 2 - 1
    vgg = VGGEncoder(pretrained=False)
    assert vgg.stand_in and 'STAND-IN' in vgg.name and vgg(ims).shape == (2, 512)
    clip = CLIPEncoder(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                        image_size=28, patch_size=14, projection_dim=8))
    dino = DinoEncoder(Dinov2WithRegistersConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, patch_size=14, num_register_tokens=4), size=28)
    assert clip(ims).shape == (2, 8) and dino(ims).shape == (2, 32)
    assert clip.prepare(ims).shape == (2, 3, 28, 28) and not clip.training
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\)'): vgg(ims[0])
    with pytest.raises(MissingWeightsError, match='not available offline'): CLIPEncoder(CLIP_L336)


def test_encode_images_batches_and_mixed_sizes():
    vgg = VGGEncoder(pretrained=False)
    pil = [Image.new('RGB', (24, 24), (250, 0, 0))] * 3 + [Image.new('RGB', (40, 24), (0, 0, 250))]
    f = encode_images(vgg, pil, batch_size=2)
    assert f.shape == (4, 512)
    x = torch.rand(5, 3, 24, 24) * 2 - 1
    torch.testing.assert_close(encode_images(vgg, x, batch_size=2), vgg(x), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match='No images'): encode_images(vgg, [])
    dm = distribution_metrics(f, f)
    assert abs(dm['fd']) < 1e-6 and dm['mmd'] == 0.0


# ---------------------------------------------------------------- shapes prompt following
def test_parse_shapes_prompt_round_trip():
    for i in range(300):
        _, cap, at = shapes_sample(i, 64, seed=5)
        assert parse_shapes_prompt(cap) == {k: at[k] for k in ATTRS}
    with pytest.raises(ValueError, match='Not a shapes-set caption'): parse_shapes_prompt('a red apple')


def test_components_four_connected():
    m = torch.zeros(5, 7, dtype=torch.bool)
    m[0:2, 0:2] = True; m[2, 2] = True; m[1:4, 4:6] = True; m[4, 6] = True
    lab = components(m)
    assert len(lab[m].unique()) == 4 and lab[~m].eq(0).all()
    assert torch.equal(components(m[None].repeat(3, 1, 1))[1], lab)


@pytest.mark.parametrize('size', [64, 32, (48, 96)])
def test_scorer_on_ground_truth(size):
    s = [shapes_sample(i, size, seed=11) for i in range(150)]
    pf = prompt_following([im for im, _, _ in s], [a for _, _, a in s])
    assert pf['n'] == 150 and all(pf[k] >= 0.95 for k in SCORED), pf
    # the same images as tensors in [-1, 1] score the same
    from pixeldiff_nb.core import img_to_tensor
    pf_t = prompt_following(torch.stack([img_to_tensor(im) for im, _, _ in s[:20]]), [a for _, _, a in s[:20]])
    assert pf_t['all'] == prompt_following([im for im, _, _ in s[:20]], [a for _, _, a in s[:20]])['all']


def test_scorer_rejects_wrong_prompts_and_images():
    s = [shapes_sample(i, 64, seed=12) for i in range(80)]
    opposite = {'left': 'right', 'right': 'left', 'top': 'bottom', 'bottom': 'top', 'top left': 'bottom right',
                'bottom right': 'top left', 'top right': 'bottom left', 'bottom left': 'top right'}
    for key in SCORED:
        bad = []
        for im, _, a in s:
            b = dict(a)
            if key == 'count': b['count'] = a['count'] % 3 + 1
            elif key == 'position':
                if a['position'] not in opposite: continue
                b['position'] = opposite[a['position']]
            else: b[key] = next(c for c in (BACKGROUNDS if key == 'background' else SHAPE_COLORS) if c != a[key])
            bad.append(judge_shapes(read_shapes(im), b))
        assert np.mean([j[key] for j in bad]) <= 0.02 and not any(j['all'] for j in bad)
        assert all(np.mean([j[k] for j in bad]) >= 0.95 for k in SCORED if k != key)
    # images that contradict their own prompt
    side = [(im, a) for im, _, a in s if a['position'] in ('left', 'right', 'top left', 'bottom right')]
    mirrored = prompt_following([im.transpose(Image.FLIP_LEFT_RIGHT) for im, _ in side], [a for _, a in side])
    assert mirrored['position'] <= 0.02
    blank = prompt_following([Image.new('RGB', (64, 64), BACKGROUNDS[a['background']]) for _, _, a in s[:10]],
                             [a for _, _, a in s[:10]])
    assert blank['background'] == 1.0 and blank['count'] == 0.0 and blank['all'] == 0.0
    shuffled = prompt_following([im for im, _, _ in s], [a for _, _, a in s[1:] + s[:1]])
    assert shuffled['all'] <= 0.05
    with pytest.raises(ValueError, match='images but'): prompt_following([s[0][0]], [])


def test_read_shapes_noise_robust():
    g = _g(13)
    from pixeldiff_nb.core import img_to_tensor
    s = [shapes_sample(i, 64, seed=14) for i in range(60)]
    noisy = torch.stack([img_to_tensor(im) for im, _, _ in s]) + 0.08 * torch.randn(60, 3, 64, 64, generator=g)
    pf = prompt_following(noisy, [a for _, _, a in s])
    assert all(pf[k] >= 0.9 for k in SCORED), pf


# ---------------------------------------------------------------- the loop
class _Text:
    "A stand-in text tower: fixed random states per prompt (no encoder download in unit tests)."
    def __init__(self, dim): self.dim = dim
    def encode(self, prompts):
        g = _g(len(prompts))
        return torch.randn(len(prompts), 4, self.dim, generator=g), torch.ones(len(prompts), 4, dtype=torch.bool)


def test_evaluate_loop_runs_and_reports():
    from pixeldiff_nb.model import PRXDenoiser, model_config
    cfg = model_config('tiny', depth=1, hidden=64, heads=1)
    net = PRXDenoiser(cfg).eval()
    text = _Text(cfg.text_dim)
    s = [shapes_sample(i, 32, seed=15) for i in range(5)]
    prompts = [c for _, c, _ in s]
    real = torch.rand(6, 3, 32, 32) * 2 - 1
    txt, mask = text.encode(['x'] * 2)
    vb = [{'pixels': real[:2], 'txt': txt, 'mask': mask}]
    enc = VGGEncoder(pretrained=False)
    res = evaluate(net, text, prompts, real=real, encoder=enc, val_batches=vb, attrs=[parse_shapes_prompt(p) for p in prompts],
                   size=(32, 32), steps=2, batch_size=2)
    assert res['images'].shape == (5, 3, 32, 32) and res['encoder'] == enc.name
    assert set(res['val']) == {'0.0-0.3', '0.3-0.6', '0.6-1.0', 'all'}
    assert np.isfinite(res['fd']) and np.isfinite(res['mmd'])
    assert res['prompt_following']['n'] == 5 and set(SCORED) <= set(res['prompt_following'])
    # precomputed reference features give the same numbers as reference images
    res2 = evaluate(net, text, prompts, real=encode_images(enc, real), encoder=enc, size=(32, 32), steps=2, batch_size=2)
    assert res2['fd'] == pytest.approx(res['fd'], rel=1e-6) and 'val' not in res2 and 'prompt_following' not in res2
    with pytest.raises(ValueError, match='need an encoder'): evaluate(net, text, prompts, real=real, size=(32, 32), steps=2)
    with pytest.raises(ValueError, match='attrs'): evaluate(net, text, prompts, attrs=[], size=(32, 32), steps=2)


def test_show_judged_titles():
    import matplotlib
    matplotlib.use('Agg')
    from pixeldiff_nb.evaluation import show_judged
    s = [shapes_sample(i, 32, seed=16) for i in range(3)]
    judged = prompt_following([im for im, _, _ in s], [a for _, _, a in s])['judged']
    fig = show_judged([im for im, _, _ in s], [c for _, c, _ in s], judged)
    titles = [ax.get_title() for ax in fig.axes[:3]]
    assert all(t.endswith('bg✓  colour✓  count✓  pos✓') for t in titles)
