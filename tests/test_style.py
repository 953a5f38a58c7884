"""Exported code reads like the anchors: every line of an exported notebook cell fits in 100 characters.

`ruff check` (run by `.ci/run`) lints the modules for everything else, `;`-joined statements included. Line length is
checked here, on the notebooks' exported cells, because the two lines nbdev writes into every module — the docstring
from the notebook's summary and `__all__`, which nbdev wraps at 120 characters — are not code anyone writes.
"""
import json
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT/'nbs').glob('*.ipynb') if not p.name.startswith(('_', '.')))
LIMIT = 100


def exported_lines(nb: Path):
    "(cell index, line number, line) of every line of the notebook's `#| export` cells."
    for i, c in enumerate(json.loads(nb.read_text())['cells']):
        src = ''.join(c['source'])
        if c['cell_type'] == 'code' and src.startswith('#| export'):
            for j, line in enumerate(src.splitlines(), 1): yield i, j, line


@pytest.mark.parametrize('nb', NOTEBOOKS, ids=lambda p: p.stem)
def test_exported_lines_fit(nb):
    long = [f'cell {i} line {j}: {len(s)} characters' for i, j, s in exported_lines(nb) if len(s) > LIMIT]
    assert not long, f'{nb.name}: exported lines over {LIMIT} characters:\n' + '\n'.join(long)


def test_the_check_sees_exported_cells_only(tmp_path):
    cell = lambda src: {'cell_type': 'code', 'source': [src], 'metadata': {}, 'outputs': [], 'execution_count': None}
    nb = tmp_path/'x.ipynb'
    nb.write_text(json.dumps({'cells': [cell('#| export\nx = 1\n' + 'y' * 101), cell('z = "' + 'w' * 200 + '"')]}))
    assert [(i, j, len(s)) for i, j, s in exported_lines(nb) if len(s) > LIMIT] == [(0, 3, 101)]
