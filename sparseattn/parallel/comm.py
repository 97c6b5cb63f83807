"""Collectives that autograd can differentiate through (NCCL and gloo).

Every backward here is the exact adjoint (transpose) of its forward as a linear map from all ranks'
inputs to all ranks' outputs: all-to-all <-> the reverse all-to-all, all-gather <-> reduce-scatter
(summing), all-reduce (sum) <-> all-reduce (sum). With adjoints, the gradients that the ranks of a
group accumulate together are the gradient of the *sum* of what the ranks back-propagate.

The convention that follows (used across ``sparseattn.parallel``): every rank of a sequence-parallel
group back-propagates the *same* global loss (made global with :func:`all_reduce_sum`), so the
summed gradient is ``P x`` the true one, and the parameter gradients are **averaged** over the group
(:func:`average_gradients`, or DDP/FSDP over the world, which average by default). A term that every
rank computes identically from replicated parameters (the Lagrangian on gate parameters held by
every rank) needs no collective at all under this convention.

A group of ``None`` means a single process: every function is then the identity.

``torch.distributed.nn.functional`` has the same adjoint backwards, but its all-to-all runs one
scatter per rank on gloo and its all-gather returns per-rank tuples; these use
``all_to_all_single`` and a concatenated result.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

__all__ = ["all_gather", "all_reduce_sum", "all_to_all", "assert_same_across_group", "average_gradients",
           "group_rank", "group_size"]


def group_size(group: dist.ProcessGroup | None) -> int:
    """Processes in ``group`` (1 for None)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    """This process's rank in ``group`` (0 for None)."""
    return 0 if group is None else dist.get_rank(group)


def _all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    size = dist.get_world_size(group)
    # [size, ...chunk]: chunk j (along scatter_dim) goes to rank j.
    send = x.unflatten(scatter_dim, (size, x.shape[scatter_dim] // size)).movedim(scatter_dim, 0).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv[j] came from rank j: concatenate along gather_dim in rank order.
    return recv.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


def all_to_all(x: torch.Tensor, group: dist.ProcessGroup | None, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split ``x`` into ``P`` chunks along ``scatter_dim``, send chunk ``j`` to rank ``j``, and
    concatenate the received chunks along ``gather_dim`` in rank order; differentiable.

    Ulysses uses it twice: sequence shards -> head shards before attention
    (``scatter_dim`` = heads, ``gather_dim`` = sequence) and back after it.

    Args:
        x: any tensor; ``x.shape[scatter_dim]`` must be a multiple of the group size, and every
            rank must pass the same shape.
        group: the process group (None: returns ``x``).
        scatter_dim, gather_dim: distinct dimensions of ``x`` (negative allowed).

    Returns:
        ``x``'s shape with ``scatter_dim`` divided and ``gather_dim`` multiplied by ``P``.
    """
    size = group_size(group)
    if size == 1:
        return x
    scatter_dim, gather_dim = scatter_dim % x.dim(), gather_dim % x.dim()
    if scatter_dim == gather_dim:
        raise ValueError(f"all_to_all: scatter_dim and gather_dim must differ, both are {scatter_dim}")
    if x.shape[scatter_dim] % size != 0:
        raise ValueError(
            f"all_to_all: dimension {scatter_dim} of shape {tuple(x.shape)} ({x.shape[scatter_dim]}) must be a "
            f"multiple of the group size ({size})"
        )
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The sum of ``x`` over the ranks of ``group`` (every rank gets it); differentiable.

    The backward sums the incoming gradients over the ranks (the adjoint), so when every rank
    back-propagates a loss built from the result, each rank's ``x`` receives the gradient of the sum
    of those losses - ``P x`` the gradient of one of them, which :func:`average_gradients` divides out.
    """
    if group_size(group) == 1:
        return x
    return _AllReduceSum.apply(x, group)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        ctx.rank, ctx.length = dist.get_rank(group), x.shape[dim]
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        # Reduce-scatter as all-reduce + own slice: gloo has no reduce-scatter on every torch we support.
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad.narrow(ctx.dim, ctx.rank * ctx.length, ctx.length), None, None


def all_gather(x: torch.Tensor, group: dist.ProcessGroup | None, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in rank order; differentiable.

    Unlike ``torch.distributed.all_gather`` (whose outputs carry no gradient: the defect of the
    reference PruLong trainer's sparsity statistic), the backward returns to each rank the sum over
    ranks of the gradient of its slice.

    Args:
        x: the same shape on every rank.
        group: the process group (None: returns ``x``).
        dim: the concatenation dimension.
    """
    if group_size(group) == 1:
        return x
    return _AllGather.apply(x, group, dim % x.dim())


@torch.no_grad()
def average_gradients(parameters: Iterable[torch.nn.Parameter], group: dist.ProcessGroup | None) -> None:
    """Average ``.grad`` of ``parameters`` over ``group`` in place (one all-reduce per dtype and device).

    Use it when the model is not wrapped in DDP/FSDP (which average over their group themselves).
    Every rank must pass the same parameters in the same order; a parameter whose ``.grad`` is None
    on this rank contributes zeros (and gets a gradient), so ranks may differ in which ones they used.
    """
    size = group_size(group)
    if size == 1:
        return
    params = [p for p in parameters if p.requires_grad]
    buckets: dict[tuple, list[torch.nn.Parameter]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for bucket in buckets.values():
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat /= size
        offset = 0
        for p in bucket:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n


@torch.no_grad()
def assert_same_across_group(tensor: torch.Tensor, group: dist.ProcessGroup | None, name: str = "tensor",
                             atol: float = 0.0) -> None:
    """Raise ValueError unless ``tensor`` is equal (within ``atol``) on every rank of ``group``.

    A debugging check for things that must be replicated, e.g. the hard-concrete noise of the gates
    (every rank that holds a KV head must sample the same ``z`` for it).
    """
    if group_size(group) == 1:
        return
    local = tensor.detach().float().contiguous()
    high, low = local.clone(), local.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    spread = (high - low).abs().max().item() if local.numel() else 0.0
    if not spread <= atol:
        raise ValueError(f"{name} differs across the ranks of the group: max spread {spread:.3g} > atol {atol:.3g}")
