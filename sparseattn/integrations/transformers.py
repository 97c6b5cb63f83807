"""Sparse prefill for Hugging Face models: ``attn_implementation="sparseattn"`` and :func:`patch`.

Importing this module registers two functions with transformers, under the name ``"sparseattn"``:

- an attention function in ``transformers.AttentionInterface`` (the same slot ``"sdpa"`` and
  ``"flash_attention_2"`` use), so every model whose attention layers call
  ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)`` runs it;
- a mask function in ``transformers.masking_utils.AttentionMaskInterface``. It returns ``None``
  whenever the mask would be plain causal attention aligned bottom-right (no padding, no window
  that cuts anything, no static-cache tail, no packed sequences, no overlay); otherwise the same
  boolean mask ``"sdpa"`` gets. ``None`` is what lets a long prompt go sparse: the attention
  function never has to inspect a `[B, 1, Lq, Lk]` mask to learn that it is causal.

No model code is copied and no ``forward`` is replaced: :func:`patch` only switches the model's
``config._attn_implementation`` (through ``model.set_attn_implementation``) and records the routing
settings.

Routing, per attention call (``q [B, Hq, Lq, D]``, ``k, v [B, Hkv, Lk, D]`` after the KV cache):

=========================================  ==================================================
call                                       path
=========================================  ==================================================
decode step (``Lq == 1``)                  dense SDPA (nothing to skip)
a materialized mask (padding, sliding      transformers' own SDPA function with that mask:
window that cuts, static cache, packing)   exact, never sparse
non-causal module, or dropout > 0          dense SDPA
layer in ``dense_layers``                  dense SDPA
``Lk < min_sparse_len`` (per method)       dense SDPA: below the crossover sparse does not pay
otherwise                                  ``sparseattn.sparse_attention(q, k, v, method, ...)``
=========================================  ==================================================

With ``Lq < Lk`` (chunked prefill on top of a KV cache) the queries are the last ``Lq`` positions,
which is exactly ``sparse_attention``'s convention, so chunked prefill is sparse too.

Where the settings live: the attention function receives the attention *module*, which holds
``module.config`` (one config object shared by all layers of a model) and ``module.layer_idx``.
:func:`patch` stores a :class:`SparseAttentionSettings` in a module-level registry keyed by
``id(config)`` and guarded by a weak reference (a dead config drops its entry, and a recycled id
never matches). The config itself is not touched beyond ``_attn_implementation``, so
``save_pretrained`` writes nothing of ours. A model loaded with ``attn_implementation="sparseattn"``
and never patched uses :data:`DEFAULT_METHOD` with its default config.

Tested with transformers 5.17 (GPU machine) and 5.23 (CPU); ``pyproject.toml`` pins
``transformers>=5.17,<6``. Tested model types: :data:`TESTED_MODEL_TYPES`.

Example:
    >>> import torch, transformers
    >>> from sparseattn.integrations.transformers import patch
    >>> cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                                num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    >>> model = transformers.LlamaForCausalLM(cfg).eval()
    >>> ids = torch.randint(0, 128, (1, 200))
    >>> with patch(model, method="streaming", sink=16, window=32, block_size=16, min_sparse_len=0) as handle:
    ...     logits = model(ids).logits
    >>> handle.counts["sparse"], model.config._attn_implementation
    (2, 'sdpa')
"""

from __future__ import annotations

import dataclasses
import logging
import os
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
import transformers
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, prepare_padding_mask, sdpa_mask

from ..api import resolve_config, sparse_attention
from ..methods.full import dense_attention

logger = logging.getLogger("sparseattn")

__all__ = [
    "DEFAULT_METHOD",
    "CROSSOVER_LENGTHS",
    "DEFAULT_MIN_SPARSE_LEN",
    "IMPLEMENTATION",
    "TESTED_MODEL_TYPES",
    "TESTED_TRANSFORMERS",
    "LayerRoute",
    "LayerStats",
    "SparseAttentionPatch",
    "SparseAttentionSettings",
    "SwitchedModel",
    "build_settings",
    "load_layer_configs",
    "check_model_type",
    "default_min_sparse_len",
    "patch",
    "register",
    "settings_for",
    "sparse_attention_forward",
    "sparse_attention_mask",
]

IMPLEMENTATION = "sparseattn"
DEFAULT_METHOD = "xattention"
# Below these many keys a method runs dense. Measured on the H100 (benchmarks/crossover.py,
# benchmarks/results/nvidia-h100-80gb-hbm3/crossover.json and methods.json): the shortest length
# from which one attention call (selection + attention) beats cuDNN dense on a 32/8-head, D=128
# layer at the method's defaults. MInference (seed sizes) is 0.96x at 64K and 1.51x at 128K.
# Small models cross later (9/3 heads, D=64: streaming 32K, xattention and flexprefill 64K).
CROSSOVER_LENGTHS = {"xattention": 16384, "flexprefill": 32768, "streaming": 16384, "minference": 131072,
                     "full": 0}
# Methods without a measured crossover (your own, headmask, ...).
DEFAULT_MIN_SPARSE_LEN = 16384


def default_min_sparse_len(method: str) -> int:
    """The measured crossover length of ``method`` (:data:`CROSSOVER_LENGTHS`), else :data:`DEFAULT_MIN_SPARSE_LEN`."""
    return CROSSOVER_LENGTHS.get(method, DEFAULT_MIN_SPARSE_LEN)
TESTED_TRANSFORMERS = ("5.17", "5.23")
# Model types the test suite runs end to end (tests/test_integration.py).
TESTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma3_text"})
# Model types whose attention needs something the sparse path does not compute.
_SINK_MODEL_TYPES = frozenset({"gpt_oss", "mimo_v2_flash", "openai_privacy_filter"})
# Keyword arguments some attention layers pass that change the attention itself.
_UNSUPPORTED_KWARGS = {"softcap": "attention logit soft-capping", "s_aux": "attention sinks",
                       "sinks": "attention sinks"}


@dataclass(frozen=True)
class LayerRoute:
    """How one layer's attention runs.

    Attributes:
        method: a name in ``sparseattn.METHODS``.
        config: the method's resolved config dataclass (``None`` for methods without options).
        min_sparse_len: calls with fewer keys than this run dense.
        dense: the layer always runs dense.
    """

    method: str
    config: Any
    min_sparse_len: int
    dense: bool = False


@dataclass(frozen=True)
class LayerStats:
    """One attention call with ``Lq > 1`` (collected when ``collect_stats=True``).

    Attributes:
        layer_idx: the module's ``layer_idx`` (None if it has none).
        method: the method used, ``"full"`` for dense calls.
        reason: ``"sparse"`` or why the call went dense (``"masked"``, ``"short"``,
            ``"dense_layer"``, ``"non_causal"``, ``"dropout"``).
        q_len, k_len: the call's query and key lengths.
        density: `[B, Hq]` float32 on the CPU, fraction of causal blocks computed (1 for dense).
    """

    layer_idx: int | None
    method: str
    reason: str
    q_len: int
    k_len: int
    density: torch.Tensor


@dataclass
class SparseAttentionSettings:
    """The routing settings of one patched model (see :func:`patch`).

    Attributes:
        default: the route of layers without their own entry.
        layers: per-layer routes, by ``layer_idx``.
        collect_stats: record a :class:`LayerStats` per prefill call in ``stats``.
        stats: the recorded calls, in call order.
        counts: calls per route taken: ``"sparse"``, ``"decode"``, ``"masked"``, ``"short"``,
            ``"dense_layer"``, ``"non_causal"``, ``"dropout"``. Always kept (it is cheap).
    """

    default: LayerRoute
    layers: dict[int, LayerRoute] = field(default_factory=dict)
    collect_stats: bool = False
    stats: list[LayerStats] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    def route(self, layer_idx: int | None) -> LayerRoute:
        return self.layers.get(layer_idx, self.default)


class ConfigRegistry:
    """Values keyed by a model config object: ``id(config)`` guarded by a weak reference, so a dead
    config drops its entry and a recycled id never matches. Shared by every attention function
    that keeps per-model settings (``patch``, head masks, sequence parallelism)."""

    def __init__(self):
        self._entries: dict[int, tuple[weakref.ref, Any]] = {}

    def get(self, config):
        entry = self._entries.get(id(config))
        if entry is not None and entry[0]() is config:
            return entry[1]
        return None

    def set(self, config, value) -> None:
        key = id(config)
        if value is None:
            self._entries.pop(key, None)
            return
        self._entries[key] = (weakref.ref(config, lambda _ref, key=key: self._entries.pop(key, None)), value)

    def switch(self, model, implementation: str, value) -> list:
        """Run every config of ``model`` on ``implementation`` with ``value`` registered for it.

        Returns what :meth:`restore` needs to put back each config's implementation and value.
        """
        configs = model_configs(model)
        saved = [(cfg, getattr(cfg, "_attn_implementation_internal", None), self.get(cfg)) for cfg in configs]
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(implementation)
        else:
            for cfg in configs:
                cfg._attn_implementation = implementation
        for cfg in configs:
            self.set(cfg, value)
        return saved

    def restore(self, saved: list) -> None:
        """Undo a :meth:`switch` (nested switches restore in reverse order)."""
        for config, implementation, value in reversed(saved):
            config._attn_implementation_internal = implementation
            self.set(config, value)


class SwitchedModel:
    """A model whose configs :meth:`ConfigRegistry.switch` moved to another attention implementation.

    A context manager and a plain handle: ``restore()`` (or leaving the ``with`` block) puts back
    each config's previous implementation and registry value (idempotent; ``active`` is False
    afterwards). Nested switches restore in reverse order.
    """

    def __init__(self, model, registry: ConfigRegistry, saved: list):
        self.model = model
        self._registry = registry
        self._saved = saved
        self.active = True

    def restore(self) -> None:
        """Put back the previous attention implementation (idempotent)."""
        if self.active:
            self._registry.restore(self._saved)
            self.active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


# The settings of each patched config; see the module docstring.
_SETTINGS = ConfigRegistry()
_get_settings = _SETTINGS.get
_default_settings: SparseAttentionSettings | None = None
_warned_no_config = False


def _settings_of_module(module) -> SparseAttentionSettings:
    global _default_settings, _warned_no_config
    config = getattr(module, "config", None)
    settings = _get_settings(config) if config is not None else None
    if settings is not None:
        return settings
    if config is None and not _warned_no_config:
        logger.warning("sparseattn: %s has no .config, so patch() settings cannot reach it; using the defaults "
                       "(method %r)", type(module).__name__, DEFAULT_METHOD)
        _warned_no_config = True
    if _default_settings is None:
        _default_settings = SparseAttentionSettings(
            LayerRoute(DEFAULT_METHOD, resolve_config(DEFAULT_METHOD), default_min_sparse_len(DEFAULT_METHOD)))
    return _default_settings


def settings_for(model) -> SparseAttentionSettings | None:
    """The settings :func:`patch` stored for ``model`` (its top-level config), or None."""
    return _get_settings(model.config)


# --------------------------------------------------------------------------------------------
# The functions transformers calls
# --------------------------------------------------------------------------------------------


def _is_plain_causal(attention_mask, q_length, kv_length, q_offset, kv_offset, local_size) -> bool:
    """Whether the mask is exactly causal, bottom-right aligned, over all ``kv_length`` keys."""
    # A static cache passes a tensor offset and a kv_length that includes empty slots.
    if isinstance(q_offset, torch.Tensor) or isinstance(kv_offset, torch.Tensor):
        return False
    if q_offset + q_length != kv_offset + kv_length:
        return False
    # A sliding window (or attention chunk) of local_size cuts nothing while every position fits in it.
    if local_size is not None and q_offset + q_length > local_size:
        return False
    if attention_mask is not None:
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)[:, kv_offset:kv_offset + kv_length]
        if not bool(padding.all()):
            return False
    return True


def sparse_attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                          mask_function=None, attention_mask: torch.Tensor | None = None,
                          local_size: int | None = None, allow_is_causal_skip: bool = True, **kwargs):
    """The mask for ``attn_implementation="sparseattn"`` (registered in ``AttentionMaskInterface``).

    Returns ``None`` when the mask is plain bottom-right causal attention over all keys;
    otherwise the boolean `[B, 1, q_length, kv_length]` mask ``"sdpa"`` would build. transformers
    sets ``allow_is_causal_skip=False`` whenever the mask function is more than causal (+ padding
    + ``local_size`` window): overlays, packed sequences, compiled decoding; then the mask is
    always built.
    """
    if allow_is_causal_skip and _is_plain_causal(attention_mask, q_length, kv_length, q_offset, kv_offset,
                                                 local_size):
        return None
    kwargs.pop("allow_is_bidirectional_skip", None)
    if mask_function is not None:
        kwargs["mask_function"] = mask_function
    # Never None from here on: None must keep meaning "plain causal" to the attention function.
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, local_size=local_size,
                     allow_is_causal_skip=False, allow_is_bidirectional_skip=False, **kwargs)


def _record(settings, layer_idx, method, reason, query, key, density=None):
    settings.counts[reason] += 1
    if settings.collect_stats and reason != "decode":
        if density is None:
            density = torch.ones(query.shape[0], query.shape[1])
        settings.stats.append(LayerStats(layer_idx, method, reason, query.shape[2], key.shape[2],
                                         density.detach().float().cpu()))


def sparse_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The attention function for ``attn_implementation="sparseattn"`` (see the module docstring).

    Args:
        module: the attention layer (reads ``config``, ``layer_idx``, ``is_causal``).
        query: `[B, Hq, Lq, D]`.
        key, value: `[B, Hkv, Lk, D]`, the whole KV cache included.
        attention_mask: None (plain causal, see :func:`sparse_attention_mask`) or a mask for SDPA.
        dropout: attention dropout; > 0 runs dense.
        scaling: softmax scale.
        **kwargs: what the model passes on (``is_causal``, ``sliding_window``, ...).

    Returns:
        ``(attn_output [B, Lq, Hq, D], None)``, like ``sdpa_attention_forward``.
    """
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise ValueError(
                f"attn_implementation={IMPLEMENTATION!r} does not implement {what} ({type(module).__name__} passed "
                f"{name}=...); load this model with attn_implementation='sdpa' or 'eager'"
            )
    settings = _settings_of_module(module)
    layer_idx = getattr(module, "layer_idx", None)
    is_causal = kwargs.pop("is_causal", None)
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    q_len, k_len = query.shape[2], key.shape[2]

    if attention_mask is not None:
        # Padding, a window that cuts, a static cache or packed sequences: exact dense attention,
        # through the very function attn_implementation="sdpa" uses.
        _record(settings, layer_idx, "full", "decode" if q_len == 1 else "masked", query, key)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if dropout > 0:
        _record(settings, layer_idx, "full", "dropout", query, key)
        mask = None
        if is_causal:
            mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                      is_causal=False, **kwargs)

    route = settings.route(layer_idx)
    if q_len == 1:
        reason = "decode"
    elif not is_causal:
        reason = "non_causal"
    elif route.dense:
        reason = "dense_layer"
    elif k_len < route.min_sparse_len:
        reason = "short"
    else:
        reason = "sparse"

    if reason == "sparse":
        result = sparse_attention(query, key, value, method=route.method, config=route.config, causal=True,
                                  scale=scaling, return_stats=settings.collect_stats)
        if settings.collect_stats:
            out, stats = result
            _record(settings, layer_idx, route.method, reason, query, key, stats.density)
        else:
            out = result
            _record(settings, layer_idx, route.method, reason, query, key)
    else:
        _record(settings, layer_idx, "full", reason, query, key)
        # A single query row sees every key; otherwise causal means bottom-right aligned.
        out = dense_attention(query, key, value, causal=bool(is_causal) and q_len > 1, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"sparseattn"`` with transformers (done on import; calling it again is harmless)."""
    transformers.AttentionInterface.register(IMPLEMENTATION, sparse_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, sparse_attention_mask)


register()


# --------------------------------------------------------------------------------------------
# patch()
# --------------------------------------------------------------------------------------------


def _unsupported_reason(config) -> str | None:
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "it soft-caps attention logits (attn_logit_softcapping), which the sparse path does not compute"
    if getattr(config, "model_type", None) in _SINK_MODEL_TYPES:
        return "its attention has sinks (learned per-head logits), which the sparse path does not compute"
    return None


def check_model_type(config) -> None:
    """Raise ``ValueError`` for a model config the sparse path cannot run; warn for an untested one."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(config, "model_type", None)
    for cfg in (config, text_config):
        reason = _unsupported_reason(cfg)
        if reason is not None:
            raise ValueError(
                f"model type {model_type!r} is not supported by sparseattn: {reason}. "
                f"Tested model types: {sorted(TESTED_MODEL_TYPES)}"
            )
    if model_type not in TESTED_MODEL_TYPES and getattr(text_config, "model_type", None) not in TESTED_MODEL_TYPES:
        logger.warning("sparseattn: model type %r is untested (tested: %s); it should work if its attention goes "
                       "through transformers' ALL_ATTENTION_FUNCTIONS, but check its outputs against sdpa",
                       model_type, sorted(TESTED_MODEL_TYPES))


def _check_layer(name: str, idx, num_layers: int | None) -> int:
    if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
        raise ValueError(f"{name} entries must be layer indices (ints >= 0), got {idx!r}")
    if num_layers is not None and idx >= num_layers:
        raise ValueError(f"{name} has layer {idx}, but the model has {num_layers} layers (0..{num_layers - 1})")
    return idx


def _check_min_sparse_len(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"min_sparse_len must be an int >= 0, got {value!r}")
    return value


def build_settings(method: str = DEFAULT_METHOD, *, config=None, min_sparse_len: int | None = None,
                   dense_layers: Iterable[int] = (), layer_configs: Mapping[int, Mapping[str, Any]] | None = None,
                   collect_stats: bool = False, num_layers: int | None = None,
                   **overrides) -> SparseAttentionSettings:
    """Validated routing settings (the arguments are :func:`patch`'s)."""
    measured = min_sparse_len is None
    if measured:
        min_sparse_len = default_min_sparse_len(method)
    default = LayerRoute(method, resolve_config(method, config, **overrides), _check_min_sparse_len(min_sparse_len))
    dense = {_check_layer("dense_layers", idx, num_layers) for idx in dense_layers}
    layers = {idx: dataclasses.replace(default, dense=True) for idx in dense}
    if layer_configs is not None and not isinstance(layer_configs, Mapping):
        raise TypeError("layer_configs must be a dict {layer_idx: {option: value}}, "
                        f"got {type(layer_configs).__name__}")
    for idx, options in (layer_configs or {}).items():
        _check_layer("layer_configs", idx, num_layers)
        if not isinstance(options, Mapping):
            raise TypeError(f"layer_configs[{idx}] must be a dict of options, got {type(options).__name__}")
        options = dict(options)
        layer_method = options.pop("method", method)
        layer_min = _check_min_sparse_len(options.pop(
            "min_sparse_len", default_min_sparse_len(layer_method) if measured else default.min_sparse_len))
        layer_dense = bool(options.pop("dense", idx in dense))
        if layer_method == method:
            layer_config = resolve_config(method, default.config, **options)
        else:
            # Another method: only a JSON config file (which has a section per method) carries over.
            base = config if isinstance(config, (str, os.PathLike)) else None
            layer_config = resolve_config(layer_method, base, **options)
        layers[idx] = LayerRoute(layer_method, layer_config, layer_min, layer_dense)
    if not isinstance(collect_stats, bool):
        raise TypeError(f"collect_stats must be a bool, got {type(collect_stats).__name__}")
    return SparseAttentionSettings(default, layers, collect_stats)


def model_configs(model) -> list:
    """Every config object of ``model``: its own, its sub-models', and their sub-configs."""
    found: dict[int, Any] = {}
    pending = [model.config] + [m.config for m in model.modules()
                                if isinstance(m, transformers.PreTrainedModel)]
    while pending:
        config = pending.pop()
        if config is None or id(config) in found:
            continue
        found[id(config)] = config
        pending.extend(getattr(config, key, None) for key in getattr(config, "sub_configs", {}) or {})
    return list(found.values())


class SparseAttentionPatch(SwitchedModel):
    """A model switched to ``attn_implementation="sparseattn"``; a context manager and a plain handle.

    ``restore()`` (or leaving the ``with`` block) puts back each config's previous attention
    implementation and the previous settings. Nested patches restore in reverse order.

    Attributes:
        model: the patched model.
        settings: its :class:`SparseAttentionSettings`.
        stats: ``settings.stats`` (recorded with ``collect_stats=True``).
        counts: ``settings.counts``, calls per route.
        active: False once restored.
    """

    def __init__(self, model, settings: SparseAttentionSettings, saved: list):
        super().__init__(model, _SETTINGS, saved)
        self.settings = settings

    @property
    def stats(self) -> list[LayerStats]:
        return self.settings.stats

    @property
    def counts(self) -> Counter:
        return self.settings.counts

    def reset_stats(self) -> None:
        """Forget the recorded stats and counts."""
        self.settings.stats.clear()
        self.settings.counts.clear()

    def __repr__(self) -> str:
        route = self.settings.default
        return (f"SparseAttentionPatch({type(self.model).__name__}, method={route.method!r}, "
                f"min_sparse_len={route.min_sparse_len}, active={self.active})")


# Per-layer data files: their JSON "format" -> (the method they configure, their loader).
def _layer_config_loaders() -> dict[str, tuple[str, Any]]:
    from ..calibrate import FORMAT as THRESHOLDS_FORMAT, load_xattention_thresholds
    from ..methods.minference import PATTERN_FORMAT, minference_layer_configs
    return {THRESHOLDS_FORMAT: ("xattention", lambda src, model: load_xattention_thresholds(src, model=model)),
            PATTERN_FORMAT: ("minference", lambda src, model: minference_layer_configs(src, model=model))}


def load_layer_configs(source: str | os.PathLike, method: str, model=None) -> dict[int, dict[str, Any]]:
    """``layer_configs`` from a per-layer data file of ``method``: a ``.json`` path or a packaged name.

    A ``.json`` file is read by its ``"format"`` field (XAttention thresholds or MInference
    patterns), and must belong to ``method``. Any other string is a model name looked up among the
    files shipped for ``method`` (``"smollm2"``, ``"default"``, ...). With ``model``, the file's
    layer and head counts are checked against it.

    Raises:
        FileNotFoundError: no such file, or nothing packaged under that name.
        ValueError: not a per-layer data file, or one made for another method.
    """
    import json

    loaders = _layer_config_loaders()
    by_method = {m: (fmt, load) for fmt, (m, load) in loaders.items()}
    path = os.fspath(source)
    if path.endswith(".json") or os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                found = json.load(f).get("format")
        except FileNotFoundError:
            raise FileNotFoundError(f"layer_configs file {path} does not exist") from None
        except (ValueError, AttributeError):
            found = None
        if found not in loaders:
            raise ValueError(f"layer_configs file {path} has format {found!r}; per-layer data files are "
                             f"{sorted(loaders)}")
        file_method = loaders[found][0]
        if file_method != method:
            raise ValueError(f"layer_configs file {path} holds {file_method} settings ({found}), but the method "
                             f"is {method!r}; use method={file_method!r}")
        return loaders[found][1](path, model)
    if method not in by_method:
        raise ValueError(f"method {method!r} has no per-layer data files; layer_configs names one of "
                         f"{sorted(by_method)}'s files, or pass a dict")
    return by_method[method][1](path, model)


def patch(model, method: str = DEFAULT_METHOD, *, config=None, min_sparse_len: int | None = None,
          dense_layers: Iterable[int] = (),
          layer_configs: Mapping[int, Mapping[str, Any]] | str | os.PathLike | None = None,
          collect_stats: bool = False, **overrides) -> SparseAttentionPatch:
    """Run ``model``'s attention through sparseattn: a plain call or a context manager.

    Args:
        model: a ``transformers.PreTrainedModel`` whose attention goes through
            ``ALL_ATTENTION_FUNCTIONS`` (Llama, Qwen2/3, Mistral, Gemma 3, ...).
        method: a name in ``sparseattn.METHODS`` (default ``"xattention"``).
        config: the method's config dataclass, a dict of its fields, or a JSON config path.
        min_sparse_len: calls with fewer keys run dense; default: the method's crossover length
            measured on the H100 (:data:`CROSSOVER_LENGTHS`, 16384 for xattention); 0 makes every
            prefill sparse.
        dense_layers: layer indices that always run dense.
        layer_configs: ``{layer_idx: {option: value}}`` per-layer overrides of the method's fields,
            and of ``"method"``, ``"min_sparse_len"``, ``"dense"``. A layer with another method
            starts from that method's defaults (or its section of a JSON ``config``). Or a data
            file (a path, or a packaged model name such as ``"smollm2"``) of the method:
            XAttention thresholds (``sparseattn profile``) or MInference patterns
            (``sparseattn search``); see :func:`load_layer_configs`.
        collect_stats: record per-call density in ``handle.stats`` (syncs the GPU once per layer).
        **overrides: fields of the method's config, e.g. ``threshold=0.9``.

    Returns:
        A :class:`SparseAttentionPatch`; ``restore()`` or the end of a ``with`` block undoes it.

    Example:
        >>> import torch, transformers
        >>> from sparseattn.integrations.transformers import patch
        >>> cfg = transformers.Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        ...                                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        ...                                vocab_size=128)
        >>> model = transformers.Qwen3ForCausalLM(cfg).eval()
        >>> handle = patch(model, method="xattention", threshold=0.9, stride=8, block_size=16,
        ...                min_sparse_len=64, collect_stats=True)
        >>> _ = model(torch.randint(0, 128, (1, 100)))
        >>> [(s.layer_idx, s.reason) for s in handle.stats]
        [(0, 'sparse'), (1, 'sparse')]
        >>> handle.restore()
    """
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"model must be a transformers.PreTrainedModel, got {type(model).__name__}")
    check_model_type(model.config)
    if hasattr(model, "_can_set_attn_implementation") and not model._can_set_attn_implementation():
        raise ValueError(
            f"{type(model).__name__} does not route its attention through transformers' ALL_ATTENTION_FUNCTIONS, "
            "so attn_implementation='sparseattn' cannot reach it"
        )
    register()
    text_config = model.config.get_text_config()
    if isinstance(layer_configs, (str, os.PathLike)):
        layer_configs = load_layer_configs(layer_configs, method, model)
    settings = build_settings(method, config=config, min_sparse_len=min_sparse_len, dense_layers=dense_layers,
                              layer_configs=layer_configs, collect_stats=collect_stats,
                              num_layers=getattr(text_config, "num_hidden_layers", None), **overrides)
    return SparseAttentionPatch(model, settings, _SETTINGS.switch(model, IMPLEMENTATION, settings))
