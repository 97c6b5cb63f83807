"""Where a memory-bounded MInference call spends its time: the selection's host and GPU time, per
chunk and unchunked, and the call end to end with packed or uniform head chunks (run 21c: the
default config's 8 chunk selections took 43 ms standalone against 5 ms for one unchunked
selection; a seed-L table got 13% slower end to end with packed chunks).

128K, B=1, GQA 32/8, D=128, bf16, LLM-like input (seed 1). For each config: its chunk bounds
(packed and uniform), ``time_ms`` of the call (both), of ``selection_chunks`` and of one unchunked
selection; ``host_ms`` of the selection (the host's time to queue it while the GPU sleeps: a host
sync inside would read as the sleep, ~1 s); torch.profiler's top self-CPU ops of one chunked
selection of the default config.

    python benchmarks/profile_minference_call.py --out /tmp/out/minference-call-profile.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparseattn import api  # noqa: E402
from sparseattn.api import selection_chunks, sparse_attention  # noqa: E402
from sparseattn.bench.inputs import llm_like_qkv  # noqa: E402
from sparseattn.bench.timing import host_ms, machine_record, time_ms  # noqa: E402
from sparseattn.methods import get_method  # noqa: E402
from sparseattn.methods.minference import MInferenceConfig  # noqa: E402

BS32, BS64, VS1024 = ("block_sparse", 32, 0), ("block_sparse", 64, 0), ("vertical_and_slash", 1024, 1024)
CONFIGS = {
    "1000 / 6096 (default)": MInferenceConfig(),
    "512 / 512": MInferenceConfig(vertical_size=512, slash_size=512),
    "block-sparse top 64": MInferenceConfig(pattern="block_sparse", top_k=64),
    # Like seed L's layer-mean-0.9 table: two wide vertical-slash heads in KV head 3.
    "seed-L-like mix": MInferenceConfig(head_patterns=(BS32,) * 13 + (VS1024,) * 2 + (BS64,) * 17),
    # Like seed 1's: four narrow vertical-slash heads over KV heads 1 and 4.
    "seed-1-like mix": MInferenceConfig(head_patterns=(BS64,) * 6 + (("vertical_and_slash", 128, 128),) * 2
                                        + (BS64,) * 8 + (("vertical_and_slash", 128, 128),) * 2 + (BS64,) * 2
                                        + (("block_sparse", 128, 0),) * 4 + (("block_sparse", 16, 0),) * 4
                                        + (("block_sparse", 256, 0),) * 4),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=131072)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    q, k, v = llm_like_qkv(1, 32, 8, args.length, 128, seed=args.seed)
    spec = get_method("minference")
    record = {"machine": machine_record(), "L": args.length, "seed": args.seed, "configs": {}}
    dense = time_ms(lambda: sparse_attention(q, k, v, method="full"))["ms"]
    record["full_ms"] = dense
    print(f"full (dense) {dense:.2f} ms", flush=True)
    for name, cfg in CONFIGS.items():
        row = {}
        per = api.kv_heads_per_chunk(spec, cfg, q, k, v)
        row["uniform_bounds"] = [(g, min(8, g + per)) for g in range(0, 8, per)]
        row["packed_bounds"] = api.packed_chunk_bounds(spec, cfg, q, k, v) if per < 8 else [(0, 8)]
        chunks = lambda: [None for _ in selection_chunks(q, k, v, "minference", cfg)]  # noqa: E731
        row["select_chunks_ms"] = time_ms(chunks)["ms"]
        row["select_chunks_host_ms"] = host_ms(chunks, iters=2)
        whole = lambda: spec.select(q, k, cfg, causal=True)  # noqa: E731
        row["select_whole_ms"] = time_ms(whole)["ms"]
        row["select_whole_host_ms"] = host_ms(whole, iters=2)
        for pack in (True, False):
            api.PACK_CHUNKS = pack
            t = time_ms(lambda: sparse_attention(q, k, v, method="minference", config=cfg))
            row["e2e_packed_ms" if pack else "e2e_uniform_ms"] = t["ms"]
            row["peak_beyond_output_mib_" + ("packed" if pack else "uniform")] = t["peak_mib"] - q.numel() * 2 / 2**20
        api.PACK_CHUNKS = True
        record["configs"][name] = row
        print(f"{name}: bounds {row['packed_bounds']} (uniform {row['uniform_bounds']}); e2e packed "
              f"{row['e2e_packed_ms']:.2f} / uniform {row['e2e_uniform_ms']:.2f} ms; select chunks "
              f"{row['select_chunks_ms']:.2f} ms (host {row['select_chunks_host_ms']:.2f}), whole "
              f"{row['select_whole_ms']:.2f} ms (host {row['select_whole_host_ms']:.2f})", flush=True)
        torch.cuda.empty_cache()
    cfg = CONFIGS["1000 / 6096 (default)"]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        [None for _ in selection_chunks(q, k, v, "minference", cfg)]
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    record["profile_default_chunks"] = table
    print(table)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
