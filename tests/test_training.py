"""The learner, checkpoints and runs: the loss function, EMA, checkpoint save/load equality and every damaged-checkpoint
case, config overrides and validation, the NaN guard keeping the last good checkpoint, exact resume, and the CLIs."""
import json, math, shutil, warnings
from pathlib import Path

import pytest
import torch

from pixeldiff_nb.model import PRXDenoiser, model_config
from pixeldiff_nb.diffusion import DiffusionConfig
from pixeldiff_nb.training import Objective, TrainModule, EMA, Learner, NaNGuardCB, unwrap, step_generator
from pixeldiff_nb.checkpoints import (save_checkpoint, load_checkpoint, latest_checkpoint, list_checkpoints, pack_state,
                                      unpack_state)
from pixeldiff_nb.config import get_preset, apply_overrides, validate_run, config_to_dict, config_from_dict, RunConfig
from pixeldiff_nb.runs import Run, train, train_cli, sample_cli, export_weights, load_for_sampling
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
    with pytest.raises(ValueError, match='must satisfy 0 <= start <= end'): get_preset('cpu', ['tread.start=5', 'tread.end=2'])


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


def test_nan_stops_run_and_keeps_last_good_checkpoint(micro_run, tmp_path):
    d, _ = micro_run
    out = tmp_path/'nan'
    shutil.copytree(d/'full', out)
    run = Run(get_preset('cpu', MICRO + [f'out_dir={out}', 'stages.0.steps=8']), resume='latest', progress=False)
    with torch.no_grad(): unwrap(run.model).net.blocks[0].mod.bias[0] = float('nan')
    with pytest.raises(FloatingPointError, match='Loss is not finite at step 4'): run.fit()
    ck = load_checkpoint(latest_checkpoint(out))
    assert ck['step'] == 4 and all(torch.isfinite(v).all() for v in ck['model'].values())


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
