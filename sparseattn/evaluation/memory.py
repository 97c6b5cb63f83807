"""``sparseattn memory``: peak memory of a whole-model prefill with eager, SDPA and each sparse method.

One prefill (``model(input_ids, use_cache=True, logits_to_keep=1)``, the forward that builds the
KV cache) per implementation and length, on the same ids, after one untimed warm-up prefill (kernel
compilation, autotuning and one-time buffers are not the prefill's). Measured:

- on a CUDA GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  the memory allocated before the call (the weights): the prefill's own peak, in bytes, exact for
  PyTorch's caching allocator (cuDNN's workspace included; memory Triton or a library takes outside
  it is not seen);
- on a CPU: every allocation and free of PyTorch's CPU allocator during the call, in order, as
  ``torch.profiler`` traces them (``profile_memory=True``); the peak of their running sum is the
  prefill's peak tensor memory, exact and independent of what the C allocator and the OS keep
  resident (the process's resident set is not: freed pages stay resident or not at glibc's whim);
- elsewhere (no such trace): not measured (``None``), and the result says why.

``reduction_vs`` in each row is ``1 - peak / baseline_peak`` against ``eager`` and ``sdpa``: the
answer to "how much less memory than traditional attention", with the baseline named. Eager
attention materializes every layer's `[B, H, L, L]` scores; SDPA (FlashAttention / cuDNN /
memory-efficient kernels) does not, so most of a sparse method's saving against eager is
already there with SDPA.
"""

from __future__ import annotations

import functools
import gc
from typing import Any, Iterable, Mapping

import torch

__all__ = ["BASELINES", "memory_table", "peak_prefill_memory", "run_memory"]

BASELINES = ("eager", "sdpa")


def _traced_peak(run) -> int:
    """Peak of the running sum of PyTorch's CPU allocations and frees while ``run()`` runs (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def measurement_kind(device: torch.device) -> tuple[str | None, str]:
    """``(kind, note)``: how peak memory is measured on ``device``, or ``(None, why not)``."""
    if device.type == "cuda":
        return "cuda_max_memory_allocated", "torch.cuda.max_memory_allocated minus the allocation before the prefill"
    if device.type == "cpu":
        return _cpu_measurement_kind()
    return None, f"no peak-memory counter for device {device}"


@functools.lru_cache(maxsize=1)
def _cpu_measurement_kind() -> tuple[str | None, str]:
    """Whether this torch's profiler traces CPU allocations (probed once)."""
    try:
        if _traced_peak(lambda: torch.empty(1 << 16, dtype=torch.uint8)) < 1 << 16:
            return None, "torch.profiler traced no CPU allocation here"
    except (AttributeError, RuntimeError) as err:
        return None, f"torch.profiler cannot trace CPU allocations in this torch ({err})"
    return "torch_profiler_cpu", ("peak of PyTorch's CPU tensor allocations, traced by torch.profiler "
                                  "(profile_memory=True)")


@torch.no_grad()
def _prefill(model, ids, implementation, options, min_sparse_len) -> float | None:
    """One prefill with ``implementation``; the mean density of its sparse calls (None for a baseline)."""
    from ..integrations.transformers import patch

    def run():
        model(input_ids=ids, use_cache=True, logits_to_keep=1)  # the output is dropped at once
        if ids.device.type == "cuda":
            torch.cuda.synchronize(ids.device)

    if implementation in BASELINES:
        previous = model.config._attn_implementation
        model.set_attn_implementation(implementation)
        try:
            run()
        finally:
            model.set_attn_implementation(previous)
        return None
    with patch(model, method=implementation, min_sparse_len=min_sparse_len, collect_stats=True,
               **dict(options or {})) as handle:
        run()
        sparse = [s.density.mean().item() for s in handle.stats if s.reason == "sparse"]
    return sum(sparse) / len(sparse) if sparse else None


@torch.no_grad()
def peak_prefill_memory(model, input_ids: torch.Tensor, implementation: str, *,
                        options: Mapping[str, Any] | None = None, min_sparse_len: int = 0) -> dict[str, Any]:
    """Peak memory of one prefill of ``input_ids [1, L]`` with ``implementation``.

    Args:
        model: a causal LM on its device.
        input_ids: `[1, L]` token ids.
        implementation: ``"eager"``, ``"sdpa"``, or a sparse method's name (through ``patch``).
        options: the sparse method's options.
        min_sparse_len: the sparse route's crossover (default 0: every prefill call sparse).

    Returns:
        ``{"implementation", "length", "peak_bytes" (None if not measurable), "measure", "density"}``.
    """
    device = next(model.parameters()).device
    kind, _ = measurement_kind(device)
    ids = input_ids.to(device)
    _prefill(model, ids, implementation, options, min_sparse_len)  # warm-up, not measured
    gc.collect()
    density = None

    def measured():
        nonlocal density
        density = _prefill(model, ids, implementation, options, min_sparse_len)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        measured()
        peak = torch.cuda.max_memory_allocated(device) - before
    elif kind is not None:
        peak = _traced_peak(measured)
    else:
        measured()
        peak = None
    return {"implementation": implementation, "length": int(ids.shape[1]), "peak_bytes": peak, "measure": kind,
            "density": density}


def run_memory(model, tokenizer, *, lengths: Iterable[int], methods: Mapping[str, Mapping[str, Any]],
               min_sparse_len: int = 0, progress=None) -> dict[str, Any]:
    """Peak prefill memory of eager, SDPA and each method at each length, on standard-library text."""
    from .haystack import haystack_ids

    device = next(model.parameters()).device
    kind, note = measurement_kind(device)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "measure": kind, "note": note,
              "min_sparse_len": min_sparse_len, "methods": {m: dict(o) for m, o in methods.items()}, "rows": []}
    for length in lengths:
        ids = torch.tensor([haystack_ids(tokenizer, "stdlib", length)[:length]])
        rows = []
        for name in [*BASELINES, *methods]:
            row = peak_prefill_memory(model, ids, name, options=methods.get(name), min_sparse_len=min_sparse_len)
            rows.append(row)
            if progress:
                shown = "not measured" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**20:.1f} MiB"
                progress(f"{length} tokens, {name}: {shown}")
        for row in rows:
            row["reduction_vs"] = {}
            for base in BASELINES:
                ref = next(r["peak_bytes"] for r in rows if r["implementation"] == base)
                mine = row["peak_bytes"]
                row["reduction_vs"][base] = None if mine is None or not ref else 1 - mine / ref
        result["rows"] += rows
    return result


def memory_table(result: dict[str, Any]) -> str:
    """Markdown: peak prefill memory per length and implementation, and the reduction against each baseline."""
    lines = [f"Peak memory of one whole-model prefill on {result['device']} ({result['dtype']}): "
             f"{result['note']}.", "",
             "| length | implementation | density | peak (MiB) | vs eager | vs sdpa |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f}"
        red = {b: "-" if r["reduction_vs"][b] is None else f"{-100 * r['reduction_vs'][b] + 0.0:+.1f}%" for b in BASELINES}
        density = "-" if r["density"] is None else f"{100 * r['density']:.1f}%"
        lines.append(f"| {r['length']} | {r['implementation']} | {density} | {peak} | {red['eager']} | {red['sdpa']} |")
    lines += ["", "vs eager / vs sdpa: change of the peak against that baseline (negative = less memory)."]
    return "\n".join(lines)
