"""GPU correctness check of the Triton kernels (block-sparse fwd/bwd, dense mode, varlen,
vertical-slash, CUDA-graph capture), against fp32 references. Prints one PASS/FAIL line per case
and exits non-zero if any case fails. Meant for an H100; takes about a minute.

    python benchmarks/gpu_kernel_check.py            # all cases
    python benchmarks/gpu_kernel_check.py -k sparse  # cases whose name contains "sparse"
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback

import torch

from sparseattn.index import BlockIndex, VerticalSlashIndex, causal_block_mask, diagonal_block_range
from sparseattn.kernels.block_sparse import (
    block_sparse_attention,
    block_sparse_backward,
    block_sparse_forward,
)
from sparseattn.kernels.vertical_slash import vertical_slash_attention

DEV = "cuda"
CASES = []


def case(fn):
    CASES.append(fn)
    return fn


# ---- references and inputs ---------------------------------------------------------------------


def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def qkv(B, Hq, Hkv, Lq, Lk, D, dtype=torch.bfloat16, seed=0, grad=False):
    g = torch.Generator(device=DEV).manual_seed(seed)
    shapes = [(B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D)]
    return [torch.randn(s, generator=g, device=DEV, dtype=dtype).requires_grad_(grad) for s in shapes]


def block_mask(index) -> torch.Tensor:
    B, H, nq, width = index.indices.shape
    nk = -(-index.k_len // index.block_k)
    valid = torch.arange(width, device=DEV) < index.counts[..., None]
    target = torch.where(valid, index.indices.long(), nk)
    full = torch.zeros(B, H, nq, nk + 1, dtype=torch.bool, device=DEV)
    return full.scatter_(-1, target, True)[..., :nk]


def random_index(B, H, Lq, Lk, bq, bk, density, seed=0) -> BlockIndex:
    nq, nk = -(-Lq // bq), -(-Lk // bk)
    g = torch.Generator(device=DEV).manual_seed(seed)
    mask = torch.rand(B, H, nq, nk, generator=g, device=DEV) < density
    mask[..., 0] = True
    first, last = diagonal_block_range(Lq, Lk, bq, bk, device=DEV)
    cols = torch.arange(nk, device=DEV)
    mask |= (cols[None, :] >= first[:, None]) & (cols[None, :] <= last[:, None])
    mask &= causal_block_mask(Lq, Lk, bq, bk, causal=True, device=DEV)
    return BlockIndex.from_mask(mask, block_q=bq, block_k=bk, q_len=Lq, k_len=Lk, max_k=nk)


def chunked_reference(q, k, v, *, causal=True, index=None, vs_mask_fn=None, scale=None, chunk=1024):
    """fp32 attention over query chunks, per KV group: memory O(G x chunk x Lk), never L x L."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = scale or 1 / math.sqrt(D)
    out = torch.empty(B, Hq, Lq, D, dtype=torch.float32, device=DEV)
    kpos = torch.arange(Lk, device=DEV)
    bmask = block_mask(index) if index is not None else None
    for r0 in range(0, Lq, chunk):
        r1 = min(Lq, r0 + chunk)
        qpos = torch.arange(r0, r1, device=DEV) + Lk - Lq
        for kvh in range(Hkv):
            heads = slice(kvh * G, (kvh + 1) * G)
            s = q[:, heads, r0:r1].float() @ k[:, kvh:kvh + 1].float().transpose(-1, -2) * scale  # [B,G,r,Lk]
            allowed = torch.ones(r1 - r0, Lk, dtype=torch.bool, device=DEV)
            if causal:
                allowed = kpos[None, :] <= qpos[:, None]
            if bmask is not None:
                rows = torch.arange(r0, r1, device=DEV) // index.block_q
                allowed = allowed & bmask[:, heads][:, :, rows][:, :, :, kpos // index.block_k]
            if vs_mask_fn is not None:
                allowed = allowed & vs_mask_fn(r0, r1, heads)
            s = s.masked_fill(~allowed, float("-inf"))
            out[:, heads, r0:r1] = torch.softmax(s, -1) @ v[:, kvh:kvh + 1].float()
    return out


def autograd_reference(q, k, v, dout, *, causal=True, index=None):
    """fp32 dense-masked attention with torch autograd (small L only): (out, dq, dk, dv)."""
    Hq, Hkv, Lq, Lk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    head = torch.arange(Hq, device=DEV) // (Hq // Hkv)
    s = qf @ kf[:, head].transpose(-1, -2) / math.sqrt(q.shape[-1])
    allowed = torch.ones(Lq, Lk, dtype=torch.bool, device=DEV)
    if causal:
        allowed = torch.arange(Lk, device=DEV)[None, :] <= (torch.arange(Lq, device=DEV) + Lk - Lq)[:, None]
    if index is not None:
        bm = block_mask(index)
        allowed = allowed & bm[:, :, torch.arange(Lq, device=DEV) // index.block_q][
            :, :, :, torch.arange(Lk, device=DEV) // index.block_k]
    out = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ vf[:, head]
    return (out, *torch.autograd.grad(out, (qf, kf, vf), dout.float()))


def check(name, errors: dict, tol: float):
    bad = {k: e for k, e in errors.items() if not (e < tol)}
    text = " ".join(f"{k}={e:.2e}" for k, e in errors.items())
    if bad:
        raise AssertionError(f"{text} (tol {tol:g})")
    return text


# ---- cases -------------------------------------------------------------------------------------


@case
def dense_causal_32k_vs_sdpa_and_fp32():
    L = 32768
    q, k, v = qkv(1, 32, 8, L, L, 128, seed=1)
    out = block_sparse_attention(q, k, v)
    torch.cuda.synchronize()
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    # fp32 reference on a sample of heads (the whole thing is ~9 TFLOP of fp32).
    heads = slice(0, 8)  # KV heads 0 and 1
    ref = chunked_reference(q[:, heads], k[:, :2], v[:, :2], chunk=2048)
    return check("dense32k", {"vs_sdpa": rel_err(out, sdpa), "vs_fp32(h0-7)": rel_err(out[:, heads], ref)}, 1e-2)


@case
def dense_awkward_shapes():
    errs = {}
    for B, Hq, Hkv, Lq, Lk, D, causal, dtype in [
        (2, 9, 3, 1000, 1000, 64, True, torch.bfloat16),
        (1, 8, 2, 777, 3001, 128, True, torch.float16),
        (1, 4, 4, 1, 513, 128, True, torch.bfloat16),
        (2, 4, 1, 1000, 1300, 64, False, torch.bfloat16),
        (1, 4, 1, 1000, 1000, 256, True, torch.bfloat16),
        (1, 2, 1, 300, 300, 64, True, torch.float32),
    ]:
        q, k, v = qkv(B, Hq, Hkv, Lq, Lk, D, dtype, seed=2)
        out = block_sparse_attention(q, k, v, causal=causal)
        tol_key = f"B{B}-H{Hq}/{Hkv}-L{Lq}/{Lk}-D{D}-{'c' if causal else 'nc'}-{str(dtype)[6:]}"
        errs[tol_key] = rel_err(out, chunked_reference(q, k, v, causal=causal))
    return check("dense", errs, 1e-2)


@case
def sparse_8k_random_indices():
    errs = {}
    L = 8192
    for D, bq, bk, density in [(128, 128, 128, 0.1), (128, 64, 64, 0.1), (64, 64, 128, 0.2), (128, 128, 64, 0.05)]:
        q, k, v = qkv(1, 8, 2, L, L, D, seed=3)
        index = random_index(1, 8, L, L, bq, bk, density, seed=4)
        out = block_sparse_attention(q, k, v, index)
        errs[f"D{D}-bq{bq}-bk{bk}"] = rel_err(out, chunked_reference(q, k, v, index=index))
    # Lq < Lk (chunked prefill) with a sparse index
    q, k, v = qkv(1, 8, 2, 1000, 8000, 128, seed=5)
    index = random_index(1, 8, 1000, 8000, 64, 64, 0.2, seed=6)
    errs["Lq1000-Lk8000"] = rel_err(block_sparse_attention(q, k, v, index), chunked_reference(q, k, v, index=index))
    return check("sparse", errs, 1e-2)


@case
def backward_4k_dense_and_sparse():
    errs = {}
    L = 4096
    for name, index in [("dense", None), ("sparse-bs64", random_index(1, 8, L, L, 64, 64, 0.2, seed=7)),
                        ("sparse-bq128-bk64", random_index(1, 8, L, L, 128, 64, 0.2, seed=8))]:
        q, k, v = qkv(1, 8, 2, L, L, 128, seed=9, grad=True)
        out = block_sparse_attention(q, k, v, index)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        ref = autograd_reference(q, k, v, dout, index=index)
        errs[f"{name}:o"] = rel_err(out, ref[0])
        for n, got, want in zip("qkv", grads, ref[1:]):
            errs[f"{name}:d{n}"] = rel_err(got, want)
    # D=64 with SmolLM2's 9/3 heads, Lq < Lk, non-causal dense
    q, k, v = qkv(1, 9, 3, 1000, 1500, 64, seed=10, grad=True)
    for causal in (True, False):
        out = block_sparse_attention(q, k, v, causal=causal)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        ref = autograd_reference(q, k, v, dout, causal=causal)
        for n, got, want in zip("oqkv", (out, *grads), ref):
            errs[f"D64-{'c' if causal else 'nc'}:d{n}"] = rel_err(got, want)
    return check("backward", errs, 2e-2)


@case
def backward_deterministic():
    L = 4096
    q, k, v = qkv(1, 8, 2, L, L, 128, seed=11, grad=True)
    index = random_index(1, 8, L, L, 64, 64, 0.3, seed=12)
    dout = torch.randn(q.shape, device=DEV, dtype=q.dtype)
    a = torch.autograd.grad(block_sparse_attention(q, k, v, index), (q, k, v), dout)
    b = torch.autograd.grad(block_sparse_attention(q, k, v, index), (q, k, v), dout)
    if not all(torch.equal(x, y) for x, y in zip(a, b)):
        raise AssertionError("two backward passes differ")
    return "bitwise equal"


@case
def varlen_dense_and_sparse():
    lengths = [1, 1000, 63, 3000, 257]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    total, max_len, bs = sum(lengths), max(lengths), 64
    q, k, v = qkv(1, 8, 2, total, total, 128, seed=13, grad=True)
    nq = -(-max_len // bs)
    mask = torch.zeros(len(lengths), 8, nq, nq, dtype=torch.bool, device=DEV)
    per_seq = []
    for i, n in enumerate(lengths):
        idx = random_index(1, 8, n, n, bs, bs, 0.3, seed=14 + i)
        per_seq.append(idx)
        m = block_mask(idx)
        mask[i, :, :m.shape[2], :m.shape[3]] = m[0]
    index = BlockIndex.from_mask(mask, block_q=bs, block_k=bs, q_len=max_len, k_len=max_len, max_k=nq)
    errs = {}
    for name, idx in (("dense", None), ("sparse", index)):
        out = block_sparse_attention(q, k, v, idx, cu_seqlens=cu, max_seqlen=max_len)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        refs = [[], [], [], []]
        for i, (s, n) in enumerate(zip(cu[:-1].tolist(), lengths)):
            sl = slice(s, s + n)
            r = autograd_reference(q[:, :, sl], k[:, :, sl], v[:, :, sl], dout[:, :, sl],
                                   index=None if idx is None else per_seq[i])
            for lst, t in zip(refs, r):
                lst.append(t)
        for n, got, want in zip("oqkv", (out, *grads), refs):
            errs[f"{name}:d{n}"] = rel_err(got, torch.cat(want, dim=2))
    return check("varlen", errs, 2e-2)


@case
def vertical_slash_4k():
    L, bq, bk, H = 4096, 64, 64, 8
    nq = L // bq
    g = torch.Generator(device=DEV).manual_seed(15)
    # Ranges: the local range ending at each block's diagonal + one at position 0 (when disjoint).
    last = torch.arange(nq, device=DEV) * bq + bq - 1
    local = (last - bk + 1).clamp_min(0)
    starts = torch.full((1, H, nq, 2), -1, dtype=torch.int32, device=DEV)
    starts[..., 0] = 0
    two = local >= bk
    starts[..., 1] = torch.where(two, local, torch.full_like(local, -1)).int()
    r_cnt = torch.where(two, 2, 1).int().expand(1, H, nq).contiguous()
    # Columns: random positions in [bk, local) (outside both ranges), sorted, up to 100.
    raw = torch.rand(1, H, nq, 100, generator=g, device=DEV)
    span = (local - bk).clamp_min(0).float()
    cols = (bk + raw * span[:, None]).long()
    cols = torch.sort(cols, dim=-1).values
    keep = torch.cat([torch.ones_like(cols[..., :1], dtype=torch.bool), cols[..., 1:] != cols[..., :-1]], -1)
    keep &= cols < local[:, None]
    c_cnt = keep.sum(-1).int()
    cols = torch.sort(torch.where(keep, cols, torch.full_like(cols, 1 << 30)), -1).values
    cols = torch.where(cols == 1 << 30, -1, cols).int()
    index = VerticalSlashIndex(starts, r_cnt, cols, c_cnt, block_q=bq, block_k=bk, q_len=L, k_len=L)
    q, k, v = qkv(1, H, 2, L, L, 128, seed=16)
    out = vertical_slash_attention(q, k, v, index)
    kpos = torch.arange(L, device=DEV)

    def vs_mask(r0, r1, heads):
        rows = torch.arange(r0, r1, device=DEV) // bq
        st = index.range_starts[:, heads][:, :, rows].long()  # [1,G,r,2]
        rv = torch.arange(2, device=DEV) < index.range_counts[:, heads][:, :, rows][..., None]
        m = ((kpos >= st[..., None]) & (kpos < st[..., None] + bk) & rv[..., None]).any(-2)
        cv = torch.arange(100, device=DEV) < index.column_counts[:, heads][:, :, rows][..., None]
        c = index.columns[:, heads][:, :, rows].long()
        cm = torch.zeros(*m.shape[:-1], L + 1, dtype=torch.bool, device=DEV)
        cm.scatter_(-1, torch.where(cv, c, L), True)
        return m | cm[..., :L]

    return check("vs", {"out": rel_err(out, chunked_reference(q, k, v, vs_mask_fn=vs_mask))}, 1e-2)


@case
def cuda_graph_capture_no_host_sync():
    """Forward + backward launchers (incl. the key-major transpose) captured in one CUDA graph."""
    L = 2048
    q, k, v = qkv(1, 8, 2, L, L, 128, seed=17)
    index = random_index(1, 8, L, L, 64, 64, 0.3, seed=18)
    dout = torch.randn(q.shape, device=DEV, dtype=q.dtype)

    def step():
        o, lse = block_sparse_forward(q, k, v, index)
        grads = block_sparse_backward(dout, q, k, v, o, lse, index)
        od, _ = block_sparse_forward(q, k, v, None)
        return o, od, *grads

    eager = step()  # also compiles
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    if not all(torch.equal(a, b) for a, b in zip(eager, captured)):
        raise AssertionError("graph replay differs from eager")
    return "captured and replayed"


@case
def timing_info_dense_32k():
    """Not a gate: forward TFLOP/s of dense causal 32K (GQA 32/8, D=128) next to SDPA."""
    from triton.testing import do_bench

    L = 32768
    q, k, v = qkv(1, 32, 8, L, L, 128, seed=19)
    flops = 2 * 32 * L * L * 128  # causal: half of 4 B H L^2 D
    ours = do_bench(lambda: block_sparse_forward(q, k, v), return_mode="median")
    sdpa = do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                             enable_gqa=True), return_mode="median")
    index = random_index(1, 32, L, L, 128, 128, 0.1, seed=20)
    density = (index.counts.sum() / causal_block_mask(L, L, 128, 128, device=DEV).sum() / 32).item()
    sparse = do_bench(lambda: block_sparse_forward(q, k, v, index), return_mode="median")
    return (f"dense {ours:.2f} ms ({flops / ours / 1e9:.0f} TFLOP/s), SDPA {sdpa:.2f} ms "
            f"({flops / sdpa / 1e9:.0f} TFLOP/s), ratio {sdpa / ours:.2f}; sparse bs128 density {density:.3f}: "
            f"{sparse:.2f} ms = {sparse / (density * sdpa):.2f} x d x SDPA")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="run only cases whose name contains this")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("FAIL no CUDA device")
        return 1
    import triton

    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    torch.backends.cuda.matmul.allow_tf32 = False
    failed = 0
    for fn in CASES:
        if args.k not in fn.__name__:
            continue
        t0 = time.time()
        try:
            msg = fn()
            print(f"PASS {fn.__name__} ({time.time() - t0:.1f}s) {msg}", flush=True)
        except Exception as exc:  # report every case, then fail the run
            failed += 1
            print(f"FAIL {fn.__name__} ({time.time() - t0:.1f}s) {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc()
        torch.cuda.empty_cache()
    print(f"{'FAILED' if failed else 'ALL PASSED'}: {failed} of {len(CASES)} cases failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
