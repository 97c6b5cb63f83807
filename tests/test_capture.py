"""Capturing real q/k/v from a model leaves its outputs unchanged and returns the right tensors."""

import pytest
import torch
import transformers

from sparseattn.bench.capture import capture_qkv
from sparseattn.reference.attention import reference_attention


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg).eval()


def test_capture_shapes_and_restore(tiny_llama):
    ids = torch.randint(0, 128, (2, 70), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = tiny_llama(ids).logits
    got = capture_qkv(tiny_llama, ids, layers=[0, 2])
    assert sorted(got) == [0, 2]
    q, k, v = got[2]
    assert q.shape == (2, 4, 70, 16) and k.shape == v.shape == (2, 2, 70, 16)
    assert tiny_llama.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(tiny_llama(ids).logits, before)


def test_captured_qkv_reproduce_the_layer_attention(tiny_llama):
    """The captured tensors are the real post-RoPE inputs: attention on them equals the layer's own."""
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    q, k, v = capture_qkv(tiny_llama, ids, layers=[1])[1]
    seen = {}
    attn = tiny_llama.model.layers[1].self_attn
    hook = attn.o_proj.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    try:
        with torch.no_grad():
            tiny_llama(ids)
    finally:
        hook.remove()
    ours = reference_attention(q, k, v).transpose(1, 2).reshape(1, 40, -1)
    assert torch.allclose(ours, seen["x"], atol=1e-5)


def test_unknown_layer_is_an_error(tiny_llama):
    with pytest.raises(ValueError, match=r"layers \[7\] were not reached"):
        capture_qkv(tiny_llama, torch.randint(0, 128, (1, 10)), layers=[7])
