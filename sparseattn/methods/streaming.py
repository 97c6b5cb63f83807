"""Streaming attention (A-shape): a sink of the first tokens plus a local window, exact."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..index import BlockIndex
from ..reference.streaming import streaming_select
from ..validation import check_block_size, check_positive_int
from . import register_method


@dataclass(frozen=True)
class StreamingConfig:
    """Options of streaming attention.

    Args:
        sink: first tokens every query attends to (default 128).
        window: most recent tokens every query attends to (default 1024).
        block_size: selection block (default 64); block-granular, so a query may see up to one
            block more than ``sink``/``window`` tokens.
    """

    sink: int = 128
    window: int = 1024
    block_size: int = 64

    def __post_init__(self):
        check_positive_int("sink", self.sink, allow_zero=True)
        check_positive_int("window", self.window)
        check_block_size("block_size", self.block_size)


def select_blocks(q: torch.Tensor, k: torch.Tensor, config: StreamingConfig, *, causal: bool = True) -> BlockIndex:
    """Sink + window blocks for `q [B, Hq, Lq, D]` against `k [B, Hkv, Lk, D]`."""
    B, Hq, Lq, _ = q.shape
    return streaming_select(Lq, k.shape[2], B, Hq, sink=config.sink, window=config.window,
                            block_size=config.block_size, causal=causal, device=q.device)


register_method("streaming", select_blocks, StreamingConfig, description="sink + local window (A-shape)")
