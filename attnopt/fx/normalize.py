"""One view of graph nodes for both IR levels.

Dynamo hands backends a torch-level graph (``call_method transpose``, ``getitem`` with None
for unsqueeze, ``torch._C._nn.scaled_dot_product_attention``); torch.export gives ATen
(``aten.transpose.int``, ``aten.unsqueeze.default``, ``aten.scaled_dot_product_attention``).
``canonical`` maps both to a small vocabulary so every recogniser is written once.
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten


@dataclass(frozen=True)
class Canon:
    """``kind`` applied to ``input`` with ``params`` (dims already made non-negative)."""

    kind: str  # transpose | permute | copy | unsqueeze | expand | reshape | repeat_interleave | pad | slice
    input: Node
    params: tuple = ()


def meta(node: Any) -> Any:
    """The fake value recorded for a node by Dynamo (example_value) or export (val)."""
    if not isinstance(node, Node):
        return None
    return node.meta.get("val", node.meta.get("example_value"))


def shape(node: Node) -> Optional[tuple]:
    v = meta(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def same(a: Any, b: Any) -> bool:
    """Equal as sizes, also for symbolic sizes, without adding guards."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return bool(statically_known_true(a == b))


def _sdpa_signature(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):
    """Python mirror of scaled_dot_product_attention's signature, for binding node args."""


_SDPA_SIG = inspect.signature(_sdpa_signature)
SDPA_TARGETS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention,
                aten.scaled_dot_product_attention.default}


def sdpa_args(node: Node) -> Optional[dict]:
    """The SDPA call's arguments by name, or None if ``node`` is not an SDPA call."""
    if node.op != "call_function" or node.target not in SDPA_TARGETS:
        return None
    bound = _SDPA_SIG.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


_OPERATOR_NAMES = {operator.truediv: "div", operator.floordiv: "floordiv", operator.matmul: "matmul",
                   operator.mul: "mul", operator.add: "add", operator.sub: "sub"}


def op_name(node: Node) -> str:
    """A node's operation name, the same at both IR levels: ``transpose`` for the method
    ``x.transpose``, ``torch.transpose`` and ``aten.transpose.int`` alike."""
    if node.op == "call_method":
        return node.target
    if node.op != "call_function":
        return node.op
    t = node.target
    if t in _OPERATOR_NAMES:
        return _OPERATOR_NAMES[t]
    if isinstance(t, torch._ops.OpOverload):
        return t.overloadpacket.__name__
    return getattr(t, "__name__", str(t))


def _dim(d: Any, rank: int) -> int:
    return d + rank if d < 0 else d


def _rank(node: Node) -> Optional[int]:
    s = shape(node)
    return None if s is None else len(s)


def _unsqueeze_from_index(index: Any, rank: int) -> Optional[int]:
    """Position of the new axis for ``x[:, :, None]``-style indexing, else None."""
    if not isinstance(index, tuple):
        index = (index,)
    full = slice(None, None, None)
    if index.count(None) != 1 or any(i is not None and i is not Ellipsis and i != full for i in index):
        return None
    if Ellipsis in index:
        e = index.index(Ellipsis)
        before, after = index[:e], index[e + 1:]
        index = before + (full,) * (rank + 1 - len(before) - len(after)) + after
    return index.index(None)


def _slice_from_index(index: Any, rank: int) -> Optional[tuple]:
    """(dim, start, stop, step) for ``x[..., :n]``-style indexing of one axis, else None."""
    if not isinstance(index, tuple):
        index = (index,)
    full = slice(None, None, None)
    if index.count(Ellipsis) > 1 or any(i is not Ellipsis and not isinstance(i, slice) for i in index):
        return None
    if Ellipsis in index:
        e = index.index(Ellipsis)
        index = index[:e] + (full,) * (rank + 1 - len(index)) + index[e + 1:]
    cut = [d for d, i in enumerate(index) if i != full]
    if len(cut) != 1:
        return None
    s = index[cut[0]]
    if any(v is not None and not isinstance(v, int) for v in (s.start, s.stop, s.step)):
        return None
    return cut[0], s.start, s.stop, s.step


_METHOD_KIND = {"transpose": "transpose", "swapaxes": "transpose", "swapdims": "transpose", "permute": "permute",
                "contiguous": "copy", "clone": "copy", "unsqueeze": "unsqueeze", "expand": "expand",
                "broadcast_to": "expand", "expand_as": "expand", "reshape": "reshape", "view": "reshape",
                "flatten": "reshape", "repeat_interleave": "repeat_interleave"}
_FUNCTION_KIND = {
    torch.transpose: "transpose", torch.swapaxes: "transpose", torch.swapdims: "transpose", torch.permute: "permute",
    torch.unsqueeze: "unsqueeze", torch.reshape: "reshape", torch.flatten: "reshape", torch.clone: "copy",
    torch.broadcast_to: "expand", torch.repeat_interleave: "repeat_interleave", F.pad: "pad",
    torch._C._nn.pad: "pad",
    aten.transpose.int: "transpose", aten.permute.default: "permute", aten.contiguous.default: "copy",
    aten.clone.default: "copy", aten.alias.default: "copy", aten.unsqueeze.default: "unsqueeze",
    aten.expand.default: "expand", aten.broadcast_to.default: "expand", aten.reshape.default: "reshape",
    aten.view.default: "reshape", aten._unsafe_view.default: "reshape", aten.flatten.using_ints: "reshape",
    aten.repeat_interleave.self_int: "repeat_interleave", aten.pad.default: "pad",
    aten.constant_pad_nd.default: "pad", aten.slice.Tensor: "slice",
}


def _arg(node: Node, pos: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of ``node``'s call (``pos`` counts the input tensor as 0)."""
    return node.args[pos] if len(node.args) > pos else node.kwargs.get(name, default)


def _pad_params(node: Node) -> Optional[tuple]:
    """(pad, fill value) of a constant pad; None for reflect/replicate/circular padding."""
    if node.target is aten.constant_pad_nd.default:
        return tuple(_arg(node, 1, "pad")), _arg(node, 2, "value", 0)
    if _arg(node, 2, "mode", "constant") != "constant":
        return None
    value = _arg(node, 3, "value")
    return tuple(_arg(node, 1, "pad")), 0 if value is None else value


def canonical(node: Node) -> Optional[Canon]:
    """The layout-relevant meaning of ``node``, or None for anything else."""
    if node.op == "call_method":
        kind = _METHOD_KIND.get(node.target)
    elif node.op == "call_function":
        if node.target is operator.getitem and isinstance(node.args[0], Node):
            rank = _rank(node.args[0])
            if rank is None:
                return None
            pos = _unsqueeze_from_index(node.args[1], rank)
            if pos is not None:
                return Canon("unsqueeze", node.args[0], (pos,))
            cut = _slice_from_index(node.args[1], rank)
            return None if cut is None else Canon("slice", node.args[0], cut)
        kind = _FUNCTION_KIND.get(node.target)
    else:
        return None
    if kind is None or not node.args or not isinstance(node.args[0], Node):
        return None
    x, rest = node.args[0], node.args[1:]
    rank = _rank(x)
    if rank is None:
        return None
    if kind == "transpose":
        d0 = rest[0] if rest else node.kwargs.get("dim0")
        d1 = rest[1] if len(rest) > 1 else node.kwargs.get("dim1")
        return Canon(kind, x, (_dim(d0, rank), _dim(d1, rank)))
    if kind == "permute":
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        dims = dims or node.kwargs.get("dims")
        return Canon(kind, x, tuple(_dim(d, rank) for d in dims))
    if kind == "unsqueeze":
        d = rest[0] if rest else node.kwargs["dim"]
        return Canon(kind, x, (_dim(d, rank + 1),))
    if kind == "copy":
        fmt = node.kwargs.get("memory_format", torch.contiguous_format)
        if fmt not in (torch.contiguous_format, torch.preserve_format):
            return None
        return Canon(kind, x)
    if kind == "repeat_interleave":
        repeats, dim = _arg(node, 1, "repeats"), _arg(node, 2, "dim")
        if not isinstance(repeats, int) or not isinstance(dim, int):  # tensor repeats, or flattening
            return None
        return Canon(kind, x, (repeats, _dim(dim, rank)))
    if kind == "pad":
        params = _pad_params(node)
        return None if params is None else Canon(kind, x, params)
    if kind == "slice":
        dim, start, end, step = (_arg(node, i, n, d) for i, n, d in
                                 ((1, "dim", 0), (2, "start", None), (3, "end", None), (4, "step", 1)))
        if any(v is not None and not isinstance(v, int) for v in (start, end, step)):
            return None
        return Canon(kind, x, (_dim(dim, rank), start, end, step))
    if kind == "reshape" and any(isinstance(a, torch.dtype) for a in (*rest, *node.kwargs.values())):
        return None  # x.view(dtype) reinterprets bits
    return Canon(kind, x)  # expand / reshape: read sizes from metadata
