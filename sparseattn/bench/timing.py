"""Timing, FLOP accounting and the machine record shared by every benchmark."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import torch


def time_ms(fn, *, min_runs: int = 5, max_runs: int = 100, budget_ms: float = 1500.0, warmup: int = 2) -> dict:
    """Median wall time of ``fn`` on the GPU with CUDA events, after warm-up.

    Runs as many times as fit ``budget_ms`` (between ``min_runs`` and ``max_runs``) and returns
    ``{"ms": median, "min": ..., "max": ..., "runs": n, "peak_mib": ...}``. ``peak_mib`` is the
    most device memory one call holds on top of what was allocated before it (its output,
    workspace and temporaries: the selection's scores, the index), from the first timed call.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    peak_mib = (torch.cuda.max_memory_allocated() - before) / 2**20
    estimate = max(start.elapsed_time(end), 1e-3)
    runs = int(min(max_runs, max(min_runs, budget_ms // estimate)))
    times = []
    for _ in range(runs):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return {"ms": statistics.median(times), "min": min(times), "max": max(times), "runs": runs, "peak_mib": peak_mib}


def kernel_us(fn, *, iters: int = 20) -> dict[str, float]:
    """Each GPU kernel's (and memset's, copy's) own time per call of ``fn`` (us), by name: the mean
    over ``iters`` calls after one warm-up, from torch.profiler with CUDA activity only (so no CPU op
    also counts its kernels' time)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return {e.key: e.self_device_time_total / iters for e in prof.key_averages() if e.self_device_time_total > 0}


def host_ms(fn, *, iters: int = 20, sleep_cycles: int = 2_000_000_000) -> float:
    """Host time to queue one call of ``fn`` (ms), with the GPU kept busy by a sleep kernel.

    No call waits for the GPU, so this is what the host spends on Python, dispatch and launches
    (a host synchronization inside ``fn`` would show up as the sleep's length). Keep ``iters``
    times the kernels per call under the ~1000-entry launch queue, or launches block.
    """
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(sleep_cycles)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    ms = (time.perf_counter() - start) * 1e3 / iters
    torch.cuda.synchronize()
    return ms


def write_json(path, record: dict) -> None:
    """Write a benchmark record to ``path`` (parent folders created), indented for diffs."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)


def causal_dense_flops(batch, q_heads, q_len, k_len, head_dim, causal=True) -> float:
    """Forward FLOPs of dense attention: ``4 B H Lq Lk D``, about half of it when causal."""
    if not causal:
        return 4.0 * batch * q_heads * q_len * k_len * head_dim
    off = k_len - q_len
    pairs = q_len * off + q_len * (q_len + 1) / 2  # allowed (query, key) pairs
    return 4.0 * batch * q_heads * pairs * head_dim


def block_flops(block_index, head_dim) -> float:
    """Forward FLOPs the kernel actually spends: ``4 D bq bk`` per kept block (partial blocks counted full)."""
    return 4.0 * head_dim * block_index.block_q * block_index.block_k * float(block_index.counts.sum().item())


def linear_fit(points) -> tuple[float, float]:
    """Least-squares ``(intercept, slope)`` of ``y = a + b x`` through ``[(x, y), ...]`` (two points at least).

    >>> linear_fit([(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)])
    (1.0, 2.0)
    """
    n = len(points)
    mx, my = sum(p[0] for p in points) / n, sum(p[1] for p in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - slope * mx, slope


def machine_record() -> dict:
    import triton

    rec = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        rec.update(device=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                   sm_count=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                   cudnn=torch.backends.cudnn.version())
    else:
        rec["device"] = "cpu"
    return rec


def device_slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower() or "cpu"
