"""Unit tests for `pixeldiff_nb.data` and `pixeldiff_nb.buckets`: buckets, loading (imagefolder / parquet / webdataset / streaming), bad records,
bucketed batches (sharding, determinism, exact resume), the shapes set and the emoji builder (offline, fake fixtures)."""
import io, json, math, tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import datasets
from PIL import Image

from pixeldiff_nb import data as D
from pixeldiff_nb import shapes as S
from pixeldiff_nb import mixing as M
from pixeldiff_nb import buckets as B
from pixeldiff_nb import emoji as E
from pixeldiff_nb.core import data_samples_dir

datasets.disable_progress_bars()


def png_bytes(im, fmt='PNG'):
    b = io.BytesIO(); im.save(b, fmt); return b.getvalue()


def mixed_shapes(n=48, seed=0):
    return S.shapes_dataset(n, size=64, seed=seed, aspect_ratios=(0.5, 1.0, 2.0))


# ---------------------------------------------------------------- buckets
def test_bucket_counts_and_rule():
    for size, count, lo in ((512, 13, 240), (1024, 27, 984)):
        bs = B.bucket_sizes(size, 32)
        assert len(bs) == count
        n2 = (size // 32) ** 2
        for H, W in bs:
            assert H % 32 == 0 and W % 32 == 0 and H % 16 == 0 and W % 16 == 0
            assert lo <= (H // 32) * (W // 32) <= n2
            assert 0.5 * (1 - 1 / math.sqrt(n2)) <= W / H <= 2 / (1 - 1 / math.sqrt(n2))  # ratio tested before ⌊⌋
        assert (size, size) in bs
        assert bs == sorted(bs, key=lambda hw: hw[1] / hw[0])
        assert set(bs) == {(W, H) for H, W in bs}                                        # symmetric
    assert B.bucket_sizes(512)[0] == (704, 352) and B.bucket_sizes(1024)[-1] == (704, 1440)


@pytest.mark.parametrize('patch', [8, 16])
def test_small_cpu_buckets(patch):
    bs = B.bucket_sizes(64, patch)
    assert (64, 64) in bs and len(bs) >= 3
    assert all(H % patch == 0 and W % patch == 0 and 0.5 <= W / H <= 2 for H, W in bs)


def test_bucket_bad_size():
    with pytest.raises(ValueError, match='multiple of patch'): B.bucket_sizes(500, 32)


def test_nearest_bucket_and_resize():
    bs = B.bucket_sizes(512)
    assert B.nearest_bucket(700, 700, bs) == (512, 512)
    assert B.nearest_bucket(1080, 1920, bs) == (384, 672)
    assert B.nearest_bucket(1920, 1080, bs) == (672, 384)
    assert B.nearest_bucket(10, 1000, bs) == (352, 704)
    im = Image.new('LA', (300, 100))
    out = B.resize_to_bucket(im, B.nearest_bucket(100, 300, bs))
    assert out.size == (704, 352) and out.mode == 'RGB'


def test_nearest_bucket_is_prx_linear_scale():
    "PRX's get_closest_ar compares W/H on a linear scale; a log scale would put 1000×1872 in another bucket."
    bs = B.bucket_sizes(512)
    assert B.nearest_bucket(1000, 1872, bs) == (384, 672)          # |1.872 − 1.75| < |2.0 − 1.872|
    prx = lambda h, w: min(bs, key=lambda hw: abs(hw[1] / hw[0] - w / h))
    assert all(B.nearest_bucket(h, w, bs) == prx(h, w) for h in range(200, 2100, 37) for w in range(200, 2100, 41))


def test_resize_to_bucket_matches_prx_float_resize():
    "PRX resizes [0, 1] floats with torchvision (bilinear, antialias); ours agrees up to the uint8 rounding."
    import torch
    import torchvision.transforms.v2.functional as TF
    rng = np.random.default_rng(0)
    for (h, w), bucket in (((300, 900), (352, 704)), ((1000, 1872), (384, 672)), ((37, 50), (64, 64))):
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ours = torch.from_numpy(np.asarray(B.resize_to_bucket(Image.fromarray(a), bucket)).copy()).permute(2, 0, 1).float()
        ref = TF.resize(torch.from_numpy(a).permute(2, 0, 1).float() / 255, list(bucket), antialias=True).clamp(0, 1) * 255
        assert ours.shape == ref.shape and (ours - ref).abs().max() < 1, (h, w, (ours - ref).abs().max())


# ---------------------------------------------------------------- shapes
def test_shapes_deterministic_and_consistent():
    a, b = S.shapes_sample(11, (48, 96), seed=2), S.shapes_sample(11, (48, 96), seed=2)
    assert a[1] == b[1] and a[2] == b[2] and np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    captions = set()
    for i in range(40):
        im, cap, at = S.shapes_sample(i, (64, 96), seed=0)
        captions.add(cap)
        assert im.size == (96, 64) and (at['height'], at['width']) == (64, 96)
        assert len(at['boxes']) == at['count']
        for w in (at['color'], at['size'], at['background'], S.POSITIONS[at['position']][0], S.NUMBERS[at['count']]):
            assert w in cap
        assert (at['shape'] + 's' in cap) == (at['count'] > 1)
        x = np.asarray(im).astype(int)
        for cx, cy, r in at['boxes']:
            assert 0 <= cx - r and cx + r <= 96 and 0 <= cy - r and cy + r <= 64      # inside the canvas
            assert np.abs(x[int(cy), int(cx)] - S.SHAPE_COLORS[at['color']]).max() <= 12
    assert len(captions) > 30


def test_shapes_dataset_columns():
    ds = mixed_shapes(12)
    assert ds.column_names == ['image', 'text', 'attrs']
    for i, r in enumerate(ds):
        assert r['image'].size == (r['attrs']['width'], r['attrs']['height'])
        assert r['text'] == S.shapes_sample(i, (r['attrs']['height'], r['attrs']['width']))[1]


# ---------------------------------------------------------------- loading
@pytest.fixture(scope='module')
def imagefolder(tmp_path_factory):
    d = tmp_path_factory.mktemp('imf'); (d/'img').mkdir()
    rows = []
    for i in range(10):
        im, cap, _ = S.shapes_sample(i, (64, 128) if i % 2 else (64, 64))
        im.save(d/'img'/f'{i:02d}.png'); rows.append({'file_name': f'img/{i:02d}.png', 'caption': cap, 'short_caption': f'shape {i}'})
    (d/'metadata.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    return d


def test_load_imagefolder(imagefolder):
    data = D.load_image_text(imagefolder)
    assert data.image_column == 'image' and data.caption_columns == ['caption', 'short_caption']
    b = next(iter(B.BucketLoader(data, 64, 16, 5, drop_last=False)))
    assert b['pixels'].ndim == 4 and b['pixels'].shape[-2:] == b['bucket']


def test_malformed_metadata_lines_are_skipped_and_counted(imagefolder, tmp_path, capsys):
    d = tmp_path/'bad'
    import shutil; shutil.copytree(imagefolder, d)
    lines = (d/'metadata.jsonl').read_text().splitlines()
    lines[2] = lines[2][:-7]                                         # a cut line: invalid JSON
    lines[5] = '["a list, not a record"]'
    (d/'metadata.jsonl').write_text('\n'.join(lines) + '\n')
    data = D.load_image_text(d)
    assert len(data) == 8 and data.caption_columns == ['caption', 'short_caption']
    assert data.bad_lines == [f'{d/"metadata.jsonl"}:3', f'{d/"metadata.jsonl"}:6']
    rep = D.DataReport().add_bad_lines(data.bad_lines)
    assert rep.seen == 2 and rep.skipped == {'bad_metadata_line': 2}
    assert f'bad_metadata_line 2 ({d/"metadata.jsonl"}:3, {d/"metadata.jsonl"}:6)' in rep.summary()
    assert data.select([0, 1]).bad_lines == data.bad_lines and D.load_image_text(imagefolder).bad_lines == []
    good = D.load_image_text(imagefolder)                            # the same columns and image paths as imagefolder gives
    assert data.ds.features == good.ds.features
    assert Path(data.ds[0]['image']['path']).relative_to(d) == Path(good.ds[0]['image']['path']).relative_to(imagefolder)
    assert len(list(B.BucketLoader(data, 64, 16, 4, drop_last=False))) > 0


def test_missing_caption_columns_fall_back_to_detected(imagefolder, capsys):
    data = D.load_image_text(imagefolder, caption_columns=['text', 'caption_long'], caption_weights=[0.5, 0.5])
    out = capsys.readouterr().out
    assert data.caption_columns == ['caption', 'short_caption'] and data.caption_weights == [1.0, 1.0]
    assert "caption columns ['text', 'caption_long'] not found; using ['caption', 'short_caption']" in out
    assert 'set data.caption_columns=[caption,short_caption]' in out and len(out.strip().splitlines()) == 1


def test_load_parquet_and_stream(tmp_path):
    ds = mixed_shapes(32)
    for k in range(4): ds.shard(4, k).to_parquet(str(tmp_path/f'p{k}.parquet'))
    data = D.load_image_text(tmp_path)
    assert len(data) == 32 and data.caption_columns == ['text'] and not data.streaming
    assert D.load_image_text(tmp_path, streaming=True).streaming
    got = []
    for r in range(2):                                              # 4 shards over 2 ranks: split by whole shards
        ld = B.BucketLoader(ds.to_iterable_dataset(num_shards=4), 64, 16, 4, rank=r, world_size=2,
                            drop_last=False, extra_columns=['attrs'])
        for b in ld:
            assert b['pixels'].shape[-2:] == b['bucket'] and len(b['attrs']) == len(b['captions'])
            got += [c + json.dumps(a, sort_keys=True) for c, a in zip(b['captions'], b['attrs'])]
        assert ld.state_dict()['epoch'] == 1
    assert len(got) == 32 and len(set(got)) == 32                    # the two ranks' streams are disjoint and complete


def test_stream_state_dict_resumes(tmp_path):
    ds = S.shapes_dataset(24, 64, seed=1)
    for k in range(2): ds.shard(2, k).to_parquet(str(tmp_path/f'p{k}.parquet'))
    mk = lambda: B.BucketLoader(D.load_image_text(tmp_path, streaming=True), 64, 16, 4, shuffle=False)
    ref = mk(); it = iter(ref); next(it); next(it); st = ref.state_dict(); rest = [b['captions'] for b in it]
    assert st['stream'] is not None
    res = mk(); res.load_state_dict(st)
    assert [b['captions'] for b in res] == rest                        # unshuffled, square: the resume is exact


def test_load_webdataset(tmp_path):
    for s in range(2):
        with tarfile.open(tmp_path/f'shard-{s}.tar', 'w') as tf:
            for k in range(4):
                im, cap, _ = S.shapes_sample(4*s + k, 64)
                for ext, blob in (('png', png_bytes(im)), ('txt', cap.encode())):
                    ti = tarfile.TarInfo(f'{s}{k:03d}.{ext}'); ti.size = len(blob); tf.addfile(ti, io.BytesIO(blob))
    data = D.load_image_text(tmp_path)
    assert data.image_column == 'png' and data.caption_columns == ['txt'] and len(data) == 8
    batches = list(B.BucketLoader(data, 64, 16, 4))
    assert len(batches) == 2 and all(b['pixels'].shape == (4, 3, 64, 64) for b in batches)


def test_no_usable_column_errors():
    ds = datasets.Dataset.from_dict({'image': [Image.new('RGB', (8, 8))], 'label': [1]}).cast_column('image', datasets.Image())
    with pytest.raises(ValueError, match=r'no usable caption column \(columns found: image \(Image\), label \(int64\)\); '
                                         r'set data.caption_columns'):
        D.as_image_text(ds)
    with pytest.raises(ValueError, match=r'no usable image column \(columns found: text \(string\), n \(int64\)\)'):
        D.as_image_text(datasets.Dataset.from_dict({'text': ['a'], 'n': [1]}))
    with pytest.raises(ValueError, match='caption_weights'):
        D.as_image_text(ds, caption_columns=['label'], caption_weights=[1, 2])


def test_explicit_columns_and_weights():
    ds = datasets.Dataset.from_dict({'pic': [png_bytes(Image.new('RGB', (64, 64)))] * 8, 'a': ['short'] * 8, 'b': ['long'] * 8})
    data = D.as_image_text(ds, image_column='pic', caption_columns=['a', 'b'], caption_weights=[0, 1])
    caps = [c for b in B.BucketLoader(data, 64, 16, 4) for c in b['captions']]
    assert caps == ['long'] * 8
    caps = [c for b in B.BucketLoader(data, 64, 16, 4, caption_weights=[1, 0]) for c in b['captions']]
    assert caps == ['short'] * 8


def test_load_shapes_and_dataset_objects():
    sh = D.load_image_text('shapes', n=8, size=32, aspect_ratios=(1.0, 2.0))
    assert len(sh) == 8 and sh.caption_columns == ['text'] and sh.source == 'shapes'
    assert D.load_image_text('shapes', n=8, size=32, streaming=True).streaming
    ds = S.shapes_dataset(4, 32)
    assert len(D.load_image_text(ds)) == 4


def test_hub_id_offline_error(monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(FileNotFoundError, match='hf download some-org/some-set --repo-type dataset'):
        D.load_image_text('some-org/some-set')


# ---------------------------------------------------------------- bad records
def bad_records_dataset():
    ok = png_bytes(Image.new('RGB', (64, 64), 'red'))
    good_header_bad_data = ok[:60]                                   # header parses, pixels do not
    imgs = {'ok': ok, 'gray': png_bytes(Image.new('L', (64, 64), 100)),
            'cmyk': png_bytes(Image.new('CMYK', (64, 64), (0, 200, 200, 0)), 'JPEG'),
            'alpha': png_bytes(Image.new('RGBA', (64, 64), (0, 0, 255, 0))), 'palette': png_bytes(Image.new('P', (64, 64), 5)),
            '16bit': png_bytes(Image.fromarray(np.full((64, 64), 40000, np.uint16))), 'tiny': png_bytes(Image.new('RGB', (6, 6))),
            'broken': b'\x00garbage', 'truncated': good_header_bad_data, 'nocap': ok, 'emptycap': ok, 'noimage': None}
    caps = {k: f'a {k} image' for k in imgs}; caps['nocap'] = None; caps['emptycap'] = '   '
    return datasets.Dataset.from_dict({'image': list(imgs.values()), 'text': list(caps.values()), 'key': list(imgs)}), list(imgs)


def test_prepare_image_each_case():
    ds, keys = bad_records_dataset()
    rep = D.DataReport()
    out = {k: D.prepare_image(v, rep, min_side=16, key=k) for k, v in zip(keys, ds['image'])}
    assert {k for k, v in out.items() if v is None} == {'tiny', 'broken', 'truncated', 'noimage'}
    assert all(v.mode == 'RGB' for v in out.values() if v is not None)
    assert out['alpha'].getpixel((0, 0)) == (255, 255, 255)
    assert out['16bit'].getpixel((0, 0))[0] == round(40000 / 65535 * 255)
    assert out['gray'].getpixel((0, 0)) == (100, 100, 100)
    assert dict(rep.skipped) == {'too_small': 1, 'undecodable': 2, 'missing_image': 1}
    assert set(rep.converted) == {'L', 'CMYK', 'RGBA', 'P', 'I;16'}
    s = rep.summary()
    assert 'undecodable 2' in s and 'CMYK→RGB 1' in s


def test_loader_skips_and_counts_bad_records():
    ds, keys = bad_records_dataset()
    ld = B.BucketLoader(ds, 64, 16, 4, drop_last=False, shuffle=False, extra_columns=['key'])
    batches = list(ld)                                              # never raises
    used = [k for b in batches for k in b['key']]
    assert set(used) == {'ok', 'gray', 'cmyk', 'alpha', 'palette', '16bit'}
    assert all(b['pixels'].shape[0] == len(b['captions']) for b in batches)
    r = ld.report
    assert r.seen == 12
    assert r.skipped['empty_caption'] == 2 and r.skipped['too_small'] == 1 and r.skipped['missing_image'] == 1
    assert r.skipped['undecodable'] == 2 and r.skipped['filled'] == 1   # 'broken' at scan; 'truncated' at decode, slot refilled
    assert 'empty_caption 2' in r.summary()


# ---------------------------------------------------------------- bucketed batches
@pytest.fixture(scope='module')
def shapes_data():
    return D.as_image_text(S.shapes_dataset(60, size=64, seed=0, aspect_ratios=(0.5, 0.75, 1.0, 1.5, 2.0)))


def test_batches_uniform_shapes(shapes_data):
    ld = B.BucketLoader(shapes_data, 64, 16, 4, extra_columns=['attrs'])
    n = 0
    for b in ld:
        H, W = b['bucket']
        assert b['pixels'].shape == (4, 3, H, W) and b['pixels'].dtype == torch.float32
        assert -1 <= b['pixels'].min() and b['pixels'].max() <= 1
        for a in b['attrs']: assert B.nearest_bucket(a['height'], a['width'], ld.buckets) == (H, W)
        n += 1
    assert n == len(ld) > 0 and len({b[0] for b in ld.epoch_batches(0)}) > 1


@pytest.mark.parametrize('world_size', [2, 3])
def test_rank_sharding(shapes_data, world_size):
    full = [B.BucketLoader(shapes_data, 64, 16, 4, rank=r, world_size=world_size, drop_last=False) for r in range(world_size)]
    rows = [i for ld in full for _, idx in ld.epoch_batches(1) for i in idx]
    assert sorted(rows) == list(range(60))                          # covers everything, no overlap
    dl = [B.BucketLoader(shapes_data, 64, 16, 4, rank=r, world_size=world_size) for r in range(world_size)]
    assert len({len(ld) for ld in dl}) == 1                         # equal batch counts per rank
    sets = [{i for _, idx in ld.epoch_batches(0) for i in idx} for ld in dl]
    assert sum(map(len, sets)) == len(set().union(*sets))
    with pytest.raises(ValueError, match='rank'): B.BucketLoader(shapes_data, 64, 16, 4, rank=3, world_size=3)


def test_deterministic_order(shapes_data):
    mk = lambda seed: B.BucketLoader(shapes_data, 64, 16, 4, seed=seed)
    assert mk(1).epoch_batches(0) == mk(1).epoch_batches(0)
    assert mk(1).epoch_batches(0) != mk(2).epoch_batches(0)
    assert mk(1).epoch_batches(0) != mk(1).epoch_batches(1)
    a, b = [x['captions'] for x in mk(5)], [x['captions'] for x in mk(5)]
    assert a == b


def test_exact_resume_across_epochs(shapes_data):
    mk = lambda: B.BucketLoader(shapes_data, 64, 16, 4, seed=7)
    ref = mk(); n = len(ref)
    it = ref.iter_forever(); [next(it) for _ in range(n - 2)]
    state = json.loads(json.dumps(ref.state_dict()))               # a state survives JSON (checkpoints)
    rest = [next(it) for _ in range(n + 3)]                          # crosses into the next epochs
    res = mk(); res.load_state_dict(state)
    it2 = res.iter_forever(); again = [next(it2) for _ in range(n + 3)]
    assert [b['index'] for b in again] == [b['index'] for b in rest]
    assert [b['captions'] for b in again] == [b['captions'] for b in rest]
    assert all(torch.equal(x['pixels'], y['pixels']) for x, y in zip(again, rest))
    assert ref.state_dict() == res.state_dict()
    with pytest.raises(ValueError, match='seed 7 != 8'):
        B.BucketLoader(shapes_data, 64, 16, 4, seed=8).load_state_dict(state)


def test_break_keeps_position_and_workers_match(shapes_data):
    ld = B.BucketLoader(shapes_data, 64, 16, 4, seed=2)
    seq = [b['index'] for b in B.BucketLoader(shapes_data, 64, 16, 4, seed=2)]
    first = []
    for b in ld:
        first.append(b['index'])
        if len(first) == 3: break
    rest = [b['index'] for b in ld]
    assert first + rest == seq and ld.epoch == 1
    wk = B.BucketLoader(shapes_data, 64, 16, 4, seed=2, num_workers=2)
    assert [b['index'] for b in wk] == seq


def test_forever_with_no_batch_fails():
    ds = S.shapes_dataset(3, 64)
    with pytest.raises(ValueError, match='lower batch_size'):
        next(B.BucketLoader(ds, 64, 16, 8).iter_forever())


def test_train_val_split_stable(imagefolder):
    data = D.load_image_text(imagefolder)
    tr, va = M.train_val_split(data, 0.3, seed=0)
    assert len(tr) + len(va) == 10 and len(va) > 0
    names = lambda d: {Path(r['path']).name for r in d.ds['image']}
    perm = data.select(list(range(9, -1, -1)))
    assert names(M.train_val_split(perm, 0.3, seed=0)[1]) == names(va)
    assert names(tr).isdisjoint(names(va))
    assert names(M.train_val_split(data, 0.3, seed=0)[1]) == names(va)


# ---------------------------------------------------------------- emoji builder (offline, fake packages)
def fake_iconify(d: Path, prefix, size, icons, aliases=None, categories=None, chars=None, as_tgz=False):
    files = {'icons.json': {'prefix': prefix, 'width': size, 'height': size, 'icons': icons, 'aliases': aliases or {}},
             'metadata.json': {'categories': categories or {}}, 'chars.json': chars or {}}
    if not as_tgz:
        d.mkdir(parents=True)
        for k, v in files.items(): (d/k).write_text(json.dumps(v))
        return d
    tgz = d.with_suffix('.tgz')
    with tarfile.open(tgz, 'w:gz') as tf:
        for k, v in files.items():
            blob = json.dumps(v).encode(); ti = tarfile.TarInfo(f'package/{k}'); ti.size = len(blob); tf.addfile(ti, io.BytesIO(blob))
    return tgz


def circle(c): return {'body': f'<circle cx="8" cy="8" r="6" fill="{c}"/>'}


@pytest.fixture
def fake_sources(tmp_path):
    noto = fake_iconify(tmp_path/'noto', 'noto', 16,
                        {'red-apple': circle('#e00'), 'waving-hand': circle('#fc0'), 'waving-hand-medium-skin-tone': circle('#a60'),
                         'dog': circle('#850'), 'zero': dict(circle('#000'), hidden=True), 'only-noto': circle('#0f0')},
                        aliases={'pointing-right': {'parent': 'waving-hand', 'hFlip': True}, 'hound': {'parent': 'dog'}},
                        categories={'Food & Drink': ['red-apple'], 'People & Body': ['waving-hand'], 'Animals & Nature': ['dog']},
                        chars={'1f34e': 'red-apple'})
    fluent = fake_iconify(tmp_path/'fluent', 'fluent-emoji-flat', 32,
                          {'red-apple': {'body': '<rect width="20" height="32" fill="#c00"/>', 'width': 20},
                           'waving-hand': circle('#fd0'), 'waving-hand-medium': circle('#a60'), 'dog': circle('#740'),
                           'pointing-right': circle('#fd0')},
                          categories={'Food & Drink': ['red-apple'], 'Animals & Nature': ['dog']}, as_tgz=True)
    tags = tmp_path/'emojibase'; (tags/'en').mkdir(parents=True)
    (tags/'en'/'data.json').write_text(json.dumps([{'hexcode': '1F34E', 'tags': ['apple', 'fruit'], 'label': 'red apple'}]))
    return {'noto': noto, 'fluent': fluent, 'tags': tags}


def test_build_emoji_set_offline(tmp_path, fake_sources):
    out = E.build_emoji_set(tmp_path/'set', size=24, n_concepts=None, sources=fake_sources, verbose=False)
    meta = [json.loads(l) for l in (out/'metadata.jsonl').read_text().splitlines()]
    concepts = {m['concept'] for m in meta}
    assert concepts == {'red-apple', 'waving-hand', 'dog', 'pointing-right'}   # shared, no skin tones, no hidden, no plain alias
    assert len(meta) == 8 and {m['style'] for m in meta} == {'noto', 'fluent'}
    for m in meta:
        assert set(m) >= {'file_name', 'text', 'caption_long', 'concept', 'style', 'category', 'source', 'license', 'tags'}
        assert m['file_name'] == f"images/{m['style']}_{m['concept']}.png" and (out/m['file_name']).exists()
        assert m['text'] == m['concept'].replace('-', ' ') and m['text'] in m['caption_long']
        im = Image.open(out/m['file_name']); assert im.size == (24, 24) and im.mode == 'RGB'
    apple = {m['style']: m for m in meta if m['concept'] == 'red-apple'}
    assert apple['noto']['caption_long'] == 'an emoji of a red apple in the Noto style, from the food & drink group'
    assert apple['fluent']['category'] == 'Food & Drink' and apple['noto']['tags'] == 'apple, fruit'
    assert apple['noto']['license'] == 'Apache-2.0' and apple['fluent']['license'] == 'MIT'
    px = np.asarray(Image.open(out/'images/fluent_red-apple.png'))       # a 20x32 box padded to square, not stretched
    red = (np.abs(px.astype(int) - (204, 0, 0)).max(-1) < 10)[12]
    assert tuple(px[12, 12]) == (204, 0, 0) and tuple(px[12, 1]) == (255, 255, 255) and 14 <= red.sum() <= 16
    hand = np.asarray(Image.open(out/'images/noto_waving-hand.png')).astype(int)
    right = np.asarray(Image.open(out/'images/noto_pointing-right.png')).astype(int)
    assert np.abs(hand[:, ::-1] - right).max() <= 2                      # the hFlip alias is the mirror image
    assert (out/'README.md').exists()
    ds = datasets.load_dataset('imagefolder', data_dir=str(out), split='train')
    assert len(ds) == 8 and 'caption_long' in ds.column_names


def test_build_full_with_skin_tones(tmp_path, fake_sources):
    out = E.build_emoji_set(tmp_path/'full', size=16, n_concepts=None, shared_only=False, skin_tones=True, tags=False,
                            sources=fake_sources, verbose=False)
    meta = {(m['style'], m['concept']): m for m in map(json.loads, (out/'metadata.jsonl').read_text().splitlines())}
    assert ('noto', 'only-noto') in meta and ('fluent', 'only-noto') not in meta
    for st in ('noto', 'fluent'):                                    # one concept name for both styles' tone variants
        assert meta[(st, 'waving-hand-medium-skin-tone')]['text'] == 'waving hand, medium skin tone'
    assert 'README.md' in {p.name for p in out.iterdir()} and 'full' in (out/'README.md').read_text()


def test_build_is_deterministic_and_removes_stale(tmp_path, fake_sources):
    a = E.build_emoji_set(tmp_path/'a', size=16, n_concepts=2, seed=3, sources=fake_sources, verbose=False)
    (a/'images'/'noto_stale.png').write_bytes(b'x')
    a = E.build_emoji_set(tmp_path/'a', size=16, n_concepts=2, seed=3, sources=fake_sources, verbose=False)
    b = E.build_emoji_set(tmp_path/'b', size=16, n_concepts=2, seed=3, sources=fake_sources, verbose=False)
    assert (a/'metadata.jsonl').read_text() == (b/'metadata.jsonl').read_text()
    assert sorted(p.name for p in (a/'images').iterdir()) == sorted(p.name for p in (b/'images').iterdir())
    assert len(list((a/'images').iterdir())) == 4
    for p in (a/'images').iterdir(): assert p.read_bytes() == (b/'images'/p.name).read_bytes()
    assert E.select_concepts(list('abcdef'), 3, 0) == E.select_concepts(list('fedcba'), 3, 0)


def test_npm_fetch_rejects_bad_integrity(tmp_path):
    fake = tmp_path/'iconify-json-noto-1.2.9.tgz'; fake.write_bytes(b'tampered')
    with pytest.raises(RuntimeError, match='integrity'):
        E.npm_fetch('@iconify-json/noto', '1.2.9', E.EMOJI_PACKAGES['noto'][2], dest=tmp_path)
    assert not fake.exists()
    fake.write_bytes(b'tampered')
    assert E.npm_fetch('@iconify-json/noto', '1.2.9', E.npm_integrity(fake), dest=tmp_path) == fake


# ---------------------------------------------------------------- bundled set and preview
def test_bundled_samples():
    root = data_samples_dir()
    meta = [json.loads(l) for l in (root/'metadata.jsonl').read_text().splitlines()]
    assert len(meta) >= 500
    by = {}
    for m in meta:
        assert (root/m['file_name']).exists() and m['style'] in ('noto', 'fluent') and m['text'] and m['caption_long']
        by.setdefault(m['concept'], set()).add(m['style'])
    assert all(v == {'noto', 'fluent'} for v in by.values())             # every concept in both styles
    assert not any('skin-tone' in c for c in by)
    assert {p.name for p in (root/'LICENSES').iterdir()} >= {'Apache-2.0.txt', 'MIT.txt'}
    assert sum(p.stat().st_size for p in root.rglob('*') if p.is_file()) < 5e6
    im = Image.open(root/meta[0]['file_name']); assert im.size == (64, 64) and im.mode == 'RGB'


def test_preview_cli(tmp_path, capsys):
    B.preview_cli(['--source', 'shapes', '--out', str(tmp_path), '-n', '4', '--image-size', '64'])
    assert {p.name for p in tmp_path.iterdir()} == {'samples.png', 'buckets.png', 'report.txt'}
    assert str(tmp_path) in capsys.readouterr().out
