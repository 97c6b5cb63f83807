"""PruLong training (sparseattn.training): gates, schedule, Lagrangian, gated attention, packing, trainer, scripts.

Everything runs on the CPU on tiny random Llama models (hidden 64) built from configs; the attention
references are the fp32 ones in sparseattn.reference. The run scripts run end to end through
torchrun on the tiny model (and once on the embedded SmolLM2 when its GGUF is already cached).
"""

import copy
import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from sparseattn.headmask import load_head_mask, random_head_mask, save_head_mask
from sparseattn.methods.streaming import StreamingConfig
from sparseattn.reference.attention import reference_attention, reference_block_sparse_attention
from sparseattn.reference.streaming import streaming_select
from sparseattn.training.attention import full_attention, mixed_attention, streaming_attention
from sparseattn.training.data import (IGNORE_INDEX, ByteTokenizer, PackedCollator, PackedDataset, pack_documents,
                                      read_records, tokenize_record)
from sparseattn.training.export import binarize, export_head_mask, load_gates
from sparseattn.training.export import main as export_main
from sparseattn.training.gates import HardConcreteGates
from sparseattn.training.lagrangian import SparsityLagrangian
from sparseattn.training.model import STATE_FILE, PruLongModel, prulong_attention_forward
from sparseattn.training.schedule import SparsitySchedule
from sparseattn.training.synthetic import SyntheticRetrievalDataset, corpus_files
from sparseattn.training.trainer import CSV_COLUMNS, PruLongTrainer, PruLongTrainingArguments, build_param_groups

ROOT = Path(__file__).resolve().parent.parent
TOK = ByteTokenizer()
STREAM = StreamingConfig(sink=16, window=32, block_size=16)
SMALL = dict(sink=16, window=32, block_size=16)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and lose a lot to a busy machine: run these tests on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(layers=2, heads=4, kv_heads=2, seed=0):
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads,
                                      vocab_size=TOK.vocab_size, max_position_embeddings=4096,
                                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def text_rows(seq_len, n_docs=40, doc_chars=150):
    text = corpus_files()[0].read_text(encoding="utf-8")
    docs = [tokenize_record({"text": text[i * doc_chars:(i + 1) * doc_chars]}, TOK) for i in range(n_docs)]
    return pack_documents(docs, seq_len, TOK.pad_token_id)


def rel_rms(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def args_for(tmp_path, **overrides):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=1, save_strategy="no", disable_tqdm=True,
                use_cpu=True, report_to="none", seed=0)
    base.update(overrides)
    return PruLongTrainingArguments(**base)


# --------------------------------------------------------------------------------------------
# Gates, schedule, Lagrangian
# --------------------------------------------------------------------------------------------


def test_gate_sample_matches_closed_forms():
    values = torch.tensor([-3.0, -1.0, 0.0, 1.5, 4.0])
    gates = HardConcreteGates(40000, 5)
    with torch.no_grad():
        gates.log_alpha.copy_(values.expand(40000, 5))
    torch.manual_seed(0)
    z = gates.sample()
    assert ((z >= 0) & (z <= 1)).all()
    beta, left, right = 2 / 3, -0.1, 1.1
    p_nonzero = torch.sigmoid(values - beta * math.log(-left / right))
    p_one = torch.sigmoid(values - beta * math.log((1 - left) / (right - 1)))
    torch.testing.assert_close((z > 0).float().mean(0), p_nonzero, atol=0.01, rtol=0)
    torch.testing.assert_close((z == 1).float().mean(0), p_one, atol=0.01, rtol=0)
    torch.testing.assert_close(gates.prob_nonzero()[0], p_nonzero)
    torch.testing.assert_close(gates.prob_one()[0], p_one)
    assert gates.expected_sparsity().item() == pytest.approx(1 - p_nonzero.mean().item(), abs=1e-6)


def test_gate_deterministic_eval_and_init():
    gates = HardConcreteGates(2, 3, init=4.0)
    # All heads start full: P(z > 0) = sigmoid(4 - (2/3) log(1/11)).
    expected = 1 - 1 / (1 + math.exp(-(4 + 2 / 3 * math.log(11))))
    assert gates.expected_sparsity().item() == pytest.approx(expected, abs=1e-6)
    with torch.no_grad():
        gates.log_alpha.copy_(torch.tensor([[-5.0, -1.0, 0.0], [0.5, 2.0, 5.0]]))
    expected = (torch.sigmoid(gates.log_alpha) * 1.2 - 0.1).clamp(0, 1)
    torch.testing.assert_close(gates.deterministic(), expected)
    assert gates.deterministic()[0, 0] == 0 and gates.deterministic()[1, 2] == 1
    gates.eval()
    torch.testing.assert_close(gates(), expected)
    gates.train()
    assert not torch.equal(gates(), gates())  # training samples differ


def test_gate_gradients_reach_log_alpha():
    gates = HardConcreteGates(3, 4, init=0.0)
    torch.manual_seed(1)
    gates.sample().sum().backward()
    assert (gates.log_alpha.grad != 0).any() and torch.isfinite(gates.log_alpha.grad).all()
    gates.log_alpha.grad = None
    gates.expected_sparsity().backward()
    assert (gates.log_alpha.grad < 0).all()  # raising a gate lowers the sparsity


def test_schedule_endpoints_and_shapes():
    linear = SparsitySchedule(0.1, 0.5, 0.5, "linear")
    assert linear(0, 100) == pytest.approx(0.1)
    assert linear(25, 100) == pytest.approx(0.3)
    assert linear(50, 100) == linear(99, 100) == pytest.approx(0.5)
    log = SparsitySchedule(0.2, 0.8, 0.5, "logarithmic")
    assert log(0, 100) == pytest.approx(0.2) and log(50, 100) == pytest.approx(0.8)
    assert log(25, 100) == pytest.approx(1 - math.sqrt(0.8 * 0.2))  # geometric mean of the densities
    values = [log(s, 100) for s in range(100)]
    assert values == sorted(values)
    assert SparsitySchedule(0.0, 0.7, 0.0)(0, 10) == pytest.approx(0.7)
    assert SparsitySchedule(kind="log").kind == "logarithmic"
    for bad in (dict(kind="cosine"), dict(end=1.2), dict(warmup_ratio=-0.1), dict(start=1.0),
                dict(end=1.0, kind="logarithmic")):
        with pytest.raises(ValueError):
            SparsitySchedule(**bad)


def test_lagrangian_gradients_and_ascent():
    model = PruLongModel(tiny_llama(), mode="masks_only", gate_init=1.0, **SMALL)
    args = PruLongTrainingArguments(output_dir="unused", mask_learning_rate=0.1, reg_learning_rate=0.1,
                                    use_cpu=True, report_to="none")
    groups = build_param_groups(model, args, set())
    assert [g["prulong_group"] for g in groups] == ["gates", "multipliers"]  # weights frozen in masks_only
    assert groups[1]["maximize"] and groups[1]["weight_decay"] == 0 and groups[0]["weight_decay"] == 0
    optimizer = torch.optim.AdamW(groups)

    def step(target):
        optimizer.zero_grad()
        s = model.gates.expected_sparsity()
        model.lagrangian(s, target).backward()
        optimizer.step()
        return s.item()

    s0 = model.gates.expected_sparsity().item()
    model.lagrangian(model.gates.expected_sparsity(), 0.9).backward()
    assert model.lagrangian.lambda1.grad.item() == pytest.approx(s0 - 0.9)
    assert model.lagrangian.lambda2.grad.item() == pytest.approx((s0 - 0.9) ** 2)
    optimizer.zero_grad()
    step(0.9)  # below target: ascent makes lambda1 negative, lambda2 positive
    assert model.lagrangian.lambda1.item() < 0 < model.lagrangian.lambda2.item()
    before = model.gates.expected_sparsity().item()
    for _ in range(3):
        step(0.9)
    assert model.gates.expected_sparsity().item() > before  # the gates descend toward sparsity
    # Above the target, ascent makes lambda1 positive (fresh multipliers and optimizer: no momentum).
    with torch.no_grad():
        model.gates.log_alpha.fill_(-6.0)
        model.lagrangian.lambda1.zero_()
        model.lagrangian.lambda2.zero_()
    optimizer = torch.optim.AdamW(build_param_groups(model, args, set()))
    step(0.0)
    assert model.lagrangian.lambda1.item() > 0 and model.lagrangian.lambda2.item() > 0


def test_linear_term_can_be_disabled():
    lagrangian = SparsityLagrangian(linear_term=False)
    assert not lagrangian.lambda1.requires_grad
    lagrangian(torch.tensor(0.2), 0.5).backward()
    assert lagrangian.lambda1.grad is None and lagrangian.lambda2.grad.item() == pytest.approx(0.09)


# --------------------------------------------------------------------------------------------
# Gated attention
# --------------------------------------------------------------------------------------------

SHAPES = [
    pytest.param(1, 6, 3, 300, 16, id="B1-H6-HKV3-L300-D16"),
    pytest.param(2, 4, 1, 257, 32, id="B2-H4-HKV1-L257-D32"),
    pytest.param(1, 2, 2, 63, 64, id="B1-H2-HKV2-L63-D64"),
]


def qkv(B, Hq, Hkv, L, D, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, L, D, generator=g)
    k, v = torch.randn(B, Hkv, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def references(q, k, v):
    index = streaming_select(q.shape[2], k.shape[2], q.shape[0], q.shape[1], **SMALL)
    return reference_attention(q, k, v), reference_block_sparse_attention(q, k, v, index)


@pytest.mark.parametrize("B,Hq,Hkv,L,D", SHAPES)
def test_mixed_attention_matches_fp32_references(B, Hq, Hkv, L, D):
    q, k, v = qkv(B, Hq, Hkv, L, D)
    full_ref, stream_ref = references(q, k, v)
    if L > 64:
        assert rel_rms(stream_ref, full_ref) > 0.05  # the two branches really differ
    assert rel_rms(mixed_attention(q, k, v, torch.ones(Hkv), streaming=STREAM), full_ref) < 1e-5
    assert rel_rms(mixed_attention(q, k, v, torch.zeros(Hkv), streaming=STREAM), stream_ref) < 1e-5
    z = torch.linspace(0.2, 0.9, Hkv)
    zq = z.repeat_interleave(Hq // Hkv)[None, :, None, None]
    expected = zq * full_ref + (1 - zq) * stream_ref
    assert rel_rms(mixed_attention(q, k, v, z, streaming=STREAM), expected) < 1e-5


def test_mixed_attention_gradients():
    q, k, v = qkv(1, 4, 2, 200, 16, requires_grad=True)
    z = torch.tensor([0.3, 0.7], requires_grad=True)
    out = mixed_attention(q, k, v, z, streaming=STREAM)
    weight = torch.randn_like(out)
    (out * weight).sum().backward()
    with torch.no_grad():
        full, local = full_attention(q, k, v), streaming_attention(q, k, v, streaming=STREAM)
        expected = ((full - local) * weight).unflatten(1, (2, 2)).sum((0, 2, 3, 4))
    torch.testing.assert_close(z.grad, expected, rtol=1e-4, atol=1e-4)
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


DOCS = [37, 1, 90, 128, 60]


def test_varlen_attention_never_crosses_documents():
    total = sum(DOCS)
    q, k, v = qkv(1, 4, 2, total, 16)
    cu = torch.tensor([0] + list(torch.tensor(DOCS).cumsum(0)), dtype=torch.int32)
    z = torch.tensor([0.25, 0.8])
    packed = mixed_attention(q, k, v, z, streaming=STREAM, cu_seqlens=cu, max_seqlen=max(DOCS))
    parts = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        full_ref, stream_ref = references(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end])
        zq = z.repeat_interleave(2)[None, :, None, None]
        parts.append(zq * full_ref + (1 - zq) * stream_ref)
    assert rel_rms(packed, torch.cat(parts, 2)) < 1e-5


@pytest.mark.parametrize("path", ["fused", "two-pass", "two-pass-split-dkdv"])
def test_varlen_attention_through_the_triton_kernel(monkeypatch, path):
    """The GPU code paths, run in the Triton interpreter on the CPU; GQA 4/2 with two gates: the
    fused mixed kernels (sparseattn.kernels.mixed, the default), and the earlier two-pass node
    (gate-scaled gradients, the second branch accumulated onto the first's), also with the split
    dK/dV pass (fp32 partials reduced into the gradients)."""
    import sparseattn.kernels.block_sparse as bs
    import sparseattn.training.attention as attention

    monkeypatch.setattr(attention, "FUSED_MIXED_KERNELS", path == "fused")
    if path == "two-pass-split-dkdv":
        monkeypatch.setattr(bs, "DKDV_SPLIT_ENTRIES", 1)
    docs = [40, 1, 70]
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter (conftest)
    q, k, v = (t.detach().to(dev).requires_grad_() for t in qkv(1, 4, 2, sum(docs), 16))
    cu = torch.tensor([0, 40, 41, 111], dtype=torch.int32, device=dev)
    z = torch.tensor([0.6, 0.25], device=dev, requires_grad=True)
    weight = torch.randn(1, 4, sum(docs), 16).to(dev)
    outs, grads = [], []
    for backend in ("reference", "triton"):
        monkeypatch.setenv("SPARSEATTN_BACKEND", backend)
        out = mixed_attention(q, k, v, z, streaming=STREAM, cu_seqlens=cu, max_seqlen=70)
        (out * weight).sum().backward()
        outs.append(out.detach())
        grads.append([t.grad.clone() for t in (q, k, v, z)])
        for t in (q, k, v, z):
            t.grad = None
    assert rel_rms(outs[1], outs[0]) < 1e-4
    for triton_grad, reference_grad in zip(grads[1], grads[0]):
        assert rel_rms(triton_grad, reference_grad) < 1e-3


# --------------------------------------------------------------------------------------------
# The model wrapper
# --------------------------------------------------------------------------------------------


def packed_batch(doc_lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in doc_lengths:
        ids = torch.randint(3, TOK.vocab_size, (n,), generator=g)
        rows.append(ids)
    ids = torch.cat(rows)
    feature = {"input_ids": ids, "labels": ids.clone(), "doc_lengths": torch.tensor(doc_lengths)}
    return PackedCollator()([feature]), rows


@pytest.mark.parametrize("mode", ["masks_only", "masks_and_weights", "sft"])
def test_gradients_reach_what_each_mode_trains(mode):
    torch.manual_seed(0)
    model = PruLongModel(tiny_llama(), mode=mode, gate_init=0.0, **SMALL).train()
    batch, _ = packed_batch([100, 60])
    out = model(**batch, target_sparsity=0.5)
    out["loss"].backward()
    weight_grad = model.model.model.layers[0].self_attn.q_proj.weight.grad
    if mode == "sft":
        assert model.gates.log_alpha.grad is None and weight_grad.abs().sum() > 0
    else:
        assert (model.gates.log_alpha.grad != 0).all(), model.gates.log_alpha.grad
        assert model.lagrangian.lambda2.grad is not None
        assert (weight_grad is None) == (mode == "masks_only")


def test_packing_matches_per_document_runs():
    model = PruLongModel(tiny_llama(), mode="masks_only", **SMALL).eval()
    with torch.no_grad():
        model.gates.log_alpha.copy_(torch.tensor([[-0.5, 0.3], [0.1, -0.2]]))  # fractional gates
    assert ((model.gates.deterministic() > 0) & (model.gates.deterministic() < 1)).all()
    batch, docs = packed_batch([37, 1, 90, 128])
    with torch.no_grad():
        packed = model(**batch, return_logits=True)["logits"][0]
        alone = [model(input_ids=d[None], return_logits=True)["logits"][0] for d in docs]
        # Without the document boundaries the answer changes (the test can fail).
        crossing = model(input_ids=batch["input_ids"], return_logits=True)["logits"][0]
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-5, rtol=1e-5)
    assert (crossing[37:] - packed[37:]).abs().max() > 1e-2


def test_fixed_head_mask_equals_saturated_gates():
    mask = torch.tensor([[True, False], [False, True]])
    base = tiny_llama()
    sft = PruLongModel(copy.deepcopy(base), mode="sft", head_mask=mask, **SMALL).eval()
    gated = PruLongModel(copy.deepcopy(base), mode="masks_only", **SMALL).eval()
    with torch.no_grad():
        gated.gates.log_alpha.copy_(torch.where(mask, 10.0, -10.0))
    batch, _ = packed_batch([70, 130])
    with torch.no_grad():
        a = sft(**batch, return_logits=True)
        b = gated(**batch, return_logits=True)
    torch.testing.assert_close(a["logits"], b["logits"], atol=1e-5, rtol=1e-5)
    assert a["sparsity"].item() == pytest.approx(0.5)


@pytest.mark.parametrize("log_alpha", [[[6.0, -6.0], [0.0, 0.5]], [[9.0, -9.0], [-9.0, 9.0]]],
                         ids=["some-saturated", "all-saturated"])
def test_skipping_saturated_branches_is_exact(log_alpha):
    """A head whose sampled gate is exactly 0 or 1 computes one branch: same loss, same gradients."""
    results = []
    for skip in (False, True):
        model = PruLongModel(tiny_llama(), mode="masks_and_weights", skip_saturated_branches=skip, **SMALL).train()
        with torch.no_grad():
            model.gates.log_alpha.copy_(torch.tensor(log_alpha))
        batch, _ = packed_batch([150, 50])
        torch.manual_seed(7)
        out = model(**batch, target_sparsity=0.4)
        out["loss"].backward()
        results.append((out["loss"].detach(), model.gates.log_alpha.grad.clone(),
                        model.model.model.layers[0].self_attn.k_proj.weight.grad.clone()))
    gates = HardConcreteGates(2, 2)
    with torch.no_grad():
        gates.log_alpha.copy_(torch.tensor(log_alpha))
    torch.manual_seed(7)
    z = gates.sample()  # the draw the models made (sampling the gates is the first use of the RNG)
    saturated = (z == 0) | (z == 1)
    assert saturated[0].all() and (saturated[1].all() == (log_alpha[1][0] == -9.0))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("rank,size,q_heads,kv_heads",
                         [(1, 2, slice(2, 4), slice(1, 2)), (3, 4, slice(3, 4), slice(1, 2))],
                         ids=["P2-rank1", "P4-rank3-kv-repeated"])
def test_attention_on_a_sequence_parallel_head_shard(rank, size, q_heads, kv_heads):
    """Between the Ulysses all-to-alls a rank holds some heads (HeadShard): its gates are sliced to them."""
    from sparseattn.parallel.ulysses import HeadShard
    from sparseattn.training.model import install

    shard = HeadShard(rank, size, 4, 2, q_heads, kv_heads, 2 if size > 2 else 1)
    model = PruLongModel(tiny_llama(), mode="masks_only", **SMALL)
    attn = model.model.model.layers[1].self_attn
    q, k, v = qkv(1, 4, 2, 150, 16)
    gates = torch.tensor([[0.0, 1.0], [1.0, 0.3]])  # layer 1: this rank's KV head 1 is mixed
    values = tuple(map(tuple, gates.tolist()))
    calls = [dict(prulong_gates=gates), dict(prulong_gates=gates, prulong_gate_values=values)]
    for kwargs in calls:
        whole, _ = prulong_attention_forward(attn, q, k, v, None, scaling=0.25, **kwargs)
        part, _ = prulong_attention_forward(attn, q[:, q_heads], k[:, kv_heads], v[:, kv_heads], None, scaling=0.25,
                                            head_shard=shard, **kwargs)
        torch.testing.assert_close(part, whole[:, :, q_heads], atol=1e-6, rtol=1e-5)
    install(model.model, STREAM, head_mask=torch.tensor([[True, False], [True, False]]))
    whole, _ = prulong_attention_forward(attn, q, k, v, None, scaling=0.25)
    part, _ = prulong_attention_forward(attn, q[:, q_heads], k[:, kv_heads], v[:, kv_heads], None, scaling=0.25,
                                        head_shard=shard)
    torch.testing.assert_close(part, whole[:, :, q_heads], atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = PruLongModel(tiny_llama(), mode="masks_and_weights", gate_init=0.0, **SMALL).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        batch, _ = packed_batch([80, 48])
        torch.manual_seed(3)
        model(**batch, target_sparsity=0.3)["loss"].backward()
        grads.append((model.gates.log_alpha.grad.clone(), model.model.model.layers[0].mlp.up_proj.weight.grad.clone()))
    assert model.is_activation_checkpointing
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_bf16_autocast_forward():
    model = PruLongModel(tiny_llama(), mode="masks_only", **SMALL).train()
    batch, _ = packed_batch([60, 40])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch, target_sparsity=0.2)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and torch.isfinite(model.gates.log_alpha.grad).all()


def test_attention_function_rejects_what_it_cannot_do():
    model = PruLongModel(tiny_llama(), mode="masks_only", **SMALL)
    ids = torch.randint(3, 200, (1, 20))
    with pytest.raises(ValueError, match="padded"):
        model(input_ids=ids, attention_mask=torch.cat([torch.ones(1, 15), torch.zeros(1, 5)], 1).long())
    with pytest.raises(ValueError, match="needs the gates"):
        model.model(input_ids=ids)  # the bare model, without the wrapper's gates
    padded = torch.cat([torch.zeros(1, 5), torch.ones(1, 15)], 1).long()
    with pytest.raises(ValueError, match="padded batches"):  # refused where the model prepares its mask
        model.model(input_ids=ids, attention_mask=padded, prulong_gates=model.gates.deterministic())
    restarting = torch.cat([torch.arange(10), torch.arange(10)])[None]
    with pytest.raises(ValueError, match="cu_seq_lens_q is missing"):
        model(input_ids=ids, position_ids=restarting)
    attn = model.model.model.layers[0].self_attn
    q = k = v = torch.randn(1, 4, 20, 16)
    with pytest.raises(ValueError, match="no attention mask"):
        prulong_attention_forward(attn, q, k[:, :2], v[:, :2], torch.ones(1, 1, 20, 20, dtype=torch.bool))


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def test_pack_documents_boundaries_labels_and_splits():
    text = [tokenize_record({"text": "a" * n}, TOK) for n in (10, 30)]  # 12 and 32 tokens with BOS/EOS
    sft = tokenize_record({"prompt": "question?", "answer": "yes"}, TOK)  # 10 prompt + 4 answer tokens
    too_long = tokenize_record({"prompt": "x" * 40, "answer": "y"}, TOK)
    rows = pack_documents(text + [sft, too_long], seq_len=20, pad_token_id=0)
    assert [r.doc_lengths for r in rows] == [[12, 8], [20], [4, 14, 2]]
    flat_ids = torch.cat([torch.from_numpy(r.input_ids) for r in rows])
    flat_labels = torch.cat([torch.from_numpy(r.labels) for r in rows])
    starts = torch.tensor([0, 12, 20, 40, 44, 58])
    assert (flat_labels[starts] == IGNORE_INDEX).all()  # no loss across a document boundary
    assert flat_ids[44] == TOK.bos_token_id  # the SFT example starts a row piece, whole
    sft_labels = flat_labels[44:58]
    assert (sft_labels[:10] == IGNORE_INDEX).all() and TOK.decode(sft_labels[10:13]) == "yes"
    assert sft_labels[13] == TOK.eos_token_id
    assert (flat_labels[58:] == IGNORE_INDEX).all()  # padding
    batch = PackedCollator()([PackedDataset(rows)[0], PackedDataset(rows)[1]])
    assert batch["input_ids"].shape == (1, 40) and batch["cu_seq_lens_q"].tolist() == [0, 12, 20, 40]
    assert batch["position_ids"][0, 12:20].tolist() == list(range(8)) and batch["max_length_q"] == 20


def test_read_records_from_files(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "hello"}\n\n{"prompt": "p", "completion": "c"}\n')
    (tmp_path / "b.json").write_text(json.dumps([{"input_ids": [5, 6, 7]}]))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.txt").write_text("plain text")
    records = list(read_records([tmp_path]))
    assert records == [{"text": "hello"}, {"prompt": "p", "completion": "c"}, {"input_ids": [5, 6, 7]},
                       {"text": "plain text"}]
    assert list(read_records([tmp_path], max_records=2)) == records[:2]
    assert not tokenize_record(records[1], TOK).splittable
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\nnot json\n')
    with pytest.raises(ValueError, match="line 2"):
        list(read_records([tmp_path / "bad.jsonl"]))
    with pytest.raises(ValueError, match="needs 'text'"):
        tokenize_record({"body": "x"}, TOK)
    with pytest.raises(FileNotFoundError):
        list(read_records([tmp_path / "missing"]))


def test_read_parquet(tmp_path):
    import pyarrow as pa  # a test dependency (pyproject's [test] extra): parquet input is tested, not skipped
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one", "two"]}), tmp_path / "d.parquet")
    assert list(read_records([tmp_path / "d.parquet"])) == [{"text": "one"}, {"text": "two"}]


def test_synthetic_retrieval_rows():
    data = SyntheticRetrievalDataset(TOK, seq_len=1200, num_samples=6, seed=3, max_needles=3)
    counts = set()
    for i in range(len(data)):
        item = data[i]
        assert item["input_ids"].shape == (1200,) and item["doc_lengths"].tolist() == [1200]
        text = TOK.decode(item["input_ids"])
        answers = data.answers(i)
        counts.add(len(answers))
        labeled = TOK.decode(item["input_ids"][item["labels"] != IGNORE_INDEX])
        assert labeled.split() == answers
        for value in answers:
            assert text.count(value) >= 2  # the needle in the text and the answer at the end
    assert len(counts) > 1
    assert torch.equal(data[2]["input_ids"], data[2]["input_ids"])
    other = SyntheticRetrievalDataset(TOK, seq_len=1200, num_samples=6, seed=4, max_needles=3)
    assert not torch.equal(other[2]["input_ids"], data[2]["input_ids"])
    everything = SyntheticRetrievalDataset(TOK, seq_len=1200, num_samples=2, loss_on="all")
    assert (everything[0]["labels"] != IGNORE_INDEX).all()
    from sparseattn.tasks import HAYSTACK_FILES

    assert not {p.name for p in corpus_files()} & set(HAYSTACK_FILES)
    with pytest.raises(ValueError, match="too short"):
        SyntheticRetrievalDataset(TOK, seq_len=256, num_samples=1, max_needles=4)


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def test_binarize_global_top_k():
    log_alpha = torch.tensor([[3.0, -2.0, 0.5], [1.0, -4.0, 2.0], [0.0, 0.0, 0.0]])
    mask = binarize(log_alpha, 0.5)  # 9 heads: round(4.5) = 5 streaming, the lowest scores
    assert int((~mask).sum()) == 5
    assert mask.tolist() == [[True, False, True], [True, False, True], [False, False, False]]
    assert binarize(torch.zeros(2, 3), 0.5).tolist() == [[False, False, False], [True, True, True]]  # ties by index
    assert binarize(log_alpha, 0.0).all() and not binarize(log_alpha, 1.0).any()
    with pytest.raises(ValueError):
        binarize(log_alpha, 1.5)


def test_export_writes_the_tsv(tmp_path):
    model = PruLongModel(tiny_llama(layers=3, kv_heads=2), mode="masks_only", **SMALL)
    with torch.no_grad():
        model.gates.log_alpha.copy_(torch.tensor([[5.0, -3.0], [0.0, 2.0], [-1.0, 4.0]]))
    model.save_checkpoint(tmp_path / "ckpt", extra_config={"end_head_sparsity": 0.5})
    assert torch.equal(load_gates(tmp_path / "ckpt"), model.gates.log_alpha.detach())
    mask = export_head_mask(tmp_path / "ckpt", 0.5, tmp_path / "m.tsv")
    assert (tmp_path / "m.tsv").read_text() == "1\t0\n0\t1\n0\t1\n"
    assert torch.equal(load_head_mask(tmp_path / "m.tsv"), mask)
    assert export_main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "n.tsv")]) == 0
    assert (tmp_path / "n.tsv").read_text() == "1\t0\n0\t1\n0\t1\n"


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------


class RecordingTrainer(PruLongTrainer):
    """Records the (step, first tokens) of every batch it trains on."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.seen.append((self.state.global_step, inputs["input_ids"][0, :16].tolist()))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def run_trainer(output_dir, rows, resume=None, **overrides):
    model = PruLongModel(tiny_llama(seed=0), mode="masks_and_weights", gate_init=1.0, **SMALL)
    config = dict(mode="masks_and_weights", max_steps=6, save_strategy="steps", save_steps=3, learning_rate=1e-3,
                  mask_learning_rate=0.2, reg_learning_rate=1.0, end_head_sparsity=0.5, sparsity_warmup_ratio=0.5)
    config.update(overrides)
    trainer = RecordingTrainer(model, args_for(output_dir, **config), train_dataset=PackedDataset(rows))
    trainer.seen = []
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_resume_gives_the_identical_continuation(tmp_path):
    rows = text_rows(96)
    assert len(rows) > 6
    full = run_trainer(tmp_path / "a", rows)
    assert [step for step, _ in full.seen] == list(range(6))
    # An interrupted run: the same folder with only checkpoint-3, resumed with "auto".
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoint-6")
    resumed = run_trainer(tmp_path / "b", rows, resume="auto")
    assert resumed.seen == full.seen[3:]  # same data, same order, nothing repeated or lost
    a, b = full.prulong_model.state_dict(), resumed.prulong_model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=0, rtol=0, msg=key)
    with open(tmp_path / "a" / "train_log.csv") as f:
        log_a = list(csv.DictReader(f))
    with open(tmp_path / "b" / "train_log.csv") as f:
        log_b = list(csv.DictReader(f))
    assert [r["step"] for r in log_b] == [str(s) for s in range(1, 7)]  # rows 4-6 replaced, not duplicated
    assert [r["lm_loss"] for r in log_b] == [r["lm_loss"] for r in log_a]
    # Weights are saved in this mode; the final folder loads back into a fresh wrapper.
    fresh = PruLongModel(tiny_llama(seed=5), mode="masks_and_weights", **SMALL)
    fresh.load_checkpoint(tmp_path / "a" / "checkpoint-6")
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(value, a[key], atol=0, rtol=0, msg=key)


def test_masks_only_sparsity_tracks_the_target(tmp_path):
    rows = text_rows(64, n_docs=120, doc_chars=100)
    model = PruLongModel(tiny_llama(layers=4, kv_heads=4), mode="masks_only", sink=16, window=16, block_size=16)
    steps = 150
    args = args_for(tmp_path, max_steps=steps, mask_learning_rate=0.2, reg_learning_rate=4.0, end_head_sparsity=0.5,
                    sparsity_warmup_ratio=0.5)
    PruLongTrainer(model, args, train_dataset=PackedDataset(rows)).train()
    with open(tmp_path / "train_log.csv") as f:
        log = list(csv.DictReader(f))
    assert len(log) == steps and list(log[0]) == list(CSV_COLUMNS)
    sparsity = [float(r["sparsity"]) for r in log]
    target = [float(r["target_sparsity"]) for r in log]
    assert sparsity[0] < 0.01 and target[-1] == 0.5
    last_quarter = [abs(s - t) for s, t in zip(sparsity[-steps // 4:], target[-steps // 4:])]
    assert sum(last_quarter) / len(last_quarter) < 0.03, last_quarter
    assert last_quarter[-1] < 0.03
    assert float(log[-1]["lambda2"]) > 0


def test_seq_parallel_size_is_validated(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="must divide"):
        PruLongTrainingArguments(output_dir="x", seq_parallel_size=3, use_cpu=True)
    with pytest.raises(ValueError, match=">= 1"):
        PruLongTrainingArguments(output_dir="x", seq_parallel_size=0, use_cpu=True)
    with pytest.raises(ValueError, match="mode"):
        PruLongTrainingArguments(output_dir="x", mode="weights_only", use_cpu=True)


# --------------------------------------------------------------------------------------------
# The run scripts, end to end (torchrun)
# --------------------------------------------------------------------------------------------

TINY_ENV = dict(MODEL="tiny-random", SEQ_LEN="512", STEPS="3", SAVE_STEPS="2", SINK_SIZE="16",
                CONTEXT_WINDOW_IF_TOGGLED="32", BLOCK_SIZE="16", SYNTHETIC_NEEDLES="1", NPROC="1", BF16="0",
                LR="1e-3", MASK_LEARNING_RATE="0.2", OMP_NUM_THREADS="1")


def run_script(name, out, **env):
    full_env = {**os.environ, **TINY_ENV, "OUT": str(out), "PYTHON": sys.executable, **env}
    result = subprocess.run(["bash", str(ROOT / "run_scripts" / name)], env=full_env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(out / "train_log.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("script", ["prulong_masksonly.sh", "prulong_masksandweights.sh"])
def test_mask_scripts_run_end_to_end(script, tmp_path):
    log = run_script(script, tmp_path / "run")
    assert [r["step"] for r in log] == ["1", "2", "3"]
    assert all(math.isfinite(float(r["lm_loss"])) for r in log)
    mask = load_head_mask(tmp_path / "run" / "head_mask_sp0.5.tsv")
    assert mask.shape == (2, 2) and int((~mask).sum()) == 2
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["global_step"] == 3 and summary["streaming_heads"] == 2
    assert (tmp_path / "run" / "checkpoint-2" / STATE_FILE).is_file()
    assert (tmp_path / "run" / "model.safetensors").is_file() == (script == "prulong_masksandweights.sh")


def test_sft_script_runs_with_a_frozen_mask(tmp_path):
    mask = random_head_mask(2, 2, 2, seed=1)
    save_head_mask(mask, tmp_path / "mask.tsv")
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(40)))
    log = run_script("sft.sh", tmp_path / "run", HEAD_MASK=str(tmp_path / "mask.tsv"), TRAIN_FILES=str(data),
                     SEQ_LEN="128")
    assert len(log) == 3 and float(log[-1]["sparsity"]) == pytest.approx(0.5)
    config = json.loads((tmp_path / "run" / "prulong_config.json").read_text())
    assert config["mode"] == "sft" and config["head_mask"] == mask.int().tolist()
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_masks_only_script_on_the_embedded_model(tmp_path, embedded_model_path):
    log = run_script("prulong_masksonly.sh", tmp_path / "run", MODEL=str(embedded_model_path), SEQ_LEN="256", STEPS="1",
                     SAVE_STEPS="1", SINK_SIZE="64", CONTEXT_WINDOW_IF_TOGGLED="64", BLOCK_SIZE="64")
    assert len(log) == 1 and 0.0 < float(log[0]["lm_loss"]) < 20
    mask = load_head_mask(tmp_path / "run" / "head_mask_sp0.5.tsv")
    assert mask.shape == (30, 3) and int((~mask).sum()) == 45


def test_fixed_mask_generation_with_kv_cache():
    from sparseattn.training.model import install

    model = tiny_llama().eval()
    install(model, STREAM, head_mask=torch.tensor([[True, False], [False, False]]))
    ids = torch.randint(3, TOK.vocab_size, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    assert out.sequences.shape == (1, 304) and all(torch.isfinite(s).all() for s in out.scores)


@pytest.mark.parametrize("name", ["gates", "schedule", "lagrangian", "attention", "model", "data", "synthetic",
                                  "export"])
def test_docstring_examples(name):
    import doctest
    import importlib

    module = importlib.import_module(f"sparseattn.training.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


def test_training_curves_png(tmp_path):
    """The CSV log becomes a three-panel PNG; a log with no steps is a clear error."""
    from sparseattn.training.curves import plot_training_log, read_training_log

    log = tmp_path / "train_log.csv"
    header = "step,lm_loss,sparsity,sparsity_det,target_sparsity,lambda1,lambda2\n"
    log.write_text(header + "".join(f"{i},{2.0 / i},{i / 40},{i / 30},{i / 40},{-i},{i * i}\n" for i in range(1, 21)))
    cols = read_training_log(log)
    assert cols["lm_loss"][0] == (1.0, 2.0) and len(cols["lambda2"]) == 20
    png = plot_training_log(log, tmp_path / "curves.png", title="t")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    empty = tmp_path / "empty.csv"
    empty.write_text(header)
    with pytest.raises(ValueError, match="no logged steps"):
        read_training_log(empty)
