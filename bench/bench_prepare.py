"""Prepared shards vs today's loader, side by side on the same 512 px images, and the shard engines compared.

One run measures, on the same synthetic JPEG images (short side 384-1024 px, W/H in [0.5, 2], as `bench_data.py`):
- today's `BucketLoader` at 512 px (decode + bucket resize + collate, in the process, after its header scan);
- the prepare step per core: `prepare_record` (header, draft decode, bicubic resize, JPEG 95) at 512 and 1024 px;
- MiniLM caption encoding on the CPU (captions/s, at true length);
- `ShardLoader` over the prepared 512 px shards (decode + collate), with 0, 1 and 2 DataLoader workers;
- the engines under a shard: `datasets` memory-mapped Arrow (what `pixeldiff_nb.shards` uses), `datasets` parquet,
  `webdataset` tar and `litdata` chunks (the last two only when importable: they are not project dependencies).
Everything runs with one torch thread, so "per process" numbers are per core.

Usage: python bench/bench_prepare.py [--n 96] [--batch-size 8] [--captions 128]
"""
import argparse, json, os, platform, resource, sys, tempfile, time
from pathlib import Path

import numpy as np
import torch
import datasets

sys.path.insert(0, str(Path(__file__).parent))
from bench_data import synthetic_parquet                                       # the images bench_data.py uses
from pixeldiff_nb.data import load_image_text
from pixeldiff_nb.buckets import BucketLoader, bucket_sizes
from pixeldiff_nb.prepare import prepare, prepare_record, record_rows, encode_captions
from pixeldiff_nb.shards import ShardLoader
from pixeldiff_nb.text import TextEncoder

datasets.disable_progress_bars()
WORDS = ('a photo of a red fox sitting in fresh snow at golden hour with soft light and a blurred forest behind it, '
         'detailed fur, shallow depth of field, warm tones, cinematic composition, high resolution').split()


CPU = {}


def _cpu() -> float:
    "CPU seconds of this process and its finished children (DataLoader workers)."
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + c.ru_utime + c.ru_stime


def per_s(n, fn, key=None):
    "Run fn(), return (n / wall seconds, wall seconds); n / CPU seconds goes to CPU[key] (the rate of a free core)."
    t, c = time.perf_counter(), _cpu(); fn(); dt, dc = time.perf_counter() - t, _cpu() - c
    if key: CPU[key] = n / dc
    return n / dt, dt


def count_batches(loader) -> int:
    return sum(b['pixels'].shape[0] for b in loader)


def engines(table_ds, order, tmp: Path) -> list:
    "Read the same records (image bytes + states) in the loader's planned order through each engine; rows of a table."
    rows, n = [], len(order)
    def arrow_read():
        for s in range(0, n, 8): table_ds[order[s:s + 8]]
    r, _ = per_s(n, arrow_read, 'arrow')
    rows.append(('datasets, Arrow IPC (memory-mapped)', r, CPU['arrow'], 'random access by row: exact resume = (epoch, batch)'))
    pq = tmp/'parquet'; pq.mkdir()
    table_ds.to_parquet(str(pq/'part-0.parquet'))
    t = time.perf_counter()
    pds = datasets.Dataset.from_parquet(str(pq/'part-0.parquet'), cache_dir=str(tmp/'pqcache'))
    conv = time.perf_counter() - t
    def pq_read():
        for s in range(0, n, 8): pds[order[s:s + 8]]
    r, _ = per_s(n, pq_read, 'parquet')
    rows.append(('datasets, parquet', r, CPU['parquet'], f'map-style needs a conversion to Arrow first ({n / conv:.0f} rows/s, a second copy on disk)'))
    try:
        import webdataset as wds
        with wds.TarWriter(str(tmp/'wds-000.tar')) as w:
            for i, rec in enumerate(table_ds):
                w.write({'__key__': f'{i:06d}', 'jpg': rec['image'], 'states.pyd': rec['states']})
        def wds_read():
            for _ in wds.WebDataset(str(tmp/'wds-000.tar'), shardshuffle=False): pass
        r, _ = per_s(len(table_ds), wds_read, 'webdataset')
        rows.append((f'webdataset {wds.__version__} (tar, sequential)', r, CPU['webdataset'], 'no position state: resume = replay and skip'))
    except Exception as e: rows.append(('webdataset', float('nan'), float('nan'), f'not measured: {type(e).__name__}: {e}'[:120]))
    try:
        import litdata as ld
        recs = [{'image': rec['image'], 'bucket': rec['bucket']} for rec in table_ds]
        ld.optimize(fn=_ident, inputs=recs, output_dir=str(tmp/'litdata'), chunk_bytes='16MB', num_workers=1)
        def lit_read():
            for _ in ld.StreamingDataset(str(tmp/'litdata')): pass
        r, _ = per_s(len(recs), lit_read, 'litdata')
        rows.append((f'litdata {ld.__version__} (chunks, streaming)', r, CPU['litdata'], 'StreamingDataLoader.state_dict: resume by sample count'))
    except Exception as e: rows.append(('litdata', float('nan'), float('nan'), f'not measured: {type(e).__name__}: {e}'[:120]))
    return rows


def _ident(x): return x


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--n', type=int, default=96, help='images')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--captions', type=int, default=128)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix='bench-prepare-'))
    synthetic_parquet(tmp/'src', a.n)
    data = load_image_text(str(tmp/'src'))
    res = {}
    # today's loader, after its one-off header scan
    bl = BucketLoader(data, 512, 32, a.batch_size, drop_last=False, shuffle=False)
    res['scan_img_s'], _ = per_s(len(data), bl._scan, 'scan_img_s')
    res['bucketloader_img_s'], _ = per_s(a.n, lambda: count_batches(bl), 'bucketloader_img_s')
    # the prepare step, images, per core
    rows = record_rows(data, data.ds)
    for size in (512, 1024):
        b = bucket_sizes(size, 32)
        res[f'prepare_{size}_img_s'], _ = per_s(a.n, lambda: [prepare_record(r['image'], b, size // 4) for r in rows],
                                                 f'prepare_{size}_img_s')
    # captions with MiniLM on the CPU, long-ish captions of 20-40 words
    enc = TextEncoder('minilm')
    rng = np.random.default_rng(0)
    caps = [' '.join(rng.choice(WORDS, int(rng.integers(20, 41)))) + f' {i}' for i in range(a.captions)]
    st = {}
    res['minilm_captions_s'], _ = per_s(len(caps), lambda: st.update(encode_captions(enc, caps)), 'minilm_captions_s')
    res['minilm_tokens_per_caption'] = float(np.mean([len(s) for s in st.values()]))
    # shards at 512 px, then the shard loader
    prepare(str(tmp/'src'), tmp/'shards', 512, text_encoder=enc, shard_size=32, verbose=False)
    folder = tmp/'shards'/'512px'
    res['jpeg_bytes_per_image'] = float(np.mean([len(x) for x in datasets.Dataset.from_file(str(next(folder.glob('*.arrow'))))['image']]))
    for u8, w in ((False, 0), (True, 0), (True, 1), (True, 2)):              # float: CPU training; uint8: the GPU path
        sl = ShardLoader(folder, a.batch_size, drop_last=False, shuffle=False, num_workers=w, uint8=u8)
        count_batches(sl)                                                     # one warm epoch (page cache, workers)
        k = f'shardloader_{"u8" if u8 else "f32"}_w{w}_img_s'
        res[k], _ = per_s(len(sl.ds), lambda: count_batches(sl), k)
    sl = ShardLoader(folder, a.batch_size, drop_last=False)
    order = [i for _, b in sl.epoch_batches() for i in b]
    eng = engines(sl.ds, order, tmp)
    # report
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other jobs); "
          f"torch {torch.__version__}, datasets {datasets.__version__}, python {platform.python_version()}; "
          f"{a.n} images, batch {a.batch_size}, 1 torch thread")
    print('\n| step (512 px unless said) | images/s (wall) | images per CPU-second |\n|---|---:|---:|')
    for k, label in (('bucketloader_img_s', "today's BucketLoader (decode + resize + collate)"),
                     ('scan_img_s', "today's header scan (once per run)"),
                     ('shardloader_f32_w0_img_s', 'ShardLoader, in process: decode + collate + float [-1, 1] (CPU training)'),
                     ('shardloader_u8_w0_img_s', 'ShardLoader, in process: decode + collate, uint8 (GPU path: float on the GPU)'),
                     ('shardloader_u8_w1_img_s', 'ShardLoader uint8, 1 DataLoader worker (total)'),
                     ('shardloader_u8_w2_img_s', 'ShardLoader uint8, 2 DataLoader workers (total)'),
                     ('prepare_512_img_s', 'prepare_record at 512 px (header, draft decode, resize, JPEG 95)'),
                     ('prepare_1024_img_s', 'prepare_record at 1024 px')):
        print(f'| {label} | {res[k]:.1f} | {CPU[k]:.1f} |')
    for k in ('f32', 'u8'):
        print(f"ShardLoader ({k}) / BucketLoader, in process: {res[f'shardloader_{k}_w0_img_s'] / res['bucketloader_img_s']:.1f}x "
              f"wall, {CPU[f'shardloader_{k}_w0_img_s'] / CPU['bucketloader_img_s']:.1f}x CPU")
    print(f"MiniLM on the CPU: {res['minilm_captions_s']:.1f} captions/s wall, {CPU['minilm_captions_s']:.1f} per CPU-second "
          f"({res['minilm_tokens_per_caption']:.0f} tokens each)")
    print(f"512 px JPEG 95: {res['jpeg_bytes_per_image'] / 1e3:.1f} kB per image")
    print('\n| engine | records/s (bytes, wall) | per CPU-second | note |\n|---|---:|---:|---|')
    for name, r, c, note in eng: print(f'| {name} | {r:,.0f} | {c:,.0f} | {note} |')
    print('\n' + json.dumps({'wall': res, 'cpu': CPU}))
    return res


if __name__ == '__main__':
    main()
