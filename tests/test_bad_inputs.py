"""Every bad input to `pixeldiff-train` gives one line that names the key, the value and what to do, and no traceback.
A new case is one row of CASES: (command-line arguments, exit code, words the one-line message must contain)."""
import subprocess, sys

import pytest

from pixeldiff_nb.cli import train_cli

CASES = [
    (['optim.lr=abc'], 2, 'optim.lr=abc: expected a finite float, e.g. optim.lr=0.002'),
    (['optim.lr=nan'], 2, 'optim.lr=nan: expected a finite float'),
    (['optim.lr=-0.001'], 2, 'optim.lr=-0.001: expected a float >= 0'),
    (['model.hidden=abc'], 2, 'model.hidden=abc: expected an integer, e.g. model.hidden=256'),
    (['model.bottleneck=x'], 2, 'model.bottleneck=x: expected an integer or none'),
    (['stages.0.steps=ten'], 2, 'stages.0.steps=ten: expected an integer, e.g. stages.0.steps=600'),
    (['stages.0.steps=1e3'], 2, 'stages.0.steps=1e3: expected an integer'),
    (['stages.0.steps=-5'], 2, 'stages.0.steps=-5: expected an integer >= 1'),
    (['stages.3.steps=4'], 2, 'stages.3.steps: this preset has 1 stage(s)'),
    (['stages.0.micro_batch=0'], 2, 'stages.0.micro_batch=0: expected an integer >= 1'),
    (['stages.0.image_size=60'], 2, 'stages.0.image_size=60 is not divisible by the patch size 8'),
    (['seed=1.5'], 2, 'seed=1.5: expected an integer'),
    (['loss.dino_pooled=maybe'], 2, 'loss.dino_pooled=maybe: expected true or false'),
    (['repa.enabled=false'], 2, 'repa.enabled is gone: each feature has one switch, its weight or rate; use repa.weight=0'),
    (['tread.enabled=false'], 2, 'tread.enabled is gone: each feature has one switch, its weight or rate; use tread.rate=0'),
    (['stages.0.repa=false'], 2, 'stages.0.repa is gone: each feature has one switch, its weight or rate; use stages.0.repa_weight=0'),
    (['tread.rate=1.5'], 2, 'tread.rate=1.5 must be in [0, 1)'),
    (['tread.start=5', 'tread.end=2'], 2, 'must satisfy 0 <= tread.start <= tread.end'),
    (['model.heads=3'], 2, 'model.hidden=256 is not divisible by model.heads=3'),
    (['model.axes_dim=[1,2,3]'], 2, 'model.axes_dim=[1,2,3]: expected a list of 2 numbers'),
    (['optim.betas=[0.9]'], 2, 'optim.betas=[0.9]: expected a list of 2 numbers'),
    (['optim.kind=sgd'], 2, 'optim.kind=sgd: expected one of muon, adamw'),
    (['precision=fp8'], 2, 'precision=fp8: expected one of auto, bf16, no'),
    (['ema_decay=1.5'], 2, 'ema_decay=1.5: expected a float in [0, 1]'),
    (['max_skips=0'], 2, 'max_skips=0: expected an integer >= 1'),
    (['data.val_fraction=1'], 2, 'data.val_fraction=1: expected a float in [0, 1)'),
    (['data.caption_columns=5'], 2, 'data.caption_columns=5: expected a dict or a list or none'),
    (['data.source=/no/such/folder'], 2, 'data source /no/such/folder does not exist: set data.source'),
    (['repa.weight=0.5', 'repa.layer=8'], 2, 'repa.layer=8 is beyond the model'),
    (['model.dpth=2'], 2, "Unknown config key 'model.dpth' (did you mean 'model.depth'"),
    (['--preset', 'nope'], 2, "Unknown preset 'nope': choose one of cpu, gpu"),
    (['steps'], 2, "Override 'steps' is not of the form key=value"),
    (['--preset', 'cpuu'], 2, "Unknown preset 'cpuu' (did you mean 'cpu'"),
    (['--resume', '/no/such/checkpoint'], 2, '--resume /no/such/checkpoint: no checkpoint there'),
    (['--bogus'], 2, 'unrecognized arguments: --bogus (see pixeldiff-train --help)'),
    (['--show-config', 'optim.lr=abc'], 2, 'optim.lr=abc: expected a finite float'),
]


def _one_line(capsys, argv) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e: train_cli(argv)
    err = capsys.readouterr().err
    return e.value.code, err


@pytest.mark.parametrize('argv,code,words', CASES, ids=[' '.join(c[0]) for c in CASES])
def test_bad_input_gives_one_line(argv, code, words, capsys):
    got, err = _one_line(capsys, argv)
    assert got == code, err
    assert 'Traceback' not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith('pixeldiff-train: error: ') and words in err, err


def test_help_lists_every_preset(capsys):
    with pytest.raises(SystemExit) as e: train_cli(['--help'])
    out = capsys.readouterr().out
    listed = ' '.join(out.split()).split('one of: ')[1].split(' --resume')[0]
    assert e.value.code == 0 and {'cpu', 'gpu', 'speedrun'} <= set(listed.split(', '))


def test_bad_override_end_to_end_in_a_fresh_process():
    "The installed entry point, in a new interpreter (no preset registered by an earlier import): one line, exit 2."
    cmd = [sys.executable, '-c', 'import sys; from pixeldiff_nb.cli import train_cli; sys.exit(train_cli())',
           '--preset', 'speedrun', 'optim.lr=abc']
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and 'Traceback' not in res.stderr
    assert res.stderr.strip() == 'pixeldiff-train: error: optim.lr=abc: expected a finite float, e.g. optim.lr=0.0001'
