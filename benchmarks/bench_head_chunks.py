"""What the memory-bounded head chunks of ``sparse_attention`` cost (NOTES.md, run 19d).

At 128K MInference's index exceeds ``api.INDEX_BUDGET`` and ``sparse_attention`` selects and
attends one KV head's group at a time. For each config this times, on the LLM-like input (seed L):

- the whole call (budget lifted): selection, attention over the whole index, end to end;
- the chunked call: end to end, its peak memory beyond the output, and the host time to queue it
  (``host_ms``: the GPU kept busy, so a host synchronization would show as the sleep's length; so
  does a call of more launches than the ~1000-entry queue holds, as chunked MInference's eight
  selections are: its ~600 ms there is the queue, not a sync, NOTES.md run 19d);
- one chunk's selection and attention, times the number of chunks;
- whether the chunked call synchronizes with the host (``torch.cuda.set_sync_debug_mode("error")``).

    python benchmarks/bench_head_chunks.py --out /tmp/out/head-chunks.json
"""

from __future__ import annotations

import argparse
import json

import torch

from sparseattn import api, sparse_attention
from sparseattn.bench.inputs import llm_like_qkv
from sparseattn.bench.peers import DENSE_PEERS
from sparseattn.bench.timing import host_ms, machine_record, time_ms, write_json
from sparseattn.methods import get_method

CASES = {"minference default": ("minference", {}),
         "minference 512/512": ("minference", dict(vertical_size=512, slash_size=512)),
         "xattention 64-blocks": ("xattention", dict(block_size=64)),
         "headmask, half the KV heads full": ("headmask", dict(full_heads=[True, False] * 4))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--length", type=int, default=131072)
    args = parser.parse_args()
    L = args.length
    q, k, v = llm_like_qkv(1, 32, 8, L, 128, seed=L)
    G = q.shape[1] // k.shape[1]
    result = {"suite": "head_chunks", "machine": machine_record(), "length": L, "records": [],
              "cudnn_dense_ms": time_ms(DENSE_PEERS[0].make(q, k, v, True))["ms"]}
    budget = api.INDEX_BUDGET
    for label, (method, options) in CASES.items():
        spec = get_method(method)
        cfg = api.resolve_config(method, None, **options)
        per_chunk = api.kv_heads_per_chunk(spec, cfg, q, k, v)
        chunks = (len(spec.chunk_bounds(cfg, k.shape[1], per_chunk)) if spec.chunk_bounds
                  else -(-k.shape[1] // per_chunk))
        rec = {"case": label, "kv_heads_per_chunk": per_chunk, "chunks": chunks}

        api.INDEX_BUDGET = float("inf")
        index = spec.select(q, k, cfg, causal=True)
        rec["whole_select_ms"] = time_ms(lambda: spec.select(q, k, cfg, causal=True))["ms"]
        rec["whole_attend_ms"] = time_ms(lambda: api.attend(q, k, v, index))["ms"]
        index = None
        whole = time_ms(lambda: sparse_attention(q, k, v, method=method, **options))
        rec.update(whole_e2e_ms=whole["ms"], whole_peak_mib=whole["peak_mib"])
        api.INDEX_BUDGET = budget

        out_mib = q.numel() * q.element_size() / 2**20
        chunked = time_ms(lambda: sparse_attention(q, k, v, method=method, **options))
        rec.update(chunked_e2e_ms=chunked["ms"], chunked_extra_mib=chunked["peak_mib"] - out_mib,
                   whole_extra_mib=rec["whole_peak_mib"] - out_mib,
                   chunked_host_ms=host_ms(lambda: sparse_attention(q, k, v, method=method, **options), iters=2))
        qc, kc, vc = q[:, :per_chunk * G], k[:, :per_chunk], v[:, :per_chunk]
        cfg_c = spec.head_slice(cfg, 0, per_chunk * G, G) if spec.head_slice else cfg
        index = spec.select(qc, kc, cfg_c, causal=True)
        rec["chunk_select_ms_x_chunks"] = chunks * time_ms(lambda: spec.select(qc, kc, cfg_c, causal=True))["ms"]
        rec["chunk_attend_ms_x_chunks"] = chunks * time_ms(lambda: api.attend(qc, kc, vc, index))["ms"]
        index = None
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            sparse_attention(q, k, v, method=method, **options)
            rec["host_sync"] = False
        except RuntimeError as err:
            rec["host_sync"] = str(err)[:300]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        result["records"].append(rec)
        print(json.dumps(rec), flush=True)
        torch.cuda.empty_cache()
    write_json(args.out, result)
    print(f"\nDevice: {result['machine'].get('device')}; L={L}, B=1 GQA 32/8 D=128 bf16 causal, LLM-like seed L; "
          f"cuDNN {result['cudnn_dense_ms']:.2f} ms")
    print("| case | chunks | whole: select + attend / e2e ms | chunked e2e ms | chunk parts x n (select + attend) "
          "| host ms (chunked; queue-bound if ~sleep) | extra MiB whole / chunked | host sync |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["records"]:
        print(f"| {r['case']} | {r['chunks']} | {r['whole_select_ms']:.2f} + {r['whole_attend_ms']:.2f} / "
              f"{r['whole_e2e_ms']:.2f} | {r['chunked_e2e_ms']:.2f} | {r['chunk_select_ms_x_chunks']:.2f} + "
              f"{r['chunk_attend_ms_x_chunks']:.2f} | {r['chunked_host_ms']:.2f} | {r['whole_extra_mib']:.0f} / "
              f"{r['chunked_extra_mib']:.0f} | {r['host_sync']} |")


if __name__ == "__main__":
    main()
