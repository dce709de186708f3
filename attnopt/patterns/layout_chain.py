"""Walk layout chains around attention: from an operand back to the tensor as produced, and
from the output forward to the tensor its consumers read.

Only value-preserving steps are crossed (transpose, permute, contiguous/clone copies) plus
transformers' ``repeat_kv`` (unsqueeze right after the head axis, expand of that axis only,
reshape merging it into heads), whose value is exactly GQA's "head h reads kv head h // R".
Every step is checked on the shapes recorded in the graph; anything else ends the walk.
"""
from __future__ import annotations

from typing import Optional

from torch.fx import Node

from .normalize import canonical, same, shape
from .site import Operand, OutputUse

KERNEL_LAYOUTS = ("bhsd", "bshd", "sbhd")


def _apply_transpose(dims: list[str], d0: int, d1: int) -> list[str]:
    out = list(dims)
    out[d0], out[d1] = out[d1], out[d0]
    return out


def _repeat_source(node: Node, dims: list[str]) -> Optional[tuple[Node, int, list[Node]]]:
    """If ``node`` is the reshape of a repeat_kv, return (unrepeated tensor, R, nodes crossed)."""
    if "h" not in dims:
        return None
    head = dims.index("h")
    expand = canonical(node).input
    e = canonical(expand)
    if e is None or e.kind != "expand":
        return None
    u = canonical(e.input)
    if u is None or u.kind != "unsqueeze" or u.params[0] != head + 1:
        return None
    x = u.input
    xs, es, rs = shape(x), shape(expand), shape(node)
    if xs is None or es is None or rs is None or len(xs) != len(dims) or len(es) != len(xs) + 1:
        return None
    rep = es[head + 1]
    if not isinstance(rep, int) or rep < 1:
        return None
    expected_expand = xs[: head + 1] + (rep,) + xs[head + 1 :]
    expected_out = xs[:head] + (xs[head] * rep,) + xs[head + 1 :]
    if not all(same(a, b) for a, b in zip(es, expected_expand)):
        return None
    if len(rs) != len(expected_out) or not all(same(a, b) for a, b in zip(rs, expected_out)):
        return None
    return x, rep, [node, expand, e.input]


def trace_operand(node: Node, strip_repeat: bool = True) -> Operand:
    """The tensor an attention operand is a view/copy/repeat of, with its axis labels."""
    dims, group, cur, skipped = list("bhsd"), 1, node, []
    while True:
        c = canonical(cur)
        if c is None:
            break
        if c.kind == "copy":
            pass
        elif c.kind == "transpose":
            dims = _apply_transpose(dims, *c.params)
        elif c.kind == "permute":
            new = [""] * len(dims)
            for k, p in enumerate(c.params):
                new[p] = dims[k]
            dims = new
        elif c.kind == "reshape" and strip_repeat and group == 1:
            rep = _repeat_source(cur, dims)
            if rep is None:
                break
            src, group, crossed = rep
            skipped.extend(crossed)
            cur = src
            continue
        else:
            break
        skipped.append(cur)
        cur = c.input
    return Operand(cur, "".join(dims), group, skipped)


def trace_output(node: Node) -> OutputUse:
    """The furthest single-use transpose/permute/copy chain node whose value is the output in a
    kernel layout (the attention node itself, as bhsd, when there is none)."""
    dims, cur, best, skipped = list("bhsd"), node, OutputUse(node, "bhsd"), []
    while len(cur.users) == 1:
        user = next(iter(cur.users))
        c = canonical(user)
        if c is None or c.input is not cur:
            break
        if c.kind == "transpose":
            dims = _apply_transpose(dims, *c.params)
        elif c.kind == "permute":
            dims = [dims[p] for p in c.params]
        elif c.kind != "copy":
            break
        skipped.append(user)
        cur = user
        layout = "".join(dims)
        if layout in KERNEL_LAYOUTS:
            best = OutputUse(cur, layout, list(skipped))
    return best
