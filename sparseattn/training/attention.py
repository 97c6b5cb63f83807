"""Gated attention for training: each KV head's output is ``z * full + (1 - z) * streaming``.

Both branches are exact softmax attention computed through sparseattn's own path:

- full: causal dense attention (the ``"full"`` method's ``dense_attention``: cuDNN SDPA on a GPU);
- streaming: sink + local window, block-granular (the ``"streaming"`` method's ``BlockIndex`` through
  ``sparseattn.api.attend``: the shared Triton block-sparse kernel on a GPU, forward and backward).

Packed sequences (``cu_seqlens``) never attend across documents. On a GPU each branch is one
varlen launch of the shared kernel (dense mode for the full branch, one streaming ``BlockIndex``
row per document for the other); when every head needs both branches, ``sparseattn.kernels.mixed``
computes both from one ``Q K^T`` per tile instead (one forward launch, two backward launches), for
a packed row and for a batch-1 row that is one document.
Elsewhere ``sparse_attention`` runs each document on its own. Given the gates' values on the host,
heads whose gate is exactly 0 or 1 compute only the branch they use. Everything is differentiable
in ``q, k, v`` and ``z``; ``dL/dz`` of a head is ``<dL/dout, full - streaming>`` summed over its
query heads and positions.

Example:
    >>> import torch
    >>> from sparseattn.methods.streaming import StreamingConfig
    >>> from sparseattn.training.attention import full_attention, mixed_attention, streaming_attention
    >>> cfg = StreamingConfig(sink=16, window=32, block_size=16)
    >>> q, k, v = torch.randn(1, 4, 200, 16), torch.randn(1, 2, 200, 16), torch.randn(1, 2, 200, 16)
    >>> z = torch.tensor([1.0, 0.0])  # KV head 0 full, KV head 1 streaming
    >>> out = mixed_attention(q, k, v, z, streaming=cfg)
    >>> full, local = full_attention(q, k, v), streaming_attention(q, k, v, streaming=cfg)
    >>> torch.allclose(out[:, :2], full[:, :2], atol=1e-6), torch.allclose(out[:, 2:], local[:, 2:], atol=1e-6)
    (True, True)
"""

from __future__ import annotations

import functools

import torch

from ..api import _use_triton, attend, sparse_attention
from ..index import BlockIndex
from ..methods.full import dense_attention
from ..methods.streaming import StreamingConfig
from ..reference.streaming import streaming_select

__all__ = ["full_attention", "mixed_attention", "streaming_attention", "streaming_index"]


@functools.lru_cache(maxsize=16)
def _cached_streaming_index(q_len: int, k_len: int, batch: int, heads: int, sink: int, window: int,
                            block_size: int, device: str) -> BlockIndex:
    return streaming_select(q_len, k_len, batch, heads, sink=sink, window=window, block_size=block_size,
                            causal=True, device=torch.device(device))


def streaming_index(q_len: int, k_len: int, batch: int, heads: int, streaming: StreamingConfig,
                    device) -> BlockIndex:
    """The sink + window ``BlockIndex`` (cached: every layer of a step asks for the same one)."""
    return _cached_streaming_index(q_len, k_len, batch, heads, streaming.sink, streaming.window,
                                   streaming.block_size, str(torch.device(device)))


def _check_varlen(q, k, cu_seqlens, max_seqlen):
    if q.shape[0] != 1 or q.shape[2] != k.shape[2]:
        raise ValueError(f"with cu_seqlens, q and k must be one packed row [1, heads, total, head_dim] of the same "
                         f"length; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if cu_seqlens.dtype != torch.int32:
        cu_seqlens = cu_seqlens.to(torch.int32)
    if max_seqlen is None:
        max_seqlen = int(cu_seqlens.diff().max().item())
    return cu_seqlens, int(max_seqlen)


@functools.lru_cache(maxsize=16)
def _whole_row(length: int, device: str) -> torch.Tensor:
    """``cu_seqlens`` ``[0, length]`` of a row that is one document (cached: no copy per layer)."""
    return torch.tensor([0, length], dtype=torch.int32, device=device)


def _single_sequence(cu_seqlens) -> bool:
    # [0, total]: one document filling the row, the plain causal path (a shape test, no host sync).
    return cu_seqlens is None or cu_seqlens.numel() == 2


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                   cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> torch.Tensor:
    """Exact causal attention, per document when ``cu_seqlens`` is given.

    Args:
        q: `[B, Hq, Lq, D]` (the last `Lq` of `Lk` positions); `[1, Hq, total, D]` with ``cu_seqlens``.
        k, v: `[B, Hkv, Lk, D]`.
        scale: softmax scale, default `1/sqrt(D)`.
        cu_seqlens: `[N + 1]` cumulative document lengths of one packed row (int32), or None.
        max_seqlen: the longest document (saves a host sync on the GPU path).

    Returns:
        `[B, Hq, Lq, D]` in q's dtype.
    """
    if _single_sequence(cu_seqlens):
        return dense_attention(q, k, v, causal=True, scale=scale)
    cu_seqlens, max_seqlen = _check_varlen(q, k, cu_seqlens, max_seqlen)
    if _use_triton(q):
        from ..kernels.block_sparse import block_sparse_attention

        return block_sparse_attention(q, k, v, None, scale=scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    return sparse_attention(q, k, v, method="full", scale=scale, cu_seqlens=cu_seqlens)


def streaming_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, streaming: StreamingConfig,
                        scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
                        max_seqlen: int | None = None) -> torch.Tensor:
    """Exact sink + window attention (block-granular), per document when ``cu_seqlens`` is given.

    Args: as :func:`full_attention`, plus ``streaming`` (sink, window, block_size).

    Returns:
        `[B, Hq, Lq, D]` in q's dtype.
    """
    B, Hq, Lq, _ = q.shape
    if _single_sequence(cu_seqlens):
        index = streaming_index(Lq, k.shape[2], B, Hq, streaming, q.device)
        return attend(q, k, v, index, causal=True, scale=scale)  # the shared kernel on a GPU
    cu_seqlens, max_seqlen = _check_varlen(q, k, cu_seqlens, max_seqlen)
    if _use_triton(q):
        from ..kernels.block_sparse import block_sparse_attention

        # One index row per document, query-relative: the pattern depends only on positions.
        index = streaming_index(max_seqlen, max_seqlen, cu_seqlens.numel() - 1, Hq, streaming, q.device)
        return block_sparse_attention(q, k, v, index, scale=scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    return sparse_attention(q, k, v, method="streaming", config=streaming, scale=scale, cu_seqlens=cu_seqlens)


def _on_heads(fn, kv_heads: list[int], q, k, v, **kwargs) -> torch.Tensor | None:
    """``fn`` on the KV heads ``kv_heads`` (and their query heads) only, zero elsewhere; None if no head."""
    B, Hq, Lq, _ = q.shape
    Hkv = k.shape[1]
    if len(kv_heads) == Hkv:
        return fn(q, k, v, **kwargs)
    if not kv_heads:
        return None
    G = Hq // Hkv
    kv_idx = torch.tensor(kv_heads, device=q.device)
    q_idx = (kv_idx[:, None] * G + torch.arange(G, device=q.device)).flatten()
    part = fn(q.index_select(1, q_idx), k.index_select(1, kv_idx), v.index_select(1, kv_idx), **kwargs)
    return q.new_zeros(B, Hq, Lq, v.shape[-1]).index_copy(1, q_idx, part)


# True: packed rows with both branches everywhere run sparseattn.kernels.mixed (both branches from
# one Q K^T per tile). False: the earlier two-pass node (two block-sparse forwards and a lerp, two
# block-sparse backwards), kept to compare against (benchmarks/mixed_attention_overhead.py, tests).
FUSED_MIXED_KERNELS = True


def _two_pass_forward(ctx, q, k, v, z, streaming, scale, cu_seqlens, max_seqlen):
    from ..kernels.block_sparse import block_sparse_forward

    index = streaming_index(max_seqlen, max_seqlen, cu_seqlens.numel() - 1, q.shape[1], streaming, q.device)
    kwargs = dict(scale=scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    full, lse_full = block_sparse_forward(q, k, v, None, **kwargs)
    local, lse_local = block_sparse_forward(q, k, v, index, **kwargs)
    Hkv, G = k.shape[1], q.shape[1] // k.shape[1]
    gate = z.detach().to(full.dtype).view(1, Hkv, 1, 1, 1)
    out = torch.lerp(local.unflatten(1, (Hkv, G)), full.unflatten(1, (Hkv, G)), gate).flatten(1, 2)
    ctx.save_for_backward(q, k, v, z, full, lse_full, local, lse_local, cu_seqlens)
    ctx.index = index
    return out


def _two_pass_backward(ctx, dout):
    from ..kernels.block_sparse import block_sparse_backward, cached_key_major_index

    q, k, v, z, full, lse_full, local, lse_local, cu_seqlens = ctx.saved_tensors
    Hkv, G = k.shape[1], q.shape[1] // k.shape[1]
    dq = dk = dv = dz = None
    if ctx.needs_input_grad[3]:  # dL/dz = <dout, full - local> over the KV head's query heads
        dz = (dout * (full - local)).sum(dim=(0, 2, 3), dtype=torch.float32).view(Hkv, G).sum(1).to(z.dtype)
    if any(ctx.needs_input_grad[:3]):
        share = z.detach().float().repeat_interleave(G)  # [Hq] the dense branch's share of dout
        kwargs = dict(scale=ctx.scale, cu_seqlens=cu_seqlens, max_seqlen=ctx.max_seqlen)
        grads = block_sparse_backward(dout, q, k, v, local, lse_local, ctx.index, do_scale=1.0 - share,
                                      key_major=cached_key_major_index(ctx.index), **kwargs)
        dq, dk, dv = block_sparse_backward(dout, q, k, v, full, lse_full, None, do_scale=share,
                                           accumulate=grads, **kwargs)
    return dq, dk, dv, dz


class _MixedAttention(torch.autograd.Function):
    """Both branches of every head as one autograd node, on packed rows through Triton kernels.

    Forward: one launch of ``mixed_forward`` (``out``, both branches and their log-sum-exps).
    Backward: ``mixed_backward``'s dQ launch (which also computes the row deltas and the
    ``dL/dz`` partials) and dK/dV launch (which also sums ``dL/dz``), or the dQ kernel's prologue
    alone when only ``z`` needs a gradient. The training step is bound by the host's launch cost
    (NOTES.md, run 11): the earlier node (``FUSED_MIXED_KERNELS = False``) queued 2 kernels and a
    lerp forward and about 7 kernels and 8 torch ops backward.
    """

    @staticmethod
    def forward(ctx, q, k, v, z, streaming, scale, cu_seqlens, max_seqlen):
        from ..kernels.block_sparse import _validate

        _validate(q, k, v, None, True, scale, cu_seqlens, max_seqlen)  # clear errors (e.g. CPU tensors)
        ctx.streaming, ctx.scale, ctx.max_seqlen = streaming, scale, max_seqlen
        ctx.fused = FUSED_MIXED_KERNELS
        if not ctx.fused:
            return _two_pass_forward(ctx, q, k, v, z, streaming, scale, cu_seqlens, max_seqlen)
        from ..kernels.mixed import mixed_forward

        out, branches, lse = mixed_forward(q, k, v, z, sink=streaming.sink, window=streaming.window,
                                           block_size=streaming.block_size, cu_seqlens=cu_seqlens,
                                           max_seqlen=max_seqlen, scale=scale)
        ctx.save_for_backward(q, k, v, z, branches, lse, cu_seqlens)
        return out

    @staticmethod
    def backward(ctx, dout):
        if not ctx.fused:
            return (*_two_pass_backward(ctx, dout), None, None, None, None)
        from ..kernels.mixed import mixed_backward

        q, k, v, z, branches, lse, cu_seqlens = ctx.saved_tensors
        streaming = ctx.streaming
        dq, dk, dv, dz = mixed_backward(dout, q, k, v, z, branches, lse, sink=streaming.sink,
                                        window=streaming.window, block_size=streaming.block_size,
                                        cu_seqlens=cu_seqlens, max_seqlen=ctx.max_seqlen, scale=ctx.scale,
                                        qkv_grads=any(ctx.needs_input_grad[:3]))
        return dq, dk, dv, (dz if ctx.needs_input_grad[3] else None), None, None, None, None


def mixed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, z: torch.Tensor, *,
                    streaming: StreamingConfig, scale: float | None = None,
                    cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                    z_values: tuple[float, ...] | None = None) -> torch.Tensor:
    """``z * full + (1 - z) * streaming`` per KV head (all query heads of a KV head share its gate).

    Args:
        q: `[B, Hq, Lq, D]`; `[1, Hq, total, D]` with ``cu_seqlens``.
        k, v: `[B, Hkv, Lk, D]`, `Hq % Hkv == 0`.
        z: `[Hkv]` gates in [0, 1] (any float dtype; may require grad). The fused kernels fold
            the shares into log-sum-exps, so a gate outside [0, 1] gives NaN gradients there.
        streaming: the streaming branch's sink, window and block size.
        scale: softmax scale, default `1/sqrt(D)`.
        cu_seqlens: `[N + 1]` int32 cumulative document lengths of one packed row, or None.
        max_seqlen: the longest document, if known.
        z_values: ``z`` as Python floats, when the caller knows them. Then a head whose gate is
            exactly 1 computes only the full branch and one at exactly 0 only the streaming branch
            (on the GPU's fused node, which serves packed and one-document rows, only when all
            heads saturate to the same side; a mix runs as one node): the output is the same, and
            so are the gradients, except ``dL/dz`` of those saturated heads (which hard-concrete
            gates clamped at 0 or 1 do not pass on to ``log_alpha``). A fixed 0/1 head mask is
            this case with no gradient at all.

    Returns:
        `[B, Hq, Lq, D]` in q's dtype, differentiable in q, k, v and z.
    """
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    if not isinstance(z, torch.Tensor) or z.shape != (Hkv,):
        raise ValueError(f"z must be a [num_kv_heads] = [{Hkv}] tensor, got "
                         f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
    if z_values is not None and len(z_values) != Hkv:
        raise ValueError(f"z_values has {len(z_values)} entries, expected {Hkv}")
    heads = range(Hkv)
    need_full = [h for h in heads if z_values is None or z_values[h] > 0.0]
    need_local = [h for h in heads if z_values is None or z_values[h] < 1.0]
    if need_full and need_local and _use_triton(q):
        # Both branches are needed (by every head, or some heads full and others streaming): one
        # fused autograd node for a packed row, and (fused kernels only) for a row that is one
        # document, what the synthetic PruLong rows are. Saturated heads compute both branches
        # there too: same output, and one node costs the host less than a branch per head subset
        # (the step is host-bound; NOTES.md run 15).
        if not _single_sequence(cu_seqlens):
            cu_seqlens, max_seqlen = _check_varlen(q, k, cu_seqlens, max_seqlen)
            return _MixedAttention.apply(q, k, v, z, streaming, scale, cu_seqlens, max_seqlen)
        if FUSED_MIXED_KERNELS and B == 1 and Lq == k.shape[2]:
            return _MixedAttention.apply(q, k, v, z, streaming, scale, _whole_row(Lq, str(q.device)), Lq)
    kwargs = dict(scale=scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    full = _on_heads(full_attention, need_full, q, k, v, **kwargs)
    local = _on_heads(streaming_attention, need_local, q, k, v, streaming=streaming, **kwargs)
    if local is None:
        return full
    if full is None:
        return local
    if not set(need_full) & set(need_local):  # every head saturated: the branches cover disjoint heads
        return full + local
    G = Hq // Hkv
    gate = z.to(full.dtype).view(1, Hkv, 1, 1, 1)
    full, local = full.unflatten(1, (Hkv, G)), local.unflatten(1, (Hkv, G))  # [B, Hkv, G, Lq, D]
    # local + gate * (full - local) in one kernel (and fewer in the backward than the three ops).
    return torch.lerp(local, full, gate).flatten(1, 2)
