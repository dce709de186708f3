"""How K/V blocks reach each context-parallel rank: one all-gather, or a ring of point-to-point
transfers whose next block is in flight while the current one is attended.

All-gather is one collective and the cheapest for short sequences, but every rank then holds every
rank's K/V; the ring holds two blocks at a time. ``choose`` picks the ring once the gathered K/V
would exceed ``GATHER_LIMIT_BYTES``; ``ATTNOPT_CP_EXCHANGE`` (or ``set_kv_exchange``) forces one.
Backward sends each block's dK/dV accumulator around the ring with its K/V, as torch's ring
attention does, or reduce-scatters the gathered gradients.
"""
from __future__ import annotations

import os
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor

# torch 2.13 renamed these (the old names warn there); older torch has only the old ones.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

RING, ALL_GATHER = "ring", "allgather"
GATHER_LIMIT_BYTES = 64 << 20
_ENV = "ATTNOPT_CP_EXCHANGE"
_forced: Optional[str] = None


def set_kv_exchange(method: Optional[str]) -> None:
    """Force "ring" or "allgather" for context-parallel attention; None goes back to ``choose``'s rule."""
    if method not in (None, RING, ALL_GATHER):
        raise ValueError(f"K/V exchange must be {RING!r}, {ALL_GATHER!r} or None, got {method!r}")
    global _forced
    _forced = method


def choose(kv_bytes_per_rank: int, world: int) -> str:
    """The exchange for one call: forced by ``set_kv_exchange`` or ``ATTNOPT_CP_EXCHANGE`` (ring,
    allgather, auto), else all-gather while the gathered K/V stays within ``GATHER_LIMIT_BYTES``."""
    forced = _forced or os.environ.get(_ENV, "auto")
    if forced in (RING, ALL_GATHER):
        return forced
    if forced != "auto":
        raise ValueError(f"{_ENV} must be {RING!r}, {ALL_GATHER!r} or 'auto', got {forced!r}")
    return ALL_GATHER if kv_bytes_per_rank * world <= GATHER_LIMIT_BYTES else RING


def _neighbours(group: dist.ProcessGroup) -> tuple[int, int, int, int]:
    rank, world = group.rank(), group.size()
    return (rank, world, dist.get_global_rank(group, (rank + 1) % world),
            dist.get_global_rank(group, (rank - 1) % world))


def _shift(send: Tensor, group: dist.ProcessGroup, tag: int) -> tuple[Tensor, list]:
    """Start sending ``send`` to the next rank and receiving the previous rank's into a new buffer."""
    _, _, nxt, prev = _neighbours(group)
    recv = torch.empty_like(send)
    works = dist.batch_isend_irecv([dist.P2POp(dist.isend, send, nxt, group, tag),
                                    dist.P2POp(dist.irecv, recv, prev, group, tag)])
    return recv, works


def _wait(works: list) -> None:
    for w in works:
        w.wait()


def blocks(kv: Tensor, group: dist.ProcessGroup, method: str) -> Iterator[tuple[int, Tensor]]:
    """(source rank, its flat K/V) for every rank, this rank's first; with the ring, the next block
    travels while the caller works on the one yielded."""
    rank, world, _, _ = _neighbours(group)
    if method == ALL_GATHER:
        gathered = kv.new_empty(world * kv.numel())
        _all_gather(gathered, kv, group=group)
        for i in range(world):
            src = (rank - i) % world
            yield src, gathered[src * kv.numel():(src + 1) * kv.numel()]
        return
    for i in range(world):
        works = []
        if i < world - 1:
            nxt, works = _shift(kv, group, tag=0)
        yield (rank - i) % world, kv
        if works:
            _wait(works)
            kv = nxt


class BlocksWithGrads:
    """Iterates as ``blocks``, with a zeroed buffer per block into which the caller adds this rank's
    share of that block's flat dK/dV; once the iteration ends, ``grad`` is this rank's own block's
    gradient summed over every rank."""

    def __init__(self, kv: Tensor, group: dist.ProcessGroup, method: str, grad_dtype: torch.dtype):
        self.kv, self.group, self.method, self.grad_dtype = kv, group, method, grad_dtype
        self.grad: Optional[Tensor] = None

    def __iter__(self) -> Iterator[tuple[int, Tensor, Tensor]]:
        world = self.group.size()
        if self.method == ALL_GATHER:
            grads = torch.zeros(world * self.kv.numel(), dtype=self.grad_dtype, device=self.kv.device)
            for src, kv in blocks(self.kv, self.group, ALL_GATHER):
                yield src, kv, grads[src * kv.numel():(src + 1) * kv.numel()]
            self.grad = grads.new_empty(self.kv.numel())
            _reduce_scatter(self.grad, grads, group=self.group)
            return
        passing: Optional[tuple[Tensor, list]] = None  # the previous block's accumulator, in flight
        for src, kv in blocks(self.kv, self.group, RING):
            mine = torch.zeros(kv.numel(), dtype=self.grad_dtype, device=kv.device)
            yield src, kv, mine
            if passing is not None:
                received, works = passing
                _wait(works)
                mine += received
            passing = _shift(mine, self.group, tag=1) if world > 1 else (mine, [])
        received, works = passing
        _wait(works)
        self.grad = received
