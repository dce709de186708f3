"""KV-cache writes that Inductor keeps in place.

transformers' StaticCache writes each decode step's keys and values with
``cache.index_copy_(2, positions, new)``. Inductor in torch 2.11 does not reinplace ``index_copy``:
it clones the whole cache and scatters into the clone, so a decode step copies every layer's cache
(measured on the H200 with ``bench/decode.py --profile``: at batch 8 and a cache of 8192, a
162 µs copy kernel per layer, half the step). ``cache[:, :, positions] = new``, i.e.
``aten.index_put_`` with the leading dims left whole, is the same write, and Inductor's reinplacing
pass keeps ``index_put`` in place.

Rewritten only where the two are the same by definition: a 1-D int64 index, a source of the
cache's rank and dtype, a constant dim (duplicate positions are undefined for both). The in-place
form stays in place; the functional form (an exported program's) becomes functional ``index_put``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch.fx import GraphModule, Node

from ..fx.normalize import meta

aten = torch.ops.aten
_INPLACE = {aten.index_copy_.default, torch.Tensor.index_copy_, "index_copy_"}
_FUNCTIONAL = {aten.index_copy.default, torch.index_copy, torch.Tensor.index_copy, "index_copy"}
_TARGETS = _INPLACE | _FUNCTIONAL
_NAMES = ("self", "dim", "index", "source")


def _bound(node: Node) -> Optional[tuple[bool, dict[str, Any]]]:
    """(in place, the arguments by name) of an index_copy call, else None."""
    if node.op not in ("call_method", "call_function") or node.target not in _TARGETS:
        return None
    args = dict(zip(_NAMES, node.args))
    args.update({("self" if k == "input" else k): v for k, v in node.kwargs.items()})
    if set(args) != set(_NAMES):
        return None
    return node.target in _INPLACE, args


def _same_write(args: dict[str, Any]) -> Optional[int]:
    """The dim (non-negative) when index_put with that many leading ``None``s is the same write."""
    x, index, source = (meta(args[n]) if isinstance(args[n], Node) else None for n in ("self", "index", "source"))
    dim = args["dim"]
    tensors = (x, index, source)
    if not isinstance(dim, int) or not all(isinstance(t, torch.Tensor) for t in tensors):
        return None
    if index.dtype != torch.int64 or index.dim() != 1 or source.dim() != x.dim() or x.dim() == 0 \
            or source.dtype != x.dtype or not -x.dim() <= dim < x.dim():
        return None
    return dim % x.dim()


def keep_cache_writes_in_place(gm: GraphModule) -> int:
    """Rewrite every provable ``index_copy(_)`` of ``gm`` into ``index_put(_)``; returns how many."""
    count = 0
    for node in list(gm.graph.nodes):
        bound = _bound(node)
        dim = None if bound is None else _same_write(bound[1])
        if dim is None:
            continue
        inplace, args = bound
        target = aten.index_put_.default if inplace else aten.index_put.default
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(target, (args["self"], [None] * dim + [args["index"]], args["source"]))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    return count


__all__ = ["keep_cache_writes_in_place"]
