"""The learner, checkpoints and runs: the loss function, EMA, checkpoint save/load equality and every damaged-checkpoint
case, config overrides and validation, the NaN guard keeping the last good checkpoint, exact resume, and the CLIs."""
import json, math, shutil

import pytest
import torch

from pixeldiff_nb.model import PRXDenoiser, model_config
from pixeldiff_nb.diffusion import DiffusionConfig
from pixeldiff_nb.training import Objective, TrainModule, EMA, Learner, ClipCB, unwrap, step_generator, model_patch
from pixeldiff_nb.checkpoints import (save_checkpoint, load_checkpoint, latest_checkpoint, list_checkpoints, pack_state,
                                      unpack_state)
from pixeldiff_nb.config import validate_run, config_to_dict, config_from_dict, RunConfig
from pixeldiff_nb.presets import get_preset
from pixeldiff_nb.runs import Run
from pixeldiff_nb.cli import train, train_cli, sample_cli, export_weights, load_for_sampling
from pixeldiff_nb.ablation import StepClock, TimeBudgetCB, step_cost

MICRO = ['model.depth=2', 'model.hidden=64', 'model.heads=1', 'stages.0.global_batch=4', 'stages.0.steps=4', 'val_every=2',
         'sample_every=0', 'ckpt_every=2', 'log_every=2', 'val_batches=1', 'warmup=2']


def _batch(cfg, B=4, L=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {'pixels': torch.rand(B, 3, 32, 32, generator=g) * 2 - 1, 'txt': torch.randn(B, L, cfg.text_dim, generator=g),
            'mask': torch.ones(B, L, dtype=torch.bool)}


def test_objective_is_a_function_of_the_step():
    cfg = model_config('tiny', depth=1)
    obj = Objective(DiffusionConfig(), torch.zeros(1, 6, cfg.text_dim), torch.ones(1, 6, dtype=torch.bool), seed=0)
    m, b = TrainModule(PRXDenoiser(cfg)), _batch(cfg)
    l1, parts = obj(m, b, step=3)
    assert torch.equal(l1, obj(m, b, step=3)[0]) and not torch.equal(l1, obj(m, b, step=4)[0])
    assert set(parts) == {'mse'} and torch.equal(parts['mse'], l1)
    g1, g2 = step_generator(0, 3, 0), step_generator(0, 3, 1)
    assert not torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


def _objective_before(obj, model, batch, step, rank=0, train=True):
    "The loss as Objective computed it before it called perceptual_parts (a copy, for the comparison below)."
    from pixeldiff_nb.diffusion import sample_t, interpolate, v_loss, drop_captions
    from pixeldiff_nb.repa import repa_loss
    d, x0, txt, mask = obj.d, batch['pixels'], batch['txt'], batch['mask']
    B, dev = x0.shape[0], x0.device
    g = step_generator(obj.seed, step, rank)
    t = sample_t(B, d.shift, d.t_mean, d.t_std, d.uniform_frac, d.t_min, generator=g).to(dev)
    eps = torch.randn(x0.shape, generator=step_generator(obj.seed, step, rank, dev, 'eps'), device=dev) * d.noise_scale
    if train and d.caption_dropout > 0:
        txt, mask = drop_captions(txt, mask, obj.null_txt.to(dev), obj.null_mask.to(dev), d.caption_dropout, generator=g)
    x_t = interpolate(x0, eps, t)
    n_tokens = (x0.shape[-2] // model_patch(model)) * (x0.shape[-1] // model_patch(model))
    plan = obj.router(B, n_tokens, step=step, rank=rank, device=dev) if (train and obj.router) else None
    layer = obj.repa.layer if (train and obj.repa is not None) else None
    out = model(x_t, t, txt, mask, route=plan, return_block=layer)
    x0_hat, feats, idx = out if layer is not None else (out, None, None)
    x0_hat = x0_hat.float()
    parts = {'mse': v_loss(x0_hat, x0, x_t, t, d.t_clamp)}
    total = parts['mse']
    for name, (w, loss_fn) in obj.perceptual.items():
        parts[name] = loss_fn(x0_hat, x0).mean()
        total = total + w * parts[name]
    if layer is not None:
        parts['repa'] = repa_loss(feats, obj.repa.teacher_features(x0), idx)
        total = total + obj.repa.weight * parts['repa']
    return total, parts


def test_objective_equals_its_previous_implementation():
    "Perceptual terms, REPA and TREAD on: the loss through perceptual_parts equals the former inline code, bit for bit."
    from pixeldiff_nb.repa import RepaConfig, build_repa, dinov3_config
    from pixeldiff_nb.tread import Router, TreadConfig
    torch.manual_seed(0)
    cfg = model_config('tiny', depth=3, hidden=64, heads=2, axes_dim=(16, 16), text_dim=16)
    net = PRXDenoiser(cfg)
    with torch.no_grad(): net.final.out.weight.normal_(0, 0.02)          # a non-zero x0_hat
    repa = build_repa(RepaConfig(layer=1, proj_width=16), cfg, teacher=dinov3_config('tiny'))
    per_image = lambda k: (lambda a, b: ((a - b).abs() ** k).flatten(1).mean(1))   # cheap stand-ins, (B,) each
    perceptual = {'lpips': (0.1, per_image(1)), 'dino': (0.01, per_image(3))}
    obj = Objective(DiffusionConfig(), torch.zeros(1, 6, 16), torch.ones(1, 6, dtype=torch.bool), perceptual, repa,
                    Router(TreadConfig(rate=0.5, start=1, end=1), cfg.depth), seed=0)
    model, batch = TrainModule(net, repa.projector), _batch(cfg, B=2)
    for step in (0, 5):
        new, new_parts = obj(model, batch, step)
        old, old_parts = _objective_before(obj, model, batch, step)
        assert list(new_parts) == list(old_parts) == ['mse', 'lpips', 'dino', 'repa']
        assert all(torch.equal(new_parts[k], old_parts[k]) for k in old_parts), step
        assert torch.equal(new, old)
    # a stage's own REPA weight (stages.N.repa_weight) scales the term; the parts stay the same
    stage = Objective(obj.d, obj.null_txt, obj.null_mask, perceptual, repa, obj.router, seed=0, repa_weight=0.3)
    (full, parts), (weaker, wparts) = obj(model, batch, 5), stage(model, batch, 5)
    assert obj.repa_weight == repa.weight == 0.5 and torch.equal(parts['repa'], wparts['repa'])
    torch.testing.assert_close(full - weaker, 0.2 * parts['repa'])


def test_build_objective_takes_the_stage_repa_weight():
    from pixeldiff_nb.builders import build_objective
    from types import SimpleNamespace
    cfg = get_preset('cpu', MICRO + ['repa.weight=0.5', 'stages.0.repa_weight=0.25'])
    data = SimpleNamespace(null_txt=torch.zeros(1, 6, 16), null_mask=torch.ones(1, 6, dtype=torch.bool))
    repa = SimpleNamespace(weight=0.5)
    assert build_objective(cfg, 0, data, repa, {}).repa_weight == 0.25


def test_ema_update_rule():
    lin = torch.nn.Linear(3, 3)
    ema = EMA(lin, decay=0.9, every=2)
    w0 = lin.weight.detach().clone()
    with torch.no_grad(): lin.weight.add_(1)
    ema.update(lin, 1); assert torch.equal(ema.shadow['weight'], w0)
    ema.update(lin, 2); torch.testing.assert_close(ema.shadow['weight'], w0 + 0.1)
    with pytest.raises(ValueError, match='another model size'): ema.load_state_dict({'weight': w0})


def test_pack_unpack_state():
    import numpy as np
    s = {'a': (1, [2.5, None]), 3: {'t': torch.arange(3)}, 'n': np.arange(3, dtype=np.uint32), 'x': 'y'}
    skel, t = pack_state(s)
    back = unpack_state(json.loads(json.dumps(skel)), t)
    assert back['a'] == (1, [2.5, None]) and torch.equal(back[3]['t'], torch.arange(3)) and back['n'].dtype == np.uint32
    with pytest.raises(TypeError, match='Cannot store a set'): pack_state({'s': {1, 2}})


def test_checkpoint_equality_and_damage(tmp_path):
    net = PRXDenoiser(model_config('tiny', depth=1))
    cfg = {'model': json.loads(json.dumps(__import__('dataclasses').asdict(net.cfg)))}
    for s in (1, 2): save_checkpoint(tmp_path, s, model_sd=net.state_dict(), config=cfg, trainer_state={'step': s}, keep_last=5)
    ck = load_checkpoint(latest_checkpoint(tmp_path), net.cfg)
    assert ck['step'] == 2 and all(torch.equal(ck['model'][k], v) for k, v in net.state_dict().items())
    with pytest.raises(ValueError, match='different model \\(depth=1'): load_checkpoint(tmp_path/'checkpoints'/'step-00000002', model_config('tiny', depth=2))
    f = tmp_path/'checkpoints'/'step-00000002'/'model.safetensors'
    data = bytearray(f.read_bytes()); data[-1] ^= 0xFF; f.write_bytes(bytes(data))      # one flipped byte
    with pytest.raises(ValueError, match='is corrupted'): load_checkpoint(f.parent)
    f.write_bytes(bytes(data[:100]))                                                     # truncated
    with pytest.raises(ValueError, match='is truncated'): load_checkpoint(f.parent)
    with pytest.warns(UserWarning, match='Skipping step-00000002'): assert latest_checkpoint(tmp_path).name == 'step-00000001'
    with pytest.raises(FileNotFoundError, match='No checkpoint at'): load_checkpoint(tmp_path/'nope')


def test_overrides_and_validation():
    cfg = get_preset('cpu', ['model.depth=4', 'optim.lr=3e-4', 'stages.0.steps=7', 'loss.lpips_weight=0.1'])
    assert (cfg.model.depth, cfg.optim.lr, cfg.stages[0].steps, cfg.loss.lpips_weight) == (4, 3e-4, 7, 0.1)
    assert config_from_dict(RunConfig, config_to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="Unknown config key 'model.dpth' \\(did you mean 'model.depth'"): get_preset('cpu', ['model.dpth=2'])
    with pytest.raises(ValueError, match='not of the form key=value'): get_preset('cpu', ['steps'])
    with pytest.raises(ValueError, match="Unknown preset 'cpuu'"): get_preset('cpuu')
    with pytest.raises(ValueError, match='image_size=60 is not divisible by the patch size 8'): validate_run(get_preset('cpu', ['stages.0.image_size=60']))
    with pytest.raises(ValueError, match='not divisible by 3 processes'): validate_run(get_preset('cpu'), world_size=3)
    with pytest.raises(ValueError, match='repa.layer=8 is beyond'): validate_run(get_preset('cpu', ['repa.weight=0.5', 'repa.layer=8']))
    with pytest.raises(ValueError, match='must satisfy 0 <= tread.start <= tread.end'): get_preset('cpu', ['tread.start=5', 'tread.end=2'])
    with pytest.raises(ValueError, match='optim.lr=abc: expected a finite float, e.g. optim.lr=0.002'): get_preset('cpu', ['optim.lr=abc'])
    with pytest.raises(ValueError, match='optim.lr=-0.001: expected a float >= 0'): validate_run(get_preset('cpu', ['optim.lr=-0.001']))
    cfg = get_preset('cpu', ['data.caption_columns=[text]', 'model.bottleneck=none', 'optim.betas=[0.8,0.9]', 'data.source=123'])
    assert (cfg.data.caption_columns, cfg.model.bottleneck, cfg.optim.betas, cfg.data.source) == (['text'], None, (0.8, 0.9), '123')


@pytest.fixture(scope='module')
def micro_run(tmp_path_factory):
    d = tmp_path_factory.mktemp('runs')
    full = train(get_preset('cpu', MICRO + [f'out_dir={d}/full']), progress=False)
    return d, full


def test_run_writes_log_checkpoints_and_resumes_exactly(micro_run):
    d, full = micro_run
    assert [p.name for p in list_checkpoints(d/'full')] == ['step-00000002', 'step-00000004']
    recs = [json.loads(l) for l in (d/'full'/'log.jsonl').read_text().splitlines()]
    assert [r['step'] for r in recs] == [2, 4] and 'val' in recs[-1] and 'tokens_per_s' in recs[-1]
    data = recs[-1]['data']                                         # the stage's data summary ends the stage
    assert data['seen'] >= data['used'] > 0 and data['skipped'] == {} and set(data) >= {'converted'}
    assert (d/'full'/'loss.png').exists() and json.loads((d/'full'/'config.json').read_text())['model']['depth'] == 2
    train(get_preset('cpu', MICRO + [f'out_dir={d}/cut', 'stages.0.steps=2']), progress=False)
    resumed = train(get_preset('cpu', MICRO + [f'out_dir={d}/cut']), resume='latest', progress=False)
    a, b = unwrap(full.model).net.state_dict(), unwrap(resumed.model).net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(full.ema.shadow[k], resumed.ema.shadow[k]) for k in a)
    ka, kb = full.opt.state_dict()['state'], resumed.opt.state_dict()['state']
    assert all(torch.equal(ka[i][n], kb[i][n]) for i in ka for n in ka[i] if torch.is_tensor(ka[i][n]))


def test_resume_from_another_model_size_fails(micro_run):
    d, _ = micro_run
    with pytest.raises(ValueError, match='different model \\(depth=2'):
        Run(get_preset('cpu', MICRO + [f'out_dir={d}/full', 'model.depth=3']), resume='latest', progress=False)


@pytest.mark.parametrize('max_skips,msg', [
    (2, r'2 steps in a row \(5\.\.6\) were not finite \(loss nan, grad norm nan\); none was applied'),
    (3, r'Not writing checkpoint step-00000006: model/blocks\.0\.mod\.bias holds NaN or inf')])
def test_nan_is_skipped_then_stops_and_keeps_last_good_checkpoint(micro_run, tmp_path, max_skips, msg, capsys):
    d, _ = micro_run
    out = tmp_path/'nan'
    shutil.copytree(d/'full', out)
    run = Run(get_preset('cpu', MICRO + [f'out_dir={out}', 'stages.0.steps=8', f'max_skips={max_skips}']), resume='latest',
              progress=False)
    with torch.no_grad(): unwrap(run.model).net.blocks[0].mod.bias[0] = float('nan')     # poison a weight directly
    with pytest.raises(FloatingPointError, match=msg): run.fit()
    assert 'step 5: loss nan, grad norm nan is not finite: update skipped (1 in a row' in capsys.readouterr().out
    ck = load_checkpoint(latest_checkpoint(out))
    assert ck['step'] == 4 and all(torch.isfinite(v).all() for v in ck['model'].values())


def test_huge_lr_never_reaches_weights_or_checkpoints_and_resumes(tmp_path, capsys):
    "lr=1e6: the grad norm turns NaN while the loss is still finite; no such update is applied or saved."
    out = tmp_path/'lr'
    argv = MICRO + [f'out_dir={out}', 'optim.lr=1e6', 'warmup=1', 'ckpt_every=1', 'val_every=0', 'stages.0.steps=6']
    with pytest.raises(SystemExit) as e: train_cli(argv)
    io = capsys.readouterr()
    assert e.value.code == 1 and 'steps in a row' in io.err and 'none was applied, and no checkpoint is written with NaN or inf' in io.err
    assert 'grad norm nan is not finite: update skipped' in io.out
    recs = [json.loads(l) for l in (out/'log.jsonl').read_text().splitlines()]
    assert any(math.isfinite(r['loss']) and not math.isfinite(r['grad_norm']) for r in recs)   # the case the loss alone misses
    assert recs[-1]['skipped_steps'] >= 1
    for p in list_checkpoints(out):
        ck = load_checkpoint(p)
        assert all(torch.isfinite(v).all() for part in ('model', 'ema') for v in ck[part].values()), p.name
    last = latest_checkpoint(out)
    with pytest.raises(SystemExit): train_cli(argv[:-1] + ['stages.0.steps=8', 'optim.lr=1e-3', '--resume', 'latest'])
    io = capsys.readouterr()
    assert f'resumed from {last} at step {int(last.name[5:])}' in io.out
    assert 'resume: optim.lr changed from 1000000.0 to 0.001' in io.out
    assert json.loads((out/'log.jsonl').read_text().splitlines()[-1])['step'] > int(last.name[5:])   # it went on


def test_nonfinite_checkpoint_is_never_written_and_never_picked(tmp_path):
    net = PRXDenoiser(model_config('tiny', depth=1))
    cfg = {'model': json.loads(json.dumps(__import__('dataclasses').asdict(net.cfg)))}
    save_checkpoint(tmp_path, 1, model_sd=net.state_dict(), config=cfg)
    bad = {k: v.clone() for k, v in net.state_dict().items()}
    k = next(k for k, v in bad.items() if v.ndim == 2)
    bad[k][0, 0] = float('inf')
    with pytest.raises(FloatingPointError, match=f'Not writing checkpoint step-00000002: model/{k} holds NaN or inf'):
        save_checkpoint(tmp_path, 2, model_sd=bad, config=cfg)
    assert [p.name for p in list_checkpoints(tmp_path)] == ['step-00000001']
    old = save_checkpoint(tmp_path, 3, model_sd=net.state_dict(), config=cfg)       # one written before the check existed
    from safetensors.torch import save_file
    from pixeldiff_nb.checkpoints import _sha256
    save_file(bad, old/'model.safetensors')
    man = json.loads((old/'manifest.json').read_text()); man.pop('finite')
    man['files']['model.safetensors'] = {'bytes': (old/'model.safetensors').stat().st_size, 'sha256': _sha256(old/'model.safetensors')}
    (old/'manifest.json').write_text(json.dumps(man))
    with pytest.warns(UserWarning, match=f'Skipping step-00000003: model/{k} holds NaN or inf'):
        assert latest_checkpoint(tmp_path).name == 'step-00000001'
    shutil.rmtree(tmp_path/'checkpoints'/'step-00000001')                            # only the poisoned one is left
    with pytest.warns(UserWarning), pytest.raises(FileNotFoundError, match='None of the 1 checkpoints .* can be resumed'):
        Run(get_preset('cpu', MICRO + [f'out_dir={tmp_path}']), resume='latest', progress=False)   # never a silent fresh start


def test_resume_applies_changed_lr_and_refuses_a_fixed_key(micro_run, tmp_path, capsys):
    d, _ = micro_run
    out = tmp_path/'lr'
    shutil.copytree(d/'full', out)
    run = train(get_preset('cpu', MICRO + [f'out_dir={out}', 'stages.0.steps=6', 'optim.lr=1e-5', 'grad_clip=0.5']),
                resume='latest', progress=False)
    io = capsys.readouterr().out
    assert 'resume: optim.lr changed from 0.002 to 1e-05, applied from step 4' in io
    assert 'resume: grad_clip changed from 1.0 to 0.5' in io and 'stages.0.steps changed from 4 to 6' in io
    clip = next(c for c in run.learn.cbs if isinstance(c, ClipCB))
    assert clip.max_norm == 0.5 and run.sched.base_lrs == [1e-5] * len(run.sched.base_lrs)
    rec = json.loads((out/'log.jsonl').read_text().splitlines()[-1])
    assert rec['step'] == 6 and rec['lr'] == [1e-5] * len(rec['lr'])                  # the log shows the new lr
    with pytest.raises(ValueError, match=r'Cannot change on resume: optim\.momentum=0\.9 \(the checkpoint has 0\.95\)'):
        Run(get_preset('cpu', MICRO + [f'out_dir={out}', 'optim.momentum=0.9']), resume='latest', progress=False)
    with pytest.raises(ValueError, match=r'Cannot change on resume: diffusion\.shift=2\.0'):
        Run(get_preset('cpu', MICRO + [f'out_dir={out}', 'diffusion.shift=2']), resume='latest', progress=False)


def test_export_and_sample_cli(micro_run, tmp_path, capsys):
    d, full = micro_run
    f = export_weights(latest_checkpoint(d/'full'), tmp_path/'w.safetensors')
    net, cfg = load_for_sampling(f)
    assert cfg.model == full.cfg.model and all(torch.equal(v, full.ema.shadow[k]) for k, v in net.state_dict().items())
    assert sample_cli([str(f), 'red apple', '--steps', '2', '--size', '32', '--out', str(tmp_path/'g.png')]) == 0
    assert (tmp_path/'g.png').exists()
    with pytest.raises(SystemExit) as e: sample_cli([str(tmp_path/'nothing'), 'x'])
    assert e.value.code == 2 and 'No checkpoint in' in capsys.readouterr().err


def test_train_cli_rejects_bad_override(capsys):
    with pytest.raises(SystemExit) as e: train_cli(['--preset', 'cpu', 'model.depht=3'])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "did you mean 'model.depth'" in err and len(err.strip().splitlines()) == 1


class _Ticker:
    "A fake clock that advances by 1 s per reading, so StepClock's split is exact."
    def __init__(self): self.t = 0.0
    def __call__(self): self.t += 1.0; return self.t


def test_step_clock_splits_steps_and_stops_the_fit():
    cfg = model_config('tiny', depth=1, hidden=32, heads=2, axes_dim=(8, 8), text_dim=16, bottleneck=8)
    model = TrainModule(PRXDenoiser(cfg))
    batches = iter([_batch(cfg, B=2)] * 10)
    clock = StepClock(n=3, clock=_Ticker(), order=100)
    learn = Learner(model, Objective(DiffusionConfig(), torch.zeros(1, 6, 16), torch.ones(1, 6, dtype=torch.bool)),
                    torch.optim.SGD(model.parameters(), lr=0.0), batches, cbs=[clock])
    learn.fit(10)
    assert learn.step == 3 and clock.times == [(1.0, 1.0)] * 3        # stopped after n steps; one tick per reading
    assert clock.step_s == [2.0] * 3 and clock.rest_s == [1.0] * 3
    assert StepClock().order == 5 and StepClock(order=100).order == 100


def test_time_budget_stops_the_fit_on_its_clock():
    cfg = model_config('tiny', depth=1, hidden=32, heads=2, axes_dim=(8, 8), text_dim=16, bottleneck=8)
    model = TrainModule(PRXDenoiser(cfg))
    budget = TimeBudgetCB(2.5, clock=_Ticker())                        # readings 1 (start), 2, 3, 4: over budget after step 3
    learn = Learner(model, Objective(DiffusionConfig(), torch.zeros(1, 6, 16), torch.ones(1, 6, dtype=torch.bool)),
                    torch.optim.SGD(model.parameters(), lr=0.0), iter([_batch(cfg, B=2)] * 10), cbs=[budget])
    learn.fit(10)
    assert learn.step == 3


def test_step_cost_refuses_nothing_to_time():
    with pytest.raises(ValueError, match='needs steps > skip'): step_cost(steps=2, skip=2)


def test_bad_metadata_line_and_text_only_folder_train_with_a_summary(tmp_path, capsys):
    "A folder with one malformed metadata line and only a `text` column trains; the stage's data summary is shown and logged."
    from pixeldiff_nb.core import data_samples_dir
    src, d = data_samples_dir(), tmp_path/'folder'
    d.mkdir(); (d/'images').symlink_to(src/'images')
    rows = [json.loads(l) for l in (src/'metadata.jsonl').read_text().splitlines()][:40]
    lines = [json.dumps({'file_name': r['file_name'], 'text': r['text']}) for r in rows]
    lines[9] = lines[9][:-3]                                         # line 10 is cut short
    (d/'metadata.jsonl').write_text('\n'.join(lines) + '\n')
    argv = MICRO + [f'out_dir={tmp_path/"run"}', f'data.source={d}', 'stages.0.steps=2', 'val_every=0', 'data.val_fraction=0']
    assert train_cli(argv) == 0
    out = capsys.readouterr().out
    assert f"{d}: caption columns ['caption_long'] not found; using ['text'] (set data.caption_columns=[text]" in out
    assert f'stage 0 (64px) data: 40 records seen, 8 used; skipped: bad_metadata_line 1 ({d/"metadata.jsonl"}:10)' in out
    rec = json.loads((tmp_path/'run'/'log.jsonl').read_text().splitlines()[-1])
    assert rec['data']['skipped'] == {'bad_metadata_line': 1} and rec['data']['bad_metadata_lines'] == [f'{d/"metadata.jsonl"}:10']


def test_runs_of_different_precisions_in_one_process(tmp_path):
    "A notebook kernel (or a test session) may train a bf16 run and then a full-precision one: no 'restart your runtime'."
    assert Run(get_preset('cpu', MICRO + ['precision=bf16', f'out_dir={tmp_path}/a']), progress=False).acc.mixed_precision == 'bf16'
    assert Run(get_preset('cpu', MICRO + ['precision=no', f'out_dir={tmp_path}/b']), progress=False).acc.mixed_precision == 'no'


def test_repa_off_for_the_run_but_on_in_a_stage_is_built():
    "repa.weight=0 with stages.0.repa_weight=0.5: the stage's value wins, so the teacher and projector exist."
    from pixeldiff_nb.builders import build_model
    cfg = get_preset('cpu', MICRO + ['repa.weight=0', 'stages.0.repa_weight=0.5', 'repa.teacher=vgg16', 'repa.layer=1'])
    _, repa = build_model(cfg)
    assert repa is not None and repa.weight == 0.5
