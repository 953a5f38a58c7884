"""Run every notebook in `nbs/` as one pytest test, with the project's skip flags (`slow`, `gpu`, `notest`) honoured.

Each notebook runs in its own Python process (fresh memory and RNG state), through nbdev's notebook runner, so this
file gives a normal pytest summary with one line per notebook. On a GPU machine, `nbdev-test --flags gpu` runs the
cells this module skips.
"""
import os, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT/'nbs').glob('*.ipynb') if not p.name.startswith(('_', '.')))

RUNNER = """
import sys
from nbdev.config import get_config
from nbdev.test import test_nb
ok, secs = test_nb(sys.argv[1], skip_flags=get_config().tst_flags, basepath=sys.argv[2], cell_timeout=600)
print(f'notebook ran in {secs:.1f}s')
sys.exit(0 if ok else 1)
"""

@pytest.mark.parametrize('nb', NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook(nb):
    env = dict(os.environ, PYTHONUNBUFFERED='1', MPLBACKEND='Agg')
    r = subprocess.run([sys.executable, '-c', RUNNER, str(nb), str(ROOT)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, f'{nb.name} failed\n--- stdout ---\n{r.stdout[-4000:]}\n--- stderr ---\n{r.stderr[-12000:]}'
