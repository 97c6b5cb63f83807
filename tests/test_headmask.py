"""Trained head masks at inference: the TSV format, the ``headmask`` prefill method, the KV cache that
evicts streaming heads' tokens, and the transformers integration.

The integration is checked against a reference written here: an fp32 eager attention function over a
plain ``DynamicCache`` that *masks* (never evicts) the streaming heads' keys -- the ``streaming``
method's blocks for a fresh prefill, ``key < sink or key > query - window`` afterwards.
"""

from __future__ import annotations

import doctest
import importlib
import math
import re
from pathlib import Path

import pytest
import torch
import transformers
from transformers import DynamicCache
from transformers.masking_utils import AttentionMaskInterface

from sparseattn import sparse_attention
from sparseattn.headmask import (
    check_head_mask,
    format_head_mask,
    head_mask_for_model,
    head_sparsity,
    load_head_mask,
    parse_head_mask,
    random_head_mask,
    save_head_mask,
)
from sparseattn.index import BlockIndex
from sparseattn.integrations import headmask_attention
from sparseattn.integrations.headmask_attention import generate_with_head_mask, make_cache, patch_head_mask
from sparseattn.integrations.headmask_cache import HeadMaskCache, HeadMaskSettings, kept_positions, kv_cache_bytes
from sparseattn.integrations.transformers import patch, sparse_attention_mask
from sparseattn.methods import headmask as headmask_method
from sparseattn.methods.headmask import HeadMaskConfig, head_mask_attention, select_blocks
from sparseattn.reference.attention import reference_attention, reference_block_sparse_attention
from sparseattn.reference.streaming import streaming_select

ROOT = Path(__file__).resolve().parent.parent


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def qkv(B=1, Hq=4, Hkv=2, Lq=200, Lk=200, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Lq, D, generator=g), torch.randn(B, Hkv, Lk, D, generator=g),
            torch.randn(B, Hkv, Lk, D, generator=g))


# --------------------------------------------------------------------------------------------
# The TSV format
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers,heads", [(1, 1), (2, 3), (30, 3), (7, 8)])
def test_tsv_round_trip(tmp_path, layers, heads):
    mask = torch.rand(layers, heads, generator=torch.Generator().manual_seed(layers * heads)) < 0.5
    path = save_head_mask(mask, tmp_path / "sub" / "mask.tsv")
    text = path.read_text()
    assert text.endswith("\n") and text.count("\n") == layers
    assert all(line.count("\t") == heads - 1 for line in text.splitlines())
    assert torch.equal(load_head_mask(path), mask)
    assert torch.equal(parse_head_mask(format_head_mask(mask.int())), mask)  # 0/1 ints too


def test_tsv_reads_the_fixed_format():
    assert parse_head_mask("1\t0\n0\t1").tolist() == [[True, False], [False, True]]  # no final newline
    assert parse_head_mask("1\t0\r\n0\t1\r\n\n").tolist() == [[True, False], [False, True]]  # CRLF, blank tail
    assert parse_head_mask("0\n").tolist() == [[False]]


@pytest.mark.parametrize("text,message", [
    pytest.param("", "is empty", id="empty"),
    pytest.param("\n\n", "is empty", id="only-newlines"),
    pytest.param("1\t0\t1\n1\t0\n", "ragged rows, line 2 has 2 columns but line 1 has 3", id="ragged"),
    pytest.param("1\t0\n1\t0\t1\n", "ragged rows, line 2 has 3 columns", id="ragged-longer"),
    pytest.param("1\t2\n", "line 1, column 2: '2' is not 0 or 1", id="two"),
    pytest.param("1\t0.73\n", "binarized first", id="gate-value"),
    pytest.param("1\t-1\n", "'-1' is not 0 or 1", id="negative"),
    pytest.param("head0\thead1\n1\t0\n", "no header line", id="header"),
    pytest.param("1 0 1\n", "separated by tabs", id="spaces"),
    pytest.param("1\t0\n\n1\t1\n", "line 2: blank line", id="blank-middle"),
    pytest.param("1\t\n", "column 2: '' is not 0 or 1", id="empty-field"),
])
def test_tsv_errors_name_the_fault(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_head_mask(text)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="head mask file not found"):
        load_head_mask(tmp_path / "absent.tsv")
    bad = tmp_path / "bad.tsv"
    bad.write_text("1\t0\n1\n")
    with pytest.raises(ValueError, match=re.escape(f"head mask {bad}: ragged rows")):
        load_head_mask(bad)
    binary = tmp_path / "binary.tsv"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_head_mask(binary)


def test_shape_checks_against_the_model(tmp_path):
    config = transformers.LlamaConfig(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    good = save_head_mask(torch.ones(3, 2, dtype=torch.bool), tmp_path / "good.tsv")
    assert head_mask_for_model(good, config).shape == (3, 2)
    wrong = save_head_mask(torch.ones(3, 4, dtype=torch.bool), tmp_path / "wrong.tsv")
    with pytest.raises(ValueError, match=r"has 3 layers x 4 KV heads, but the model has 3 layers x 2 KV heads"):
        head_mask_for_model(wrong, config)
    with pytest.raises(ValueError, match="2 layers x 2 KV heads, but the model has 3 layers"):
        check_head_mask(torch.ones(2, 2), 3, 2)
    with pytest.raises(ValueError, match="only 0 and 1"):
        check_head_mask(torch.tensor([[1.0, 0.5]]), 1, 2)
    with pytest.raises(ValueError, match="2-D"):
        check_head_mask(torch.ones(6, dtype=torch.bool), 3, 2)


def test_random_masks_and_sparsity():
    a = random_head_mask(30, 3, 45, seed=1)
    assert a.shape == (30, 3) and int((~a).sum()) == 45 and head_sparsity(a) == 0.5
    assert torch.equal(a, random_head_mask(30, 3, 45, seed=1))
    assert not torch.equal(a, random_head_mask(30, 3, 45, seed=2))
    assert head_sparsity(random_head_mask(4, 2, 0)) == 0.0
    with pytest.raises(ValueError, match=r"num_streaming must be an int in \[0, 8\]"):
        random_head_mask(4, 2, 9)


def test_parser_agrees_with_the_trainers_export(tmp_path):
    from sparseattn.training import export

    mask = random_head_mask(6, 3, 7, seed=3)
    path = save_head_mask(mask, tmp_path / "mask.tsv")
    assert torch.equal(export.load_head_mask(path).bool(), load_head_mask(path))


# --------------------------------------------------------------------------------------------
# The prefill method
# --------------------------------------------------------------------------------------------


def per_head_reference(q, k, v, full_heads, sink, window, block_size):
    """fp32, one KV head at a time: dense causal for full heads, the streaming method's blocks otherwise."""
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    outs = []
    for h, full in enumerate(full_heads):
        qh, kh, vh = q[:, h * G:(h + 1) * G], k[:, h:h + 1], v[:, h:h + 1]
        if full:
            outs.append(reference_attention(qh, kh, vh))
        else:
            index = streaming_select(Lq, Lk, B, G, sink=sink, window=window, block_size=block_size, device=q.device)
            outs.append(reference_block_sparse_attention(qh, kh, vh, index))
    return torch.cat(outs, dim=1)


SHAPES = [
    pytest.param(1, 4, 2, 200, 200, 16, id="B1-H4-HKV2-L200-D16"),
    pytest.param(2, 4, 4, 63, 63, 32, id="B2-H4-HKV4-L63-D32"),
    pytest.param(1, 8, 2, 1, 150, 16, id="B1-H8-HKV2-Lq1-Lk150"),
    pytest.param(1, 6, 3, 77, 300, 64, id="B1-H6-HKV3-Lq77-Lk300-D64"),
]


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D", SHAPES)
def test_mixed_heads_match_the_per_head_reference(B, Hq, Hkv, Lq, Lk, D):
    q, k, v = qkv(B, Hq, Hkv, Lq, Lk, D)
    full = [h % 2 == 0 for h in range(Hkv)] if Hkv > 1 else [False]
    full[-1] = False
    out, stats = head_mask_attention(q, k, v, full, sink=16, window=32, block_size=16, return_stats=True)
    assert rel(out, per_head_reference(q, k, v, full, 16, 32, 16)) < 1e-5
    density = stats.density[0].view(Hkv, Hq // Hkv)
    for h, is_full in enumerate(full):  # GQA: a KV head's query heads share its choice
        assert (density[h] == 1).all() if is_full else (density[h] == density[h, 0]).all()


def test_mixed_heads_on_the_triton_kernel(monkeypatch):
    """The shared kernel (the Triton interpreter on a CPU, compiled fp32 on a GPU) runs the mixed
    index as the reference says."""
    monkeypatch.setenv("SPARSEATTN_BACKEND", "triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (t.to(device) for t in qkv(1, 4, 2, 130, 130, 16, seed=3))
    out = head_mask_attention(q, k, v, [True, False], sink=16, window=32, block_size=16)
    assert rel(out, per_head_reference(q, k, v, [True, False], 16, 32, 16)) < 1e-5


def test_all_full_is_dense():
    q, k, v = qkv(1, 4, 2, 200, 200, 32)
    config = HeadMaskConfig(full_heads=[1, 1], sink=16, window=32, block_size=16)
    assert select_blocks(q, k, config) is None
    out = sparse_attention(q, k, v, method="headmask", config=config)
    assert rel(out, reference_attention(q, k, v)) < 1e-5
    assert rel(sparse_attention(q, k, v, method="headmask"), reference_attention(q, k, v)) < 1e-5  # default


@pytest.mark.parametrize("Lq,Lk", [(200, 200), (90, 260)])
def test_all_streaming_equals_the_streaming_method(Lq, Lk):
    q, k, v = qkv(2, 4, 2, Lq, Lk, 16)
    options = dict(sink=16, window=40, block_size=16)
    index = select_blocks(q, k, HeadMaskConfig(full_heads=[False, False], **options))
    streaming = streaming_select(Lq, Lk, 2, 4, **options)
    assert torch.equal(index.to_mask(), streaming.to_mask())
    assert torch.equal(index.counts, streaming.counts)
    out = sparse_attention(q, k, v, method="headmask", full_heads=[0, 0], **options)
    assert torch.equal(out, sparse_attention(q, k, v, method="streaming", **options))


def test_mixed_index_rows_are_exactly_full_or_streaming():
    q, k, _ = qkv(1, 6, 3, 300, 300, 16)
    index = select_blocks(q, k, HeadMaskConfig(full_heads=(True, False, True), sink=16, window=48, block_size=32))
    blocks = index.to_mask()[0]
    dense = BlockIndex.dense(1, 1, 300, 300, 32, 32).to_mask()[0, 0]
    stream = streaming_select(300, 300, 1, 1, sink=16, window=48, block_size=32).to_mask()[0, 0]
    for h in range(6):
        assert torch.equal(blocks[h], dense if (h // 2) != 1 else stream)


def test_select_blocks_builds_the_row_tables_once_per_shape(monkeypatch):
    """Layers of one prompt differ only in their pattern: the shape's tables are built once, and
    every pattern still gets exactly its own rows (a cached table is never written to)."""
    headmask_method._row_tables.cache_clear()
    built = []
    real = headmask_method.streaming_select
    monkeypatch.setattr(headmask_method, "streaming_select", lambda *a, **kw: built.append(a) or real(*a, **kw))
    q, k, _ = qkv(2, 6, 3, 300, 300, 16)
    options = dict(sink=16, window=48, block_size=32)
    dense = BlockIndex.dense(1, 1, 300, 300, 32, 32).to_mask()[0, 0]
    stream = streaming_select(300, 300, 1, 1, **options).to_mask()[0, 0]
    for pattern in [(True, False, True), (False, False, False), (False, True, False), (True, False, True)]:
        index = select_blocks(q, k, HeadMaskConfig(full_heads=pattern, **options))
        blocks = index.to_mask()
        assert index.batch == 2 and index.num_heads == 6
        for b in range(2):
            for h in range(6):
                assert torch.equal(blocks[b, h], dense if pattern[h // 2] else stream), (pattern, b, h)
    assert len(built) == 1
    select_blocks(*qkv(1, 6, 3, 200, 200, 16)[:2], HeadMaskConfig(full_heads=(True, False, True), **options))
    assert len(built) == 2 and headmask_method._row_tables.cache_info().currsize == 2


@pytest.mark.parametrize("kwargs,error,message", [
    pytest.param(dict(full_heads=[1, 2]), ValueError, "bools or 0/1", id="two"),
    pytest.param(dict(full_heads=[]), ValueError, "must not be empty", id="empty"),
    pytest.param(dict(full_heads=torch.ones(2, 2)), ValueError, "1-D", id="2d"),
    pytest.param(dict(full_heads="10"), TypeError, "full_heads must be", id="string"),
    pytest.param(dict(window=0), ValueError, "window must be > 0", id="window"),
    pytest.param(dict(block_size=48), ValueError, "power of two", id="block"),
])
def test_config_validation(kwargs, error, message):
    with pytest.raises(error, match=message):
        HeadMaskConfig(**kwargs)


def test_config_normalizes_and_checks_the_head_count():
    assert HeadMaskConfig(full_heads=torch.tensor([1.0, 0.0])).full_heads == (True, False)
    q, k, v = qkv(1, 4, 2, 50, 50, 16)
    with pytest.raises(ValueError, match="full_heads has 3 entries but k has 2 KV heads"):
        sparse_attention(q, k, v, method="headmask", full_heads=[True, False, True])


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


def storage_bytes(tensors):
    """Bytes of the distinct storages behind ``tensors`` (measured, independent of kv_cache_bytes)."""
    storages = {}
    for t in tensors:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("B", [1, 3])
def test_cache_stores_full_heads_whole_and_streaming_heads_sink_plus_window(B):
    sink, window, D = 4, 8, 16
    mask = torch.tensor([[True, False, False], [False, False, False], [True, True, True]])
    cache = HeadMaskCache(HeadMaskSettings(mask, sink=sink, window=window, block_size=16))
    g = torch.Generator().manual_seed(0)
    history = [[] for _ in range(3)]
    for length in [5, 1, 3, 1, 1, 9, 1, 20, 1, 1]:
        for layer in range(3):
            k, v = torch.randn(2, B, 3, length, D, generator=g)
            history[layer].append((k, v))
            cache.update(k, v, layer)
        n = cache.get_seq_length()
        assert n == sum(k.shape[2] for k, _ in history[0])
        kept = kept_positions(n, sink, window)
        assert kept.numel() == min(n, sink + window)
        per_token = B * D * 4 * 2  # fp32 keys and values
        full_heads, stream_heads = int(mask.sum()), int((~mask).sum())
        expected = (full_heads * n + stream_heads * min(n, sink + window)) * per_token
        layers = cache.layers
        tensors = [t for layer in layers for t in layer.kv_tensors()]
        assert storage_bytes(tensors) == expected == cache.kv_bytes() == kv_cache_bytes(cache)
        for layer_idx, layer in enumerate(layers):  # the kept tokens are the right ones, in order
            all_k = torch.cat([k for k, _ in history[layer_idx]], dim=2)
            all_v = torch.cat([v for _, v in history[layer_idx]], dim=2)
            full_idx, stream_idx = torch.nonzero(mask[layer_idx]).flatten(), torch.nonzero(~mask[layer_idx]).flatten()
            if full_idx.numel():
                assert torch.equal(layer.full_keys, all_k[:, full_idx])
                assert torch.equal(layer.full_values, all_v[:, full_idx])
            else:
                assert layer.full_keys is None
            if stream_idx.numel():
                assert torch.equal(layer.stream_keys, all_k[:, stream_idx][:, :, kept])
                assert torch.equal(layer.stream_values, all_v[:, stream_idx][:, :, kept])
            else:
                assert layer.stream_keys is None


def test_cache_update_returns_what_attention_reads():
    settings = HeadMaskSettings(torch.tensor([[True, False]]), sink=2, window=3, block_size=16)
    cache = HeadMaskCache(settings)
    k = torch.arange(10.0).view(1, 1, 10, 1).expand(1, 2, 10, 1).contiguous()
    fresh, same = cache.update(k, k.clone(), 0)
    assert fresh is same and fresh.past_len == 0 and fresh.key_states is k and fresh.stream_keys is None
    chunk, _ = cache.update(k[:, :, :4] + 10, k[:, :, :4] + 10, 0)  # positions 10..13
    assert chunk.past_len == 10 and chunk.stream_positions.tolist() == [0, 1, 7, 8, 9, 10, 11, 12, 13]
    assert chunk.stream_keys[0, 0, :, 0].tolist() == [0, 1, 7, 8, 9, 10, 11, 12, 13]
    assert chunk.full_keys.shape[2] == 14
    one, _ = cache.update(k[:, :, :1] + 14, k[:, :, :1] + 14, 0)  # position 14 sees sink 0, 1 and 12..14
    assert one.stream_positions.tolist() == [0, 1, 12, 13, 14]
    assert one.stream_keys[0, 0, :, 0].tolist() == [0, 1, 12, 13, 14]


def test_cache_batch_operations_crop_and_reset():
    settings = HeadMaskSettings(torch.tensor([[True, False]]), sink=2, window=3, block_size=16)
    cache = HeadMaskCache(settings)
    k = torch.randn(2, 2, 4, 8)
    cache.update(k, k, 0)
    cache.crop(-1)  # nothing evicted yet: exact rollback
    layer = cache.layers[0]
    assert cache.get_seq_length() == 3 and torch.equal(layer.stream_keys, k[:, 1:2, :3])
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.full_keys[0], k[1, :1, :3])
    cache.batch_repeat_interleave(2)
    assert layer.full_keys.shape[0] == 4 and layer.stream_keys.shape[0] == 4
    cache.batch_select_indices(torch.tensor([0]))
    assert layer.full_keys.shape[0] == 1
    cache.update(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), 0)  # 8 tokens > sink + window
    with pytest.raises(RuntimeError, match="evicted tokens"):
        cache.crop(-1)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.kv_bytes() == 0


def test_cache_rejects_wrong_inputs():
    cache = HeadMaskCache(HeadMaskSettings(torch.ones(2, 2, dtype=torch.bool), sink=2, window=3))
    with pytest.raises(ValueError, match=r"key_states must be \[B, 2, L, D\]"):
        cache.update(torch.randn(1, 3, 4, 8), torch.randn(1, 3, 4, 8), 0)
    with pytest.raises(ValueError, match="outside the head mask's 2 layers"):
        cache.update(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), 2)
    with pytest.raises(TypeError, match="HeadMaskSettings"):
        HeadMaskCache(torch.ones(2, 2))


# --------------------------------------------------------------------------------------------
# The transformers integration, against a masking reference
# --------------------------------------------------------------------------------------------

SINK, WINDOW, BLOCK = 16, 48, 16
REFERENCE = "test_headmask_reference"
_reference_masks: dict[int, torch.Tensor] = {}


def reference_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """fp32 eager attention over all cached keys; streaming heads' keys are masked, not evicted."""
    full = _reference_masks[id(module.config)][module.layer_idx]
    Hq, Lq = query.shape[1], query.shape[2]
    Hkv, Lk = key.shape[1], key.shape[2]
    G = Hq // Hkv
    device = query.device
    qpos, kpos = torch.arange(Lk - Lq, Lk, device=device), torch.arange(Lk, device=device)
    causal = kpos[None, :] <= qpos[:, None]
    if Lq == Lk:  # a fresh prefill: the streaming method's blocks
        stream = streaming_select(Lq, Lk, 1, 1, sink=SINK, window=WINDOW, block_size=BLOCK,
                                  device=device).to_element_mask()[0, 0]
    else:
        stream = causal & ((kpos[None, :] < SINK) | (kpos[None, :] > qpos[:, None] - WINDOW))
    allowed = torch.stack([causal if full[h // G] else stream for h in range(Hq)])[None]  # [1, Hq, Lq, Lk]
    if attention_mask is not None:
        allowed = allowed & attention_mask
    scores = query.float() @ key.float().repeat_interleave(G, 1).transpose(-1, -2) * scaling
    probs = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1).nan_to_num(0.0)  # empty rows -> 0
    out = probs @ value.float().repeat_interleave(G, 1)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


transformers.AttentionInterface.register(REFERENCE, reference_forward)
AttentionMaskInterface.register(REFERENCE, sparse_attention_mask)

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=1024)
ARCHS = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
         "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 16})}
MIXED = torch.tensor([[True, False], [False, False], [True, True]])


def tiny_model(arch="llama", seed=0):
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**COMMON, **extra)).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def tokens(length, batch=1, seed=1):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


class reference_run:
    """The model on the masking reference (a plain DynamicCache), restored afterwards."""

    def __init__(self, model, mask):
        self.model, self.mask = model, mask

    def __enter__(self):
        self.previous = self.model.config._attn_implementation
        _reference_masks[id(self.model.config)] = self.mask
        self.model.set_attn_implementation(REFERENCE)
        return self.model

    def __exit__(self, *exc):
        self.model.set_attn_implementation(self.previous)
        _reference_masks.pop(id(self.model.config), None)


def generate(model, ids, n=8, **kwargs):
    out = model.generate(ids, max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         **kwargs)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("batch", [1, 2])
def test_decode_with_eviction_matches_the_masking_reference(arch, batch):
    model, ids = tiny_model(arch), tokens(300, batch)
    with torch.no_grad():
        _, dense_logits = generate(model, ids)
        with reference_run(model, MIXED):
            ref_tokens, ref_logits = generate(model, ids)
        with patch_head_mask(model, MIXED, sink=SINK, window=WINDOW, block_size=BLOCK) as handle:
            cache = handle.make_cache()
            out_tokens, out_logits = generate(model, ids, past_key_values=cache)
            assert handle.counts["prefill"] == 2 and handle.counts["decode"] == 3 * 7
    assert rel(ref_logits, dense_logits) > 1e-3  # the streaming heads matter in this test
    torch.testing.assert_close(out_logits, ref_logits, atol=2e-5, rtol=2e-5)
    assert torch.equal(out_tokens, ref_tokens)
    n = 300 + 7  # the last token is returned, not fed back
    per_token = batch * 16 * 4 * 2
    assert cache.kv_bytes() == (3 * n + 3 * min(n, SINK + WINDOW)) * per_token
    assert all(layer.stream_keys.shape[2] == SINK + WINDOW for layer in cache.layers[:2])


def test_batch_rows_match_single_runs():
    model, ids = tiny_model(), tokens(300, 2, seed=5)
    with torch.no_grad(), patch_head_mask(model, MIXED, sink=SINK, window=WINDOW, block_size=BLOCK) as handle:
        both, both_logits = generate(model, ids, past_key_values=handle.make_cache())
        for row in range(2):
            one, one_logits = generate(model, ids[row:row + 1], past_key_values=handle.make_cache())
            assert torch.equal(one, both[row:row + 1])
            torch.testing.assert_close(one_logits, both_logits[row:row + 1], atol=1e-5, rtol=1e-5)


def test_beam_search_reorders_the_cache_like_the_reference():
    model, ids = tiny_model(), tokens(300)
    with torch.no_grad():
        with reference_run(model, MIXED):
            ref = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False)
        with patch_head_mask(model, MIXED, sink=SINK, window=WINDOW, block_size=BLOCK) as handle:
            out = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False,
                                 past_key_values=handle.make_cache())
    assert torch.equal(out, ref)


def test_chunked_prefill_matches_the_masking_reference():
    model, ids = tiny_model(), tokens(300)
    with torch.no_grad():
        with reference_run(model, MIXED):
            ref = DynamicCache(config=model.config)
            model(ids[:, :180], past_key_values=ref)
            ref_logits = model(ids[:, 180:], past_key_values=ref).logits
        with patch_head_mask(model, MIXED, sink=SINK, window=WINDOW, block_size=BLOCK) as handle:
            cache = handle.make_cache()
            model(ids[:, :180], past_key_values=cache)
            logits = model(ids[:, 180:], past_key_values=cache).logits
            assert handle.counts["chunk"] == 3
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=2e-5)
    assert cache.layers[1].stream_keys.shape[2] == SINK + WINDOW


def test_left_padding_matches_the_masking_reference():
    model, ids = tiny_model(), tokens(300, 2, seed=7)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :37] = 0  # row 1 is 37 tokens shorter, padded on the left
    ids[1, :37] = 0
    kwargs = dict(attention_mask=attention_mask)
    with torch.no_grad():
        with reference_run(model, MIXED):
            ref_tokens, ref_logits = generate(model, ids, **kwargs)
        with patch_head_mask(model, MIXED, sink=SINK, window=WINDOW, block_size=BLOCK) as handle:
            out_tokens, out_logits = generate(model, ids, past_key_values=handle.make_cache(), **kwargs)
            assert handle.counts["prefill_padded"] == 2
            alone, _ = generate(model, ids[:1], past_key_values=handle.make_cache())
    assert torch.isfinite(out_logits).all()
    torch.testing.assert_close(out_logits, ref_logits, atol=2e-5, rtol=2e-5)
    assert torch.equal(out_tokens, ref_tokens)
    assert torch.equal(out_tokens[:1], alone)  # the unpadded row is what it is alone


def test_dynamic_cache_masks_what_the_head_mask_cache_evicts():
    model, ids = tiny_model(), tokens(300)
    with torch.no_grad(), patch_head_mask(model, MIXED, sink=SINK, window=WINDOW, block_size=BLOCK) as handle:
        evicting, evicting_logits = generate(model, ids, past_key_values=handle.make_cache())
        masking, masking_logits = generate(model, ids)  # generate's own DynamicCache
        assert handle.counts["uncached_decode"] == 2 * 7  # layer 2 has only full heads: plain dense
    torch.testing.assert_close(evicting_logits, masking_logits, atol=2e-5, rtol=2e-5)
    assert torch.equal(evicting, masking)


def test_all_full_mask_is_the_dense_model():
    model, ids = tiny_model(), tokens(300)
    with torch.no_grad():
        dense_tokens, dense_logits = generate(model, ids)
        dense_cache = DynamicCache(config=model.config)
        dense_prefill = model(ids, past_key_values=dense_cache).logits
        with patch_head_mask(model, torch.ones(3, 2, dtype=torch.bool), sink=SINK, window=WINDOW) as handle:
            torch.testing.assert_close(model(ids).logits, dense_prefill, atol=1e-5, rtol=1e-5)
            cache = handle.make_cache()
            out_tokens, out_logits = generate(model, ids, past_key_values=cache)
            full_cache = handle.make_cache()
            model(ids, past_key_values=full_cache)
    torch.testing.assert_close(out_logits, dense_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(out_tokens, dense_tokens)
    assert full_cache.kv_bytes() == kv_cache_bytes(dense_cache)


def test_all_streaming_prefill_is_the_streaming_method():
    model, ids = tiny_model(), tokens(300)
    with torch.no_grad():
        with patch(model, method="streaming", sink=SINK, window=WINDOW, block_size=BLOCK, min_sparse_len=0):
            streaming_logits = model(ids).logits
        with patch_head_mask(model, torch.zeros(3, 2, dtype=torch.bool), sink=SINK, window=WINDOW,
                             block_size=BLOCK):
            logits = model(ids).logits
        dense_logits = model(ids).logits
    torch.testing.assert_close(logits, streaming_logits, atol=1e-6, rtol=1e-6)
    assert rel(logits, dense_logits) > 1e-3


def test_patch_restores_and_the_cache_refuses_other_attention():
    model, ids = tiny_model(), tokens(40)
    before = model.config._attn_implementation
    handle = patch_head_mask(model, MIXED, sink=SINK, window=WINDOW)
    assert model.config._attn_implementation == "sparseattn_headmask"
    assert make_cache(model).settings is handle.settings
    cache = handle.make_cache()
    handle.restore()
    handle.restore()  # idempotent
    assert model.config._attn_implementation == before and headmask_attention.settings_for(model) is None
    with pytest.raises(RuntimeError, match="only works with attn_implementation='sparseattn_headmask'"), \
            torch.no_grad():
        model(ids, past_key_values=cache)
    with pytest.raises(ValueError, match="not patched with a head mask"):
        make_cache(model)
    model.set_attn_implementation("sparseattn_headmask")  # switched by hand, without a mask
    with pytest.raises(RuntimeError, match="without a head mask"), torch.no_grad():
        model(ids)
    model.set_attn_implementation(before)


def test_cache_of_another_mask_is_refused():
    model, ids = tiny_model(), tokens(40)
    with patch_head_mask(model, MIXED, sink=SINK, window=WINDOW) as first:
        cache = first.make_cache()
    with patch_head_mask(model, ~MIXED, sink=SINK, window=WINDOW), torch.no_grad():
        with pytest.raises(ValueError, match="made for another head mask"):
            model(ids, past_key_values=cache)


def test_patch_errors(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="has 2 layers x 2 KV heads, but the model has 3 layers x 2 KV heads"):
        patch_head_mask(model, torch.ones(2, 2))
    path = save_head_mask(torch.ones(3, 4, dtype=torch.bool), tmp_path / "m.tsv")
    with pytest.raises(ValueError, match="3 layers x 4 KV heads"):
        patch_head_mask(model, path)
    mistral = transformers.MistralForCausalLM(transformers.MistralConfig(**COMMON, sliding_window=64))
    with pytest.raises(ValueError, match="sliding window"):
        patch_head_mask(mistral, torch.ones(3, 2))
    with pytest.raises(TypeError, match="PreTrainedModel"):
        patch_head_mask(torch.nn.Linear(2, 2), torch.ones(3, 2))


def test_generate_with_head_mask_from_a_tsv(tmp_path):
    model, ids = tiny_model(), tokens(300)
    path = save_head_mask(MIXED, tmp_path / "mask.tsv")
    output, cache = generate_with_head_mask(model, ids, path, sink=SINK, window=WINDOW, block_size=BLOCK,
                                            max_new_tokens=6, do_sample=False)
    with torch.no_grad(), reference_run(model, MIXED):
        ref_tokens, _ = generate(model, ids, n=6)
    assert torch.equal(output[:, 300:], ref_tokens)
    assert isinstance(cache, HeadMaskCache) and cache.get_seq_length() == 305
    assert model.config._attn_implementation != "sparseattn_headmask"


@pytest.mark.gpu
@pytest.mark.parametrize("L", [4096, 8000])
def test_gpu_mixed_heads_kernel_matches_the_per_head_reference(L):
    q, k, v = (t.cuda() for t in qkv(1, 9, 3, L, L, 64, seed=2))
    full = [True, False, False]
    out = head_mask_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), full, sink=128, window=1024, block_size=64)
    assert torch.isfinite(out).all()
    assert rel(out, per_head_reference(q, k, v, full, 128, 1024, 64)) < 1e-2


@pytest.mark.gpu
def test_gpu_decode_with_eviction_matches_the_masking_reference():
    model, ids = tiny_model(), tokens(300, 2)
    model, ids = model.cuda(), ids.cuda()
    with torch.no_grad():
        with reference_run(model, MIXED):
            ref_tokens, ref_logits = generate(model, ids)
        with patch_head_mask(model, MIXED, sink=SINK, window=WINDOW, block_size=BLOCK) as handle:
            out_tokens, out_logits = generate(model, ids, past_key_values=handle.make_cache())
    torch.testing.assert_close(out_logits, ref_logits, atol=1e-3, rtol=1e-3)  # TF32 / kernel summation order
    assert torch.equal(out_tokens, ref_tokens)


# --------------------------------------------------------------------------------------------
# The embedded model (SmolLM2-135M, 30 layers x 3 KV heads), when it is in the local cache
# --------------------------------------------------------------------------------------------


def test_embedded_model_decode_matches_the_masking_reference(embedded_model_path):
    from sparseattn.models import load_llama
    from sparseattn.tasks import haystack_text

    model, tokenizer = load_llama(embedded_model_path, device="cpu")
    model.generation_config.eos_token_id = None
    ids = tokenizer(haystack_text(2000), return_tensors="pt")["input_ids"][:, :120]
    mask = random_head_mask(30, 3, 45, seed=0)
    with torch.no_grad():
        with reference_run(model, mask):
            ref_tokens, ref_logits = generate(model, ids, n=6, pad_token_id=0)
        with patch_head_mask(model, mask, sink=SINK, window=WINDOW, block_size=BLOCK) as handle:
            cache = handle.make_cache()
            out_tokens, out_logits = generate(model, ids, n=6, pad_token_id=0, past_key_values=cache)
        _, dense_logits = generate(model, ids, n=6, pad_token_id=0)
    assert rel(ref_logits, dense_logits) > 1e-3  # streaming heads change the model here
    assert torch.equal(out_tokens, ref_tokens)
    torch.testing.assert_close(out_logits, ref_logits, atol=2e-3, rtol=2e-3)
    n = 120 + 5
    per_token = 64 * 4 * 2
    assert cache.kv_bytes() == (int(mask.sum()) * n + int((~mask).sum()) * min(n, SINK + WINDOW)) * per_token


# --------------------------------------------------------------------------------------------
# Docs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sparseattn.headmask", "sparseattn.methods.headmask",
                                  "sparseattn.integrations.headmask_cache",
                                  "sparseattn.integrations.headmask_attention"])
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


def test_docs_examples_run(tmp_path, monkeypatch):
    text = (ROOT / "docs" / "headmask.md").read_text()
    blocks = re.findall(r"(<!-- not run by tests[^>]*-->\n)?```python\n(.*?)```", text, flags=re.S)
    runnable = [code for marker, code in blocks if not marker]
    assert runnable
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for code in runnable:
        exec(compile(code, "docs/headmask.md", "exec"), namespace)
