"""Caption-encoding throughput of the text tower, and read throughput of the caption cache.

Usage: python bench/bench_text.py [--device cpu|cuda] [--dtype fp32|bf16] [--batch-sizes 1 8 32 128] [--seconds 2]
                                  [--threads N] [--local-dir DIR]  (DIR: a copy of the MiniLM folder, if not installed)

Encodes captions of the bundled data set (short `text` and long `caption_long` columns; hand-written ones if the data
set is missing) with MiniLM (`TextEncoder('minilm')`, 32 tokens) at several batch sizes, then fills a `TextCache` and
times `TextCache.get` and the cache's load from disk. Prints markdown tables (captions/s, higher is better).
"""
import argparse, json, os, platform, shutil, tempfile
os.environ.setdefault('HF_HUB_OFFLINE', '1')

import torch
import transformers
from pixeldiff_nb.core import data_samples_dir, Timer
from pixeldiff_nb.text import TextEncoder
from pixeldiff_nb.text_cache import TextCache

FALLBACK = ['a red apple', 'a green apple', 'a smiling face', 'a grinning face with big eyes', 'a dog', 'a yellow star',
            'an emoji of a red apple in the Noto style, from the food & drink group',
            'an emoji of a grinning face with big eyes in the Fluent flat style, from the smileys & emotion group']


def load_captions():
    "Short and long captions of the bundled set (or a hand-written stand-in)."
    try:
        rows = [json.loads(l) for l in (data_samples_dir()/'metadata.jsonl').read_text().splitlines() if l.strip()]
        return [r['text'] for r in rows], [r['caption_long'] for r in rows], 'data_samples'
    except (FileNotFoundError, KeyError):
        return FALLBACK[:6] * 50, FALLBACK[6:] * 150, 'hand-written'


def rate(fn, n_items, seconds):
    "Items per second of `fn()` (which handles `n_items`), repeated for at least `seconds` after one warm-up call."
    fn()
    reps, total = 0, 0.0
    while total < seconds or reps < 2:
        with Timer() as t: fn()
        total += t.elapsed; reps += 1
    return n_items * reps / total


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--dtype', default='fp32')
    ap.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 8, 32, 128])
    ap.add_argument('--seconds', type=float, default=2.0, help='minimum timed seconds per measurement')
    ap.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch decides)')
    ap.add_argument('--local-dir', default=None, help="folder holding MiniLM's files, when the package is not installed")
    args = ap.parse_args()
    if args.threads: torch.set_num_threads(args.threads)

    short, long, src = load_captions()
    with Timer() as t_load: te = TextEncoder('minilm', device=args.device, dtype=args.dtype, local_dir=args.local_dir)
    dev = torch.cuda.get_device_name() if te.device.type == 'cuda' else platform.processor() or platform.machine()
    print(f'# text tower benchmark\n\n{te}; load {t_load.elapsed:.2f}s; device {dev}; torch {torch.__version__}, '
          f'transformers {transformers.__version__}, {torch.get_num_threads()} threads; captions: {src} '
          f'({len(short)} short, mean {sum(map(len, short))/len(short):.0f} chars; {len(long)} long, '
          f'mean {sum(map(len, long))/len(long):.0f} chars)\n')

    print('## encoding (captions/s)\n\n| batch | short captions | long captions |\n|---:|---:|---:|')
    for bs in args.batch_sizes:
        r = [rate(lambda caps=caps: te.encode(caps[:bs]), min(bs, len(caps)), args.seconds) for caps in (short, long)]
        print(f'| {bs} | {r[0]:,.0f} | {r[1]:,.0f} |')

    tmp = tempfile.mkdtemp(prefix='bench-textcache-')
    try:
        caps = list(dict.fromkeys(short + long))
        cache = TextCache(tmp, te, batch_size=128)
        with Timer() as t_pre: cache.precompute(caps)
        size = cache.file.stat().st_size
        with Timer() as t_open: cache2 = TextCache(tmp, te)
        print(f'\n## cache\n\nprecompute {len(caps)} unique captions (batch 128): {t_pre.elapsed:.2f}s '
              f'({len(caps)/t_pre.elapsed:,.0f} captions/s incl. save); file {size/1e6:.1f} MB; '
              f'open + load from disk: {t_open.elapsed*1e3:.0f} ms\n')
        print('| get batch | captions/s (cache hits) | speed-up vs encoding |\n|---:|---:|---:|')
        for bs in args.batch_sizes:
            batch = caps[:bs]
            r_get = rate(lambda: cache2.get(batch), len(batch), args.seconds / 2)
            r_enc = rate(lambda: te.encode(batch), len(batch), args.seconds / 2)
            print(f'| {bs} | {r_get:,.0f} | {r_get/r_enc:,.0f}x |')
        assert cache2.n_encoded == 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    main()
