"""What a graph tensor may be, at either IR level: one that requires grad, one that masks."""
from __future__ import annotations

import torch
from torch.fx import Node

from .normalize import meta


def _floating(node: Node) -> bool:
    value = meta(node)
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def may_require_grad(node: Node) -> bool:
    """The tensor may require grad: its recorded value does (Dynamo), or it is computed, through
    floating-point values, from a graph input that does (export records requires_grad on inputs
    only). Sizes, integers and bools carry no gradient."""
    if not _floating(node):
        return False
    if meta(node).requires_grad:
        return True
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder" and meta(n).requires_grad:
            return True
        stack.extend(a for a in n.all_input_nodes if _floating(a))
    return False


_FILL = 1e4  # a constant at least this negative (or this large) is a masking fill: -10000, finfo.min, -inf


def _masking_constant(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and abs(x) >= _FILL


def may_mask(node: Node) -> bool:
    """An additive tensor may hold masking values (a fill so large it swamps the scores), unless
    it is a plain bias: floating values computed only from parameters (graph inputs that require
    grad), integer indices into them and modest constants (T5's learned position bias, ALiBi's
    slopes). A floating user input, a bool turned into floats, or a fill constant may mask."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op in ("placeholder", "get_attr"):
            if not meta(n).requires_grad:
                return True
            continue
        constants = [a for a in torch.utils._pytree.tree_leaves((n.args, n.kwargs)) if not isinstance(a, Node)]
        if any(_masking_constant(a) for a in constants):
            return True
        for a in n.all_input_nodes:
            value = meta(a)
            if isinstance(value, torch.Tensor) and value.dtype == torch.bool:
                return True
            if _floating(a):
                stack.append(a)
    return False


__all__ = ["may_mask", "may_require_grad"]
