"""The fused mixed-attention kernels (sparseattn.kernels.mixed) against an fp32 reference composed
document by document from the references of both branches: dense causal attention and attention
over ``streaming_select``'s sink + window blocks, mixed with the gates; gradients by autograd.

Without CUDA the kernels run in the Triton interpreter (conftest.py) on fp32 CPU tensors; with CUDA
the same tests run on the GPU in fp32, plus the ``gpu``-marked bf16 tests at PruLong's training
shape. Every kernel output is allocated NaN-filled (``SPARSEATTN_NAN_FILL=1``), so a row a kernel
never writes fails the comparison.
"""

from __future__ import annotations

import pytest
import torch

import sparseattn.kernels.mixed as mixed_kernels
import sparseattn.training.attention as training_attention
from sparseattn.kernels.block_sparse import NAN_FILL_ENV, KernelConfig
from sparseattn.kernels.mixed import MixedConfigs, mixed_backward, mixed_forward, streaming_blocks
from sparseattn.methods.streaming import StreamingConfig
from sparseattn.reference.attention import reference_attention, reference_block_sparse_attention
from sparseattn.reference.streaming import streaming_select

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# A gate of exactly 0 or 1 folds log2(0) = -inf into a log-sum-exp (so P = 0 exactly); the
# interpreter computes it with numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")


@pytest.fixture(autouse=True)
def _nan_filled_outputs(monkeypatch):
    monkeypatch.setenv(NAN_FILL_ENV, "1")
    torch.backends.cuda.matmul.allow_tf32 = False


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def packed(lengths, Hq, Hkv, D, dtype=torch.float32, seed=0, seq_major=False):
    """``q, k, v [1, H, total, D]`` (head-major, or views of ``[1, total, H, D]``) and ``cu_seqlens``."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)

    def make(H):
        t = torch.randn(1, total, H, D, generator=g) if seq_major else torch.randn(1, H, total, D, generator=g)
        t = t.to(DEVICE, dtype)
        return t.transpose(1, 2) if seq_major else t

    q, k, v = make(Hq), make(Hkv), make(Hkv)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return q, k, v, cu


def reference(q, k, v, z, cu, stream: StreamingConfig):
    """fp32 ``(out, full, local, lse_full, lse_local)`` of a packed row, each document on its own."""
    G = q.shape[1] // k.shape[1]
    parts = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if end == start:
            continue
        qd, kd, vd = (t[:, :, start:end].float() for t in (q, k, v))
        full, lse_full = reference_attention(qd, kd, vd, return_lse=True)
        index = streaming_select(end - start, end - start, 1, q.shape[1], sink=stream.sink, window=stream.window,
                                 block_size=stream.block_size, device=q.device)
        local, lse_local = reference_block_sparse_attention(qd, kd, vd, index, return_lse=True)
        parts.append((full, local, lse_full, lse_local))
    full, local, lse_full, lse_local = (torch.cat(p, 2) for p in zip(*parts))
    share = z.float().repeat_interleave(G)[None, :, None, None]
    return share * full + (1 - share) * local, full, local, lse_full, lse_local


def run_kernels(q, k, v, z, cu, stream, dout, configs=None, max_seqlen=None):
    lengths = (cu[1:] - cu[:-1]).tolist()
    common = dict(sink=stream.sink, window=stream.window, block_size=stream.block_size, cu_seqlens=cu,
                  max_seqlen=max_seqlen or max(lengths), configs=configs)
    out, branches, lse = mixed_forward(q, k, v, z, **common)
    grads = mixed_backward(dout, q, k, v, z, branches, lse, **common)
    return out, branches, lse, grads


def check_against_reference(lengths, Hq, Hkv, D, stream, z, configs=None, seed=0, seq_major=False, tol=1e-5,
                            grad_tol=1e-4):
    q, k, v, cu = packed(lengths, Hq, Hkv, D, seed=seed, seq_major=seq_major)
    z = torch.tensor(z, device=DEVICE)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE)
    out, branches, lse, (dq, dk, dv, dz) = run_kernels(q, k, v, z, cu, stream, dout, configs)

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, z)]
    ref_out, ref_full, ref_local, ref_lse_full, ref_lse_local = reference(*leaves[:3], leaves[3], cu, stream)
    want = torch.autograd.grad(ref_out, leaves, dout)
    assert rel_err(out, ref_out) < tol
    assert rel_err(branches[0], ref_full) < tol
    assert rel_err(branches[1], ref_local) < tol
    assert rel_err(lse[0], ref_lse_full) < tol
    assert rel_err(lse[1], ref_lse_local) < tol
    for name, got, ref in zip("qkvz", (dq, dk, dv, dz), want):
        assert rel_err(got, ref) < grad_tol, f"d{name}: {rel_err(got, ref)}"


# ---- the streaming set ---------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [16, 64])
def test_streaming_blocks_match_streaming_select(block_size):
    """The kernels' arithmetic block set equals streaming_select's, block for block."""
    bs = block_size
    for sink in (0, 1, bs - 1, bs, bs + 1, 3 * bs):
        for window in (1, 2, bs - 1, bs, bs + 1, bs + 2, 2 * bs, 5 * bs + 3):
            sink_blocks, window_blocks = streaming_blocks(sink, window, bs)
            for length in (1, bs - 1, bs + 1, 7 * bs + 5):
                want = streaming_select(length, length, 1, 1, sink=sink, window=window, block_size=bs).to_mask()[0, 0]
                i = torch.arange(want.shape[0])[:, None]
                j = torch.arange(want.shape[1])[None, :]
                got = (j <= i) & ((j < sink_blocks) | (j >= i - window_blocks))
                assert torch.equal(got, want), (sink, window, length)


# ---- forward and backward against the reference ---------------------------------------------------

STREAM = StreamingConfig(sink=16, window=32, block_size=16)


@pytest.mark.parametrize("lengths,Hq,Hkv,D,stream,z", [
    pytest.param([37, 163, 1, 132], 6, 2, 32, STREAM, [0.3, 0.8], id="docs37-163-1-132-H6-HKV2-D32-sink16-win32"),
    pytest.param([70, 5, 33], 2, 2, 64, StreamingConfig(sink=0, window=16, block_size=16), [0.0, 1.0],
                 id="docs70-5-33-H2-HKV2-D64-sink0-win16-z01"),
    pytest.param([100, 17], 4, 1, 48, StreamingConfig(sink=40, window=300, block_size=16), [0.5],
                 id="docs100-17-H4-HKV1-D48-sink40-win300"),
    pytest.param([0, 61, 0, 45], 4, 2, 32, StreamingConfig(sink=16, window=1, block_size=32), [1.0, 0.25],
                 id="docs0-61-0-45-H4-HKV2-D32-sink16-win1-bs32"),
    pytest.param([48, 25], 2, 1, 128, StreamingConfig(sink=16, window=48, block_size=16), [0.6],
                 id="docs48-25-H2-HKV1-D128-sink16-win48"),
])
def test_mixed_kernels_match_reference(lengths, Hq, Hkv, D, stream, z):
    check_against_reference(lengths, Hq, Hkv, D, stream, z)


def _config(fwd, dq, dkdv) -> MixedConfigs:
    return MixedConfigs(*(KernelConfig(m, n, num_warps=4, num_stages=1) for m, n in (fwd, dq, dkdv)))


@pytest.mark.parametrize("configs", [
    pytest.param(_config((16, 16), (16, 16), (16, 16)), id="tiles-16x16"),
    pytest.param(_config((64, 16), (16, 64), (64, 32)), id="tiles-64x16-16x64-64x32"),
])
def test_mixed_kernels_tile_configs(configs):
    """Tiles smaller and larger than the streaming block: sink ends and window starts fall inside
    tiles, on tile edges and per row."""
    check_against_reference([90, 3, 51], 3, 1, 32, STREAM, [0.4], configs=configs)


def test_mixed_kernels_sequence_major_layout():
    """``[1, total, H, D]`` buffers seen as ``[1, H, total, D]`` (transformers' projections) give the
    same results as head-major inputs, and so do mixed layouts (copied to head-major)."""
    lengths, stream = [50, 29], StreamingConfig(sink=16, window=16, block_size=16)
    z = torch.tensor([0.7, 0.2], device=DEVICE)
    q, k, v, cu = packed(lengths, 4, 2, 32, seq_major=True)
    assert not q.is_contiguous()
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    seq = run_kernels(q, k, v, z, cu, stream, dout)
    head = run_kernels(q.contiguous(), k.contiguous(), v.contiguous(), z, cu, stream, dout.contiguous())
    mixed_layouts = run_kernels(q, k.contiguous(), v, z, cu, stream, dout.contiguous())
    assert seq[1][0].stride()[1:] == q.stride()[1:] and seq[3][0].stride() == q.stride()  # branches, dq: q's layout
    for got in (seq, mixed_layouts):
        torch.testing.assert_close(got[0], head[0], rtol=1e-6, atol=1e-6)
        for g, h in zip(got[3], head[3]):
            torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-6)


def test_mixed_backward_gate_only():
    """Without q, k, v gradients only the dQ kernel's prologue runs: the same dL/dgate."""
    lengths = [45, 20]
    q, k, v, cu = packed(lengths, 4, 2, 32)
    z = torch.tensor([0.3, 0.9], device=DEVICE)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    common = dict(sink=16, window=32, block_size=16, cu_seqlens=cu, max_seqlen=45)
    out, branches, lse = mixed_forward(q, k, v, z, **common)
    *_, dz = mixed_backward(dout, q, k, v, z, branches, lse, **common)
    none_q, none_k, none_v, dz_only = mixed_backward(dout, q, k, v, z, branches, lse, qkv_grads=False, **common)
    assert none_q is None and none_k is None and none_v is None
    torch.testing.assert_close(dz_only, dz, rtol=1e-5, atol=1e-5)


# ---- the public function ----------------------------------------------------------------------


ROWS = [  # (document lengths, pass cu_seqlens, z, z_values)
    pytest.param([40, 1, 70], True, [0.6, 0.25], None, id="packed"),
    pytest.param([111], False, [0.7, 0.2], None, id="one-document-no-cu_seqlens"),
    pytest.param([111], True, [0.7, 0.2], None, id="one-document-cu_seqlens"),
    pytest.param([40, 1, 70], True, [1.0, 0.0], (1.0, 0.0), id="packed-saturated-both-sides"),
]


@pytest.mark.parametrize("lengths, with_cu, z, z_values", ROWS)
def test_mixed_attention_takes_the_fused_kernels(monkeypatch, lengths, with_cu, z, z_values):
    """``mixed_attention`` on the GPU path (here in the interpreter) takes the fused node for packed
    rows, for a batch-1 row that is one document (no ``cu_seqlens``, or ``[0, L]``) and for gates
    saturated to both sides; it agrees with the previous paths (``FUSED_MIXED_KERNELS = False``:
    the two-pass node, or the composed path for one document) and with the fp32 reference backend.
    Saturated gates: ``dL/dz`` is not compared (the other paths skip the unused branch)."""
    calls = []
    monkeypatch.setattr(mixed_kernels, "mixed_forward",
                        lambda *a, **kw: calls.append(1) or mixed_forward(*a, **kw))
    q, k, v, cu = packed(lengths, 4, 2, 16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    kwargs = dict(cu_seqlens=cu, max_seqlen=max(lengths)) if with_cu else {}
    z = torch.tensor(z, device=DEVICE, requires_grad=True)
    weight = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    results = {}
    for name, fused, backend in (("fused", True, "triton"), ("previous", False, "triton"),
                                 ("reference", True, "reference")):
        monkeypatch.setattr(training_attention, "FUSED_MIXED_KERNELS", fused)
        monkeypatch.setenv("SPARSEATTN_BACKEND", backend)
        out = training_attention.mixed_attention(q, k, v, z, streaming=STREAM, z_values=z_values, **kwargs)
        grads = torch.autograd.grad(out, (q, k, v, z), weight, allow_unused=True)
        results[name] = (out.detach(), grads)
    assert len(calls) == 1  # only the first call took the fused kernels
    names = "qkv" if z_values is not None else "qkvz"
    for other in ("previous", "reference"):
        assert rel_err(results["fused"][0], results[other][0]) < 1e-5
        for name, got, want in zip(names, results["fused"][1], results[other][1]):
            assert rel_err(got, want) < 1e-4, f"d{name} vs {other}"


# ---- GPU: bf16 at the training shape ----------------------------------------------------------

SMOLLM2_DOCS = [3000, 2500, 1692, 1000]  # one packed 8K row, as benchmarks/mixed_attention_overhead.py
TRAIN_STREAM = StreamingConfig(sink=128, window=1024, block_size=64)


def _bf16_check(lengths, Hq, Hkv, D, seq_major):
    q, k, v, cu = packed(lengths, Hq, Hkv, D, dtype=torch.bfloat16, seq_major=seq_major)
    z = torch.linspace(0.1, 0.9, Hkv, device=DEVICE)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)
    out, branches, lse, grads = run_kernels(q, k, v, z, cu, TRAIN_STREAM, dout)
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)] + [z.clone().requires_grad_()]
    ref = reference(*leaves[:3], leaves[3], cu, TRAIN_STREAM)
    want = torch.autograd.grad(ref[0], leaves, dout.float())
    assert rel_err(out, ref[0]) < 1e-2
    assert rel_err(branches[0], ref[1]) < 1e-2 and rel_err(branches[1], ref[2]) < 1e-2
    for name, got, ref_grad in zip("qkvz", grads, want):
        assert rel_err(got, ref_grad) < 2e-2, f"d{name}: {rel_err(got, ref_grad)}"
    again = run_kernels(q, k, v, z, cu, TRAIN_STREAM, dout)[3]
    for got, repeat in zip(grads, again):  # no atomics anywhere: bitwise deterministic
        assert torch.equal(got, repeat)


@pytest.mark.gpu
@pytest.mark.parametrize("seq_major", [True, False], ids=["seq-major", "head-major"])
def test_gpu_bf16_smollm2_shape(seq_major):
    _bf16_check(SMOLLM2_DOCS, 9, 3, 64, seq_major)


@pytest.mark.gpu
def test_gpu_bf16_head_dim_128():
    _bf16_check([2100, 37, 1500], 8, 2, 128, seq_major=True)
