"""What *Run All* costs a reader: per-cell and per-notebook CPU seconds of each notebook's default path.

Each notebook runs as nbdev's test runner (and `tests/test_notebooks.py`) runs it: `execnb`'s shell, cells flagged
`slow`/`gpu`/`notest` skipped — the same cells Jupyter's Run All runs with `FULL = False`. CPU time is this process's
plus its finished children's (`os.times`), so a cell that launches a subprocess is counted too; with one thread it is
what the cell costs on one quiet core, whatever else the machine runs. Cells over 5 CPU-s (or 10 s of wall) are listed.

    cd nbs && OMP_NUM_THREADS=1 MPLBACKEND=Agg python ../bench/bench_notebooks.py 07_tread.ipynb 08_repa.ipynb
"""
import os, sys, time
from pathlib import Path
from execnb.shell import CaptureShell
from fastcore.xtras import working_directory
from nbdev.config import get_config
from nbdev.process import NBProcessor
from nbdev.test import _skip_cell

def cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system

def time_notebook(fn: Path, min_cpu: float = 5.0, min_wall: float = 10.0) -> tuple[bool, float, float]:
    "Run `fn`'s default path; print slow cells; (ok, CPU s, wall s)."
    nb = NBProcessor(fn, rm_directives=False, process=True).nb
    skip = _skip_cell(nb, get_config().tst_flags, None)
    shell, t = CaptureShell(fn), {}
    def pre(cell):
        t['c'], t['w'] = cpu(), time.time()
        return skip(cell)
    def post(cell):
        c, w = cpu() - t['c'], time.time() - t['w']
        if c > min_cpu or w > min_wall:
            first = next((l for l in cell.source.splitlines() if l.strip() and not l.startswith('#|')), '')
            print(f'{fn.name}:{cell.id}: cpu {c:6.1f}s wall {w:6.1f}s  {first[:70]}', flush=True)
    c0, w0 = cpu(), time.time()
    with working_directory(fn.parent):
        try:
            shell.run_all(nb, exc_stop=True, preproc=pre, postproc=post, cell_timeout=900)
            ok = True
        except Exception as e:
            print('ERROR', fn, e)
            ok = False
    return ok, cpu() - c0, time.time() - w0

if __name__ == '__main__':
    os.environ['IN_TEST'] = '1'
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    for name in sys.argv[1:]:
        ok, c, w = time_notebook(Path(name))
        print(f'== {name}: ok={ok} cpu {c:.0f}s wall {w:.0f}s', flush=True)
