"""Graph assertions shared by the model tests: what was around attention, and is it gone."""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from attnopt.fx.normalize import canonical, meta, sdpa_args, shape

ATTN = torch.ops.attnopt.attention.default


def _materialises(node: Node, up: bool) -> bool:
    """A copy of a non-contiguous tensor, a real (non-identity) K/V repeat or expand, a V pad
    (operand side) or the slice that undoes it (output side)."""
    c = canonical(node)
    if c is None:
        return False
    if c.kind == "copy":
        return not meta(c.input).is_contiguous()
    if c.kind in ("expand", "repeat_interleave"):
        return shape(node) != shape(c.input)
    return c.kind == ("pad" if up else "slice")


def _layout_region(start: Node, up: bool) -> set[Node]:
    """The layout-op nodes reachable from ``start`` (itself included) through layout ops only."""
    region, stack = set(), [start]
    while stack:
        n = stack.pop()
        if n in region or canonical(n) is None:
            continue
        region.add(n)
        stack.extend([canonical(n).input] if up else n.users)
    return region


def overhead_around(operands, outputs) -> set[str]:
    """Names of the layout copies, K/V repetitions and V pads above ``operands`` and the copies
    and slices below ``outputs`` (walking layout ops only, so projections and masks are not counted)."""
    names = set()
    for operand in operands:
        names.update(n.name for n in _layout_region(operand, up=True) if _materialises(n, up=True))
    for out in outputs:
        names.update(n.name for n in _layout_region(out, up=False) if _materialises(n, up=False))
    return names


def attention_overhead(gm: GraphModule) -> set[str]:
    """The overhead around every SDPA call of ``gm`` (see ``overhead_around``)."""
    names = set()
    for node in gm.graph.nodes:
        args = sdpa_args(node)
        if args is not None:
            names |= overhead_around((args["query"], args["key"], args["value"]), node.users)
    return names


def sdpa_calls(gm: GraphModule) -> list[Node]:
    return [n for n in gm.graph.nodes if sdpa_args(n) is not None]


def attnopt_calls(gm: GraphModule) -> list[Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is ATTN]


def assert_rewritten(before: GraphModule, after: GraphModule, target: str = "op") -> None:
    """Every SDPA call of ``before`` was lowered to ``target`` and its overhead is gone."""
    n_sites = len(sdpa_calls(before))
    assert n_sites > 0
    if target == "op":
        assert sdpa_calls(after) == [] and len(attnopt_calls(after)) == n_sites
    else:
        calls = sdpa_calls(after)
        assert attnopt_calls(after) == [] and len(calls) == n_sites
        assert all(sdpa_args(n)["enable_gqa"] for n in calls)
    left = attention_overhead(before) & {n.name for n in after.graph.nodes}
    assert not left, f"copies/repeats left around attention: {sorted(left)}"
