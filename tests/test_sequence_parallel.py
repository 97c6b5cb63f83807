"""Sequence parallelism (``sparseattn.parallel``) on CPU with gloo: 2 and 4 processes against one.

The distributed runs are one process per rank (forked from a server that imported everything once;
rendezvous through a ``FileStore``; a process-group timeout and a wall-clock limit that kills every
rank, so a hang fails instead of stalling CI). Each scenario saves its per-rank results; the tests below compare
them, in the pytest process, with the same computation done by one process without any collective.

Shapes: 4 query / 2 KV heads, so 4 ranks exercise the KV-head repetition (P > Hkv); a 77-token
sequence, which neither 2 nor 4 divides, so the padding path runs; fp32 throughout.
"""

from __future__ import annotations

import datetime
import doctest
import importlib
import json
import multiprocessing
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers

from sparseattn import sparse_attention
from sparseattn.parallel import (
    average_gradients,
    build_groups,
    check_heads,
    check_seq_parallel_size,
    gather_kv_heads,
    group_layout,
    head_shard,
    shard_batch,
    shift_labels,
    ulysses_attention,
)
from sparseattn.parallel.transformers import enable_sequence_parallel

ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 240
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16
STREAMING = dict(sink=16, window=16, block_size=16)
LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=HEADS,
             num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, vocab_size=128, max_position_embeddings=256)
SEQ_LEN = 77  # odd: padded to 78 (P=2) and 80 (P=4)
TARGET_SPARSITY = 0.3


# --------------------------------------------------------------------------------------------
# What both sides compute: a gated full/streaming attention and a tiny Llama with per-KV-head gates
# --------------------------------------------------------------------------------------------


def gated_attention(q, k, v, gate, scale=None, cu_seqlens=None):
    """``z * full + (1 - z) * streaming`` with one ``z`` per KV head (`gate [Hkv]`), per document of a packed row."""
    z = gate.repeat_interleave(q.shape[1] // k.shape[1])[None, :, None, None]
    full = sparse_attention(q, k, v, method="full", scale=scale, cu_seqlens=cu_seqlens)
    local = sparse_attention(q, k, v, method="streaming", scale=scale, cu_seqlens=cu_seqlens, **STREAMING)
    return z * full + (1 - z) * local


def gated_hf_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, head_shard=None,
                       cu_seq_lens_q=None, **kwargs):
    """An AttentionInterface function with the layer's gate parameter, sliced under sequence parallelism."""
    assert attention_mask is None
    z = torch.sigmoid(module.gate_logit)  # [Hkv]
    if head_shard is not None:
        z = head_shard.kv(z)
    module.local_z = z
    out = gated_attention(query, key, value, z, scale=scaling, cu_seqlens=cu_seq_lens_q)
    return out.transpose(1, 2).contiguous(), None


transformers.AttentionInterface.register("sp_test_gated", gated_hf_attention)


def lagrangian(z_all, lambdas):
    sparsity = 1 - z_all.mean()
    return lambdas[0] * (sparsity - TARGET_SPARSITY) + lambdas[1] * (sparsity - TARGET_SPARSITY) ** 2


def build_llama(state_dict=None):
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    for layer in model.model.layers:
        layer.self_attn.register_parameter("gate_logit", torch.nn.Parameter(torch.zeros(KV_HEADS)))
    model.register_parameter("sparsity_lambdas", torch.nn.Parameter(torch.zeros(2)))
    if state_dict is not None:
        model.load_state_dict(state_dict)
    model.set_attn_implementation("sp_test_gated")
    return model


def layer_z(model):
    return [layer.self_attn.local_z for layer in model.model.layers]


def make_cases() -> dict:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = build_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.gate_logit.copy_(torch.randn(KV_HEADS, generator=gen) * 2)
        model.sparsity_lambdas.copy_(torch.tensor([0.7, 1.3]))
    ids = torch.randint(3, 128, (3, 2, SEQ_LEN), generator=gen)  # 3 batches of 2 sequences
    labels = ids.clone()
    labels[:, 0, :5] = -100  # a prompt without loss
    # One packed row of 3 documents (positions restart; no loss on a document's first token).
    cu = torch.tensor([0, 30, 52, SEQ_LEN], dtype=torch.int32)
    lengths = cu.diff().long()
    packed_positions = torch.arange(SEQ_LEN) - torch.repeat_interleave(cu[:-1].long(), lengths)
    packed_labels = ids[0, :1].clone()
    packed_labels[0, cu[:-1].long()] = -100
    L = 64
    return {
        "llama_state": model.state_dict(), "ids": ids, "labels": labels, "packed_cu": cu,
        "packed_positions": packed_positions[None], "packed_labels": packed_labels,
        "q": torch.randn(2, HEADS, L, HEAD_DIM, generator=gen), "k": torch.randn(2, KV_HEADS, L, HEAD_DIM, generator=gen),
        "v": torch.randn(2, KV_HEADS, L, HEAD_DIM, generator=gen), "gate_logit": torch.randn(KV_HEADS, generator=gen),
        "out_weight": torch.randn(2, HEADS, L, HEAD_DIM, generator=gen),
        "a2a": torch.randn(2, HEADS, 8, 3, generator=gen), "a2a_weight": torch.randn(2, HEADS, 8, 3, generator=gen),
    }


def llama_loss(model, ids, labels, **inputs):
    """One process: logits, mean token loss (HF's shift) + Lagrangian on every gate."""
    logits = model(input_ids=ids, use_cache=False, **inputs).logits
    lm = F.cross_entropy(logits.flatten(0, 1), shift_labels(labels).flatten(), ignore_index=-100)
    return logits, lm + lagrangian(torch.cat(layer_z(model)), model.sparsity_lambdas)


# --------------------------------------------------------------------------------------------
# Worker side (python tests/test_sequence_parallel.py worker RANK WORLD DIR)
# --------------------------------------------------------------------------------------------


def scenario_collectives(cases, groups, rank):
    group, P = groups.seq_group, groups.seq_parallel_size
    from sparseattn.parallel import all_gather, all_reduce_sum, all_to_all, assert_same_across_group

    X, W = cases["a2a"], cases["a2a_weight"]
    Ls, Hs = X.shape[2] // P, X.shape[1] // P
    x = X[:, :, rank * Ls:(rank + 1) * Ls].clone().requires_grad_()
    y = all_to_all(x, group, scatter_dim=1, gather_dim=2)  # sequence shards -> head shards
    (y * W[:, rank * Hs:(rank + 1) * Hs]).sum().backward()  # the ranks' sum is (X * W).sum()
    back = all_to_all(y.detach(), group, scatter_dim=2, gather_dim=1)
    from sparseattn.parallel import gather_sequence, shard_sequence

    whole = gather_sequence(x.detach(), group, dim=2, length=X.shape[2] - 1)  # padding dropped
    own = shard_sequence(X, group, dim=2)

    a = torch.full((3,), float(rank + 1), requires_grad=True)
    total = all_reduce_sum(a, group)
    (total * torch.tensor([1.0, 2.0, 3.0])).sum().backward()

    g = torch.full((2, 3), float(rank), requires_grad=True)
    gathered = all_gather(g, group, dim=1)
    (gathered * torch.arange(6.0 * P).view(2, 3 * P)).sum().backward()

    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), float(rank + 1))
    unused = torch.nn.Parameter(torch.zeros(2))  # no .grad on odd ranks: counts as zeros
    if rank % 2 == 0:
        unused.grad = torch.ones(2)
    average_gradients([p, unused], group)

    assert_same_across_group(torch.ones(3), group, "replicated")
    try:
        assert_same_across_group(torch.full((3,), float(rank)), group, "per-rank")
        differing_raised = False
    except ValueError:
        differing_raised = True
    return {"y": y.detach(), "x_grad": x.grad, "back": back, "x": x.detach(), "whole": whole, "own": own,
            "total": total.detach(),
            "a_grad": a.grad, "gathered": gathered.detach(), "g_grad": g.grad, "avg": p.grad, "avg_unused": unused.grad,
            "differing_raised": differing_raised}


def scenario_sparsity(cases, groups, rank):
    """The Lagrangian from per-rank gate values: ours vs torch.distributed.all_gather."""
    group = groups.seq_group
    model = build_llama(cases["llama_state"])
    layers = model.model.layers
    shard = head_shard(HEADS, KV_HEADS, group)

    local = [shard.kv(torch.sigmoid(layer.self_attn.gate_logit)) for layer in layers]
    z_all = torch.cat([gather_kv_heads(z, group, KV_HEADS) for z in local])
    lagrangian(z_all, model.sparsity_lambdas).backward()
    params = [layer.self_attn.gate_logit for layer in layers] + [model.sparsity_lambdas]
    average_gradients(params, group)
    ours = {"z_all": z_all.detach(), "gate_grads": torch.stack([p.grad for p in params[:-1]]),
            "lambda_grad": model.sparsity_lambdas.grad.clone()}

    for p in params:
        p.grad = None
    plain = []
    for z in local:  # the reference trainer's collective: its outputs carry no gradient
        parts = [torch.empty_like(z) for _ in range(groups.seq_parallel_size)]
        dist.all_gather(parts, z.detach(), group=group)
        plain.append(torch.cat(parts)[::shard.kv_repeat])
    z_plain = torch.cat(plain)
    loss = lagrangian(z_plain, model.sparsity_lambdas)
    loss.backward()
    average_gradients(params, group)
    ours.update(plain_requires_grad=z_plain.requires_grad, plain_z=z_plain.detach(),
                plain_gate_grads=torch.stack([p.grad for p in params[:-1]]))
    return ours


def scenario_attention(cases, groups, rank):
    """Raw Ulysses around the gated attention; the ranks' losses sum to the one-process loss."""
    group, P = groups.seq_group, groups.seq_parallel_size
    Ls = cases["q"].shape[2] // P
    part = slice(rank * Ls, (rank + 1) * Ls)
    q, k, v = (cases[name][:, :, part].clone().requires_grad_() for name in ("q", "k", "v"))
    gate_logit = cases["gate_logit"].clone().requires_grad_()
    out = ulysses_attention(q, k, v, gated_attention, group, per_kv_head={"gate": torch.sigmoid(gate_logit)})
    (out * cases["out_weight"][:, :, part]).sum().backward()
    return {"out": out.detach(), "q_grad": q.grad, "k_grad": k.grad, "v_grad": v.grad, "gate_grad": gate_logit.grad}


def _sp_llama_step(model, groups, ids, labels, **packing):
    from sparseattn.parallel import sequence_parallel_loss

    shard = shard_batch(ids, labels, seq_parallel_rank=groups.seq_parallel_rank,
                        seq_parallel_size=groups.seq_parallel_size, **packing)
    logits = model(**shard.model_inputs()).logits
    lm = sequence_parallel_loss(logits, shard.labels, groups.seq_group)
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    z_all = torch.cat([gather_kv_heads(z, groups.seq_group, KV_HEADS) for z in layer_z(inner)])
    loss = lm + lagrangian(z_all, inner.sparsity_lambdas)
    loss.backward()
    return logits.detach(), loss.detach(), shard


def scenario_llama(cases, groups, rank):
    model = build_llama(cases["llama_state"])
    enable_sequence_parallel(model, groups.seq_group)  # inner: the model's "sp_test_gated"
    logits, loss, shard = _sp_llama_step(model, groups, cases["ids"][0], cases["labels"][0])
    average_gradients(model.parameters(), groups.seq_group)
    return {"logits": logits, "loss": loss, "start": shard.start,
            "grads": {n: p.grad for n, p in model.named_parameters()}}


def scenario_llama_packed(cases, groups, rank):
    model = build_llama(cases["llama_state"])
    enable_sequence_parallel(model, groups.seq_group)
    logits, loss, shard = _sp_llama_step(model, groups, cases["ids"][0, :1], cases["packed_labels"],
                                         position_ids=cases["packed_positions"], cu_seqlens=cases["packed_cu"])
    average_gradients(model.parameters(), groups.seq_group)
    return {"logits": logits, "loss": loss, "start": shard.start, "cu_seqlens": shard.cu_seqlens,
            "grads": {n: p.grad for n, p in model.named_parameters()}}


def scenario_llama_sparseattn(cases, groups, rank):
    """Composition with the sparseattn integration: patch() first, then sequence parallelism around it."""
    from sparseattn.integrations.transformers import patch

    model = build_llama(cases["llama_state"])
    patch(model, method="streaming", min_sparse_len=0, **STREAMING)
    enable_sequence_parallel(model, groups.seq_group)  # inner: "sparseattn"
    shard = shard_batch(cases["ids"][0], seq_parallel_rank=groups.seq_parallel_rank,
                        seq_parallel_size=groups.seq_parallel_size)
    with torch.no_grad():
        return {"logits": model(**shard.model_inputs()).logits}


def scenario_dp_sp(cases, groups, rank):
    """world 4 = 2 data-parallel replicas x 2 sequence-parallel ranks, gradients averaged by DDP."""
    groups = build_groups(2)
    model = build_llama(cases["llama_state"])
    enable_sequence_parallel(model, groups.seq_group)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    batch = 1 + groups.data_parallel_rank
    logits, loss, shard = _sp_llama_step(ddp, groups, cases["ids"][batch], cases["labels"][batch])
    return {"logits": logits, "loss": loss, "start": shard.start, "batch": batch,
            "grads": {n: p.grad for n, p in model.named_parameters()}}


SCENARIOS = {"collectives": scenario_collectives, "sparsity": scenario_sparsity, "attention": scenario_attention,
             "llama": scenario_llama, "llama_packed": scenario_llama_packed,
             "llama_sparseattn": scenario_llama_sparseattn, "dp_sp": scenario_dp_sp}
WORLD_SCENARIOS = {2: ["collectives", "sparsity", "attention", "llama", "llama_packed", "llama_sparseattn"],
                   4: ["collectives", "sparsity", "attention", "llama", "llama_packed", "llama_sparseattn", "dp_sp"]}


def worker(rank: int, world: int, directory: Path) -> None:
    """One rank: run every scenario of this world size, saving results (or the traceback) per scenario."""
    log = os.open(directory / f"log-rank{rank}.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory / 'rendezvous'}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=90))
    cases = torch.load(directory / "cases.pt")
    groups = build_groups(world)  # one sequence-parallel group of every rank
    for name in WORLD_SCENARIOS[world]:
        torch.manual_seed(1234)
        try:
            torch.save(SCENARIOS[name](cases, groups, rank), directory / f"{name}-rank{rank}.pt")
        except Exception:
            (directory / f"{name}-rank{rank}.err").write_text(traceback.format_exc())
            # Stop here: the other ranks' next collective then fails at once instead of timing out.
            os._exit(1)
        dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Test side
# --------------------------------------------------------------------------------------------


class Run:
    def __init__(self, world: int, directory: Path, log: str):
        self.world, self.directory, self.log = world, directory, log

    def results(self, name: str) -> list[dict]:
        errors = [f"--- rank {rank} ---\n{err.read_text()}" for rank in range(self.world)
                  if (err := self.directory / f"{name}-rank{rank}.err").exists()]
        if errors:  # every rank's traceback: the first failure makes the others fail too
            pytest.fail(f"scenario {name!r} failed on {self.world} processes:\n" + "\n".join(errors))
        out = []
        for rank in range(self.world):
            path = self.directory / f"{name}-rank{rank}.pt"
            if not path.exists():
                pytest.fail(f"scenario {name!r} left no result on rank {rank} of {self.world}; log:\n{self.log[-4000:]}")
            out.append(torch.load(path))
        return out


def _logs(directory: Path, world: int, exitcodes) -> str:
    return "\n".join(f"--- rank {r} (exit {code}) ---\n" + (directory / f"log-rank{r}.txt").read_text()
                     for r, code in zip(range(world), exitcodes) if (directory / f"log-rank{r}.txt").exists())


def launch_workers(world: int, directory: Path, timeout: float = RUN_TIMEOUT_S) -> str:
    """Run :func:`worker` on ``world`` processes; kill them all if any is still running after ``timeout`` s.

    The processes fork from a server that imported torch, transformers and this file once, so
    the ranks start in a fraction of a second instead of re-importing (seconds each on 2 cores).
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers", "sparseattn.parallel.transformers", __name__])
    procs = [ctx.Process(target=worker, args=(rank, world, directory), daemon=True) for rank in range(world)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(0.1, deadline - time.monotonic()))
    timed_out = [proc for proc in procs if proc.is_alive()]
    for proc in timed_out:
        proc.kill()
        proc.join()
    text = _logs(directory, world, [proc.exitcode for proc in procs])
    if timed_out:
        text = f"TIMED OUT after {timeout:.0f} s; killed {len(timed_out)} process(es)\n" + text
    return text


def launch_command(command: list[str], directory: Path, timeout: float) -> str:
    """Run ``command`` (e.g. torchrun) with a wall-clock limit; returns its output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=timeout, text=True)
        return done.stdout
    except subprocess.TimeoutExpired as exc:
        return f"TIMED OUT after {timeout:.0f} s\n{exc.stdout or ''}"


@pytest.fixture(scope="module")
def cases():
    return make_cases()


_RUNS: dict[int, Run] = {}


def get_run(world: int, cases, tmp_path_factory) -> Run:
    """The results of every scenario for ``world`` processes (launched once per test session)."""
    if world not in _RUNS:
        directory = tmp_path_factory.mktemp(f"sp-world{world}")
        torch.save(cases, directory / "cases.pt")
        _RUNS[world] = Run(world, directory, launch_workers(world, directory))
    return _RUNS[world]


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def run(request, cases, tmp_path_factory):
    return get_run(request.param, cases, tmp_path_factory)


@pytest.fixture(scope="module")
def run4(cases, tmp_path_factory):
    return get_run(4, cases, tmp_path_factory)


def close(actual, expected, name, rtol=5e-5):
    """fp32 agreement: 5e-5 relative per element, with an absolute floor at 2e-6 of the largest value.
    The sums run in another order; the largest difference seen here is 5e-6 relative (a gate
    gradient), and a wrong shard, shift or reduction is off by O(1)."""
    atol = 2e-6 * float(expected.abs().max()) + 1e-9
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def test_collectives_and_their_gradients(run, cases):
    P = run.world
    X, W = cases["a2a"], cases["a2a_weight"]
    Ls, Hs = X.shape[2] // P, X.shape[1] // P
    for rank, res in enumerate(run.results("collectives")):
        assert torch.equal(res["y"], X[:, rank * Hs:(rank + 1) * Hs])  # whole sequence of this rank's heads
        assert torch.equal(res["back"], res["x"])  # the reverse all-to-all undoes it
        assert torch.equal(res["whole"], X[:, :, :-1]) and torch.equal(res["own"], res["x"])
        assert torch.equal(res["x_grad"], W[:, :, rank * Ls:(rank + 1) * Ls])  # d(sum X*W)/dX, this shard
        assert torch.equal(res["total"], torch.full((3,), P * (P + 1) / 2))
        assert torch.equal(res["a_grad"], P * torch.tensor([1.0, 2.0, 3.0]))  # adjoint: the ranks' sum
        expected = torch.arange(float(P)).repeat_interleave(3).expand(2, -1)
        assert torch.equal(res["gathered"], expected)
        weight = torch.arange(6.0 * P).view(2, 3 * P)[:, rank * 3:(rank + 1) * 3]
        assert torch.equal(res["g_grad"], P * weight)  # reduce-scatter of P identical gradients
        assert torch.equal(res["avg"], torch.full((4,), (P + 1) / 2))
        assert torch.equal(res["avg_unused"], torch.full((2,), float((P + 1) // 2) / P))
        assert res["differing_raised"]


def single_process_lagrangian(cases):
    model = build_llama(cases["llama_state"])
    layers = model.model.layers
    z_all = torch.cat([torch.sigmoid(layer.self_attn.gate_logit) for layer in layers])
    lagrangian(z_all, model.sparsity_lambdas).backward()
    return z_all.detach(), torch.stack([layer.self_attn.gate_logit.grad for layer in layers]), \
        model.sparsity_lambdas.grad


def test_sparsity_reduction_keeps_gate_gradients(run, cases):
    z_ref, gate_ref, lambda_ref = single_process_lagrangian(cases)
    assert gate_ref.abs().min() > 1e-3  # the Lagrangian does reach every gate
    for res in run.results("sparsity"):
        close(res["z_all"], z_ref, "gathered z")
        close(res["gate_grads"], gate_ref, "gate gradients")
        close(res["lambda_grad"], lambda_ref, "lambda gradients")
        # torch.distributed.all_gather: the same values, but the gates get no gradient from the statistic.
        close(res["plain_z"], z_ref, "plain all_gather z")
        assert not res["plain_requires_grad"]
        assert torch.equal(res["plain_gate_grads"], torch.zeros_like(gate_ref))


def test_ulysses_gated_attention_matches_one_process(run, cases):
    q, k, v = (cases[name].clone().requires_grad_() for name in ("q", "k", "v"))
    gate_logit = cases["gate_logit"].clone().requires_grad_()
    ref = gated_attention(q, k, v, torch.sigmoid(gate_logit))
    (ref * cases["out_weight"]).sum().backward()
    streaming_only = gated_attention(q, k, v, torch.zeros(KV_HEADS))
    assert (streaming_only - ref).abs().max() > 1e-2  # the gate matters: streaming drops keys here

    results = run.results("attention")
    close(torch.cat([r["out"] for r in results], dim=2), ref.detach(), "output")
    for name, expected in (("q_grad", q.grad), ("k_grad", k.grad), ("v_grad", v.grad)):
        close(torch.cat([r[name] for r in results], dim=2), expected, name)
    close(sum(r["gate_grad"] for r in results), gate_logit.grad, "gate gradient (summed over ranks)")


def single_process_llama(cases, batch, packed=False):
    model = build_llama(cases["llama_state"])
    if packed:
        cu = cases["packed_cu"]
        logits, loss = llama_loss(model, cases["ids"][0, :1], cases["packed_labels"],
                                  position_ids=cases["packed_positions"], cu_seq_lens_q=cu)
    else:
        logits, loss = llama_loss(model, cases["ids"][batch], cases["labels"][batch])
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def check_llama(results, ref_logits, ref_loss, ref_grads, P):
    local = results[0]["logits"].shape[1]
    assert local == -(-SEQ_LEN // P)  # padded to a multiple of P, then split
    logits = torch.cat([r["logits"] for r in results], dim=1)[:, :SEQ_LEN]
    close(logits, ref_logits, "logits")
    assert [r["start"] for r in results] == [rank * local for rank in range(P)]
    for res in results:
        close(res["loss"], ref_loss, "loss")
        assert set(res["grads"]) == set(ref_grads)
        for name, expected in ref_grads.items():
            close(res["grads"][name], expected, f"gradient of {name}")


def test_llama_sequence_parallel_matches_one_process(run, cases):
    ref_logits, ref_loss, ref_grads = single_process_llama(cases, 0)
    assert all(g is not None and g.abs().max() > 0 for g in ref_grads.values())
    check_llama(run.results("llama"), ref_logits, ref_loss, ref_grads, run.world)


def test_packed_row_matches_one_process(run, cases):
    ref_logits, ref_loss, ref_grads = single_process_llama(cases, 0, packed=True)
    plain_logits, _, _ = single_process_llama(cases, 0)
    assert (plain_logits[:1] - ref_logits).abs().max() > 1e-3  # the document boundaries matter
    results = run.results("llama_packed")
    padded = -(-SEQ_LEN // run.world) * run.world
    expected_cu = [0, 30, 52, SEQ_LEN] + ([padded] if padded > SEQ_LEN else [])
    assert all(r["cu_seqlens"].tolist() == expected_cu for r in results)  # the whole row's, padding a document
    check_llama(results, ref_logits, ref_loss, ref_grads, run.world)


def test_llama_with_sparseattn_patch_inside(run, cases):
    from sparseattn.integrations.transformers import patch

    model = build_llama(cases["llama_state"])
    ids = cases["ids"][0]
    with torch.no_grad():
        dense = model(input_ids=ids, use_cache=False).logits
        with patch(model, method="streaming", min_sparse_len=0, **STREAMING) as handle:
            ref = model(input_ids=ids, use_cache=False).logits
    assert handle.counts["sparse"] == LLAMA["num_hidden_layers"]
    assert (ref - dense).abs().max() > 1e-3  # streaming drops keys at this length
    logits = torch.cat([r["logits"] for r in run.results("llama_sparseattn")], dim=1)[:, :SEQ_LEN]
    close(logits, ref, "logits")


def test_data_parallel_times_sequence_parallel(run4, cases):
    results = run4.results("dp_sp")
    refs = [single_process_llama(cases, batch) for batch in (1, 2)]
    mean_grads = {name: (refs[0][2][name] + refs[1][2][name]) / 2 for name in refs[0][2]}
    assert [r["batch"] for r in results] == [1, 1, 2, 2]  # SP groups: ranks {0, 1} and {2, 3}
    for replica in range(2):
        logits, loss, _ = refs[replica]
        check_llama(results[2 * replica:2 * replica + 2], logits, loss, mean_grads, 2)


# --------------------------------------------------------------------------------------------
# One process: layout, validation, sharding, the Hugging Face plumbing
# --------------------------------------------------------------------------------------------


def test_group_layout():
    assert group_layout(8, 4) == ([[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 4], [1, 5], [2, 6], [3, 7]])
    assert group_layout(4, 1) == ([[0], [1], [2], [3]], [[0, 1, 2, 3]])
    assert group_layout(4, 4) == ([[0, 1, 2, 3]], [[0], [1], [2], [3]])
    with pytest.raises(ValueError, match=r"seq_parallel_size \(3\) must divide the world size \(4\).*\[1, 2, 4\]"):
        check_seq_parallel_size(3, 4)
    with pytest.raises(ValueError, match="seq_parallel_size must be an int >= 1"):
        check_seq_parallel_size(0, 4)
    groups = build_groups(1)  # no torch.distributed: one process
    assert (groups.world_size, groups.seq_parallel_size, groups.seq_group) == (1, 1, None)
    with pytest.raises(ValueError, match="must divide the world size"):
        build_groups(2)


@pytest.mark.parametrize("heads,kv_heads,P,match", [
    pytest.param(4, 2, 3, "must divide 4", id="query-heads"),
    pytest.param(12, 3, 2, "cannot be split over 2 ranks", id="kv-heads"),
    pytest.param(9, 3, 3, None, id="smollm2-P3"),
    pytest.param(4, 2, 4, None, id="repeat-kv"),
])
def test_check_heads(heads, kv_heads, P, match):
    if match is None:
        check_heads(heads, kv_heads, P)
    else:
        with pytest.raises(ValueError, match=match):
            check_heads(heads, kv_heads, P)


def test_head_shard_slices_per_head_parameters():
    gate = torch.arange(2.0)
    shard = head_shard(4, 2, None)
    assert shard.q_heads == slice(0, 4) and torch.equal(shard.kv(gate), gate)
    with pytest.raises(ValueError, match="per-KV-head tensor must have 2 entries"):
        shard.kv(torch.zeros(4))


def test_shard_batch_shifts_before_cutting_and_pads():
    ids = torch.arange(100, 107)[None].repeat(2, 1)  # 7 tokens
    labels = ids.clone()
    labels[1, :3] = -100
    shards = [shard_batch(ids, labels, seq_parallel_rank=r, seq_parallel_size=4, pad_token_id=1) for r in range(4)]
    assert all(s.padded_len == 8 and s.seq_len == 7 for s in shards)
    cat = lambda name: torch.cat([getattr(s, name) for s in shards], dim=1)
    assert cat("input_ids").tolist() == [[100, 101, 102, 103, 104, 105, 106, 1]] * 2
    assert cat("position_ids").tolist() == [list(range(8))] * 2
    # Each shard's last label is the next shard's first token, not lost at the cut.
    assert cat("labels").tolist() == [[101, 102, 103, 104, 105, 106, -100, -100],
                                      [-100, -100, 103, 104, 105, 106, -100, -100]]
    assert [s.start for s in shards] == [0, 2, 4, 6]


def test_shard_batch_right_padding_only():
    ids = torch.arange(6)[None]
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    shard = shard_batch(ids, attention_mask=mask, seq_parallel_rank=0, seq_parallel_size=1)
    assert shard.labels.tolist() == [[1, 2, 3, -100, -100, -100]]
    with pytest.raises(ValueError, match="right padding only"):
        shard_batch(ids, attention_mask=mask.flip(1), seq_parallel_rank=0, seq_parallel_size=1)
    with pytest.raises(ValueError, match=r"seq_parallel_rank must be an int in \[0, 2\)"):
        shard_batch(ids, seq_parallel_rank=2, seq_parallel_size=2)


def test_enable_sequence_parallel_one_process_is_the_inner_attention(cases):
    model = build_llama(cases["llama_state"])
    ids = cases["ids"][0]
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        with enable_sequence_parallel(model, None) as handle:
            assert model.config._attn_implementation == "sparseattn_ulysses" and handle.inner == "sp_test_gated"
            out = model(input_ids=ids, use_cache=False).logits
            with pytest.raises(ValueError, match="padding attention_mask"):
                model(input_ids=ids, attention_mask=torch.ones_like(ids).tril(), use_cache=False)
            with pytest.raises(ValueError, match="holds positions 0..76, but the model got position_ids starting at 5"):
                model(input_ids=ids, position_ids=torch.arange(5, 5 + SEQ_LEN)[None], use_cache=False)
            with pytest.raises(ValueError, match="cu_seq_lens_q for a packed row"):  # restarting positions alone
                model(input_ids=ids[:1], position_ids=cases["packed_positions"], use_cache=False)
    assert model.config._attn_implementation == "sp_test_gated"
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    with enable_sequence_parallel(model, None, inner="sdpa"), pytest.raises(ValueError, match="ignores cu_seq_lens_q"):
        model(input_ids=ids[:1], position_ids=cases["packed_positions"], cu_seq_lens_q=cases["packed_cu"],
              use_cache=False)
    with pytest.raises(ValueError, match="needs a materialized causal mask"):
        enable_sequence_parallel(model, None, inner="eager")


@pytest.mark.parametrize("name", ["groups", "sharding", "ulysses", "transformers"])
def test_docstring_examples(name):
    module = importlib.import_module(f"sparseattn.parallel.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


def test_benchmark_runs_under_torchrun_on_cpu(tmp_path):
    out = tmp_path / "sp.json"
    log = launch_command([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(ROOT / "benchmarks" / "sp_scaling.py"), "--preset", "tiny", "--seq-len", "70",
                          "--seq-parallel-sizes", "1", "2", "--steps", "2", "--warmup", "1", "--out", str(out)],
                         tmp_path, timeout=180)
    assert out.exists(), log[-4000:]
    report = json.loads(out.read_text())
    rows = {row["seq_parallel_size"]: row for row in report["results"]}
    assert set(rows) == {1, 2} and report["world_size"] == 2 and report["device"] == "cpu"
    assert rows[2]["data_parallel_size"] == 1 and rows[1]["data_parallel_size"] == 2
    for row in rows.values():
        assert row["status"] == "ok" and row["tokens_per_s_per_gpu"] > 0 and row["step_s"] > 0
    # The same sequence and weights: sequence parallelism changes the speed, not the loss.
    assert abs(rows[1]["loss"] - rows[2]["loss"]) < 1e-4 * abs(rows[1]["loss"])

