"""diffusers interop: weight names both ways exact, the same function as PRXTransformer2DModel, an exported
PRXPixelPipeline that samples our image, the export CLI, imports that refuse what we lack, bf16 sampling without
autocast, and the sampling defaults (steps, guidance <= 1, noise scale, self-guidance for TREAD runs)."""
import inspect, json

import pytest
import torch
from safetensors.torch import save_file

diffusers = pytest.importorskip('diffusers')
from diffusers import PRXTransformer2DModel, PRXPixelPipeline

from pixeldiff_nb.model import PRXDenoiser, model_config
from pixeldiff_nb.config import config_to_dict
from pixeldiff_nb.presets import get_preset
from pixeldiff_nb.diffusion import cfg_denoiser, euler_sample
from pixeldiff_nb.callbacks import generate
from pixeldiff_nb.evaluation import evaluate
from pixeldiff_nb.text import TextEncoder
from pixeldiff_nb.tread import TreadConfig
from pixeldiff_nb.cli import sample_cli, load_for_sampling
from pixeldiff_nb.diffusers_io import (to_diffusers_state_dict, from_diffusers_state_dict, from_diffusers,
                                       init_from_diffusers, save_transformer, diffusers_config, model_config_from_diffusers,
                                       export_pipeline, export_cli, pipeline_sample, prx_timesteps)

TINY = dict(in_channels=3, patch_size=4, context_in_dim=24, hidden_size=32, num_heads=2, depth=2, axes_dim=[8, 8],
            bottleneck_size=16, mlp_ratio=2.0)
MICRO = ['model.depth=2', 'model.hidden=64', 'model.heads=1', 'stages.0.image_size=32']


def _randomise(m, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters(): p.copy_(torch.randn(p.shape, generator=g) * std)
    return m.eval()


def _inputs(B=2, H=16, W=24, L=5, D=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(L)[None] < torch.tensor([[3], [L]])[:B]
    return torch.randn(B, 3, H, W, generator=g), torch.rand(B, generator=g), torch.randn(B, L, D, generator=g), mask


@pytest.fixture(scope='module')
def weights_file(tmp_path_factory):
    "Exported pixeldiff weights of a micro model with random weights (zero-inits too), so images are far from grey."
    cfg = get_preset('cpu', MICRO)
    net = _randomise(PRXDenoiser(cfg.model), std=0.05)
    f = tmp_path_factory.mktemp('w')/'w.safetensors'
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, f,
              metadata={'format': 'pixeldiff-weights-1', 'config': json.dumps(config_to_dict(cfg)), 'step': '7', 'weights': 'ema'})
    return f


@pytest.fixture(scope='module')
def exported(weights_file, tmp_path_factory):
    out = tmp_path_factory.mktemp('p')/'pipe'
    assert export_cli([str(weights_file), str(out)]) == 0
    pipe = PRXPixelPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    return out, pipe


def test_weight_round_trip_is_exact_both_ways():
    theirs = _randomise(PRXTransformer2DModel(**TINY))
    sd = theirs.state_dict()
    ours = from_diffusers_state_dict(sd)
    assert set(ours) == set(PRXDenoiser(model_config_from_diffusers(TINY)).state_dict())
    back = to_diffusers_state_dict(ours)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    flat = _randomise(PRXDenoiser(model_config('tiny', depth=1, bottleneck=None)))      # no bottleneck: one linear
    d = to_diffusers_state_dict(flat.state_dict())
    assert 'img_in.weight' in d and set(from_diffusers_state_dict(d)) == set(flat.state_dict())


def test_forward_equals_diffusers_both_directions(tmp_path):
    theirs = _randomise(PRXTransformer2DModel(**TINY))
    x, t, txt, mask = _inputs()
    with torch.no_grad():
        ref = theirs(x, t, txt, mask, return_dict=False)[0]
        out = from_diffusers(theirs)(x, t, txt, mask)
    assert ref.abs().max() > 1 and (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    ours = _randomise(PRXDenoiser(model_config_from_diffusers(TINY)), seed=3)             # ours -> a diffusers folder
    folder = save_transformer(ours, tmp_path/'transformer')
    loaded = PRXTransformer2DModel.from_pretrained(folder).eval()
    assert loaded.config.bottleneck_size == 16 and not loaded.config.resolution_embeds
    with torch.no_grad():
        a, b = ours(x, t, txt, mask), loaded(x, t, txt, mask, return_dict=False)[0]
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    again = from_diffusers(folder)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in ours.state_dict().items())


def test_imports_refuse_what_we_lack(tmp_path):
    with pytest.raises(ValueError, match='resolution_embeds=True'): model_config_from_diffusers({**TINY, 'resolution_embeds': True})
    with pytest.raises(ValueError, match='time_factor=1.0'): model_config_from_diffusers({**TINY, 'time_factor': 1.0})
    with pytest.raises(ValueError, match="Unsupported PRX transformer config keys \\['qk_scale'\\]"):
        model_config_from_diffusers({**TINY, 'qk_scale': 2.0})
    with pytest.raises(ValueError, match='256-d time embedding'): diffusers_config(model_config('tiny', time_dim=128))
    with pytest.raises(FileNotFoundError, match='No config.json'): from_diffusers(tmp_path)
    with pytest.raises(ValueError, match='pass config='): from_diffusers({})
    folder = save_transformer(PRXDenoiser(model_config_from_diffusers(TINY)), tmp_path/'t')
    with pytest.raises(ValueError, match='has another shape: depth=2 \\(ours 3\\)') as e:
        init_from_diffusers(PRXDenoiser(model_config_from_diffusers({**TINY, 'depth': 3})), folder)
    assert len(str(e.value).splitlines()) == 1


def test_exported_folder_and_model_card(exported):
    out, pipe = exported
    assert {p.name for p in out.iterdir()} == {'transformer', 'scheduler', 'text_encoder', 'tokenizer', 'model_index.json', 'README.md'}
    assert pipe.config.noise_scale == 1.0 and pipe.config.prompt_max_tokens == 32 and pipe.config.default_sample_size == 32
    assert pipe.scheduler.config.shift == 1.0 and type(pipe.text_encoder).__name__ == 'BertModel'
    card = (out/'README.md').read_text()
    assert 'step 7' in card and 'library_name: diffusers' in card and 'timesteps=ts' in card


def test_pipeline_image_equals_ours(weights_file, exported):
    _, pipe = exported
    net, cfg = load_for_sampling(weights_file, device='cpu')
    enc = TextEncoder(cfg.data.text_encoder, max_length=cfg.data.text_max_length)
    prompts = ['red apple', 'rocket']
    ours = generate(net, enc, prompts, (32, 32), 6, 3.5, 'cfg', 5, cfg.diffusion.shift)
    theirs = pipeline_sample(pipe, prompts, 6, 3.5, cfg.diffusion.shift, seed=5)
    assert ours.std() > 0.1 and (ours - theirs).abs().max() < 1e-4              # tolerance: 1e-4 on [-1, 1] pixels
    plain = pipe('red apple', timesteps=prx_timesteps(6, cfg.diffusion.shift), guidance_scale=3.5, use_resolution_binning=False,
                 generator=torch.Generator().manual_seed(5), output_type='pt').images.clamp(-1, 1)
    one = generate(net, enc, ['red apple'], (32, 32), 6, 3.5, 'cfg', 5, cfg.diffusion.shift)
    assert (plain - one).abs().max() < 1e-4                                     # the three-line call, one prompt
    embeds = pipeline_sample(pipe, prompts[:1], 6, 3.5, cfg.diffusion.shift, seed=5, text=enc)   # our encoder's states
    assert (embeds - ours[:1]).abs().max() < 1e-4


def test_export_cli_bad_inputs(weights_file, tmp_path, capsys):
    for argv, msg in [([str(tmp_path/'missing'), str(tmp_path/'o')], 'does not exist'),
                      ([str(weights_file), str(tmp_path)], 'is not an exported pipeline')]:
        (tmp_path/'junk.txt').write_text('x')
        with pytest.raises(SystemExit) as e: export_cli(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err and len(err.strip().splitlines()) == 1


def test_bf16_inference_without_autocast():
    torch.manual_seed(0)
    net = _randomise(PRXDenoiser(model_config('tiny', depth=2)), std=0.02)
    x, t, txt, mask = torch.randn(2, 3, 32, 32), torch.rand(2), torch.randn(2, 6, 384), torch.ones(2, 6, dtype=torch.bool)
    with torch.no_grad():
        ref = net(x, t, txt, mask)
        out = net.to(torch.bfloat16)(x, t, txt, mask)                          # fp32 inputs, bf16 weights
    assert out.dtype == torch.bfloat16 and ((out.float() - ref).norm() / ref.norm()) < 0.05


def test_sample_cli_bf16_and_defaults(weights_file, tmp_path):
    assert sample_cli([str(weights_file), 'red apple', '--steps', '2', '--dtype', 'bf16', '--out', str(tmp_path/'b.png')]) == 0
    assert (tmp_path/'b.png').exists()
    help_text = ' '.join(a.help or '' for a in _parser_actions())
    assert 'default 50' in help_text and "'self' for a run trained with TREAD" in help_text
    assert inspect.signature(generate).parameters['steps'].default == 50
    assert inspect.signature(evaluate).parameters['steps'].default == 50
    assert inspect.signature(evaluate).parameters['mode'].default == 'auto'


def _parser_actions():
    "The argparse actions of pixeldiff-sample (read from its --help)."
    import argparse
    actions = []
    orig = argparse.ArgumentParser.parse_args
    def grab(self, *a, **k):
        actions.extend(self._actions)
        raise SystemExit(0)
    argparse.ArgumentParser.parse_args = grab
    try:
        with pytest.raises(SystemExit): sample_cli(['x', 'y'])
    finally: argparse.ArgumentParser.parse_args = orig
    return actions


def test_guidance_at_most_one_is_the_conditional_output():
    torch.manual_seed(0)
    net = _randomise(PRXDenoiser(model_config('tiny', depth=1)), std=0.05)
    x, t = torch.randn(1, 3, 16, 16), torch.rand(1)
    txt, mask = torch.randn(1, 4, 384), torch.ones(1, 4, dtype=torch.bool)
    null, null_mask = torch.randn(1, 4, 384), torch.ones(1, 4, dtype=torch.bool)
    with torch.no_grad():
        cond = net(x, t, txt, mask)
        for s in (0.0, 0.5, 1.0): assert torch.equal(cfg_denoiser(net, txt, mask, null, null_mask, scale=s)(x, t), cond)
        assert not torch.allclose(cfg_denoiser(net, txt, mask, null, null_mask, scale=2.0)(x, t), cond)


class _Text:
    "Fixed caption states for generate (a TextEncoder stand-in with the `encode` interface)."
    def encode(self, prompts):
        g = torch.Generator().manual_seed(len(prompts[0]))
        return torch.randn(len(prompts), 4, 384, generator=g), torch.ones(len(prompts), 4, dtype=torch.bool)


def test_generate_honours_noise_scale_and_tread_default():
    torch.manual_seed(0)
    net = _randomise(PRXDenoiser(model_config('tiny', depth=4)), std=0.05)
    text = _Text()
    txt, mask = text.encode(['a'])
    noise = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    for ns in (1.0, 2.0):
        want = euler_sample(cfg_denoiser(net, txt, mask), noise * ns, steps=3)
        assert torch.equal(generate(net, text, ['a'], (16, 16), 3, 1.0, 'cfg', 2, noise_scale=ns), want)
    tr = TreadConfig(rate=0.5, start=1, end=2)
    auto = generate(net, text, ['a'], (16, 16), 3, 2.0, 'auto', 2, tread=tr)
    assert torch.equal(auto, generate(net, text, ['a'], (16, 16), 3, 2.0, 'self', 2, tread=tr))
    assert not torch.equal(auto, generate(net, text, ['a'], (16, 16), 3, 2.0, 'cfg', 2, tread=tr))
    dense = generate(net, text, ['a'], (16, 16), 3, 2.0, 'auto', 2, tread=TreadConfig(rate=0.0))
    assert torch.equal(dense, generate(net, text, ['a'], (16, 16), 3, 2.0, 'cfg', 2))


def test_t5gemma_run_exports_its_encoder(tmp_path):
    from pixeldiff_nb.text import tiny_text_model_dir
    tdir = tiny_text_model_dir('t5gemma', tmp_path/'t5')
    cfg = get_preset('cpu', MICRO + [f'data.text_encoder={tdir}', 'model.text_dim=32', 'data.text_max_length=16'])
    net = _randomise(PRXDenoiser(cfg.model), std=0.05)
    f = tmp_path/'w.safetensors'
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, f,
              metadata={'format': 'pixeldiff-weights-1', 'config': json.dumps(config_to_dict(cfg)), 'step': '1'})
    pipe = PRXPixelPipeline.from_pretrained(export_pipeline(f, tmp_path/'pipe'))
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.text_encoder).__name__ == 'T5GemmaEncoderModel' and pipe.config.prompt_max_tokens == 16
    enc = TextEncoder(str(tdir), max_length=16)
    ours = generate(net, enc, ['red apple'], (32, 32), 3, 3.5, 'cfg', 0)
    for text in (None, enc):                                                    # the pipeline's tokenizer, or our states
        assert (pipeline_sample(pipe, ['red apple'], 3, 3.5, 3.0, text=text) - ours).abs().max() < 1e-4
