"""What a lowering saved and which kernel it will run, read from the graphs' recorded metadata.

Copies are counted by replaying each removed data-movement node on meta tensors built from the
shapes, strides and dtypes recorded in the graph before the rewrite: a node whose output gets
fresh storage materialised memory (``.contiguous()`` of a transposed tensor, the reshape of a
``repeat_kv`` expand, a pad); one whose output aliases its input was a view and cost nothing.
Replaying, rather than comparing the recorded fake tensors' storages, also works on programs
loaded from a .pt2 file, whose recorded values no longer share storage.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
from torch.fx import GraphModule, Node
try:  # torch >= 2.13
    from torch.fx.experimental.symbolic_shapes import optimization_hint
except ImportError:  # torch 2.11
    from torch.fx.experimental.symbolic_shapes import hint_int as optimization_hint
from torch.fx.node import map_aggregate
from torch.utils._pytree import tree_leaves

from ..fx.normalize import meta
from ..runtime_ops import kernel_for

if TYPE_CHECKING:
    from .passes.pipeline import PassResult

# Ops that only move or re-view data; compute ops (matmul, softmax, SDPA) are never "copies".
_MOVEMENT = {
    "contiguous", "clone", "reshape", "view", "_unsafe_view", "flatten", "expand", "broadcast_to", "repeat",
    "repeat_interleave", "pad", "constant_pad_nd", "cat", "stack", "index_select", "transpose", "permute",
    "unsqueeze", "getitem", "narrow", "slice", "select", "to", "_to_copy", "type_as", "tile",
}


def op_name(node: Node) -> str:
    """The short name of what ``node`` calls ("contiguous", "reshape", "scaled_dot_product_attention")."""
    if node.op == "call_method":
        return str(node.target)
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.name.split("::")[-1]
    return getattr(node.target, "__name__", str(node.target))


def _hint(x: Any) -> Any:
    return optimization_hint(x) if isinstance(x, torch.SymInt) else x


def _concrete(value: Any) -> Any:
    """A recorded value made concrete: a meta tensor with the same sizes and strides, a symbolic
    number as its hint."""
    if isinstance(value, torch.Tensor):
        size = [_hint(s) for s in value.shape]
        stride = [_hint(s) for s in value.stride()]
        return torch.empty_strided(size, stride, dtype=value.dtype, device="meta")
    if isinstance(value, torch.SymInt):
        return optimization_hint(value)
    if isinstance(value, (torch.SymFloat, torch.SymBool)) and value.node.hint is not None:
        return value.node.hint
    return value  # a number only known at run time stays symbolic


def _placeholder(value: Any) -> Any:
    """A real tensor of the recorded sizes, dtype and device that holds one element: all the
    kernel policy reads, without allocating (or faking) the full tensor."""
    if isinstance(value, torch.Tensor):
        return torch.zeros((), dtype=value.dtype, device=value.device).expand([_hint(s) for s in value.shape])
    return _concrete(value)


def _values(node: Node, convert) -> tuple[tuple, dict]:
    def conv(a: Any) -> Any:
        return convert(meta(a)) if isinstance(a, Node) else a

    return map_aggregate(node.args, conv), map_aggregate(node.kwargs, conv)


def _written(node: Node) -> Optional[int]:
    """Bytes ``node`` writes to fresh memory (0 for a view), or None when it cannot be replayed."""
    try:
        args, kwargs = _values(node, _concrete)
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if not inputs:
            return None
        if node.op == "call_method":
            out = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            out = node.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - an op (or size) meta tensors cannot replay is not accounted for
        return None
    if not isinstance(out, torch.Tensor):
        return 0
    if out.untyped_storage()._cdata in {t.untyped_storage()._cdata for t in inputs}:
        return 0
    return out.numel() * out.element_size()


def copy_bytes(node: Node) -> Optional[int]:
    """What ``node`` copies per call: bytes for a data-movement node that materialises memory, 0 for
    a view or a compute node, None when a movement node's size cannot be worked out."""
    if node.op not in ("call_function", "call_method") or op_name(node) not in _MOVEMENT:
        return 0
    return _written(node)


def removed_copies(before: GraphModule, removed: list[str]) -> tuple[int, Optional[int]]:
    """(copies, bytes) that the removed nodes materialised per forward call, read from ``before``.

    ``bytes`` is None when some removed movement node could not be replayed.
    """
    nodes = {n.name: n for n in before.graph.nodes}
    count, total = 0, 0
    for name in removed:
        written = copy_bytes(nodes[name]) if name in nodes else 0
        if written is None:
            total = None
        elif written:
            count += 1
            total = None if total is None else total + written
    return count, total


def is_attnopt_call(node: Node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.attnopt.attention.default


def expected_kernel(node: Node) -> Optional[str]:
    """The kernel an ``attnopt.attention`` node will pick on its inputs' device and shapes."""
    if not is_attnopt_call(node):
        return None
    args, kwargs = _values(node, _placeholder)
    call = {**dict(zip((a.name for a in node.target._schema.arguments), args)), **kwargs}
    kernel = call.pop("kernel_name", "auto")
    unknown = [k for k, v in call.items() if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool))]
    if unknown:
        return f"chosen at run time ({', '.join(unknown)} known only then)"
    if call.get("cu_seqlens_q") is not None:
        _stand_in_offsets(node, call)
    try:
        return kernel_for(call.pop("query"), call.pop("key"), call.pop("value"), kernel=kernel, **call)
    except ValueError as e:
        return f"none ({e})"


def _stand_in_offsets(node: Node, call: dict) -> None:
    """Packed offsets are known only at run time: stand in valid ones, near-equal sequences no
    longer than ``max_seqlen`` (the policy reads their count, lengths and whether q and k share
    them), the same tensor for q and k when the graph passes one."""
    totals = (call["query"].shape[0], call["key"].shape[0])
    longest = (call.get("max_seqlen_q") or totals[0], call.get("max_seqlen_k") or totals[1])
    pieces = max(1, *(-(-t // max(m, 1)) for t, m in zip(totals, longest)))
    device = call["cu_seqlens_q"].device
    cu_q, cu_k = ((torch.arange(pieces + 1, device=device) * t // pieces).to(torch.int32) for t in totals)
    same = node.kwargs.get("cu_seqlens_q") is node.kwargs.get("cu_seqlens_k")
    call["cu_seqlens_q"], call["cu_seqlens_k"] = cu_q, cu_q if same else cu_k


def annotate(before: GraphModule, after: GraphModule, result: "PassResult") -> None:
    """Fill each lowered site's copies/bytes removed and expected kernel."""
    nodes = {n.name: n for n in after.graph.nodes}
    for rep in result.sites:
        if rep.status != "lowered":
            continue
        rep.copies_removed, rep.bytes_removed = removed_copies(before, rep.removed)
        new = nodes.get(rep.new_node or "")
        rep.kernel = expected_kernel(new) if new is not None else None


__all__ = ["annotate", "copy_bytes", "expected_kernel", "is_attnopt_call", "op_name", "removed_copies"]
