"""Prepared shards: bad records counted at prepare time, mixing refused, ranks disjoint, resume
skips finished shards, the shard loader resumes exactly (with workers too), and the `cpu` preset
trains from shards through SIGKILL and `--resume latest` to an uninterrupted run's weights."""
import io, json, os, signal, subprocess, sys, time

import datasets
import pytest
import torch
from safetensors.torch import load_file

from pixeldiff_nb.prepare import prepare, prepare_cli, prepare_jobs
from pixeldiff_nb.shards import ShardLoader, open_shards
from pixeldiff_nb.text import TextEncoder
from pixeldiff_nb.data import load_image_text
from pixeldiff_nb.shapes import shapes_sample
from pixeldiff_nb.presets import get_preset
from pixeldiff_nb.checkpoints import list_checkpoints

ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}   # same threads: bit-equal
EMOJI = dict(caption_columns=['text', 'caption_long'], caption_weights=[0.5, 0.5])


@pytest.fixture(scope='module')
def enc(): return TextEncoder('minilm')


@pytest.fixture(scope='module')
def shards(tmp_path_factory, enc):
    "24 bundled emoji (two captions each) and 24 shapes at 64 px, MiniLM, patch 8 (cpu preset)."
    root = tmp_path_factory.mktemp('shards')
    emoji = load_image_text(None).ds.select(range(0, 600, 25))
    prepare(emoji, root, 64, patch=8, shard_size=8, text_encoder=enc, verbose=False, **EMOJI)
    prepare('shapes', root, 64, patch=8, shard_size=8, text_encoder=enc, verbose=False, n=24,
            aspect_ratios=(0.5, 1, 2))
    return root


def _png(im) -> bytes:
    b = io.BytesIO(); im.save(b, 'PNG'); return b.getvalue()


def test_bad_records_are_counted_and_mixing_is_refused(tmp_path, enc):
    good = [{'bytes': _png(shapes_sample(i, 64)[0]), 'path': None} for i in range(3)]
    images = good + [{'bytes': b'\x89PNG broken', 'path': None}, good[0]]
    texts = ['a', 'b', 'c', 'broken file', '   ']
    ds = datasets.Dataset.from_dict({'image': images, 'text': texts})
    ds = ds.cast_column('image', datasets.Image())
    rep = prepare(ds, tmp_path, 64, patch=8, shard_size=2, text_encoder=enc, verbose=False)
    assert (rep.seen, rep.used, dict(rep.skipped)) == (5, 3, {'undecodable': 1, 'empty_caption': 1})
    header, table, stored = open_shards(tmp_path/'64px')
    assert len(table) == 3 and dict(stored.skipped) == {'undecodable': 1, 'empty_caption': 1}
    assert (header['encoder'], header['size'], header['patch']) == (enc.id, 64, 8)
    with pytest.raises(ValueError, match=r'holds shards of .* at 64 px .*patch=8.*another folder'):
        prepare(ds, tmp_path, 64, patch=16, text_encoder=enc, verbose=False)
    meta = json.loads(next((tmp_path/'64px').glob('*-00001.json')).read_text())
    meta['encoder'] = 'other-32-fp32'
    (tmp_path/'64px'/'alien-00000.json').write_text(json.dumps(meta))
    with pytest.raises(ValueError, match='was not made with'): open_shards(tmp_path/'64px')


def test_ranks_take_disjoint_shards_and_resume_skips_finished_ones(tmp_path, enc):
    kw = dict(patch=8, shard_size=4, text_encoder=enc, verbose=False, n=14)
    r0 = prepare('shapes', tmp_path, 64, rank=0, world_size=2, **kw)
    r1 = prepare('shapes', tmp_path, 64, rank=1, world_size=2, **kw)
    assert (r0.used, r1.used) == (8, 6)             # shards 0, 2 and 1, 3 (4 + 4 + 4 + 2 rows)
    _, table, _ = open_shards(tmp_path/'64px')
    assert len(set(table['key'])) == 14
    mark = next(tmp_path.glob('64px/*-00001.json'))
    mark.unlink()                                   # shard 1 "killed" before it was marked done
    t0 = {p: p.stat().st_mtime_ns for p in tmp_path.glob('64px/*.arrow')}
    again = prepare('shapes', tmp_path, 64, rank=1, world_size=2, **kw)
    assert again.used == 6
    changed = [p.name for p in t0 if p.stat().st_mtime_ns != t0[p]]
    assert changed == [mark.name.replace('.json', '.arrow')]   # only the unfinished shard again


def test_accelerate_launch_gives_each_rank_its_share(tmp_path):
    cmd = ['accelerate', 'launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1',
           '--mixed_precision', 'no', '--dynamo_backend', 'no',
           '--main_process_port', str(_free_port()), '-m', 'pixeldiff_nb.prepare', 'shapes',
           '--out', str(tmp_path), '--size', '64', '--patch', '8', '--n', '12', '--shard-size', '4']
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'rank 0/2: 2 shards' in res.stdout and 'rank 1/2: 1 shards' in res.stdout   # 0, 2 and 1
    _, table, rep = open_shards(tmp_path/'64px')
    assert len(set(table['key'])) == 12 and rep.used == 12


def _free_port() -> int:
    import socket
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def test_prepare_cli_and_jobs(tmp_path, capsys):
    argv = ['shapes', '--out', str(tmp_path), '--size', '64', '--patch', '8', '--n', '6',
            '--shard-size', '4']
    assert prepare_cli(argv + ['--workers', '1']) == 0           # images through a process pool
    assert '6 records seen, 6 used' in capsys.readouterr().out
    assert prepare_cli(['--size', '64']) == 2 and 'give --out DIR' in capsys.readouterr().err
    jobs = prepare_jobs(get_preset('gpu', ['data.source=shards:/s']))
    first = jobs[0]['source']
    assert [(j['size'], j['source']) for j in jobs][::2] == [(256, first), (512, first)]
    assert len(jobs) == 4 and all(j['out'] == '/s' and j['patch'] == 16 for j in jobs)


def test_loader_batches_are_whole_buckets_and_resume_exactly(shards):
    ld = ShardLoader(shards/'64px', 4, seed=3, split='train', val_fraction=0.2)
    val = ShardLoader(shards/'64px', 4, split='val', val_fraction=0.2, drop_last=False,
                      shuffle=False)
    train_rows = {i for _, b in ld.epoch_batches() for i in b}
    assert train_rows and not train_rows & {i for _, b in val.epoch_batches() for i in b}
    it = iter(ld)
    first = [next(it) for _ in range(2)]
    assert all(b['pixels'].shape[-2:] == b['bucket'] for b in first)
    assert all(b['pixels'].dtype == torch.float32 for b in first)
    assert -1 <= first[0]['pixels'].min() and first[0]['pixels'].max() <= 1
    state = ld.state_dict()
    rest = list(it)
    again = ShardLoader(shards/'64px', 4, seed=3, split='train', val_fraction=0.2, num_workers=2)
    again.load_state_dict(state)
    got = list(again)
    assert len(got) == len(rest) > 0
    for x, y in zip(rest, got):
        assert x['captions'] == y['captions'] and torch.equal(x['pixels'], y['pixels'])
        assert torch.equal(x['txt'], y['txt']) and torch.equal(x['mask'], y['mask'])
    assert (ld.epoch, again.epoch) == (1, 1)
    with pytest.raises(ValueError, match='cannot resume exactly: batch_size 4 != 8'):
        other = ShardLoader(shards/'64px', 8, seed=3, split='train', val_fraction=0.2)
        other.load_state_dict(state)
    with pytest.raises(ValueError, match='gpu_decode=True needs device=cuda'):
        ShardLoader(shards/'64px', gpu_decode=True)
    null, mask = ld.empty()
    assert null.shape == (1, ld.max_length, ld.dim) and mask.sum() == 2   # [CLS] [SEP]
    more = ShardLoader(shards/'64px', 4, seed=3, split='train', val_fraction=0.2)
    forever = more.iter_forever()
    for _ in range(len(more) + 1): next(forever)
    assert (more.epoch, more.batch) == (1, 1)                       # went on into the next epoch
    with pytest.raises(ValueError, match='no batch in an epoch .* prepare more data'):
        next(ShardLoader(shards/'64px', 1000).iter_forever())                     # too few rows


# --- the cpu preset from shards: SIGKILL, then --resume latest ------------------------------------
STEPS = 8


def _cmd(shards, out, resume=False):
    ov = [f'data.source=shards:{shards}', 'model.depth=2', 'model.hidden=64', 'model.heads=1',
          'stages.0.global_batch=4', f'stages.0.steps={STEPS}', 'val_every=4', 'val_batches=1',
          'sample_every=0', 'ckpt_every=3', 'log_every=2', 'warmup=2', 'data.num_workers=1',
          f'out_dir={out}']
    again = ['--resume', 'latest'] if resume else []
    return [sys.executable, '-m', 'pixeldiff_nb.launch', '--preset', 'cpu'] + again + ov


def _start(shards, out):
    out.mkdir(parents=True)
    return subprocess.Popen(_cmd(shards, out), env=ENV, stdout=open(out/'stdout.txt', 'w'),
                            stderr=open(out/'stderr.txt', 'w'), start_new_session=True)


def test_cpu_preset_from_shards_resumes_bit_for_bit_after_sigkill(shards, tmp_path):
    import psutil
    ref, cut = _start(shards, tmp_path/'ref'), _start(shards, tmp_path/'cut')
    t0 = time.time()
    while not list_checkpoints(tmp_path/'cut'):
        assert cut.poll() is None, (tmp_path/'cut'/'stderr.txt').read_text()[-3000:]
        assert time.time() - t0 < 240
        time.sleep(0.01)
    tree = [psutil.Process(cut.pid)] + psutil.Process(cut.pid).children(recursive=True)  # + worker
    for p in tree: p.kill()
    cut.wait()
    assert cut.returncode == -signal.SIGKILL
    assert list_checkpoints(tmp_path/'cut')[-1].name < f'step-{STEPS:08d}'
    res = subprocess.run(_cmd(shards, tmp_path/'cut', resume=True), env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'resumed from' in res.stdout
    assert ref.wait(timeout=300) == 0, (tmp_path/'ref'/'stderr.txt').read_text()[-3000:]
    a, b = (list_checkpoints(tmp_path/d)[-1] for d in ('ref', 'cut'))
    assert a.name == b.name == f'step-{STEPS:08d}'
    for f in ('model.safetensors', 'ema.safetensors'):
        x, y = load_file(a/f), load_file(b/f)
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) for k in x), f'{f} differs after resume'
    logs = [json.loads(l) for l in (tmp_path/'ref'/'log.jsonl').read_text().splitlines()]
    assert logs[-1]['step'] == STEPS and 'val' in logs[-1]
