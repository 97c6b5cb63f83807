"""Trained head masks in Hugging Face models: ``patch_head_mask`` and ``attn_implementation="sparseattn_headmask"``.

A head mask (a `[layers, kv_heads]` TSV, see :mod:`sparseattn.headmask`) makes each KV head either
*full* (attends to, and caches, every token) or *streaming* (the first ``sink`` tokens and the last
``window`` tokens, itself included). :func:`patch_head_mask` switches a model to the attention
function registered here; :func:`make_cache` builds the :class:`HeadMaskCache` that drops the
streaming heads' other tokens during decoding, so their memory is freed.

Per attention call (``q [B, Hq, Lq, D]``; GQA: query head ``h`` follows KV head ``h // (Hq / Hkv)``):

=======================================  ==========================================================
call                                     computation
=======================================  ==========================================================
layer with only full heads               dense SDPA (with the padding mask, if any)
fresh prefill (no past tokens), no       ``sparse_attention(method="headmask")``: one BlockIndex,
padding, more than ``sink + window``     full heads all causal blocks, streaming heads sink +
keys                                     window *blocks* (as ``method="streaming"``); the shared
                                         Triton kernel on a GPU. Dense when the prompt fits in
                                         ``sink + window`` (then identical).
fresh prefill with a padding mask        the same blocks, as an element mask with the padding
decode / chunked prefill, HeadMaskCache  full heads: SDPA over all their keys; streaming heads:
                                         SDPA over their kept keys, token-granular rule
                                         ``key < sink or key > query - window`` (``Lq == 1``
                                         without padding: the kept keys are exactly those)
decode / chunked prefill on another      the same token rule as a mask over all keys: correct,
cache (e.g. ``DynamicCache``)            but nothing is freed (logged once)
=======================================  ==========================================================

So a streaming head sees a block-granular superset of sink + window in the first prefill (the
fast kernel's granularity) and exactly sink + window tokens afterwards, in both caches.

Limits: causal decoder models whose attention goes through ``ALL_ATTENTION_FUNCTIONS`` and
whose layers are all full attention (Llama, Qwen2/3, ...; no sliding-window layers, no
soft-capping, no attention sinks); inference (no dropout); no rollback (assisted decoding)
once tokens are evicted. With left padding a streaming head's sink is the first cache positions,
i.e. padding, which the mask hides: padded rows keep only their window. Batch rows of equal
length are exact.

Example:
    >>> import torch, transformers
    >>> from sparseattn.integrations.headmask_attention import patch_head_mask
    >>> cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                                num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    >>> model = transformers.LlamaForCausalLM(cfg).eval()
    >>> mask = torch.tensor([[True, False], [False, False]])
    >>> ids = torch.randint(1, 128, (1, 300))
    >>> with patch_head_mask(model, mask, sink=16, window=64) as handle:
    ...     cache = handle.make_cache()
    ...     out = model.generate(ids, past_key_values=cache, max_new_tokens=5, do_sample=False,
    ...                          pad_token_id=0)
    >>> out.shape, cache.get_seq_length()
    (torch.Size([1, 305]), 304)
    >>> [tuple(layer.stream_keys.shape) for layer in cache.layers]
    [(1, 1, 80, 16), (1, 2, 80, 16)]
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import transformers
from transformers.masking_utils import AttentionMaskInterface

from ..api import sparse_attention
from ..headmask import head_mask_for_model
from ..methods import headmask as _headmask_method  # noqa: F401  registers method="headmask"
from ..methods.full import dense_attention
from ..reference.streaming import streaming_select
from .headmask_cache import IMPLEMENTATION, HeadMaskCache, HeadMaskSettings, HeadSplitKV
from .transformers import ConfigRegistry, SwitchedModel, check_model_type, sparse_attention_mask

logger = logging.getLogger("sparseattn")

__all__ = [
    "IMPLEMENTATION",
    "HeadMaskPatch",
    "generate_with_head_mask",
    "head_mask_attention_forward",
    "make_cache",
    "patch_head_mask",
    "register",
    "settings_for",
]

_UNSUPPORTED_KWARGS = {"softcap": "attention logit soft-capping", "s_aux": "attention sinks",
                       "sinks": "attention sinks", "sliding_window": "sliding-window attention"}
# Elements of one masked-attention chunk's bool mask ([B, Hq, rows, Lk]).
_MASK_CHUNK_ELEMENTS = 1 << 26


@dataclass
class _Active:
    """What the attention function needs for one patched model."""

    settings: HeadMaskSettings
    counts: Counter = field(default_factory=Counter)
    warned_uncached: bool = False


# id(config) -> (weak reference to the config, its state), as in sparseattn.integrations.transformers.
_ACTIVE = ConfigRegistry()
_get_active = _ACTIVE.get


def settings_for(model) -> HeadMaskSettings | None:
    """The head-mask settings of a patched model, or None."""
    active = _get_active(model.config)
    return active.settings if active is not None else None


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------


def _token_rule(qpos: torch.Tensor, kpos: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """`[Lq, Lk]` bool: causal, and in the sink or in the query's window (streaming heads)."""
    q, k = qpos[:, None], kpos[None, :]
    return (k <= q) & ((k < sink) | (k > q - window))


def _check_padding(mask, B: int, Lq: int, Lk: int):
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"attn_implementation={IMPLEMENTATION!r} takes a boolean attention mask (True = attend), "
                        f"got {getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.dim() != 4 or mask.shape[0] not in (1, B) or mask.shape[1] != 1 or tuple(mask.shape[2:]) != (Lq, Lk):
        raise ValueError(f"attention mask must be [batch, 1, {Lq}, {Lk}] (every position), got {tuple(mask.shape)}")
    return mask


def _masked_attention(q, k, v, full_q: torch.Tensor, stream_rule, padding, scale):
    """All heads over all keys, each query chunk with its element mask (padding, or a DynamicCache).

    ``full_q [Hq]`` marks full query heads (causal); the others get ``stream_rule(rows) -> [rows, Lk]``.
    """
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    kpos = torch.arange(Lk, device=q.device)
    step = max(1, _MASK_CHUNK_ELEMENTS // max(1, B * Hq * Lk))
    out = torch.empty(B, Hq, Lq, v.shape[-1], dtype=q.dtype, device=q.device)
    for r0 in range(0, Lq, step):
        r1 = min(Lq, r0 + step)
        qpos = torch.arange(r0, r1, device=q.device) + (Lk - Lq)
        causal = kpos[None, :] <= qpos[:, None]  # [rows, Lk]
        allowed = torch.where(full_q[:, None, None], causal, stream_rule(qpos) & causal)[None]  # [1, Hq, rows, Lk]
        if padding is not None:
            allowed = allowed & padding[:, :, r0:r1]
        out[:, :, r0:r1] = F.scaled_dot_product_attention(q[:, :, r0:r1], k, v, attn_mask=allowed, scale=scale,
                                                          enable_gqa=Hq != k.shape[1])
    return out


def _full_q(settings: HeadMaskSettings, layer: int, Hq: int, device) -> torch.Tensor:
    full = torch.tensor(settings.layer_full(layer), dtype=torch.bool, device=device)
    return full.repeat_interleave(Hq // settings.num_kv_heads)


def _attend_all(active: _Active, layer: int, q, k, v, padding, scale):
    """Attention over all ``Lk`` keys (a fresh prefill, or any call on a cache that keeps every token)."""
    s = active.settings
    Hq, Lq, Lk = q.shape[1], q.shape[2], k.shape[2]
    full = s.layer_full(layer)
    if all(full) or (Lq == Lk and Lk <= s.kept_tokens):
        # Streaming heads keep every key of a prompt that fits in sink + window.
        active.counts["dense"] += 1
        return dense_attention(q, k, v, causal=Lq > 1, scale=scale, attention_mask=padding)
    if Lq == Lk and padding is None:
        active.counts["prefill"] += 1
        return sparse_attention(q, k, v, method="headmask", config=s.layer_config(layer), causal=True, scale=scale)
    if Lq == Lk:
        # The fresh prefill's blocks, as an element mask combined with the padding.
        active.counts["prefill_padded"] += 1
        blocks = streaming_select(Lq, Lk, 1, 1, sink=s.sink, window=s.window, block_size=s.block_size,
                                  device=q.device).to_mask()[0, 0]  # [nq, nk]
        key_block = torch.arange(Lk, device=q.device) // s.block_size

        def stream_rule(qpos):
            return blocks[qpos // s.block_size][:, key_block]
    else:
        active.counts["uncached_decode" if Lq == 1 else "uncached_chunk"] += 1
        if not active.warned_uncached:
            logger.warning("sparseattn: head-mask decoding over a cache that keeps every token: streaming heads are "
                           "masked, not evicted, so no memory is freed; pass past_key_values=make_cache(model)")
            active.warned_uncached = True
        kpos = torch.arange(Lk, device=q.device)

        def stream_rule(qpos):
            return _token_rule(qpos, kpos, s.sink, s.window)

    return _masked_attention(q, k, v, _full_q(s, layer, Hq, q.device), stream_rule, padding, scale)


def _attend_split(active: _Active, split: HeadSplitKV, q, padding, scale):
    """Decode / chunked prefill on a HeadMaskCache: full and streaming heads apart, then back in head order."""
    s = split.settings
    B, Hq, Lq, D = q.shape
    Hkv = s.num_kv_heads
    G = Hq // Hkv
    total = split.total_len
    active.counts["decode" if Lq == 1 else "chunk"] += 1
    parts = []  # (KV head indices, keys, values, is_full, element mask or None)
    if split.full_keys is not None:
        parts.append((split.full_idx, split.full_keys, split.full_values, True, None))
    if split.stream_keys is not None:
        allowed = None  # one query without padding: it attends to exactly the kept keys
        if Lq > 1 or padding is not None:
            qpos = torch.arange(total - Lq, total, device=q.device)
            positions = split.stream_positions
            allowed = _token_rule(qpos, positions, s.sink, s.window)[None, None]
            if padding is not None:
                allowed = allowed & padding.index_select(-1, positions)
        parts.append((split.stream_idx, split.stream_keys, split.stream_values, False, allowed))

    def attend(part_q, k, v, is_full, allowed):
        if is_full:
            return dense_attention(part_q, k, v, causal=Lq > 1, scale=scale, attention_mask=padding)
        return F.scaled_dot_product_attention(part_q, k, v, attn_mask=allowed, scale=scale, enable_gqa=G > 1)

    if len(parts) == 1:  # one kind of head: no gather
        return attend(q, *parts[0][1:])
    grouped = q.reshape(B, Hkv, G, Lq, D)
    out = q.new_empty(B, Hkv, G, Lq, parts[0][2].shape[-1])
    for idx, *rest in parts:
        res = attend(grouped.index_select(1, idx).reshape(B, idx.numel() * G, Lq, D), *rest)
        out.index_copy_(1, idx, res.reshape(B, idx.numel(), G, Lq, -1))
    return out.reshape(B, Hq, Lq, -1)


def head_mask_attention_forward(module: torch.nn.Module, query: torch.Tensor, key, value, attention_mask,
                                dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """The attention function for ``attn_implementation="sparseattn_headmask"`` (see the module docstring).

    Args:
        module: the attention layer (reads ``config`` and ``layer_idx``).
        query: `[B, Hq, Lq, D]`.
        key, value: `[B, Hkv, Lk, D]` tensors (no cache, or a transformers cache), or the
            :class:`HeadSplitKV` a :class:`HeadMaskCache` returned (as both).
        attention_mask: None (plain causal) or a bool `[B, 1, Lq, Lk]` mask over every position.
        dropout: must be 0 (inference).
        scaling: softmax scale.

    Returns:
        ``(attn_output [B, Lq, Hq, D], None)``.
    """
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation={IMPLEMENTATION!r} does not implement {what} "
                             f"({type(module).__name__} passed {name}=...)")
    if dropout:
        raise ValueError(f"attn_implementation={IMPLEMENTATION!r} is for inference; got attention dropout {dropout} "
                         "(call model.eval())")
    is_causal = kwargs.pop("is_causal", None)
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if not is_causal:
        raise ValueError(f"attn_implementation={IMPLEMENTATION!r} is for causal decoders; "
                         f"{type(module).__name__} is not causal")
    config = getattr(module, "config", None)
    active = _get_active(config) if config is not None else None
    if active is None:
        raise RuntimeError(f"{type(module).__name__} runs attn_implementation={IMPLEMENTATION!r} without a head mask; "
                           "switch models with sparseattn.integrations.headmask_attention.patch_head_mask(model, mask)")
    layer = getattr(module, "layer_idx", None)
    B, Hq, Lq, _ = query.shape
    if Hq % active.settings.num_kv_heads:
        raise ValueError(f"{Hq} query heads are not a multiple of the head mask's {active.settings.num_kv_heads} "
                         "KV heads")
    if isinstance(key, HeadSplitKV):
        if value is not key:
            raise ValueError("a HeadMaskCache returns the same HeadSplitKV as key and value; got two different objects")
        if isinstance(layer, int) and layer != key.layer_idx:
            raise ValueError(f"layer {layer} received the cache entry of layer {key.layer_idx}")
        if not key.settings.same_as(active.settings):
            raise ValueError("this HeadMaskCache was made for another head mask (or sink / window) than the one the "
                             "model is patched with; build it with make_cache(model)")
        padding = _check_padding(attention_mask, B, Lq, key.total_len)
        if key.past_len == 0:
            out = _attend_all(active, key.layer_idx, query, key.key_states, key.value_states, padding, scaling)
        else:
            out = _attend_split(active, key, query, padding, scaling)
    else:
        if not isinstance(layer, int):
            raise TypeError(f"{type(module).__name__} has no integer layer_idx, so its head-mask row is unknown")
        active.settings.check_layer(layer)
        if key.shape[1] != active.settings.num_kv_heads:
            raise ValueError(f"layer {layer} has {key.shape[1]} KV heads but the head mask has "
                             f"{active.settings.num_kv_heads}")
        padding = _check_padding(attention_mask, B, Lq, key.shape[2])
        out = _attend_all(active, layer, query, key, value, padding, scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"sparseattn_headmask"`` with transformers (done on import; repeating it is harmless)."""
    transformers.AttentionInterface.register(IMPLEMENTATION, head_mask_attention_forward)
    # The same mask rule as "sparseattn": None for plain causal calls, else the boolean SDPA mask.
    AttentionMaskInterface.register(IMPLEMENTATION, sparse_attention_mask)


register()


# --------------------------------------------------------------------------------------------
# patch_head_mask, make_cache, generate_with_head_mask
# --------------------------------------------------------------------------------------------


def _check_layers_full_attention(text_config) -> None:
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        raise ValueError("head masks need full-attention layers; this model has layer types "
                         f"{sorted(set(layer_types))}")
    if getattr(text_config, "sliding_window", None) is not None and getattr(text_config, "use_sliding_window", True):
        raise ValueError(f"head masks need full-attention layers; this model uses a sliding window of "
                         f"{text_config.sliding_window} tokens")


class HeadMaskPatch(SwitchedModel):
    """A model running a head mask; a context manager and a plain handle.

    Attributes:
        model: the patched model.
        settings: its :class:`HeadMaskSettings`.
        counts: attention calls per route (``"dense"``, ``"prefill"``, ``"prefill_padded"``,
            ``"decode"``, ``"chunk"``, ``"uncached_decode"``, ``"uncached_chunk"``).
        active: False once restored.
    """

    def __init__(self, model, state: _Active, saved: list):
        super().__init__(model, _ACTIVE, saved)
        self._state = state

    @property
    def settings(self) -> HeadMaskSettings:
        return self._state.settings

    @property
    def counts(self) -> Counter:
        return self._state.counts

    def make_cache(self) -> HeadMaskCache:
        """A fresh :class:`HeadMaskCache` for this model (pass it as ``past_key_values``)."""
        if not self.active:
            raise RuntimeError("this head-mask patch was restored; patch the model again to make a cache")
        return HeadMaskCache(self.settings, config=self.model.config)

    def __repr__(self) -> str:
        s = self.settings
        return (f"HeadMaskPatch({type(self.model).__name__}, {int(s.full_heads.sum())}/{s.full_heads.numel()} full "
                f"heads, sink={s.sink}, window={s.window}, active={self.active})")


def patch_head_mask(model, mask_or_path, *, sink: int = 128, window: int = 1024,
                    block_size: int = 64) -> HeadMaskPatch:
    """Run ``model`` with a head mask: full heads attend to everything, streaming heads to sink + window.

    Args:
        model: a ``transformers.PreTrainedModel`` (causal decoder, full-attention layers, attention
            through ``ALL_ATTENTION_FUNCTIONS``: Llama, Qwen2/3, ...).
        mask_or_path: a TSV path (:func:`sparseattn.headmask.load_head_mask`) or a `[layers, kv_heads]`
            bool / 0-1 tensor; checked against the model's shape.
        sink: tokens at the start a streaming head keeps (default 128).
        window: most recent tokens a streaming head keeps, itself included (default 1024).
        block_size: block of the fresh prefill's selection (default 64).

    Returns:
        A :class:`HeadMaskPatch`; ``make_cache()`` gives the KV cache that frees the streaming
        heads' memory, ``restore()`` or the end of a ``with`` block puts the previous attention back.
    """
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"model must be a transformers.PreTrainedModel, got {type(model).__name__}")
    check_model_type(model.config)
    text_config = model.config.get_text_config()
    _check_layers_full_attention(text_config)
    if hasattr(model, "_can_set_attn_implementation") and not model._can_set_attn_implementation():
        raise ValueError(f"{type(model).__name__} does not route its attention through ALL_ATTENTION_FUNCTIONS")
    mask = head_mask_for_model(mask_or_path, text_config)
    state = _Active(HeadMaskSettings(mask, sink=sink, window=window, block_size=block_size))
    register()
    return HeadMaskPatch(model, state, _ACTIVE.switch(model, IMPLEMENTATION, state))


def make_cache(model) -> HeadMaskCache:
    """A :class:`HeadMaskCache` for a model patched with :func:`patch_head_mask`."""
    settings = settings_for(model)
    if settings is None:
        raise ValueError("the model is not patched with a head mask; call patch_head_mask(model, mask) first")
    return HeadMaskCache(settings, config=model.config)


@torch.no_grad()
def generate_with_head_mask(model, input_ids: torch.Tensor, mask_or_path, *, sink: int = 128, window: int = 1024,
                            block_size: int = 64, **generate_kwargs):
    """``model.generate`` with a head mask and its memory-saving cache; the model is restored afterwards.

    Args:
        model, mask_or_path, sink, window, block_size: as :func:`patch_head_mask`.
        input_ids: `[B, L]` prompt ids on the model's device.
        **generate_kwargs: passed to ``model.generate`` (``max_new_tokens``, ``attention_mask``, ...).

    Returns:
        ``(output, cache)``: what ``generate`` returned and the :class:`HeadMaskCache` it filled
        (``cache.kv_bytes()`` is its memory).
    """
    if "past_key_values" in generate_kwargs:
        raise ValueError("generate_with_head_mask makes its own cache; do not pass past_key_values")
    with patch_head_mask(model, mask_or_path, sink=sink, window=window, block_size=block_size) as handle:
        cache = handle.make_cache()
        output = model.generate(input_ids, past_key_values=cache, **generate_kwargs)
    return output, cache
