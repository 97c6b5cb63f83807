"""Real activations: q/k/v of chosen layers captured from a Hugging Face model on real text.

The model runs with a recording attention function registered in transformers'
``AttentionInterface`` (no model code copied, no ``forward`` replaced): each chosen layer's
post-RoPE `q [B, Hq, L, D]`, `k, v [B, Hkv, L, D]` are kept, then attention proceeds as SDPA, so
the model's output is unchanged. Used as benchmark input 3 and for fidelity measurements.
"""

from __future__ import annotations

import torch

CAPTURE_IMPLEMENTATION = "sparseattn_capture"
_RECORDER: dict = {"layers": None, "store": None}


def _capture_forward(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer = getattr(module, "layer_idx", None)
    store, layers = _RECORDER["store"], _RECORDER["layers"]
    if store is not None and (layers is None or layer in layers):
        store[layer] = (query.detach().clone(), key.detach().clone(), value.detach().clone())
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capture_forward)
    AttentionMaskInterface.register(CAPTURE_IMPLEMENTATION, sdpa_mask)


@torch.no_grad()
def capture_qkv(model, input_ids: torch.Tensor, layers=None) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Run ``model`` on ``input_ids [B, L]`` and return ``{layer: (q, k, v)}`` for ``layers`` (None: all).

    Example:
        >>> import torch, transformers
        >>> cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        ...                                num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
        >>> model = transformers.LlamaForCausalLM(cfg).eval()
        >>> qkv = capture_qkv(model, torch.randint(0, 128, (1, 50)), layers=[1])
        >>> [tuple(t.shape) for t in qkv[1]]
        [(1, 4, 50, 16), (1, 2, 50, 16), (1, 2, 50, 16)]
    """
    _register()
    previous = model.config._attn_implementation
    store: dict = {}
    _RECORDER.update(layers=None if layers is None else set(layers), store=store)
    try:
        model.set_attn_implementation(CAPTURE_IMPLEMENTATION)
        model(input_ids.to(model.device), use_cache=False)
    finally:
        _RECORDER.update(layers=None, store=None)
        model.set_attn_implementation(previous)
    missing = [] if layers is None else sorted(set(layers) - set(store))
    if missing:
        raise ValueError(f"layers {missing} were not reached; the model has {len(store)} attention layers")
    return store


def real_text_ids(tokenizer, length: int) -> torch.Tensor:
    """`[1, length]` token ids of Python standard-library source (offline, deterministic)."""
    from ..tasks import haystack_text

    chars = 6 * length
    while True:
        ids = tokenizer(haystack_text(chars), add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            return torch.tensor([ids[:length]])
        chars *= 2
