"""`ProgressCB` as a notebook shows it: the outer bar reaches 1/1, the loss plot is one figure, closed at the end (so
Jupyter does not draw it a second time), and the validation loss carries a marker from its first point."""
import types
import matplotlib, matplotlib.figure
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import pytest
import torch
import fastprogress
import fastprogress.fastprogress as fp
from pixeldiff_nb.callbacks import ProgressCB

class Handle:
    "What IPython's `display(..., display_id=True)` returns: an output that `update` replaces in place."
    def __init__(self, obj): self.obj = obj
    def update(self, obj): self.obj = obj

@pytest.fixture
def notebook_bars(monkeypatch):
    "fastprogress's notebook bars, as inside Jupyter; yields the list of outputs the cell would show."
    import IPython.display
    shown = []
    def display(*objs, display_id=False, **kw):
        h = Handle(objs[0]); shown.append(h)
        return h if display_id else None
    monkeypatch.setattr(IPython.display, 'display', display)
    monkeypatch.setattr(fp, 'IN_NOTEBOOK', True)
    monkeypatch.setattr(fastprogress, 'master_bar', fp.NBMasterBar)
    monkeypatch.setattr(fastprogress, 'progress_bar', fp.NBProgressBar)
    yield shown

def fake_learner(steps, val_at):
    L = types.SimpleNamespace(rank=0, step=0, stop_step=steps, loss=torch.tensor(1.0),
                              history={'step': [], 'loss': [], 'val': []})
    def run(cb):
        cb.learn = L
        cb.before_fit()
        for s in range(1, steps + 1):
            L.step, L.loss = s, torch.tensor(1.0 / s)
            L.history['step'].append(s); L.history['loss'].append(1.0 / s)
            if s in val_at: L.history['val'].append((s, {'all': 2.0 / s}))
            cb.after_step()
        cb.after_fit()
    return L, run

def test_progress_cb_in_a_notebook(notebook_bars):
    plt.close('all')
    L, run = fake_learner(10, val_at={10})
    cb = ProgressCB(every=5)
    run(cb)
    outer = cb.mb.main_bar
    assert (outer.total, outer.last_v) == (1, None) and not outer.is_active   # 1/1 reached: master bar ended
    assert not cb.pb.is_active and cb.pb.total == 10
    assert plt.get_fignums() == []                      # the one figure is closed: no second copy at cell end
    figs = [h for h in notebook_bars if isinstance(h.obj, matplotlib.figure.Figure)]
    assert len(figs) == 1                               # one plot, updated in place
    bars = [h.obj for h in notebook_bars if 'progress' in str(h.obj)]
    assert 'value="1"' in str(bars[-1]) and '[10/10' in str(bars[-1])   # both finished bars stay on screen
    lines = cb.ax.get_lines()
    assert [l.get_label() for l in lines] == ['train', 'validation']
    assert lines[1].get_marker() == 'o' and len(lines[1].get_xdata()) == 1   # one validation point, visible

def test_progress_cb_in_a_terminal(monkeypatch):
    monkeypatch.setattr(fp, 'IN_NOTEBOOK', False)
    plt.close('all')
    L, run = fake_learner(4, val_at={4})
    cb = ProgressCB(every=2)
    run(cb)
    assert cb.mb is None and cb.fig is None and plt.get_fignums() == []   # a bar only, no figure

def test_ablate_shows_a_bar_per_variant_and_no_plot(notebook_bars, tmp_path, capsys):
    from pixeldiff_nb.ablation import ablate
    plt.close('all')
    toy = ['model.depth=2', 'model.hidden=64', 'model.heads=1', 'stages.0.global_batch=8',
           "data.sources=[{'source': 'shapes', 'n': 64, 'size': 32}]", 'sample_every=0',
           'val_every=0', 'ckpt_every=0', 'val_batches=1', 'warmup=1']
    res = ablate({'a': [], 'b': ['optim.kind=adamw']}, toy, 'shapes', tmp_path, steps=3)
    for name, r in res.items():
        bars = [c for c in r['run'].learn.cbs if isinstance(c, ProgressCB)]
        assert len(bars) == 1 and bars[0].pb.total == 3 and not bars[0].plot
    assert not any(isinstance(h.obj, matplotlib.figure.Figure) for h in notebook_bars)
    assert capsys.readouterr().out.splitlines()[:1] == ['a:']      # each bar under its variant's name
