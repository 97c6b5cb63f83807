"""benchmarks/count_select_launches.py: a selection's launches counted on meta tensors, nothing run."""

import importlib.util
from pathlib import Path

from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

import sparseattn.kernels.minference_index as MI
import sparseattn.methods.minference as M
from sparseattn.methods.minference import MInferenceConfig

ROOT = Path(__file__).resolve().parents[1]


def load():
    spec = importlib.util.spec_from_file_location("count_select_launches",
                                                  ROOT / "benchmarks" / "count_select_launches.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_counts_a_mix_as_on_cuda_and_restores_the_module():
    mod = load()
    saved = JITFunction.run, InterpretedFunction.run, MI._backend, M.SELECT_BACKEND
    patterns = ((("vertical_and_slash", 64, 128),) * 2 + (("block_sparse", 8, 0),) * 3 + (("a_shape", 64, 256),)
                + (("block_sparse", 4, 0),) * 2)
    got = mod.count(MInferenceConfig(head_patterns=patterns), length=8192, heads=8, kv_heads=4, head_dim=64)
    assert got["chunks"] == [(0, 4)]  # 8K: under the budget's floor, one chunk
    # The vertical-slash heads' estimation and tables (4 kernels), their rows filled once, and the five
    # block-sparse heads' pooled scores in one bmm (8K: 16K scores a head) and one top-k launch.
    assert got["triton"] == {"_row_lse_kernel": 1, "_vertical_slash_sums_kernel": 1, "_cluster_scan_kernel": 1,
                             "_cluster_lookup_kernel": 1, "_fill_index_kernel": 1, "_block_top_k_kernel": 1}
    assert got["torch_ops"]["bmm"] == 1 and got["torch_op_count"] > 20
    assert (JITFunction.run, InterpretedFunction.run, MI._backend, M.SELECT_BACKEND) == saved
