"""Sharding packed documents for context parallel, balanced per document as TransformerEngine does.

Causal attention inside a document costs more at its end than at its start. Each document is padded
to a multiple of 2 * cp tokens and cut into 2 * cp equal pieces; rank r keeps piece r (its head) and
piece 2 * cp - 1 - r (its tail) of every document, in document order, so every rank holds the same
share of every document and of the work. The padding tokens end their document, so under a causal
band (window right 0) no real token sees them; under a band reaching right of the diagonal the last
real tokens would, so there documents must already be a multiple of 2 * cp long.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed._functional_collectives as funcol
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.experimental._context_parallel import _context_parallel_shard
from torch.distributed.tensor.experimental._context_parallel._load_balancer import _LoadBalancer


# torch 2.13 renamed it (the old name warns there); older torch has only the old one.
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


class DocumentPieces(_LoadBalancer):
    """torch's load-balancer interface for per-document head-tail pieces: rank-major order, so that
    torch's ``_context_parallel_shard`` (which cuts the reordered sequence into equal shards) hands
    rank r its head and tail piece of every document. ``cu_seqlens`` are padded offsets on the host."""

    def __init__(self, cu_seqlens: Sequence[int], world: int, device: torch.device):
        self.cu_seqlens, self.world, self.device = list(cu_seqlens), world, device

    def _generate_indices(self, restore: bool = False) -> Tensor:
        pieces = []
        for rank in range(self.world):
            for begin, end in zip(self.cu_seqlens[:-1], self.cu_seqlens[1:]):
                n = (end - begin) // (2 * self.world)
                for piece in (rank, 2 * self.world - 1 - rank):
                    pieces.append(torch.arange(begin + piece * n, begin + (piece + 1) * n, device=self.device))
        order = torch.cat(pieces)
        return (torch.argsort(order) if restore else order).unsqueeze(0)


@dataclass(frozen=True)
class PackedShards:
    """This rank's share of packed buffers, and the offsets to call attnopt.attention with."""

    buffers: list[Tensor]  # this rank's tokens of each buffer, head and tail piece of each document
    cu_seqlens: Tensor  # int32 global offsets of the padded documents: the op's cu_seqlens_q/k on every rank
    max_seqlen: int  # the longest padded document: the op's max_seqlen_q/k
    local_cu_seqlens: Tensor  # int32 offsets of each document's tokens (head then tail piece) on this rank
    real: Tensor  # where each original token sits in the gathered (rank-major) padded sequence


def shard_packed(mesh: DeviceMesh, buffers: Sequence[Tensor], seq_dims: Sequence[int], cu_seqlens: Tensor
                 ) -> PackedShards:
    """Pad every document to a multiple of 2 * cp tokens (zeros) and keep this rank's pieces of each
    buffer, through torch's ``_context_parallel_shard`` (which also turns torch's load-balancing
    flag on: attnopt's context-parallel attention then reads packed calls as balanced per document).
    ``cu_seqlens`` are the original offsets; one host read."""
    world = mesh.size()
    offsets = cu_seqlens.tolist()
    lengths = [e - b for b, e in zip(offsets[:-1], offsets[1:])]
    padded = [-(-n // (2 * world)) * 2 * world for n in lengths]
    starts = torch.tensor([0, *padded], dtype=torch.int64).cumsum(0).tolist()
    device = buffers[0].device
    dest = torch.cat([torch.arange(s, s + n, device=device) for s, n in zip(starts, lengths)])
    out = []
    for t, dim in zip(buffers, seq_dims):
        full = t.new_zeros(*t.shape[:dim], starts[-1], *t.shape[dim + 1:])
        out.append(full.index_copy(dim, dest, t.narrow(dim, offsets[0], offsets[-1] - offsets[0])))
    balancer = DocumentPieces(starts, world, device)
    local = _context_parallel_shard(mesh, out, list(seq_dims), load_balancer=balancer)
    cu = torch.tensor(starts, dtype=torch.int32, device=cu_seqlens.device)
    real = balancer._generate_indices(restore=True)[0].index_select(0, dest)
    return PackedShards(local, cu, max(padded, default=0), cu // world, real)


@torch.no_grad()
def unshard_packed(mesh: DeviceMesh, buffers: Sequence[Tensor], seq_dims: Sequence[int], shards: PackedShards
                   ) -> list[Tensor]:
    """The inverse of ``shard_packed`` for outputs and gradients: every rank's tokens gathered, in
    the original order, padding dropped."""
    out = []
    for t, dim in zip(buffers, seq_dims):
        gathered = _all_gather(t.contiguous(), dim, mesh)
        if isinstance(gathered, funcol.AsyncCollectiveTensor):
            gathered = gathered.wait()
        out.append(gathered.index_select(dim, shards.real))
    return out
