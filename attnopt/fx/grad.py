"""Whether a graph tensor may require grad, at either IR level."""
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


__all__ = ["may_require_grad"]
