"""The objective and the sampler: interpolation endpoints, time sampling, the v-loss against a hand computation,
prediction parameterisations, sampler endpoints, guidance and caption dropout."""
import pytest
import torch

from pixeldiff_nb.diffusion import (interpolate, shift_time, sample_t, x_to_v, v_loss, output_to_x0, sampling_times,
                                    euler_sample, drop_captions, cfg_denoiser, DiffusionConfig, denoise_at)


def test_interpolation_endpoints():
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.equal(interpolate(x0, eps, torch.zeros(2)), x0)           # t = 0: clean
    assert torch.equal(interpolate(x0, eps, torch.ones(2)), eps)           # t = 1: noise


def test_time_sampling_range_and_shift():
    t = sample_t(50_000, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 1e-3 and t.max() < 1
    assert 0.7 < t.median() < 0.8                                          # shift 3 moves the logit-normal median to 3/4
    torch.testing.assert_close(shift_time(torch.tensor([0.0, 0.5, 1.0]), 3.0), torch.tensor([0.0, 0.75, 1.0]))
    a = sample_t(8, generator=torch.Generator().manual_seed(1)); b = sample_t(8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


@pytest.mark.parametrize('t_val, expected', [(0.5, (0.5 - 0.3) ** 2 / 0.5 ** 2), (0.01, (0.5 - 0.3) ** 2 / 0.05 ** 2)])
def test_v_loss_by_hand(t_val, expected):
    x0, eps, xh = torch.tensor([[0.5]]), torch.tensor([[-1.0]]), torch.tensor([[0.3]])
    t = torch.tensor([t_val])
    assert abs(v_loss(xh, x0, interpolate(x0, eps, t), t).item() - expected) < 1e-4


def test_v_target_is_eps_minus_x0_above_clamp():
    x0, eps, t = torch.randn(3, 5), torch.randn(3, 5), torch.tensor([0.06, 0.4, 0.9])
    torch.testing.assert_close(x_to_v(interpolate(x0, eps, t), x0, t), eps - x0)


def test_parameterisations_recover_x0():
    x0, eps, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([0.3, 0.7])
    xt = interpolate(x0, eps, t)
    for kind, out in (('x', x0), ('eps', eps), ('v', eps - x0)):
        torch.testing.assert_close(output_to_x0(out, xt, t, kind), x0, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="Unknown prediction kind 'score'"): output_to_x0(x0, xt, t, 'score')


def test_sampler_endpoints():
    ts = sampling_times(50)
    assert ts[0] == 1 and ts[-1] == 0 and (ts[1:] < ts[:-1]).all()
    target = torch.rand(2, 3, 8, 8) * 2 - 1
    for steps in (1, 7, 50):
        torch.testing.assert_close(euler_sample(lambda x, t: target, torch.randn_like(target), steps), target, atol=1e-5, rtol=1e-5)


def test_guidance_is_linear_extrapolation():
    class M(torch.nn.Module):
        def forward(self, x, t, txt, mask): return x + txt.mean((1, 2))[:, None, None, None]
    x, t = torch.randn(2, 3, 4, 4), torch.rand(2)
    txt, mask, null, nmask = torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool), torch.zeros(1, 4, 8), torch.ones(1, 4, dtype=torch.bool)
    m = M()
    cond, unc = m(x, t, txt, mask), m(x, t, null.expand(2, -1, -1), mask)
    torch.testing.assert_close(cfg_denoiser(m, txt, mask, null, nmask, 4.0)(x, t), unc + 4.0 * (cond - unc))
    torch.testing.assert_close(cfg_denoiser(m, txt, mask, null, nmask, 1.0)(x, t), cond)


def test_caption_dropout():
    txt, mask = torch.randn(64, 5, 8), torch.ones(64, 5, dtype=torch.bool)
    null, nmask = torch.randn(1, 5, 8), torch.tensor([[True, True, False, False, False]])
    d_txt, d_mask = drop_captions(txt, mask, null, nmask, p=0.5, generator=torch.Generator().manual_seed(0))
    dropped = (d_txt == null).flatten(1).all(1)
    assert 10 < dropped.sum() < 54
    assert (d_mask[dropped] == nmask).all() and torch.equal(d_txt[~dropped], txt[~dropped])
    assert torch.equal(drop_captions(txt, mask, null, nmask, p=1.0)[0], null.expand_as(txt))
    with pytest.raises(ValueError, match='same text encoder'): drop_captions(txt, mask, torch.randn(1, 6, 8), nmask)


def test_config_defaults_and_errors():
    c = DiffusionConfig()
    assert (c.shift, c.t_clamp, c.caption_dropout, c.uniform_frac, c.sample_steps) == (3.0, 0.05, 0.1, 0.1, 50)
    with pytest.raises(ValueError, match="prediction must be 'x'"): DiffusionConfig(prediction='score')


def test_denoise_at():
    x0 = torch.rand(1, 3, 4, 4)
    xt, xh = denoise_at(lambda x, t: x * 0, x0, 0.0)
    assert torch.equal(xt, x0) and torch.equal(xh, torch.zeros_like(x0))
