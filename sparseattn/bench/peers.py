"""Baselines run in the same process as our kernels: the strongest dense and block-sparse peers.

Each peer is ``make(q, k, v, causal, block_index) -> callable | None`` (None when the peer is not
available here or cannot take the case). Setup that a real user would do once (compilation,
building a FlexAttention BlockMask, expanding K/V for a backend without GQA) happens in ``make``
and is excluded from timing; each peer's ``note`` says what that was.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch.nn.functional as F

from ..index import BlockIndex

logger = logging.getLogger("sparseattn.bench")

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover - torch < 2.3
    SDPBackend = sdpa_kernel = None

try:
    from torch.nn.attention.flex_attention import flex_attention
except ImportError:  # pragma: no cover
    flex_attention = None

try:
    import flash_attn  # optional peer
except ImportError:
    flash_attn = None

try:
    import flashinfer  # optional peer
except ImportError:
    flashinfer = None


@dataclass
class Peer:
    name: str
    make: Callable
    note: str = ""


def _sdpa(backend):
    def make(q, k, v, causal, block_index=None, grad=False):
        if sdpa_kernel is None or not q.is_cuda:
            return None
        if q.shape[2] != k.shape[2]:
            return None
        def attempt(kk, vv, gqa):
            def run():
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, kk, vv, is_causal=causal, enable_gqa=gqa)
            try:
                run()
                return run
            except RuntimeError as err:
                logger.info("SDPA %s rejected the case (enable_gqa=%s): %s", backend, gqa, err)
                return None

        gqa = q.shape[1] != k.shape[1]
        run = attempt(k, v, gqa)
        if run is None and gqa:
            # A backend without GQA support: expand K/V once, outside the timed region (a stronger
            # baseline than paying the copy on every call).
            G = q.shape[1] // k.shape[1]
            run = attempt(k.repeat_interleave(G, 1).detach().requires_grad_(grad),
                          v.repeat_interleave(G, 1).detach().requires_grad_(grad), False)
            if run is not None:
                run.expanded_kv = True
        return run

    return make


def _flex_compiled():
    if flex_attention is None:
        return None
    if not hasattr(_flex_compiled, "fn"):
        # One compiled graph per shape; the suite runs more shapes than dynamo's default limit of
        # 8, past which it silently falls back to eager (an O(L^2)-memory math path).
        import torch._dynamo

        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
        _flex_compiled.fn = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled.fn


def _flex_dense(q, k, v, causal, block_index=None, grad=False):
    fn = _flex_compiled()
    if fn is None or not q.is_cuda:
        return None
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    mask = None
    if causal:
        # The causal BlockMask from block coordinates (create_block_mask would evaluate the mask
        # on all L x L pairs: 128 GiB at 128K): full blocks below the diagonal, causal mask_mod
        # on the diagonal blocks; the same structure create_block_mask produces.
        mask = BlockIndex.dense(1, 1, Lq, Lk, 128, 128, causal=True, device=q.device).to_block_mask()
    return lambda: fn(q, k, v, block_mask=mask, enable_gqa=Hq != k.shape[1])


def _flex_sparse(q, k, v, causal, block_index=None, grad=False):
    fn = _flex_compiled()
    if fn is None or block_index is None or not q.is_cuda or block_index.block_q != block_index.block_k:
        return None
    mask = block_index.to_block_mask(causal=causal)
    options = None
    if block_index.block_q < 128:
        # Flex's default tiles (128 rows on the H100) must divide the BlockMask's blocks.
        options = {"BLOCK_M": block_index.block_q, "BLOCK_N": block_index.block_k}
    return lambda: fn(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1], kernel_options=options)


def _flash_attn(q, k, v, causal, block_index=None, grad=False):
    if flash_attn is None or not q.is_cuda:
        return None
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # flash-attn wants [B, L, H, D]
    return lambda: flash_attn.flash_attn_func(qt, kt, vt, causal=causal)


DENSE_PEERS = [
    Peer("cudnn_sdpa", _sdpa(SDPBackend.CUDNN_ATTENTION) if SDPBackend else lambda *a, **k: None,
         "SDPA, cuDNN backend (enable_gqa, or K/V expanded once outside timing if rejected)"),
    Peer("fa2_sdpa", _sdpa(SDPBackend.FLASH_ATTENTION) if SDPBackend else lambda *a, **k: None,
         "SDPA, FlashAttention-2 backend, enable_gqa"),
    Peer("flex_dense", _flex_dense, "FlexAttention, torch.compile, causal BlockMask (full + diagonal blocks) built once"),
    Peer("flash_attn", _flash_attn, "flash-attn package (if installed)"),
]

SPARSE_PEERS = [
    Peer("flex_sparse", _flex_sparse, "FlexAttention, torch.compile, BlockMask from the same BlockIndex "
         "(blocks below the diagonal as full blocks, no mask_mod there)"),
]
