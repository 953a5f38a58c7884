"""The preset registry is complete on its own, and `config` never imports the presets (no import cycle).

`get_preset`, `preset_names()` and `pixeldiff-train --help` must see every preset whatever else was imported, so a fresh
process that imports only `pixeldiff_nb.presets` lists all five, and imports no launch, runs or cli module.
"""
import subprocess, sys

def fresh(code: str) -> list[str]:
    "The lines a fresh Python process prints running `code`."
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.splitlines()

def test_preset_names_complete_without_launch_or_runs():
    out = fresh("import sys; from pixeldiff_nb.presets import preset_names; print(preset_names()); "
                "print(sorted(m for m in sys.modules if m in ('pixeldiff_nb.launch', 'pixeldiff_nb.runs', 'pixeldiff_nb.cli')))")
    assert out == ["['cpu', 'gpu', 'shapes', 'shapes_gpu', 'speedrun']", '[]']

def test_config_does_not_import_presets():
    assert fresh("import sys, pixeldiff_nb.config; print('pixeldiff_nb.presets' in sys.modules)") == ['False']
