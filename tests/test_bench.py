"""The GPU throughput benchmark's CPU path: `bench/gpu_throughput.py --cpu-smoke` builds the same training step as the
speedrun (denoiser, LPIPS, DINO perceptual loss, REPA teacher, TREAD, Muon) with tiny networks, and reports numbers
that are consistent with each other."""
import importlib.util, json, math
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / 'bench' / 'gpu_throughput.py'


@pytest.fixture(scope='module')
def gpu_throughput():
    spec = importlib.util.spec_from_file_location('gpu_throughput', BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cpu_smoke_reports_a_whole_step(gpu_throughput, tmp_path, one_thread):
    out = tmp_path / 'smoke.json'
    rows = gpu_throughput.main(['--cpu-smoke', '--steps', '1', '--warmup', '1', '--json', str(out)])
    (r,) = rows
    assert (r['res'], r['batch']) == (64, 2)
    assert math.isfinite(r['loss']) and r['step_s'] > 0
    assert r['images_per_s'] == pytest.approx(2 / r['step_s'])
    assert r['tokens_per_s'] == pytest.approx(r['images_per_s'] * (64 // 8) ** 2)       # tiny model: patch 8
    assert {'aux_lpips_s', 'aux_dino_s', 'aux_repa_teacher_s'} <= set(r)
    assert r['step_tflop_per_image'] > r['denoiser_tflop_per_image'] > 0               # the auxiliary nets add FLOPs
    saved = json.loads(out.read_text())
    assert saved['rows'][0]['step_s'] == r['step_s'] and saved['info']['args']['cpu_smoke']


def test_cpu_smoke_without_auxiliary_networks(gpu_throughput):
    (r,) = gpu_throughput.main(['--cpu-smoke', '--steps', '1', '--warmup', '0', '--no-aux', '--no-tread'])
    assert not any(k.startswith('aux_') for k in r)
    assert r['step_tflop_per_image'] == r['denoiser_tflop_per_image']


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the message on a machine without a GPU')
def test_refuses_cpu_without_smoke_flag(gpu_throughput):
    with pytest.raises(SystemExit, match='run with --cpu-smoke'): gpu_throughput.main([])


def test_batch_per_resolution(gpu_throughput):
    with pytest.raises(SystemExit, match='one value per --res'):
        gpu_throughput.main(['--cpu-smoke', '--res', '64', '128', '--batch', '2'])
