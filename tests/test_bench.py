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


# --- bench/gpu_check.py: the end-to-end GPU check, run here through its CPU path -------------------------------------
CHECK = Path(__file__).resolve().parents[1] / 'bench' / 'gpu_check.py'
PARTS = ('denoiser_fwd', 'denoiser_bwd', 'lpips_fwd', 'lpips_bwd', 'dino_fwd', 'dino_bwd', 'optimizer')


def _positive(*xs): return all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in xs)


@pytest.fixture(scope='module')
def gpu_check():
    spec = importlib.util.spec_from_file_location('gpu_check', CHECK)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope='module')
def smoke(gpu_check, tmp_path_factory, one_thread):
    "One CPU smoke run (tiny sizes, bf16 autocast, compiled blocks, through Run): its results."
    import os
    out = tmp_path_factory.mktemp('gpu_check')
    before = os.environ.get('PIXELDIFF_LPIPS_DIR')
    work = str(out / 'work')
    gpu_check.main(['--cpu-smoke', '--out', str(out), '--work', work, '--budget', '900'])
    assert os.environ.get('PIXELDIFF_LPIPS_DIR') == before   # the random LPIPS weights stay private
    return json.loads((out / 'results.json').read_text()), (out / 'results.md').read_text()


def test_gpu_check_smoke_runs_every_phase(smoke):
    res, md = smoke
    status = {k: v['status'] for k, v in res['phases'].items()}
    assert status == dict.fromkeys(('speedrun', 'resume', 'sample', 'nbdev'), 'ok')
    assert res['info']['smoke'] and 'CPU smoke (not performance)' in md and '| run | stage |' in md


def test_gpu_check_smoke_times_both_stages_by_part(smoke):
    sr = smoke[0]['phases']['speedrun']
    assert sr['autocast_precision'] == 'bf16' and sr['compile'] == 'aot_eager'
    assert sr['dynamo']['unique_graphs'] >= 1
    assert [s['name'] for s in sr['stages']] == ['512px', '1024px']
    for st in sr['stages']:
        assert st['timed_steps'] >= 1 and st['checks']['autocast'] == 'torch.bfloat16'
        assert _positive(st['images_per_s'], st['step_ms_median'], st['tokens_per_s'])
        assert _positive(*(st['parts_ms'][p] for p in PARTS))
        assert st['images_per_s'] == pytest.approx(st['micro_batch'] / (st['step_ms_mean'] / 1e3))
        assert _positive(*(st['flops_per_image'][p] for p in ('denoiser', 'lpips', 'dino')))
        assert math.isfinite(st['loss'])
    s1, s2 = sr['stages']                                  # REPA in stage 1 only, as the recipe
    assert _positive(s1['parts_ms']['repa_teacher'], s1['flops_per_image']['repa_teacher'])
    assert s2['parts_ms']['repa_teacher'] == 0 and s2['flops_per_image']['repa_teacher'] == 0


def test_gpu_check_smoke_resume_is_exact(smoke):
    r = smoke[0]['phases']['resume']
    assert r['passed'] is True and r['max_abs_diff_resume'] == 0.0          # bit-exact on the CPU
    assert r['final_step'] == 2 and r['A']['steps'] == r['B']['steps'] == 2
    assert _positive(*r['A']['save_s'])


def test_gpu_check_smoke_samples_and_reports_notebooks(gpu_check, smoke):
    res = smoke[0]
    rows = res['phases']['sample']['rows']
    assert [(x['mode'], x['compiled']) for x in rows] == [('cfg', False), ('self', False)]
    assert all(x['finite'] and _positive(x['images_per_s']) for x in rows)
    nbs = res['phases']['nbdev']['notebooks']
    assert set(nbs) == set(gpu_check.GPU_NOTEBOOKS)
    assert all(v['status'] == 'not run (no GPU)' for v in nbs.values())


def test_gpu_check_variant_table(gpu_check):
    st = lambda ms: {'stages': [{'step_ms_mean': ms, 'images_per_s': 32e3 / ms}]}
    res = {'phases': {'speedrun:baseline:0': st(200.0), 'speedrun:no-compile:1': st(250.0),
                      'speedrun:baseline:2': st(210.0)}}
    rows = {r['name']: r for r in gpu_check.variant_rows(res)}
    assert rows['no-compile']['measured'].startswith('250.0 ms/step (+22.0%)')   # baseline mean 205
    assert 'spread 10.0 ms' in rows['baseline']['measured'] and rows['micro-48']['measured'] == ''
    assert rows['no host sync in the step']['measured'] == ''


def test_gpu_check_bad_arguments(gpu_check, tmp_path):
    with pytest.raises(SystemExit, match='Unknown phase'):
        gpu_check.main(['--cpu-smoke', '--phases', 'speedrun,warp'])
    with pytest.raises(SystemExit, match='Unknown variant'):
        gpu_check.main(['--cpu-smoke', '--variants', 'turbo'])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match='run with --cpu-smoke'):
            gpu_check.main(['--out', str(tmp_path)])
