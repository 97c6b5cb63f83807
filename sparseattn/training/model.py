"""PruLong gates inside a Hugging Face causal LM: :class:`PruLongModel`.

The wrapper owns the model, a :class:`~sparseattn.training.gates.HardConcreteGates` grid
`[layers, kv_heads]` and a :class:`~sparseattn.training.lagrangian.SparsityLagrangian`. Its
forward samples the gates once, runs the model with them, and returns
``loss = lm_loss + lambda1 (s - t) + lambda2 (s - t)^2`` with ``s`` the expected sparsity (computed
here, from the gate parameters every process holds: no collective, nothing for FSDP to miss).

How the gates reach the attention layers: :func:`install` registers :func:`prulong_attention_forward`
in ``transformers.AttentionInterface`` under :data:`ATTENTION_NAME` (with a mask function that
returns None, so the model builds no `[L, L]` mask: causality and document boundaries are the
attention function's job, and padding is refused), switches the model to it, and stores the
streaming settings on each attention module. The sampled
gates travel with the forward call as the keyword argument :data:`GATES_KWARG`, which transformers
hands through every decoder layer to the attention function (and gradient checkpointing replays
with the same tensor). Packed batches pass ``cu_seq_lens_q`` / ``max_length_q`` the same way, the
names transformers' flash-attention path uses. No model code is copied and no forward replaced.

Modes: ``masks_only`` (weights frozen; gates and multipliers train), ``masks_and_weights``
(everything trains), ``sft`` (no gates: a fixed 0/1 head mask, or every head full, and only the
weights train).

Example:
    >>> import torch, transformers
    >>> from sparseattn.training.model import PruLongModel
    >>> cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                                num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    >>> model = PruLongModel(transformers.LlamaForCausalLM(cfg), mode="masks_only", sink=16, window=32,
    ...                      block_size=16)
    >>> ids = torch.randint(0, 128, (1, 100))
    >>> out = model(input_ids=ids, labels=ids, target_sparsity=0.5)
    >>> sorted(out)
    ['lambda1', 'lambda2', 'lm_loss', 'loss', 'reg_loss', 'sparsity', 'sparsity_det', 'target_sparsity']
    >>> out["loss"].backward()
    >>> model.gates.log_alpha.grad.shape, model.model.model.embed_tokens.weight.requires_grad
    (torch.Size([2, 2]), False)
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import transformers
from torch import nn
from transformers.masking_utils import AttentionMaskInterface, prepare_padding_mask

from ..methods.streaming import StreamingConfig
from ..parallel.loss import sequence_parallel_loss
from .attention import mixed_attention
from .gates import DEFAULT_INIT, STRETCH, TEMPERATURE, HardConcreteGates
from .lagrangian import SparsityLagrangian

logger = logging.getLogger("sparseattn")

__all__ = ["ATTENTION_NAME", "CONFIG_FILE", "GATES_KWARG", "GATE_VALUES_KWARG", "MODES", "STATE_FILE",
           "LayerSettings", "PruLongModel", "install", "prulong_attention_forward", "prulong_attention_mask",
           "register"]

ATTENTION_NAME = "sparseattn_prulong"
GATES_KWARG = "prulong_gates"
GATE_VALUES_KWARG = "prulong_gate_values"
MODES = ("masks_only", "masks_and_weights", "sft")
STATE_FILE = "prulong_state.safetensors"
CONFIG_FILE = "prulong_config.json"
_SETTINGS_ATTR = "_sparseattn_prulong"
_SCHEMA = 1


@dataclass(frozen=True)
class LayerSettings:
    """What :func:`prulong_attention_forward` needs from one attention module.

    Attributes:
        streaming: sink, window and block size of the streaming branch.
        full_kv_heads: a fixed 0/1 mask of this layer (True = full), or None for gated attention.
    """

    streaming: StreamingConfig
    full_kv_heads: tuple[bool, ...] | None = None


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def prulong_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, dropout: float = 0.0,
                              scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The attention function registered as :data:`ATTENTION_NAME` (see the module docstring).

    Args:
        module: the attention layer (reads ``layer_idx`` and the settings :func:`install` stored).
        query: `[B, Hq, Lq, D]`; key, value: `[B, Hkv, Lk, D]`.
        attention_mask: must be None (pack sequences instead of padding them).
        dropout: must be 0.
        scaling: softmax scale.
        **kwargs: :data:`GATES_KWARG` (`[layers, kv_heads]` gates; not needed with a fixed mask),
            :data:`GATE_VALUES_KWARG` (the same gates as nested tuples of floats, to skip the branch a
            saturated gate does not use; see :func:`~sparseattn.training.attention.mixed_attention`),
            ``cu_seq_lens_q`` and ``max_length_q`` for packed rows, ``head_shard`` (a
            :class:`sparseattn.parallel.ulysses.HeadShard`: this call has only those heads, so the
            gates are sliced to them); the rest is ignored.

    Returns:
        ``(out [B, Lq, Hq, D], None)`` like transformers' ``sdpa_attention_forward``.
    """
    settings: LayerSettings | None = getattr(module, _SETTINGS_ATTR, None)
    if settings is None:
        raise RuntimeError(f"{type(module).__name__} has no PruLong settings: build the model with "
                           "sparseattn.training.model.install() (or PruLongModel) before using "
                           f"attn_implementation={ATTENTION_NAME!r}")
    if attention_mask is not None:
        raise ValueError(f"attn_implementation={ATTENTION_NAME!r} takes no attention mask (got one of shape "
                         f"{tuple(attention_mask.shape)}); pack sequences with cu_seq_lens_q / position_ids instead "
                         "of padding them")
    if dropout:
        raise ValueError(f"attention dropout ({dropout}) is not supported by {ATTENTION_NAME!r}; set the model "
                         "config's attention_dropout to 0")
    if kwargs.get("sliding_window") is not None:
        raise ValueError(f"{type(module).__name__} uses sliding-window attention, which PruLong training does not "
                         "model; use a model whose layers are full attention")
    cast = _autocast_dtype(query.device)
    if cast is not None:  # our kernels are outside autocast's op lists; match what SDPA would run in
        query, key, value = query.to(cast), key.to(cast), value.to(cast)
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    max_seqlen = kwargs.get("max_length_q")
    common = dict(scale=scaling, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    # Under sparseattn.parallel's sequence parallelism this function runs between the Ulysses
    # all-to-alls on a slice of the heads (whole rows, global cu_seqlens), told which by `head_shard`.
    shard = kwargs.get("head_shard")

    def local_heads(per_kv_head: torch.Tensor) -> torch.Tensor:
        return per_kv_head if shard is None else shard.kv(per_kv_head)

    if settings.full_kv_heads is not None:
        # A fixed mask: each head computes only its own branch.
        z = local_heads(torch.tensor(settings.full_kv_heads, dtype=query.dtype, device=query.device))
        out = mixed_attention(query, key, value, z, streaming=settings.streaming, z_values=tuple(z.tolist()),
                              **common)
    else:
        gates = kwargs.get(GATES_KWARG)
        if gates is None:
            raise ValueError(f"{ATTENTION_NAME!r} attention needs the gates: call the PruLongModel wrapper (it "
                             f"passes {GATES_KWARG}=...), or install() a fixed head mask for inference")
        values = kwargs.get(GATE_VALUES_KWARG)
        if values is not None:
            values = tuple(local_heads(torch.tensor(values[module.layer_idx])).tolist())
        z = local_heads(gates[module.layer_idx])
        out = mixed_attention(query, key, value, z, streaming=settings.streaming, z_values=values, **common)
        if shard is not None and z.requires_grad and not out.requires_grad:
            # With frozen weights, heads whose gates are all saturated give an output without autograd
            # history. The ranks of the group must all run the backward all-to-all of this layer or none
            # (else they deadlock), so attach it: the gradient is zero, as it is for a saturated gate.
            out = out + 0.0 * z.sum()
    return out.transpose(1, 2).contiguous(), None


def prulong_attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                           mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs) -> None:
    """The mask function registered as :data:`ATTENTION_NAME`: always None, or an error.

    The attention function builds causality and document boundaries itself, so no `[L, L]` mask is
    ever made. What it cannot honour is refused here, where the model prepares its masks: padding
    (pack rows instead) and static caches (whose unfilled slots would be attended).
    """
    if isinstance(q_offset, torch.Tensor) or isinstance(kv_offset, torch.Tensor):
        raise ValueError(f"attn_implementation={ATTENTION_NAME!r} does not support static KV caches; use the "
                         "default dynamic cache")
    if attention_mask is not None and attention_mask.dim() == 2:
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)[:, kv_offset:kv_offset + kv_length]
        if not bool(padding.all()):
            raise ValueError(f"attn_implementation={ATTENTION_NAME!r} does not support padded batches; pack "
                             "documents with cu_seq_lens_q / position_ids (sparseattn.training.data.PackedCollator)")
    return None


def register() -> None:
    """Register :data:`ATTENTION_NAME` (attention and mask functions) with transformers (idempotent)."""
    transformers.AttentionInterface.register(ATTENTION_NAME, prulong_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, prulong_attention_mask)


def _attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    found = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int) and hasattr(module, "config") and any(
                hasattr(module, name) for name in ("q_proj", "qkv_proj", "query_key_value")):
            if idx in found:
                raise ValueError(f"two attention modules claim layer_idx {idx}")
            found[idx] = module
    return found


def model_shape(model: nn.Module) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, num_heads)`` of a transformers causal LM."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return config.num_hidden_layers, kv_heads, heads


def install(model: transformers.PreTrainedModel, streaming: StreamingConfig,
            head_mask: torch.Tensor | None = None) -> None:
    """Route ``model``'s attention through :func:`prulong_attention_forward`.

    Args:
        model: a transformers causal LM whose attention goes through ``ALL_ATTENTION_FUNCTIONS``
            (Llama family: Llama, Qwen2/3, Mistral without sliding window, ...).
        streaming: the streaming branch (sink, window, block size).
        head_mask: optional fixed `[layers, kv_heads]` bool mask (True = full head); then no gates
            are needed (SFT, inference).
    """
    from ..integrations.transformers import check_model_type

    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"model must be a transformers.PreTrainedModel, got {type(model).__name__}")
    check_model_type(model.config)
    num_layers, num_kv_heads, num_heads = model_shape(model)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads "
                         f"({num_kv_heads})")
    modules = _attention_modules(model)
    if sorted(modules) != list(range(num_layers)):
        raise ValueError(f"found attention modules for layers {sorted(modules)}, expected 0..{num_layers - 1}: "
                         f"{type(model).__name__} is not a supported (Llama-family) architecture")
    if head_mask is not None:
        from ..headmask import check_head_mask

        head_mask = check_head_mask(head_mask, num_layers, num_kv_heads)
    register()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTENTION_NAME)
    else:
        model.config._attn_implementation = ATTENTION_NAME
    for idx, module in modules.items():
        full = None if head_mask is None else tuple(bool(x) for x in head_mask[idx].tolist())
        setattr(module, _SETTINGS_ATTR, LayerSettings(streaming, full))


def _checkpointing_kwargs(kwargs: dict | None) -> dict:
    # Non-reentrant: the gates reach the layers as a keyword argument, whose gradient the reentrant
    # implementation would drop.
    return {"use_reentrant": False, **(kwargs or {})}


class PruLongModel(nn.Module):
    """A causal LM with PruLong head gates, the Lagrangian, and its loss.

    Args:
        model: a transformers causal LM (Llama family). Switched to :data:`ATTENTION_NAME`.
        mode: ``"masks_only"``, ``"masks_and_weights"`` or ``"sft"``; sets which parameters train.
        sink, window, block_size: the streaming branch (defaults 128, 1024, 64).
        gate_init: initial ``log_alpha`` (default 4: all heads full).
        temperature, stretch: hard-concrete parameters (defaults 2/3, (-0.1, 1.1)).
        head_mask: ``sft`` only: a fixed `[layers, kv_heads]` bool mask (True = full); None = all full.
        linear_term: keep the ``lambda1`` term of the Lagrangian (default True).
        base_model: where the weights came from (recorded in checkpoints, for the record).
        skip_saturated_branches: a head whose sampled gate is exactly 0 or 1 computes only the branch
            it uses (default True). Exact: such a gate was clamped, so its ``log_alpha`` gets no
            gradient either way. Costs one host read of the `[layers, kv_heads]` gates per forward.

    Forward returns a dict: ``loss`` (what is minimized), ``lm_loss``, ``reg_loss``, ``sparsity``
    (expected fraction of streaming heads), ``sparsity_det`` (``1 - mean`` of the deterministic
    gates), ``target_sparsity``, ``lambda1``, ``lambda2`` (all detached but ``loss``), and
    ``logits`` with ``return_logits=True``.
    """

    def __init__(self, model: transformers.PreTrainedModel, *, mode: str = "masks_only", sink: int = 128,
                 window: int = 1024, block_size: int = 64, gate_init: float = DEFAULT_INIT,
                 temperature: float = TEMPERATURE, stretch: tuple[float, float] = STRETCH,
                 head_mask: torch.Tensor | None = None, linear_term: bool = True, base_model: str | None = None,
                 skip_saturated_branches: bool = True):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
        if head_mask is not None and mode != "sft":
            raise ValueError("head_mask fixes the heads, so it is for mode='sft' only; masks modes learn the gates")
        self.mode = mode
        self.streaming = StreamingConfig(sink=sink, window=window, block_size=block_size)
        self.model = model
        num_layers, num_kv_heads, _ = model_shape(model)
        self.gates = HardConcreteGates(num_layers, num_kv_heads, init=gate_init, temperature=temperature,
                                       stretch=stretch)
        self.lagrangian = SparsityLagrangian(linear_term=linear_term)
        self.base_model = base_model
        self.skip_saturated_branches = skip_saturated_branches
        self.seq_group = None  # the sequence-parallel group (enable_sequence_parallel)
        self.head_mask = None
        if mode == "sft":
            from ..headmask import check_head_mask

            # No mask: every head full, i.e. the dense SFT baseline through the same attention function.
            self.head_mask = (torch.ones(num_layers, num_kv_heads, dtype=torch.bool) if head_mask is None
                              else check_head_mask(head_mask, num_layers, num_kv_heads))
        install(model, self.streaming, head_mask=self.head_mask)
        model.config.use_cache = False
        for p in model.parameters():
            p.requires_grad_(mode != "masks_only")
        if mode == "sft":
            self.gates.requires_grad_(False)
            self.lagrangian.requires_grad_(False)
        # FSDP's auto-wrap policy reads the decoder layer classes from here.
        self._no_split_modules = getattr(model, "_no_split_modules", None)

    # ---- gradient checkpointing (transformers' Trainer calls one of these) --------------------
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
        kwargs_ = _checkpointing_kwargs(activation_checkpointing_kwargs)
        if hasattr(self.model, "activation_checkpointing_enable"):
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs_, **kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs_)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    @property
    def is_activation_checkpointing(self) -> bool:
        name = "is_activation_checkpointing" if hasattr(self.model, "is_activation_checkpointing") \
            else "is_gradient_checkpointing"
        return bool(getattr(self.model, name, False))

    # ---- gates -----------------------------------------------------------------------------------
    def current_gates(self, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """The gates of this forward: a sample in training (noise from ``generator``, default the global RNG),
        the deterministic gates in eval; None in SFT."""
        if self.mode == "sft":
            return None
        return self.gates.sample(generator) if self.gates.training else self.gates.deterministic()

    # ---- sequence parallelism --------------------------------------------------------------------
    def enable_sequence_parallel(self, group: torch.distributed.ProcessGroup | None) -> None:
        """Run the gated attention Ulysses-sequence-parallel over ``group`` (``build_groups(P).seq_group``).

        Each rank then calls :meth:`forward` with its shard of the row (``shard_batch``): ids and
        positions of its ``L / P`` tokens, the whole row's ``cu_seq_lens_q``, and the shifted
        ``shift_labels``, whose loss is the token mean over the group. The gate sample must be the same
        on every rank of the group (pass the same ``gate_generator``).
        """
        from ..parallel.transformers import enable_sequence_parallel

        enable_sequence_parallel(self.model, group)
        self.seq_group = group

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cu_seq_lens_q: torch.Tensor | None = None,
                max_length_q: int | None = None, target_sparsity: float | None = None,
                attention_mask: torch.Tensor | None = None, return_logits: bool = False,
                shift_labels: torch.Tensor | None = None, gate_generator: torch.Generator | None = None,
                **unused) -> dict[str, Any]:
        """One forward pass; see the class docstring for what comes back.

        Args:
            input_ids: `[1, total]` packed row (or `[B, L]` without packing).
            labels: same shape, ``-100`` where no loss is taken; None = no loss.
            position_ids: positions restarting at each document (packed rows).
            cu_seq_lens_q: `[N + 1]` int32 document boundaries of the packed row.
            max_length_q: the longest document.
            target_sparsity: the schedule's target ``t``; None = no constraint term.
            attention_mask: accepted only if it masks nothing (padding is not supported: pack).
            return_logits: also return the logits.
            shift_labels: instead of ``labels``: targets already shifted (``shift_labels[t]`` is the
                target of position ``t``), e.g. a sequence-parallel shard's; the LM loss is then the
                token mean over the sequence-parallel group (:meth:`enable_sequence_parallel`).
            gate_generator: the source of the gates' training noise (default the global RNG).
        """
        if labels is not None and shift_labels is not None:
            raise ValueError("pass labels (shifted by the model) or shift_labels (already shifted), not both")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padded batches are not supported by PruLong training; pack documents with "
                             "cu_seq_lens_q / position_ids (sparseattn.training.data.PackedCollator)")
        if cu_seq_lens_q is None and position_ids is not None and bool((position_ids.diff(dim=-1) < 0).any()):
            raise ValueError("position_ids restart inside the row (packed documents) but cu_seq_lens_q is missing; "
                             "without it attention would cross the documents")
        extra = {}
        if cu_seq_lens_q is not None:
            extra.update(cu_seq_lens_q=cu_seq_lens_q, cu_seq_lens_k=cu_seq_lens_q,
                         max_length_q=max_length_q, max_length_k=max_length_q)
        gates = self.current_gates(gate_generator)
        if gates is not None:
            extra[GATES_KWARG] = gates
            if self.skip_saturated_branches:
                # One host read per forward: heads whose sample is exactly 0 or 1 compute one branch only.
                extra[GATE_VALUES_KWARG] = tuple(map(tuple, gates.detach().cpu().tolist()))
        out = self.model(input_ids=input_ids, labels=labels, position_ids=position_ids, use_cache=False, **extra)
        lm_loss = out.loss
        if shift_labels is not None:
            lm_loss = sequence_parallel_loss(out.logits, shift_labels, self.seq_group)
        zero = torch.zeros((), device=input_ids.device)
        if self.mode == "sft":
            sparsity = 1.0 - self.head_mask.float().mean().to(input_ids.device)
            sparsity_det = sparsity
            reg = zero
        else:
            sparsity = self.gates.expected_sparsity()
            sparsity_det = self.gates.deterministic_sparsity().detach()
            reg = self.lagrangian(sparsity, target_sparsity) if target_sparsity is not None else zero
        loss = None if lm_loss is None else lm_loss + reg.to(lm_loss.dtype)
        result = {
            "loss": loss,
            "lm_loss": None if lm_loss is None else lm_loss.detach(),
            "reg_loss": reg.detach(),
            "sparsity": sparsity.detach(),
            "sparsity_det": sparsity_det,
            "target_sparsity": float("nan") if target_sparsity is None else float(target_sparsity),
            "lambda1": self.lagrangian.lambda1.detach().clone(),
            "lambda2": self.lagrangian.lambda2.detach().clone(),
        }
        if return_logits:
            result["logits"] = out.logits
        return result

    # ---- checkpoints -------------------------------------------------------------------------
    @property
    def trains_weights(self) -> bool:
        return self.mode != "masks_only"

    def prulong_config(self) -> dict:
        return {
            "schema": _SCHEMA, "mode": self.mode, "base_model": self.base_model,
            "num_layers": self.gates.shape[0], "num_kv_heads": self.gates.shape[1],
            "streaming": asdict(self.streaming), "temperature": self.gates.temperature,
            "stretch": [self.gates.left, self.gates.right], "weights_saved": self.trains_weights,
            "head_mask": None if self.head_mask is None else self.head_mask.int().tolist(),
        }

    def save_checkpoint(self, output_dir: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
                        extra_config: dict | None = None) -> None:
        """Write the gates and multipliers (``prulong_state.safetensors``), ``prulong_config.json``, and
        the model weights (``save_pretrained``) when this mode trains them.

        ``state_dict`` is this wrapper's full state dict when the caller gathered it (FSDP); by
        default it is read from the module. ``extra_config`` is merged into ``prulong_config.json``
        (the trainer records its schedule there).
        """
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        if state_dict is None:
            state_dict = self.state_dict()
        own = {"log_alpha": state_dict["gates.log_alpha"], "lambda1": state_dict["lagrangian.lambda1"],
               "lambda2": state_dict["lagrangian.lambda2"]}
        own = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in own.items()}
        safetensors.torch.save_file(own, str(output_dir / STATE_FILE), metadata={"format": "pt"})
        config = {**self.prulong_config(), **(extra_config or {})}
        (output_dir / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
        if self.trains_weights:
            weights = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
            self.model.save_pretrained(str(output_dir), state_dict=weights)

    def load_checkpoint(self, checkpoint_dir: str | Path) -> None:
        """Load what :meth:`save_checkpoint` wrote (gates, multipliers, and the weights if saved)."""
        checkpoint_dir = Path(checkpoint_dir)
        state_path = checkpoint_dir / STATE_FILE
        if not state_path.is_file():
            raise FileNotFoundError(f"{checkpoint_dir} has no {STATE_FILE}: not a PruLong checkpoint")
        config = json.loads((checkpoint_dir / CONFIG_FILE).read_text())
        if (config["num_layers"], config["num_kv_heads"]) != self.gates.shape:
            raise ValueError(f"checkpoint {checkpoint_dir} has gates {config['num_layers']} x "
                             f"{config['num_kv_heads']}, the model {self.gates.shape[0]} x {self.gates.shape[1]}")
        state = safetensors.torch.load_file(str(state_path))
        with torch.no_grad():
            self.gates.log_alpha.copy_(state["log_alpha"])
            self.lagrangian.lambda1.copy_(state["lambda1"])
            self.lagrangian.lambda2.copy_(state["lambda2"])
        if config.get("weights_saved"):
            self._load_weights(checkpoint_dir)

    def _load_weights(self, checkpoint_dir: Path) -> None:
        single = checkpoint_dir / "model.safetensors"
        index = checkpoint_dir / "model.safetensors.index.json"
        if single.is_file():
            files = [single]
        elif index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [checkpoint_dir / name for name in shards]
        else:
            raise FileNotFoundError(f"{checkpoint_dir} says its weights were saved, but has no model.safetensors")
        state = {}
        for path in files:
            state.update(safetensors.torch.load_file(str(path)))
        result = self.model.load_state_dict(state, strict=False)
        # save_pretrained drops the copy of a tied weight (the output embedding of tied models).
        text_config = self.model.config.get_text_config()
        tied = self.model.get_output_embeddings() if text_config.tie_word_embeddings else None
        tied_names = {name for name, p in self.model.named_parameters(remove_duplicate=False)
                      if tied is not None and p is tied.weight}
        missing = [k for k in result.missing_keys if k not in tied_names]
        if missing or result.unexpected_keys:
            raise ValueError(f"weights in {checkpoint_dir} do not match the model: missing {missing[:5]}, "
                             f"unexpected {result.unexpected_keys[:5]}")
