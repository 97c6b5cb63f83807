"""A transformers KV cache that keeps every token for full heads and only sink + window for streaming heads.

Per layer, :class:`HeadMaskLayer` stores the two kinds of KV heads apart:

- full heads: `[B, Hfull, T, D]`, every token (grown by concatenation, as ``DynamicLayer``);
- streaming heads: `[B, Hstream, min(T, sink + window), D]`, the first ``sink`` tokens and the
  last ``window`` tokens in position order. After each update the older tokens are cut away with a
  copy, so their memory is actually released (no view keeps the old tensor alive).

``T`` is the number of tokens seen (``get_seq_length()``), so new tokens get their true positions.
Keys are cached after RoPE (Llama applies it before ``cache.update``), so kept keys keep their
original rotary positions and evicted positions are simply gone.

How attention finds the split heads: HF attention layers call
``key, value = cache.update(key_states, value_states, layer_idx)`` and pass ``key, value``
straight to the attention function. :meth:`HeadMaskLayer.update` returns a :class:`HeadSplitKV`
(as both), which carries the full heads' keys, the streaming heads' keys with their absolute
positions, the head indices and this call's own `[B, Hkv, L, D]` states. Only the attention
function of :mod:`sparseattn.integrations.headmask_attention` understands it; the cache refuses
to update while the model runs another attention implementation, so nothing else can receive it.

Example:
    >>> import torch
    >>> from sparseattn.integrations.headmask_cache import HeadMaskCache, HeadMaskSettings
    >>> settings = HeadMaskSettings(torch.tensor([[True, False]]), sink=4, window=8)
    >>> cache = HeadMaskCache(settings)
    >>> k = torch.randn(1, 2, 100, 16)
    >>> _ = cache.update(k, k.clone(), 0)
    >>> layer = cache.layers[0]
    >>> cache.get_seq_length(), tuple(layer.full_keys.shape), tuple(layer.stream_keys.shape)
    (100, (1, 1, 100, 16), (1, 1, 12, 16))
    >>> cache.kv_bytes() == (100 + 12) * 16 * 4 * 2
    True
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..headmask import to_head_mask
from ..methods.headmask import HeadMaskConfig
from ..validation import check_block_size, check_positive_int

__all__ = ["HeadMaskCache", "HeadMaskLayer", "HeadMaskSettings", "HeadSplitKV", "kept_positions", "kv_cache_bytes"]

# The attention implementation the cache works with (defined here so the cache can check it).
IMPLEMENTATION = "sparseattn_headmask"


@dataclass(frozen=True, eq=False)
class HeadMaskSettings:
    """A model's head mask and the streaming heads' shape.

    Args:
        full_heads: `[layers, kv_heads]` bool (or 0/1), True = full head; kept on the CPU.
        sink: first tokens a streaming head keeps (default 128).
        window: most recent tokens a streaming head keeps, the current one included (default 1024).
        block_size: prefill selection block (default 64): a fresh prefill's streaming heads are
            block-granular, as the ``streaming`` method (see
            :mod:`sparseattn.integrations.headmask_attention`).
    """

    full_heads: torch.Tensor
    sink: int = 128
    window: int = 1024
    block_size: int = 64
    _per_layer: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "full_heads", to_head_mask(self.full_heads, "full_heads"))
        check_positive_int("sink", self.sink, allow_zero=True)
        check_positive_int("window", self.window)
        check_block_size("block_size", self.block_size)

    @property
    def num_layers(self) -> int:
        return self.full_heads.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.full_heads.shape[1]

    @property
    def kept_tokens(self) -> int:
        """Tokens a streaming head keeps once the sequence is long enough: ``sink + window``."""
        return self.sink + self.window

    def check_layer(self, layer_idx) -> int:
        if not isinstance(layer_idx, int) or not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"layer_idx {layer_idx!r} is outside the head mask's {self.num_layers} layers")
        return layer_idx

    def layer_full(self, layer_idx: int) -> tuple[bool, ...]:
        """The full/streaming choice of each KV head of one layer."""
        return tuple(self.full_heads[self.check_layer(layer_idx)].tolist())

    def layer_config(self, layer_idx: int) -> HeadMaskConfig:
        """The ``headmask`` method's config for one layer."""
        key = ("config", layer_idx)
        if key not in self._per_layer:
            self._per_layer[key] = HeadMaskConfig(full_heads=self.layer_full(layer_idx), sink=self.sink,
                                                  window=self.window, block_size=self.block_size)
        return self._per_layer[key]

    def head_indices(self, layer_idx: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(full KV head indices, streaming KV head indices)``, int64 on ``device``."""
        key = ("indices", layer_idx, str(device))
        if key not in self._per_layer:
            row = self.full_heads[self.check_layer(layer_idx)]
            self._per_layer[key] = (torch.nonzero(row).flatten().to(device),
                                    torch.nonzero(~row).flatten().to(device))
        return self._per_layer[key]

    def same_as(self, other: HeadMaskSettings) -> bool:
        """Same mask, sink, window and block size."""
        if self is other:
            return True
        return (isinstance(other, HeadMaskSettings) and torch.equal(self.full_heads, other.full_heads)
                and (self.sink, self.window, self.block_size) == (other.sink, other.window, other.block_size))


def kept_positions(total: int, sink: int, window: int, device=None) -> torch.Tensor:
    """Absolute positions a streaming head keeps after ``total`` tokens, ascending: the first ``sink`` and
    the last ``window`` (all of them while ``total <= sink + window``).

    Example:
        >>> kept_positions(10, 2, 3).tolist()
        [0, 1, 7, 8, 9]
    """
    if total <= sink + window:
        return torch.arange(total, device=device)
    return torch.cat([torch.arange(sink, device=device), torch.arange(total - window, total, device=device)])


def _trim(x: torch.Tensor, total: int, sink: int, window: int) -> torch.Tensor:
    """``x [B, H, n, D]`` holds every kept position up to ``total`` in order (and maybe older ones): a fresh
    tensor of only the kept ones (a copy, so ``x``'s storage can be freed)."""
    if total <= sink + window and x.shape[-2] == total:
        return x
    parts = ([x[..., :sink, :]] if sink else []) + [x[..., x.shape[-2] - window:, :]]
    return torch.cat(parts, dim=-2)


@dataclass(frozen=True, eq=False)
class HeadSplitKV:
    """What :meth:`HeadMaskLayer.update` returns, as both the key and the value states.

    Attributes:
        settings: the cache's :class:`HeadMaskSettings`.
        layer_idx: the layer.
        past_len: tokens cached before this call; 0 means a fresh prefill.
        key_states, value_states: this call's new states `[B, Hkv, L, D]` (all heads).
        full_idx, stream_idx: KV head indices of the full and the streaming heads (int64).
        full_keys, full_values: `[B, Hfull, past_len + L, D]` (None without full heads).
        stream_keys, stream_values: `[B, Hstream, Ls, D]` the streaming heads' keys this call may
            read (None without streaming heads, and for a fresh prefill, which reads
            ``key_states``): the kept ones after this update for a one-token call, else the kept
            past ones plus the new ones.

    ``stream_positions`` gives the absolute position of each of those keys (computed on demand: a
    plain decode step does not need it).
    """

    settings: HeadMaskSettings
    layer_idx: int
    past_len: int
    key_states: torch.Tensor
    value_states: torch.Tensor
    full_idx: torch.Tensor
    stream_idx: torch.Tensor
    full_keys: torch.Tensor | None
    full_values: torch.Tensor | None
    stream_keys: torch.Tensor | None
    stream_values: torch.Tensor | None

    @property
    def total_len(self) -> int:
        return self.past_len + self.key_states.shape[-2]

    @property
    def stream_positions(self) -> torch.Tensor | None:
        """`[Ls]` int64: the absolute position of each of ``stream_keys``."""
        if self.stream_keys is None:
            return None
        s, device, total = self.settings, self.key_states.device, self.total_len
        if self.key_states.shape[-2] == 1:
            return kept_positions(total, s.sink, s.window, device=device)
        return torch.cat([kept_positions(self.past_len, s.sink, s.window, device=device),
                          torch.arange(self.past_len, total, device=device)])


class HeadMaskLayer(CacheLayerMixin):
    """One layer of :class:`HeadMaskCache` (see the module docstring).

    Attributes:
        full_keys, full_values: `[B, Hfull, T, D]` or None before the first update / without full heads.
        stream_keys, stream_values: `[B, Hstream, min(T, sink + window), D]` or None.
        cumulative_length: ``T``, tokens seen.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, settings: HeadMaskSettings, layer_idx: int):
        super().__init__()
        self.settings = settings
        self.layer_idx = settings.check_layer(layer_idx)
        self.full_keys = self.full_values = self.stream_keys = self.stream_values = None
        self.cumulative_length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.full_idx, self.stream_idx = self.settings.head_indices(self.layer_idx, self.device)
        self.is_initialized = True

    def kv_tensors(self) -> list[torch.Tensor]:
        """The tensors this layer holds."""
        return [t for t in (self.full_keys, self.full_values, self.stream_keys, self.stream_values) if t is not None]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append `[B, Hkv, L, D]` states; returns ``(split, split)`` with ``split`` a :class:`HeadSplitKV`."""
        if key_states.dim() != 4 or key_states.shape[1] != self.settings.num_kv_heads:
            raise ValueError(f"layer {self.layer_idx}: key_states must be [B, {self.settings.num_kv_heads}, L, D] "
                             f"(the head mask's KV heads), got {tuple(key_states.shape)}")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        s = self.settings
        past, length = self.cumulative_length, key_states.shape[-2]
        total = past + length
        has_full, has_stream = self.full_idx.numel() > 0, self.stream_idx.numel() > 0
        if has_full:
            new_k, new_v = key_states.index_select(1, self.full_idx), value_states.index_select(1, self.full_idx)
            if past:
                new_k = torch.cat([self.full_keys, new_k], dim=-2)
                new_v = torch.cat([self.full_values, new_v], dim=-2)
            self.full_keys, self.full_values = new_k, new_v
        read_k = read_v = None
        if has_stream:
            if past == 0:
                # Cut the tokens first, then gather the heads: the temporary is sink + window long.
                self.stream_keys = _trim(key_states, total, s.sink, s.window).index_select(1, self.stream_idx)
                self.stream_values = _trim(value_states, total, s.sink, s.window).index_select(1, self.stream_idx)
            else:
                all_k = torch.cat([self.stream_keys, key_states.index_select(1, self.stream_idx)], dim=-2)
                all_v = torch.cat([self.stream_values, value_states.index_select(1, self.stream_idx)], dim=-2)
                self.stream_keys = _trim(all_k, total, s.sink, s.window)
                self.stream_values = _trim(all_v, total, s.sink, s.window)
                # A single query attends to exactly the kept tokens; a chunk's queries to older ones too.
                read_k, read_v = (self.stream_keys, self.stream_values) if length == 1 else (all_k, all_v)
        self.cumulative_length = total
        split = HeadSplitKV(s, self.layer_idx, past, key_states, value_states, self.full_idx, self.stream_idx,
                            self.full_keys, self.full_values, read_k, read_v)
        return split, split

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Masks cover every position (the attention function maps them to the kept keys)."""
        return self.cumulative_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.full_keys = self.full_values = self.stream_keys = self.stream_values = None
        self.cumulative_length = 0
        self.is_initialized = False

    def _map(self, fn) -> None:
        for name in ("full_keys", "full_values", "stream_keys", "stream_values"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, fn(value))

    def offload(self):
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.is_initialized:
            self._map(lambda t: t.to(self.device, non_blocking=True))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens; impossible once streaming heads have evicted tokens."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        n = min(-tokens_to_remove, self.cumulative_length)
        if self.stream_keys is not None and self.cumulative_length > self.settings.kept_tokens:
            raise RuntimeError(
                f"layer {self.layer_idx}: cannot crop a head-mask cache after its streaming heads evicted tokens "
                f"({self.cumulative_length} seen, {self.settings.kept_tokens} kept); the evicted ones are gone, so "
                "rollback-based decoding (assisted / speculative generation) is not supported")
        self._map(lambda t: t[..., : t.shape[-2] - n, :].clone())
        self.cumulative_length -= n


class HeadMaskCache(Cache):
    """KV cache for a model patched with a head mask (see the module docstring).

    Args:
        settings: the :class:`HeadMaskSettings` (mask, sink, window).
        config: the model's config; when given, :meth:`update` checks that the model runs the
            ``"sparseattn_headmask"`` attention implementation (the only one that reads this cache).

    Use :func:`sparseattn.integrations.headmask_attention.make_cache` (or the patch handle's
    ``make_cache()``) to build one for a model, and pass it as ``past_key_values``.
    """

    def __init__(self, settings: HeadMaskSettings, *, config=None):
        if not isinstance(settings, HeadMaskSettings):
            raise TypeError(f"settings must be a HeadMaskSettings, got {type(settings).__name__}")
        super().__init__(layers=[HeadMaskLayer(settings, i) for i in range(settings.num_layers)])
        self.settings = settings
        self._config = weakref.ref(config) if config is not None else None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        config = self._config() if self._config is not None else None
        if config is not None and getattr(config, "_attn_implementation", None) != IMPLEMENTATION:
            raise RuntimeError(
                f"HeadMaskCache only works with attn_implementation={IMPLEMENTATION!r}, but the model runs "
                f"{getattr(config, '_attn_implementation', None)!r}; use it inside "
                "sparseattn.integrations.headmask_attention.patch_head_mask(model, ...)")
        self.settings.check_layer(layer_idx)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def kv_bytes(self) -> int:
        """Bytes of the tensors this cache holds, measured from their storages."""
        return kv_cache_bytes(self)


def kv_cache_bytes(cache: Cache) -> int:
    """Bytes of the storages behind a transformers cache's key/value tensors (each storage counted once).

    Works for :class:`HeadMaskCache` and for transformers' own caches (``DynamicCache``, ...): it sums
    ``untyped_storage().nbytes()``, so a tensor that is a view of a larger one counts the whole storage.
    """
    seen, total = set(), 0
    for layer in cache.layers:
        tensors = layer.kv_tensors() if hasattr(layer, "kv_tensors") else [getattr(layer, "keys", None),
                                                                            getattr(layer, "values", None)]
        for tensor in tensors:
            if not isinstance(tensor, torch.Tensor) or tensor.numel() == 0:
                continue
            storage = tensor.untyped_storage()
            key = (storage.data_ptr(), tensor.device)
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
    return total
