"""Data-pipeline throughput of `pixeldiff_nb.data`: decode + convert + resize to the bucket + tensor, in images/s.

Two workloads, each with the map-style `BucketLoader` (0 and N DataLoader workers) and the streaming path; every
image is counted (drop_last=False), and the first map-style pass includes the one-off header scan:
- 64 px: the bundled emoji in `data_samples/` (PNG, 64x64, patch 16 buckets);
- 512 px: a synthetic parquet folder written to a temporary directory (JPEG images of mixed sizes and aspect
  ratios between 1:2 and 2:1, 13 buckets of the recipe at 512 px).

Usage: python bench/bench_data.py [--n512 256] [--batch-size 16] [--workers 2] [--epochs 2]
"""
import argparse, io, math, platform, tempfile, time
from pathlib import Path

import numpy as np
import torch
import datasets
from PIL import Image

from pixeldiff_nb.data import load_image_text, decode_image, to_rgb
from pixeldiff_nb.buckets import BucketLoader

datasets.disable_progress_bars()


def synthetic_parquet(folder: Path, n: int, seed: int = 0, shards: int = 4) -> Path:
    "Write `n` smooth random JPEG images (short side 384-1024 px, W/H in [0.5, 2]) with captions as parquet shards."
    rng = np.random.default_rng(seed)
    imgs, caps = [], []
    for i in range(n):
        ar = float(np.exp(rng.uniform(math.log(0.5), math.log(2.0))))
        short = int(rng.integers(384, 1025))
        W, H = (round(short * ar), short) if ar >= 1 else (short, round(short / ar))
        small = rng.integers(0, 256, (H // 32 + 1, W // 32 + 1, 3), dtype=np.uint8)    # smooth, photo-like content
        im = Image.fromarray(small).resize((W, H), Image.Resampling.BICUBIC)
        b = io.BytesIO(); im.save(b, 'JPEG', quality=90)
        imgs.append({'bytes': b.getvalue(), 'path': None}); caps.append(f'synthetic image {i} of {W}x{H}')
    ds = datasets.Dataset.from_dict({'image': imgs, 'text': caps}).cast_column('image', datasets.Image())
    for k in range(shards): ds.shard(shards, k).to_parquet(str(folder / f'part-{k:03d}.parquet'))
    return folder


def run(loader, epochs: int):
    "Images and seconds over `epochs` passes."
    n, t = 0, time.perf_counter()
    for _ in range(epochs):
        for b in loader: n += b['pixels'].shape[0]
    return n, time.perf_counter() - t


def decode_only(data, limit: int):
    "Baseline: decode + RGB conversion only, no resize or tensor."
    col = data.image_column
    n, t = 0, time.perf_counter()
    for r in data.ds.select(range(min(limit, len(data.ds)))).select_columns([col]):
        to_rgb(decode_image(r[col])); n += 1
    return n, time.perf_counter() - t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--n512', type=int, default=256, help='images in the synthetic 512 px parquet set')
    p.add_argument('--batch-size', type=int, default=16)
    p.add_argument('--workers', type=int, default=2, help='DataLoader workers for the parallel rows')
    p.add_argument('--epochs', type=int, default=2, help='passes per measurement')
    p.add_argument('--threads', type=int, default=1, help='torch threads (resize/tensor work is single-image)')
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = []

    def add(name, res):
        n, s = res
        rows.append((name, n, s, n / s if s > 0 else float('nan')))
        print(f'  {name:<48} {n:>6} img {s:7.2f} s {n / s:8.1f} img/s', flush=True)

    print('64 px, bundled emoji (data_samples), patch 16')
    d64 = load_image_text()
    add('decode only (baseline)', decode_only(d64, 10_000))
    add('BucketLoader map-style, 0 workers', run(BucketLoader(d64, 64, 16, a.batch_size, drop_last=False), a.epochs))
    add(f'BucketLoader map-style, {a.workers} workers', run(BucketLoader(d64, 64, 16, a.batch_size, num_workers=a.workers, drop_last=False), a.epochs))
    add('BucketLoader streaming (1 pass)', run(BucketLoader(d64.ds.to_iterable_dataset(num_shards=4), 64, 16, a.batch_size, drop_last=False), 1))

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter(); synthetic_parquet(Path(tmp), a.n512)
        print(f'\n512 px, synthetic parquet ({a.n512} JPEGs, 384-2048 px sides, written in {time.perf_counter() - t:.1f} s), patch 32')
        d512 = load_image_text(tmp)
        add('decode only (baseline)', decode_only(d512, 10_000))
        ld = BucketLoader(d512, 512, 32, a.batch_size, drop_last=False)
        t = time.perf_counter(); ld._scan(); scan = time.perf_counter() - t
        add('header scan (once per dataset)', (len(d512), scan))
        add('BucketLoader map-style, 0 workers', run(ld, a.epochs))
        add(f'BucketLoader map-style, {a.workers} workers', run(BucketLoader(d512, 512, 32, a.batch_size, num_workers=a.workers, drop_last=False), a.epochs))
        # streamed as an IterableDataset of 4 shards; `load_image_text(tmp, streaming=True)` gives the same records, but
        # datasets' parquet reader then sleeps 5 s at the end of each shuffled pass (an Arrow threading workaround)
        add('BucketLoader streaming (1 pass)', run(BucketLoader(d512.ds.to_iterable_dataset(num_shards=4), 512, 32, a.batch_size, drop_last=False), 1))

    print(f'\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, '
          f'python {platform.python_version()}, torch {torch.__version__}, datasets {datasets.__version__}, '
          f'Pillow {Image.__version__}')
    print('\n| workload | setting | images | s | images/s |\n|---|---|---|---|---|')
    for k, (name, n, s, r) in enumerate(rows):
        print(f"| {'64 px emoji' if k < 4 else '512 px parquet'} | {name} | {n} | {s:.2f} | {r:.1f} |")


if __name__ == '__main__':
    main()
