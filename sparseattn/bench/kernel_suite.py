"""The kernel speed suite (shared/BENCHMARKS.md): our block-sparse kernel against the strongest peers.

Cases, in one run on one GPU: for every length, the dense peers (cuDNN SDPA, FA2 SDPA,
FlexAttention) and our dense mode; at each density, our sparse kernel and FlexAttention over the
*same* BlockIndex; backward of the dense mode against FA2 SDPA's backward. A correctness gate runs
first and the suite refuses to report speedups if it fails.
"""

from __future__ import annotations

import logging

import torch

from ..reference.attention import reference_attention, reference_block_sparse_attention
from .inputs import random_block_index, random_qkv
from .peers import DENSE_PEERS, SPARSE_PEERS
from .timing import block_flops, causal_dense_flops, machine_record, time_ms

logger = logging.getLogger("sparseattn.bench")

DEFAULT_LENGTHS = [8192, 16384, 32768, 65536, 131072]
DEFAULT_DENSITIES = [0.05, 0.1, 0.2, 0.5]


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def correctness_gate(q_heads=32, kv_heads=8, head_dim=128, seq_len=1536, block_size=128, tol=2e-2) -> dict:
    """Our kernel (dense and sparse, fwd) against the fp32 reference on a small case; raises on failure."""
    from ..kernels.block_sparse import block_sparse_attention

    q, k, v = random_qkv(1, q_heads, kv_heads, seq_len, head_dim, seed=123)
    idx = random_block_index(1, q_heads, seq_len, seq_len, block_size, 0.3, seed=5, device=q.device)
    dense_err = _rel(block_sparse_attention(q, k, v, None, causal=True), reference_attention(q, k, v))
    sparse_err = _rel(block_sparse_attention(q, k, v, idx, causal=True),
                      reference_block_sparse_attention(q, k, v, idx))
    result = {"dense_rel_err": dense_err, "sparse_rel_err": sparse_err, "tol": tol,
              "passed": dense_err < tol and sparse_err < tol}
    if not result["passed"]:
        raise RuntimeError(f"correctness gate failed, refusing to report speed: {result}")
    return result


def _check_peer(name, out, ours, tol=2e-2) -> float:
    """A peer that computes something else is no baseline: compare it with our (gated) output."""
    err = _rel(out, ours)
    if not err < tol:
        raise RuntimeError(f"peer {name} disagrees with our kernel (rel. error {err:.2e}); not timing it")
    return err


def _record(records, **fields):
    records.append(fields)
    logger.info("%s", fields)
    return fields


def run_kernel_suite(lengths=DEFAULT_LENGTHS, densities=DEFAULT_DENSITIES, *, batch=1, q_heads=32, kv_heads=8,
                     head_dim=128, block_size=128, dtype=torch.bfloat16, backward_lengths=(8192, 32768),
                     share_blocks_in_group=False, progress=None) -> dict:
    """Run the suite and return the JSON-able result (machine, shapes, records, gate).

    ``share_blocks_in_group``: the random blocks are drawn once per GQA group (all query heads of a
    KV head select the same blocks) instead of once per head.
    """
    from ..kernels.block_sparse import block_sparse_attention

    result = {"suite": "kernel", "machine": machine_record(), "gate": correctness_gate(q_heads, kv_heads, head_dim),
              "shape": dict(batch=batch, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
                            dtype=str(dtype).replace("torch.", ""), causal=True, block_size=block_size,
                            blocks_shared_in_gqa_group=share_blocks_in_group),
              "peers": {p.name: p.note for p in DENSE_PEERS + SPARSE_PEERS}, "records": []}
    records = result["records"]
    for L in lengths:
        if progress:
            progress(f"L={L}")
        q, k, v = random_qkv(batch, q_heads, kv_heads, L, head_dim, dtype=dtype, seed=L)
        dense_flops = causal_dense_flops(batch, q_heads, L, L, head_dim)
        ours_out = block_sparse_attention(q, k, v, None, causal=True)
        for peer in DENSE_PEERS:
            fn = peer.make(q, k, v, True)
            if fn is None:
                continue
            err = _check_peer(peer.name, fn(), ours_out)
            t = time_ms(fn)
            _record(records, L=L, case="dense", impl=peer.name, density=1.0, **t, err_vs_ours=err,
                    eff_tflops=dense_flops / t["ms"] / 1e9, act_tflops=dense_flops / t["ms"] / 1e9)
        ours_out = None  # release device memory before the next case
        t = time_ms(lambda: block_sparse_attention(q, k, v, None, causal=True))
        _record(records, L=L, case="dense", impl="ours_dense", density=1.0, **t,
                eff_tflops=dense_flops / t["ms"] / 1e9, act_tflops=dense_flops / t["ms"] / 1e9)
        for d in densities:
            idx = random_block_index(batch, q_heads, L, L, block_size, d, seed=int(d * 1000) + L, device=q.device,
                                     group_size=q_heads // kv_heads if share_blocks_in_group else 1)
            real_d = float(idx.density().mean().item())
            act = block_flops(idx, head_dim)
            t = time_ms(lambda: block_sparse_attention(q, k, v, idx, causal=True))
            _record(records, L=L, case="sparse", impl="ours_sparse", target_density=d, density=real_d, **t,
                    eff_tflops=dense_flops / t["ms"] / 1e9, act_tflops=act / t["ms"] / 1e9)
            ours_out = block_sparse_attention(q, k, v, idx, causal=True)
            for peer in SPARSE_PEERS:
                fn = peer.make(q, k, v, True, idx)
                if fn is None:
                    continue
                err = _check_peer(peer.name, fn(), ours_out)
                t = time_ms(fn)
                _record(records, L=L, case="sparse", impl=peer.name, target_density=d, density=real_d, **t,
                        err_vs_ours=err,
                        eff_tflops=dense_flops / t["ms"] / 1e9, act_tflops=act / t["ms"] / 1e9)
            idx = ours_out = None  # release device memory before the next case
        q = k = v = None  # release device memory before the next case
        torch.cuda.empty_cache()
    for L in backward_lengths:
        if progress:
            progress(f"backward L={L}")
        q, k, v = random_qkv(batch, q_heads, kv_heads, L, head_dim, dtype=dtype, seed=L + 1, requires_grad=True)
        grad = torch.randn_like(q)
        bwd_flops = 2.5 * causal_dense_flops(batch, q_heads, L, L, head_dim)  # FA convention: bwd = 2.5 x fwd
        impls = {"ours_dense": lambda: block_sparse_attention(q, k, v, None, causal=True)}
        for peer in DENSE_PEERS[:2]:
            fn = peer.make(q, k, v, True, grad=True)
            if fn is not None:
                impls[peer.name] = fn
        for name, fwd in impls.items():
            out = fwd()
            # backward() rather than autograd.grad: a peer may hold expanded K/V leaves of its own.
            t = time_ms(lambda: out.backward(grad, retain_graph=True))
            _record(records, L=L, case="backward", impl=name, density=1.0, **t,
                    eff_tflops=bwd_flops / t["ms"] / 1e9, act_tflops=bwd_flops / t["ms"] / 1e9)
            out = None  # release device memory before the next case
        q = k = v = grad = None  # release device memory before the next case
        torch.cuda.empty_cache()
    return result
