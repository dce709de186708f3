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

    kind: str  # transpose | permute | copy | unsqueeze | expand | reshape | sdpa
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


_METHOD_KIND = {"transpose": "transpose", "permute": "permute", "contiguous": "copy", "clone": "copy",
                "unsqueeze": "unsqueeze", "expand": "expand", "reshape": "reshape", "view": "reshape"}
_FUNCTION_KIND = {
    torch.transpose: "transpose", torch.permute: "permute", torch.unsqueeze: "unsqueeze", torch.reshape: "reshape",
    torch.clone: "copy",
    aten.transpose.int: "transpose", aten.permute.default: "permute", aten.contiguous.default: "copy",
    aten.clone.default: "copy", aten.unsqueeze.default: "unsqueeze", aten.expand.default: "expand",
    aten.reshape.default: "reshape", aten.view.default: "reshape", aten._unsafe_view.default: "reshape",
}


def canonical(node: Node) -> Optional[Canon]:
    """The layout-relevant meaning of ``node``, or None for anything else."""
    if node.op == "call_method":
        kind = _METHOD_KIND.get(node.target)
    elif node.op == "call_function":
        if node.target is operator.getitem and isinstance(node.args[0], Node):
            rank = _rank(node.args[0])
            pos = None if rank is None else _unsqueeze_from_index(node.args[1], rank)
            return None if pos is None else Canon("unsqueeze", node.args[0], (pos,))
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
    return Canon(kind, x)  # expand / reshape: read sizes from metadata
