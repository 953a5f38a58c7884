"""The shapes presets, the held-out prompt set, FollowingCB (scores during training, kept out of the CPU budget), the
ingredient table and the linear probe of text states."""
import os
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import pytest
import torch

from pixeldiff_nb.config import validate_run
from pixeldiff_nb.presets import get_preset, PRESETS
from pixeldiff_nb.shapes import shapes_sample
from pixeldiff_nb.evaluation import SCORED
from pixeldiff_nb.following import (TARGET, FollowingCB, shapes_prompts, train_following, read_following, plot_following,
                                    ingredient_table, text_probe)

TOY = ['model.depth=3', 'model.hidden=64', 'model.heads=1', "data.sources=[{'source': 'shapes', 'n': 48, 'size': 32}]",
       'stages.0.global_batch=8', 'sample_every=0', 'val_every=0', 'ckpt_every=0', 'val_batches=1', 'warmup=2']


def test_shapes_presets_are_registered_and_valid():
    assert {'shapes', 'shapes_gpu'} <= set(PRESETS)
    for name in ('shapes', 'shapes_gpu'):
        cfg = validate_run(get_preset(name))
        assert cfg.preset == name and cfg.data.sources[0]['source'] == 'shapes'
        assert cfg.stages[0].image_size % cfg.model.patch == 0
        assert 0 <= cfg.tread.start <= cfg.tread.end < cfg.model.depth and cfg.repa.layer < cfg.model.depth
    cpu, gpu = get_preset('shapes'), get_preset('shapes_gpu')
    assert gpu.model.hidden > cpu.model.hidden and gpu.stages[0].global_batch > cpu.stages[0].global_batch
    assert validate_run(get_preset('shapes', ['tread.rate=0.5', 'repa.weight=0.5'])).tread.rate == 0.5
    with pytest.raises(ValueError, match="did you mean 'model.depth'"): get_preset('shapes', ['model.dept=2'])


def test_held_out_prompts():
    p, a = shapes_prompts(16, 32)
    assert p == [shapes_sample(i, 32, seed=1)[1] for i in range(16)]
    assert p != shapes_prompts(16, 32, seed=0)[0]
    assert all(x['count'] in (1, 2, 3) and x['color'] in p[i] for i, x in enumerate(a))


def test_following_cb_logs_scores_and_keeps_them_out_of_the_budget(tmp_path, one_thread):
    p, a = shapes_prompts(2, 32)
    run = train_following('shapes', TOY + [f'out_dir={tmp_path}/r', 'stages.0.steps=7'], prompts=p, attrs=a, every=3, steps=1)
    cb = run.following
    assert isinstance(cb, FollowingCB) and [r['step'] for r in cb.history] == [0, 3, 6, 7]
    assert read_following(tmp_path/'r'/'following.jsonl') == cb.history
    assert set(cb.history[-1]['following']) == set(SCORED) | {'all'} and cb.history[-1]['n'] == 2
    assert cb.history[0]['following']['color'] == 0.0                # the untrained model draws no shape
    assert cb.spent > 0 and all(b['train_s'] >= a['train_s'] for a, b in zip(cb.history, cb.history[1:]))
    assert (tmp_path/'r'/'checkpoints').is_dir()
    fig = plot_following(cb.history, 'train_s')
    assert len(fig.axes[0].lines) == 5 + len(TARGET)


def test_budget_counts_training_time_only(tmp_path, one_thread):
    p, a = shapes_prompts(2, 32)
    run = train_following('shapes', TOY + [f'out_dir={tmp_path}/b', 'stages.0.steps=100000'], cpu_seconds=1.0,
                          prompts=p, attrs=a, every=2, steps=1)
    h = run.following.history
    assert 1.0 <= h[-1]['train_s'] < 2.5 and run.learn.step < 100000
    assert run.following.spent > 0


def test_ingredient_table_lists_every_variant_and_score():
    rec = lambda s: dict(steps=s, s_per_step=0.5, val=0.3, following={k: 0.25 for k in SCORED + ('all',)})
    lines = ingredient_table({'baseline': rec(10), '+Muon': rec(12)}).splitlines()
    assert len(lines) == 3 and lines[0].split()[:4] == ['variant', 'steps', 's/step', 'val']
    assert lines[2].split()[:2] == ['+Muon', '12'] and lines[1].split().count('0.250') == 5


class _States:
    "A stand-in text tower: captions -> given token states."
    def __init__(self, table): self.table = table
    def encode(self, caps):
        s = torch.stack([self.table[c] for c in caps])[:, None]       # one token per caption
        return s, torch.ones(len(caps), 1, dtype=torch.bool)


def test_text_probe_separates_what_the_states_encode(one_thread):
    p, a = shapes_prompts(300, 16, seed=5)
    g = torch.Generator().manual_seed(0)
    count_code = {1: torch.randn(16, generator=g), 2: torch.randn(16, generator=g), 3: torch.randn(16, generator=g)}
    table = {c: count_code[x['count']] + 0.05 * torch.randn(16, generator=g) for c, x in zip(p, a)}
    r = text_probe(_States(table), p, a, keys=('count', 'color'), epochs=150)
    assert r['count']['accuracy'] > 0.95 and r['count']['classes'] == 3
    assert r['color']['accuracy'] < r['color']['chance'] + 0.25      # colour is not in these states
    assert r['color']['classes'] == 8


def test_scorer_reads_an_image_of_specks_as_no_shape():
    from pixeldiff_nb.evaluation import read_shapes
    x = torch.ones(3, 32, 32)
    x[:, 5, 5] = x[:, 20, 20] = -1                                    # two one-pixel specks, no shape
    r = read_shapes(x)
    assert (r['count'], r['color'], r['background']) == (0, None, 'white')
