"""attnopt.attention inside torch's context parallel (``torch.distributed.tensor.experimental``).

torch's context parallel shards q/k/v on the sequence across a 1-D mesh and, while it is enabled,
hands SDPA calls on those DTensors to its ring attention, whose kernels are CUDA's flash, efficient
and cudnn ones only. These handlers join the same dispatch table, so attnopt's op gets the same
treatment on any device: K and V are all-gathered, each rank attends its own query rows exactly
(the causal diagonal placed by the rows' global positions through bottom-right alignment, in torch's
head-tail load-balanced order when that is on) and, in backward, the K/V gradients are
reduce-scattered back to their owners. Calls that need more (masks, dropout, packed sequences,
windows reaching right of the diagonal) raise NotImplementedError naming what.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed._functional_collectives as funcol
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.distributed.tensor.experimental._context_parallel import _attention as torch_cp
from torch.distributed.tensor.placement_types import Placement, Replicate, Shard

from .sharding import SEQ_DIM, bind, static_names

_FORWARD = torch.ops.attnopt.attention.default
_BACKWARD = torch.ops.attnopt.attention_backward.default


def _check(bound: dict[str, Any]) -> tuple[DeviceMesh, int, bool]:
    """The CP mesh, the sequence dim of q/k/v, and whether the call is banded (causal, or a window
    ending at the diagonal); raises for what the gathered computation does not cover."""
    layout = bound["layout"]
    if layout == "thd":
        raise NotImplementedError("attnopt.attention under context parallel: packed 'thd' sequences are not sharded")
    for name in ("attn_mask", "cu_seqlens_q", "cu_seqlens_k", "seqused_k", "sinks"):
        if bound.get(name) is not None:
            raise NotImplementedError(f"attnopt.attention under context parallel: {name} is not supported")
    if bound["dropout_p"] > 0:
        raise NotImplementedError("attnopt.attention under context parallel: dropout is not supported")
    seq = SEQ_DIM[layout]
    q, k, v = bound["query"], bound["key"], bound["value"]
    mesh = q.device_mesh if isinstance(q, DTensor) else None
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, DTensor) or t.device_mesh != mesh or tuple(t.placements) != (Shard(seq),):
            raise NotImplementedError(
                f"attnopt.attention under context parallel: {name} must be a DTensor sharded on its sequence dim "
                f"({seq} for layout {layout!r}) over one 1-D mesh, got "
                f"{tuple(t.placements) if isinstance(t, DTensor) else type(t).__name__}")
    left, right = bound["window_size"]
    right = 0 if bound["is_causal"] else right
    if (left, right) != (-1, -1) and right != 0:
        raise NotImplementedError("attnopt.attention under context parallel: windows reaching right of the diagonal")
    if q.shape[seq] != k.shape[seq]:
        raise NotImplementedError("attnopt.attention under context parallel: query and key sequence lengths differ")
    return mesh, seq, right == 0


def _pieces(rank: int, world: int, local_len: int) -> list[int]:
    """Global start of each equal piece of a rank's local rows, in local order: torch's head-tail
    layout (pieces r and 2W-1-r of 2W) when its load balancing is on, else one contiguous block; the
    same reading of torch's flag as its own ring attention makes."""
    if torch_cp._cp_options.enable_load_balance:
        half = local_len // 2
        return [rank * half, (2 * world - 1 - rank) * half]
    return [rank * local_len]


def _wait(t: Tensor) -> Tensor:
    return t.wait() if isinstance(t, funcol.AsyncCollectiveTensor) else t


class _Sequence:
    """Where each rank's rows sit in the global sequence, and moves between gathered and natural order."""

    def __init__(self, mesh: DeviceMesh, dim: int, local_len: int):
        self.mesh, self.dim = mesh, dim
        world = mesh.size()
        self.local = _pieces(mesh.get_local_rank(), world, local_len)
        self.piece = local_len // len(self.local)
        starts = [s for r in range(world) for s in _pieces(r, world, local_len)]  # in gathered (rank) order
        self.gathered_at = sorted(range(len(starts)), key=starts.__getitem__)  # by natural position
        self.natural_at = sorted(range(len(starts)), key=self.gathered_at.__getitem__)  # by gathered position

    def gather(self, t: Tensor) -> Tensor:
        """All-gather along the sequence, returned in natural order."""
        full = _wait(funcol.all_gather_tensor(t.contiguous(), self.dim, self.mesh))
        parts = full.split(self.piece, self.dim)
        return torch.cat([parts[i] for i in self.gathered_at], self.dim)

    def scatter_sum(self, t: Tensor) -> Tensor:
        """Sum a natural-order full-length tensor over ranks and keep this rank's rows."""
        parts = t.split(self.piece, self.dim)
        gathered = torch.cat([parts[i] for i in self.natural_at], self.dim)
        return _wait(funcol.reduce_scatter_tensor(gathered, "sum", self.dim, self.mesh))

    def keys_seen(self, start: int, banded: bool, total: int) -> int:
        """How many leading keys (of ``total``) the query piece at ``start`` can see."""
        return start + self.piece if banded else total


def _wrap(local: Tensor, mesh: DeviceMesh, placement: Placement, dim: int) -> DTensor:
    """A DTensor of contiguous global shape around this rank's (contiguous) result."""
    shape = list(local.shape)
    if isinstance(placement, Shard):
        shape[dim] *= mesh.size()
    stride = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        stride[i] = stride[i + 1] * shape[i + 1]
    meta = TensorMeta(torch.Size(shape), tuple(stride), local.dtype)
    return DTensor(local, DTensorSpec(mesh, (placement,), tensor_meta=meta), requires_grad=False)


def _local_args(op: torch._ops.OpOverload, bound: dict[str, Any], banded: bool) -> dict[str, Any]:
    """The call's non-tensor arguments for the per-piece local calls; a band is aligned bottom-right,
    which puts each piece's diagonal at its global position when it sees exactly the keys before its end."""
    statics = {n: bound[n] for n in static_names(op)}
    return {**statics, "causal_align": "bottom_right"} if banded else statics


def _forward(op: torch._ops.OpOverload, args: tuple, kwargs: dict) -> tuple[DTensor, DTensor, DTensor]:
    bound = bind(op, args, kwargs)
    mesh, seq, banded = _check(bound)
    statics = _local_args(op, bound, banded)
    q, k, v = (bound[n]._local_tensor for n in ("query", "key", "value"))
    where = _Sequence(mesh, seq, q.shape[seq])
    k, v = where.gather(k), where.gather(v)
    out_seq = SEQ_DIM[bound["out_layout"] or bound["layout"]]
    outs, lses = [], []
    for i, start in enumerate(where.local):
        n = where.keys_seen(start, banded, k.shape[seq])
        out, lse, rng = _FORWARD(q.narrow(seq, i * where.piece, where.piece), k.narrow(seq, 0, n),
                                 v.narrow(seq, 0, n), **statics)
        outs.append(out)
        lses.append(lse)
    return (_wrap(torch.cat(outs, out_seq), mesh, Shard(out_seq), out_seq),
            _wrap(torch.cat(lses, 2), mesh, Shard(2), 2), _wrap(rng, mesh, Replicate(), 0))


def _backward(op: torch._ops.OpOverload, args: tuple, kwargs: dict) -> tuple[DTensor, DTensor, DTensor]:
    bound = bind(op, args, kwargs)
    mesh, seq, banded = _check(bound)
    statics = _local_args(op, bound, banded)
    q, k, v, grad_out, out, lse, rng = (bound[n]._local_tensor for n in
                                         ("query", "key", "value", "grad_out", "out", "lse", "rng_state"))
    where = _Sequence(mesh, seq, q.shape[seq])
    k, v = where.gather(k), where.gather(v)
    out_seq = SEQ_DIM[bound["out_layout"] or bound["layout"]]
    dqs, dk, dv = [], torch.zeros_like(k), torch.zeros_like(v)
    for i, start in enumerate(where.local):
        n = where.keys_seen(start, banded, k.shape[seq])
        rows = (i * where.piece, where.piece)
        dq_p, dk_p, dv_p, _, _ = _BACKWARD(grad_out.narrow(out_seq, *rows), out.narrow(out_seq, *rows),
                                     lse.narrow(2, *rows).contiguous(), rng, q.narrow(seq, *rows),
                                     k.narrow(seq, 0, n), v.narrow(seq, 0, n), **statics)
        dqs.append(dq_p)
        dk.narrow(seq, 0, n).add_(dk_p)
        dv.narrow(seq, 0, n).add_(dv_p)
    return (_wrap(torch.cat(dqs, seq), mesh, Shard(seq), seq), _wrap(where.scatter_sum(dk), mesh, Shard(seq), seq),
            _wrap(where.scatter_sum(dv), mesh, Shard(seq), seq), None, None)


def register() -> None:
    """Join torch's context-parallel dispatch table: active exactly while torch's CP dispatcher is."""
    torch_cp.custom_ops[_FORWARD] = _forward
    torch_cp.custom_ops[_BACKWARD] = _backward
