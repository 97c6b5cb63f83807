"""Sequence parallelism for long-context training: Ulysses all-to-all over ``torch.distributed``.

A sequence too long for one GPU is cut into ``P`` consecutive shards, one per rank of a
sequence-parallel (SP) group; attention exchanges sequence shards for head shards (Ulysses) so
every attention function, gated or sparse, still sees whole sequences. SP groups tile the world
together with data-parallel groups (``world = DP x SP``). docs/parallel.md has the launch commands
and the recipe for a trainer; in short, per step on every rank:

    groups = build_groups(seq_parallel_size)                       # once
    enable_sequence_parallel(model, groups.seq_group)              # once, after patch()/gated attention
    shard = shard_batch(input_ids, labels, seq_parallel_rank=groups.seq_parallel_rank,
                        seq_parallel_size=groups.seq_parallel_size)
    logits = model(**shard.model_inputs()).logits
    loss = sequence_parallel_loss(logits, shard.labels, groups.seq_group) + lagrangian_term
    loss.backward()
    average_gradients(model.parameters(), None if groups.world_size == 1 else dist.group.WORLD)  # or DDP

Modules: ``groups`` (DP x SP layout), ``comm`` (differentiable collectives), ``ulysses`` (the
attention wrapper, head slicing, per-head gathers), ``sharding`` (batch split, label shift,
positions), ``loss`` (the global token mean), ``transformers`` (``attn_implementation`` for
Hugging Face models; imported lazily, as it imports transformers).
"""

from .comm import (
    all_gather,
    all_reduce_sum,
    all_to_all,
    assert_same_across_group,
    average_gradients,
    group_rank,
    group_size,
)
from .groups import ParallelGroups, build_groups, check_seq_parallel_size, group_layout, init_distributed
from .loss import sequence_parallel_loss
from .sharding import SequenceShard, gather_sequence, pad_to_multiple, shard_batch, shard_sequence, shift_labels
from .ulysses import HeadShard, check_heads, gather_heads, gather_kv_heads, head_shard, scatter_heads, ulysses_attention

__all__ = [
    "HeadShard",
    "ParallelGroups",
    "SequenceShard",
    "all_gather",
    "all_reduce_sum",
    "all_to_all",
    "assert_same_across_group",
    "average_gradients",
    "build_groups",
    "check_heads",
    "check_seq_parallel_size",
    "enable_sequence_parallel",
    "gather_heads",
    "gather_kv_heads",
    "gather_sequence",
    "group_layout",
    "group_rank",
    "group_size",
    "head_shard",
    "init_distributed",
    "pad_to_multiple",
    "scatter_heads",
    "sequence_parallel_loss",
    "shard_batch",
    "shard_sequence",
    "shift_labels",
    "ulysses_attention",
]


def __getattr__(name):
    # Lazy: it imports transformers, which the rest of this package does not need.
    if name == "enable_sequence_parallel":
        from .transformers import enable_sequence_parallel

        return enable_sequence_parallel
    raise AttributeError(f"module 'sparseattn.parallel' has no attribute {name!r}")
