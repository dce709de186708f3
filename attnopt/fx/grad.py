"""Whether a graph tensor may require grad, at either IR level."""
from __future__ import annotations

import torch
from torch.fx import Node

from .normalize import meta


def may_require_grad(node: Node) -> bool:
    """The tensor may require grad: its recorded value does (Dynamo), or it is computed from a
    graph input that does (export records requires_grad on parameters only)."""
    value = meta(node)
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return False
    if value.requires_grad:
        return True
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder" and isinstance(meta(n), torch.Tensor) and meta(n).requires_grad:
            return True
        stack.extend(n.all_input_nodes)
    return False


__all__ = ["may_require_grad"]
