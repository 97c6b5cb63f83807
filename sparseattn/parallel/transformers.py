"""Sequence-parallel Hugging Face models: ``attn_implementation="sparseattn_ulysses"``.

Importing this module registers, under :data:`IMPLEMENTATION`, an attention function with
``transformers.AttentionInterface`` and a mask function with ``AttentionMaskInterface``. A model
switched to it (:func:`enable_sequence_parallel`) runs unmodified on a sequence shard: embeddings,
norms, MLPs and RoPE are per token (RoPE reads the shard's global ``position_ids``), and every
attention layer does the two Ulysses all-to-alls around an *inner* attention function - the
model's previous implementation (``"sdpa"``, ``"sparseattn"``, a trainer's gated attention, ...),
which then sees the whole sequence for ``Hq / P`` heads.

The inner function is called as transformers calls any attention function, with
``attention_mask=None`` meaning plain causal attention over all keys, plus one keyword:
``head_shard`` (a :class:`~sparseattn.parallel.ulysses.HeadShard`) saying which of the layer's
heads it has, so that per-head parameters (gates ``[Hkv]``) can be sliced with
``head_shard.kv(gate)``. Functions that ignore unknown keywords (``"sdpa"``, ``"sparseattn"``)
need nothing. The inner function must take the GQA ratio from the tensor shapes, not from
``module.num_key_value_groups`` (they differ when ``P > Hkv``); ``"sdpa"`` does when the mask is None.

Positions: the shard's ``position_ids`` must be its slice of the global positions
(:func:`~sparseattn.parallel.sharding.shard_batch` gives them); the first layer checks it, since a
model called without them would rotate every shard as if it started at 0. Packed rows pass the
*global* boundaries (``cu_seq_lens_q/k``, ``max_length_q/k``: ``SequenceShard.model_inputs()``),
which reach the inner function unchanged - it sees the whole row - so the inner function must
honour them (the PruLong gated attention does; ``"sdpa"`` does not, and is refused with them).

Not supported (each raises ValueError): padding masks (pad at the end with ``shard_batch``), a KV
cache beyond the first forward, sliding windows that cut the sequence, and inner implementations
that need a materialized mask (``"eager"``, ``"flex_attention"``). Mask overlays (multimodal
models' bidirectional image spans) are not applied: use text models of the Llama family.

Example (one process, group None; under torchrun pass ``build_groups(P).seq_group``):
    >>> import torch, transformers
    >>> from sparseattn.parallel import enable_sequence_parallel
    >>> cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                                num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    >>> model = transformers.LlamaForCausalLM(cfg)
    >>> with enable_sequence_parallel(model, group=None) as handle:
    ...     logits = model(torch.randint(0, 128, (1, 40)), use_cache=False).logits
    >>> handle.inner, model.config._attn_implementation
    ('sdpa', 'sdpa')
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import transformers
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .comm import group_rank, group_size
from ..integrations.transformers import ConfigRegistry, SwitchedModel
from .ulysses import check_heads, gather_heads, scatter_heads

__all__ = ["IMPLEMENTATION", "SequenceParallelPatch", "SequenceParallelSettings", "enable_sequence_parallel",
           "register", "ulysses_attention_forward", "ulysses_attention_mask"]

IMPLEMENTATION = "sparseattn_ulysses"
# Implementations that read a materialized mask (None would make them non-causal).
_NEEDS_MASK = {"eager", "flex_attention", "paged|eager", "paged|flex_attention"}
# Keyword arguments that describe packed sequences (transformers' flash-attention names).
_PACKING_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k")
# Implementations that would ignore those boundaries and attend across documents.
_NO_PACKING = {"sdpa", "sparseattn"}


@dataclass(frozen=True)
class SequenceParallelSettings:
    """Where a model's attention runs sequence-parallel.

    Attributes:
        group: the sequence-parallel process group (None: one process).
        inner: the attention implementation run on head shards: a name registered with
            ``transformers.AttentionInterface`` (looked up at call time) or a function with that signature.
    """

    group: dist.ProcessGroup | None
    inner: str | Callable


_SETTINGS = ConfigRegistry()
_get_settings = _SETTINGS.get


def _inner_function(inner):
    if callable(inner):
        return inner
    return ALL_ATTENTION_FUNCTIONS[inner]


def ulysses_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, dropout: float = 0.0,
                              scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The attention function of ``attn_implementation="sparseattn_ulysses"``.

    Args:
        module: the attention layer; its ``config`` leads to the :class:`SequenceParallelSettings`.
        query: `[B, Hq, L/P, D]` this rank's positions (after RoPE).
        key, value: `[B, Hkv, L/P, D]`.
        attention_mask: must be None (plain causal; see :func:`ulysses_attention_mask`).
        dropout, scaling: passed to the inner function.
        **kwargs: passed to the inner function (``position_ids`` dropped: they are the shard's;
            ``cu_seq_lens_q/k`` must be the whole row's).

    Returns:
        ``(attn_output [B, L/P, Hq, D], None)``, as every transformers attention function.
    """
    settings = _get_settings(getattr(module, "config", None))
    if settings is None:
        raise ValueError(f"{type(module).__name__} uses attn_implementation={IMPLEMENTATION!r} but its model was not "
                         "set up with sparseattn.parallel.enable_sequence_parallel(model, group)")
    if attention_mask is not None:
        raise ValueError("sequence-parallel attention got an attention mask; only plain causal attention is supported "
                         "(pad at the end with shard_batch instead of passing a padding mask)")
    position_ids = kwargs.pop("position_ids", None)  # the shard's; RoPE has used them already
    if getattr(module, "layer_idx", 0) == 0:  # once per forward: these are the same for every layer
        _check_positions(settings, position_ids, query.shape[2], kwargs)
    q, k, v, shard = scatter_heads(query, key, value, settings.group)
    window = kwargs.get("sliding_window")
    if window is not None and window < q.shape[2]:
        raise ValueError(f"{type(module).__name__} has a sliding window of {window} tokens, shorter than the "
                         f"sequence ({q.shape[2]}); sliding windows are not supported under sequence parallelism")
    out, _ = _inner_function(settings.inner)(module, q, k, v, None, dropout=dropout, scaling=scaling,
                                             head_shard=shard, **kwargs)
    # [B, L, Hq/P, D] -> [B, L/P, Hq, D]
    return gather_heads(out, settings.group, head_dim=2, seq_dim=1), None


def _check_positions(settings: SequenceParallelSettings, position_ids, local_len: int, kwargs) -> None:
    P, r = group_size(settings.group), group_rank(settings.group)
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        if isinstance(settings.inner, str) and settings.inner in _NO_PACKING:
            raise ValueError(f"inner attention {settings.inner!r} ignores cu_seq_lens_q and would attend across the "
                             "documents of a packed row; use an attention function that takes cu_seq_lens_q")
        if int(cu[-1]) != P * local_len:
            raise ValueError(f"cu_seq_lens_q must describe the whole padded row ({P} x {local_len} = {P * local_len} "
                             f"tokens) under sequence parallelism, got a total of {int(cu[-1])}; pass the "
                             "SequenceShard's cu_seqlens")
        return
    if position_ids is None:
        return
    expected = torch.arange(r * local_len, (r + 1) * local_len, device=position_ids.device)
    if not bool((position_ids == expected).all()):
        raise ValueError(
            f"rank {r} of the sequence-parallel group holds positions {r * local_len}..{(r + 1) * local_len - 1}, but "
            f"the model got position_ids starting at {int(position_ids.reshape(-1)[0])}: pass the shard's position_ids "
            "(SequenceShard.model_inputs()), and cu_seq_lens_q for a packed row"
        )


def ulysses_attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                           mask_function=None, attention_mask: torch.Tensor | None = None,
                           allow_is_causal_skip: bool = True, **kwargs) -> None:
    """The mask function of ``"sparseattn_ulysses"``: always None, or ValueError.

    None means causal attention over the whole row, document boundaries (packed rows) being the
    inner function's job through ``cu_seq_lens_q``; :func:`ulysses_attention_forward` checks that
    a row whose positions restart comes with them. A padding mask or a KV-cache offset raises.
    """
    if isinstance(q_offset, torch.Tensor) or isinstance(kv_offset, torch.Tensor) or q_offset or kv_offset:
        raise ValueError("sequence parallelism supports no KV cache beyond a single forward; call the model with "
                         "use_cache=False")
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("sequence parallelism got a padding attention_mask; pad at the end with shard_batch "
                         "(labels of padding are ignored) and pass no attention_mask")
    return None


def register() -> None:
    """Register :data:`IMPLEMENTATION` with transformers (done on import; repeating it is harmless)."""
    transformers.AttentionInterface.register(IMPLEMENTATION, ulysses_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, ulysses_attention_mask)


register()


class SequenceParallelPatch(SwitchedModel):
    """A model switched to sequence-parallel attention; a context manager and a plain handle.

    Attributes:
        model: the model.
        group: its sequence-parallel group.
        inner: the implementation run on head shards.
        active: False once restored.
    """

    def __init__(self, model, settings: SequenceParallelSettings, saved: list):
        super().__init__(model, _SETTINGS, saved)
        self.group = settings.group
        self.inner = settings.inner


def enable_sequence_parallel(model, group: dist.ProcessGroup | None, inner: str | Callable | None = None
                             ) -> SequenceParallelPatch:
    """Run ``model``'s attention sequence-parallel over ``group`` (a plain call or a context manager).

    Args:
        model: a ``transformers.PreTrainedModel`` whose attention goes through ``ALL_ATTENTION_FUNCTIONS``.
        group: the sequence-parallel group (``build_groups(P).seq_group``); None runs the inner
            function directly (one process).
        inner: the attention run on head shards: an ``AttentionInterface`` name or a function;
            default the model's current implementation (so ``patch(model, ...)`` first, then this,
            makes sparse attention sequence-parallel).

    Returns:
        A :class:`SequenceParallelPatch`; ``restore()`` or the end of a ``with`` block undoes it.
    """
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"model must be a transformers.PreTrainedModel, got {type(model).__name__}")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    if inner is None:
        inner = model.config._attn_implementation
    if isinstance(inner, str):
        if inner == IMPLEMENTATION:
            raise ValueError(f"the model already runs {IMPLEMENTATION!r}; restore() it before enabling again")
        if inner in _NEEDS_MASK:
            raise ValueError(f"inner attention {inner!r} needs a materialized causal mask, which sequence parallelism "
                             "does not build; use 'sdpa', 'sparseattn' or a flash-attention implementation")
        if inner not in ALL_ATTENTION_FUNCTIONS:
            raise ValueError(f"inner attention {inner!r} is not registered with transformers.AttentionInterface; "
                             f"registered: {sorted(ALL_ATTENTION_FUNCTIONS.valid_keys())}")
    elif not callable(inner):
        raise TypeError(f"inner must be an AttentionInterface name or a function, got {type(inner).__name__}")
    text_config = model.config.get_text_config()
    P = group_size(group)
    if P > 1:
        check_heads(text_config.num_attention_heads,
                    getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads, P)
    register()
    settings = SequenceParallelSettings(group, inner)
    return SequenceParallelPatch(model, settings, _SETTINGS.switch(model, IMPLEMENTATION, settings))
