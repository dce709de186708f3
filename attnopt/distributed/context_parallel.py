"""attnopt.attention inside torch's context parallel (``torch.distributed.tensor.experimental``).

torch's context parallel shards q/k/v on the sequence across a 1-D mesh and, while it is enabled,
hands SDPA calls on those DTensors to its ring attention, whose kernels are CUDA's flash, efficient
and cudnn ones only. These handlers join the same dispatch table, so attnopt's op gets the same
treatment on any device, and more: packed documents ('thd' with cu_seqlens, which also carries
Llama 4's chunks), causal and sliding windows on either side of the diagonal. The work is
``attnopt::context_parallel_attention`` (``blockwise.py``): K/V exchanged by all-gather or a ring
(``exchange.py``), only the blocks a band or document reaches computed (``plan.py``).

What the global sequence looks like on the ranks follows torch's flag for load balancing
(``_cp_options.enable_load_balance``, set by ``_context_parallel_shard``): dense layouts use torch's
head-tail pieces when it is on and contiguous shards when off; packed 'thd' uses a head and a tail
piece of every document when it is on (``shard_packed``) and contiguous shards when off. The
cu_seqlens a packed call receives are the global ones, on every rank. Masks, dropout, sinks, key
lengths, a finite mask fill and NaN empty rows raise NotImplementedError naming what.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.distributed.tensor.experimental._context_parallel import _attention as torch_cp
from torch.distributed.tensor.placement_types import Placement, Replicate, Shard

from . import blockwise  # noqa: F401  (defines attnopt::context_parallel_attention)
from . import exchange, plan
from .sharding import SEQ_DIM, bind

_FORWARD = torch.ops.attnopt.attention.default
_BACKWARD = torch.ops.attnopt.attention_backward.default
_UNSUPPORTED = {"attn_mask": None, "seqused_k": None, "sinks": None, "mask_fill": None, "dropout_p": 0.0,
                "empty_rows": "zero"}


def _offsets(t: Any) -> Optional[Tensor]:
    """Packed offsets as a plain tensor, given plain or replicated."""
    if isinstance(t, DTensor):
        if any(not p.is_replicate() for p in t.placements):
            raise NotImplementedError("attnopt.attention under context parallel: cu_seqlens must be replicated")
        return t._local_tensor
    return t


def _check(bound: dict[str, Any]) -> DeviceMesh:
    """The CP mesh; raises for what the blockwise computation does not cover."""
    for name, default in _UNSUPPORTED.items():
        value = bound.get(name, default)
        if isinstance(value, Tensor) or value != default:
            raise NotImplementedError(f"attnopt.attention under context parallel: {name} is not supported")
    layout = bound["layout"]
    if (layout == "thd") != (bound["cu_seqlens_q"] is not None and bound["cu_seqlens_k"] is not None):
        raise ValueError("attnopt.attention: packed offsets (cu_seqlens_q and cu_seqlens_k) go with layout 'thd' only, "
                         "and layout 'thd' needs them")
    seq = SEQ_DIM[layout]
    q, k, v = bound["query"], bound["key"], bound["value"]
    mesh = q.device_mesh if isinstance(q, DTensor) else None
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, DTensor) or t.device_mesh != mesh or tuple(t.placements) != (Shard(seq),):
            raise NotImplementedError(
                f"attnopt.attention under context parallel: {name} must be a DTensor sharded on its sequence dim "
                f"({seq} for layout {layout!r}) over one 1-D mesh, got "
                f"{tuple(t.placements) if isinstance(t, DTensor) else type(t).__name__}")
    if q.shape[seq] != k.shape[seq]:
        raise NotImplementedError("attnopt.attention under context parallel: query and key sequence lengths differ")
    return mesh


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


def _arguments(bound: dict[str, Any], mesh: DeviceMesh) -> dict[str, Any]:
    """The blockwise op's arguments besides the tensors: how the sequence is sharded, how K/V travel,
    and the band (causal folded into a window ending at the diagonal)."""
    layout = bound["layout"]
    balanced = torch_cp._cp_options.enable_load_balance
    balance = (plan.DOCUMENTS if layout == "thd" else plan.HEAD_TAIL) if balanced else plan.CONTIGUOUS
    k, v = bound["key"], bound["value"]
    kv_bytes = (k._local_tensor.numel() + v._local_tensor.numel()) * k.dtype.itemsize
    left, right = bound["window_size"]
    if bound["is_causal"]:
        right = 0
    return dict(cu_seqlens_q=_offsets(bound["cu_seqlens_q"]), cu_seqlens_k=_offsets(bound["cu_seqlens_k"]),
                group_name=mesh.get_group().group_name, balance=balance,
                method=exchange.choose(kv_bytes, mesh.size()), layout=layout,
                out_layout=bound["out_layout"] or layout, window=[int(left), int(right)], scale=bound["scale"],
                softcap=bound["softcap"], kernel_name=bound["kernel_name"])


def _forward(op: torch._ops.OpOverload, args: tuple, kwargs: dict) -> tuple[DTensor, DTensor, DTensor]:
    bound = bind(op, args, kwargs)
    mesh = _check(bound)
    extra = _arguments(bound, mesh)
    q, k, v = (bound[n]._local_tensor for n in ("query", "key", "value"))
    out, lse = torch.ops.attnopt.context_parallel_attention(q, k, v, **extra)
    out_seq, lse_seq = SEQ_DIM[extra["out_layout"]], 1 if extra["layout"] == "thd" else 2
    rng = torch.empty(0, dtype=torch.int64, device=q.device)
    return (_wrap(out, mesh, Shard(out_seq), out_seq), _wrap(lse, mesh, Shard(lse_seq), lse_seq),
            _wrap(rng, mesh, Replicate(), 0))


def _backward(op: torch._ops.OpOverload, args: tuple, kwargs: dict) -> tuple[DTensor, DTensor, DTensor, None, None]:
    bound = bind(op, args, kwargs)
    mesh = _check(bound)
    extra = _arguments(bound, mesh)
    tensors = (bound[n]._local_tensor for n in ("grad_out", "out", "lse", "query", "key", "value"))
    dq, dk, dv = torch.ops.attnopt.context_parallel_attention_backward(*tensors, **extra)
    seq = SEQ_DIM[extra["layout"]]
    return (_wrap(dq, mesh, Shard(seq), seq), _wrap(dk, mesh, Shard(seq), seq), _wrap(dv, mesh, Shard(seq), seq),
            None, None)


def register() -> None:
    """Join torch's context-parallel dispatch table: active exactly while torch's CP dispatcher is."""
    torch_cp.custom_ops[_FORWARD] = _forward
    torch_cp.custom_ops[_BACKWARD] = _backward
