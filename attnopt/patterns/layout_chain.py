"""Walk layout chains around attention: from an operand back to the tensor as produced, and
from the output forward to the tensor its consumers read.

Only steps whose value is known exactly are crossed, each checked on the shapes recorded in
the graph (anything else ends the walk):

- value-preserving: transpose, permute, ``.contiguous()``/clone/alias copies, and reshape,
  view, expand or slice to the shape the tensor already has;
- K/V head repetition whose value is GQA's "head h reads kv head h // R": an axis inserted
  right after the head axis, expanded and merged back into it (transformers' ``repeat_kv``
  on BHSD or BSHD, ``[:, :, None] -> broadcast_to -> flatten``), ``repeat_interleave(R)`` on
  the head axis, and a size-1 head axis expanded to H heads (MQA);
- a zero pad appended to V's head dim (MLA written for kernels that need equal head dims),
  removed only together with the slice of the output that drops those columns again.

``.repeat(1, R, 1, 1)`` tiles heads (head h reads kv head h % G) and is never crossed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch.fx import Node

from ..fx.normalize import Canon, canonical, meta, same, shape
from .site import Operand, OutputUse

KERNEL_LAYOUTS = ("bhsd", "bshd", "sbhd")


@dataclass
class TracedOperand(Operand):
    """An operand traced to its source; ``pad`` zero columns were appended to its head dim on
    the way (only ever set for V, and only when asked to strip them)."""

    pad: int = 0


def _same_shape(a: Node, b: Node) -> bool:
    sa, sb, va, vb = shape(a), shape(b), meta(a), meta(b)
    if sa is None or sb is None or len(sa) != len(sb) or va.dtype != vb.dtype:
        return False
    return all(same(x, y) for x, y in zip(sa, sb))


def _is_identity(node: Node, c: Canon) -> bool:
    """A copy, or a reshape/view/expand/slice to the input's own shape: the same value (a slice
    as long as its input selects every element, in order)."""
    return c.kind == "copy" or (c.kind in ("reshape", "expand", "slice") and _same_shape(node, c.input))


def _transposed(dims: list[str], d0: int, d1: int) -> list[str]:
    out = list(dims)
    out[d0], out[d1] = out[d1], out[d0]
    return out


def _skip_copies(node: Node, crossed: list[Node]) -> Node:
    """The node above any chain of value-preserving steps ending at ``node`` (recorded in
    ``crossed``)."""
    while (c := canonical(node)) is not None and _is_identity(node, c):
        crossed.append(node)
        node = c.input
    return node


def _merged_repeat(node: Node, dims: list[str]) -> Optional[tuple[Node, int, list[Node]]]:
    """``node`` as unsqueeze(head + 1) -> expand(R) -> reshape merging (head, R): the source,
    R and the nodes crossed. The new axis right after the head axis makes head h read source
    head h // R; an axis before it would tile heads instead and is refused."""
    head = dims.index("h")
    crossed = [node]
    expand = _skip_copies(canonical(node).input, crossed)
    e = canonical(expand)
    if e is None or e.kind != "expand":
        return None
    crossed.append(expand)
    unsqueeze = _skip_copies(e.input, crossed)
    u = canonical(unsqueeze)
    if u is None or u.kind != "unsqueeze" or u.params[0] != head + 1:
        return None
    crossed.append(unsqueeze)
    x = u.input
    xs, es, rs = shape(x), shape(expand), shape(node)
    if xs is None or es is None or rs is None or len(xs) != len(dims) or len(es) != len(xs) + 1:
        return None
    rep = es[head + 1]
    if not isinstance(rep, int) or rep < 1:
        return None
    expected_expand = xs[: head + 1] + (rep,) + xs[head + 1:]
    expected_out = xs[:head] + (xs[head] * rep,) + xs[head + 1:]
    if not all(same(a, b) for a, b in zip(es, expected_expand)):
        return None
    if len(rs) != len(expected_out) or not all(same(a, b) for a, b in zip(rs, expected_out)):
        return None
    return x, rep, crossed


def _interleaved_repeat(node: Node, c: Canon, dims: list[str]) -> Optional[int]:
    """R for ``repeat_interleave(R, dim=head)``, whose head j reads source head j // R."""
    rep, dim = c.params
    if dims[dim] != "h" or rep < 1:
        return None
    xs, ys = shape(c.input), shape(node)
    if xs is None or ys is None or len(xs) != len(ys):
        return None
    ok = all(same(a, b * rep if i == dim else b) for i, (a, b) in enumerate(zip(ys, xs)))
    return rep if ok else None


def _broadcast_head(node: Node, c: Canon, dims: list[str]) -> Optional[int]:
    """H for an expand of a size-1 head axis to H heads (MQA), nothing else broadcast."""
    xs, ys = shape(c.input), shape(node)
    if xs is None or ys is None or len(xs) != len(ys) or "h" not in dims:
        return None
    head = dims.index("h")
    if not (isinstance(xs[head], int) and xs[head] == 1 and isinstance(ys[head], int) and ys[head] > 1):
        return None
    if not all(same(a, b) for i, (a, b) in enumerate(zip(xs, ys)) if i != head):
        return None
    return ys[head]


def _zero_pad(c: Canon, dims: list[str]) -> int:
    """Columns appended by a zero pad of the last axis when that axis is the head dim, else 0."""
    pad, value = c.params
    if dims[-1] != "d" or len(pad) != 2 or pad[0] != 0 or not isinstance(pad[1], int) or pad[1] <= 0:
        return 0
    return pad[1] if value == 0 else 0


def trace_operand(node: Node, strip_repeat: bool = True, strip_pad: bool = False) -> TracedOperand:
    """The tensor an attention operand is a view/copy/repeat (/zero pad) of, with its axis labels.

    ``strip_repeat`` crosses one K/V head repetition; ``strip_pad`` one zero pad of the head dim.
    """
    dims, group, pad, cur, skipped = list("bhsd"), 1, 0, node, []
    while (c := canonical(cur)) is not None:
        if _is_identity(cur, c):
            pass
        elif c.kind == "transpose":
            dims = _transposed(dims, *c.params)
        elif c.kind == "permute":
            new = [""] * len(dims)
            for k, p in enumerate(c.params):
                new[p] = dims[k]
            dims = new
        elif c.kind == "reshape" and strip_repeat and group == 1 and "h" in dims:
            rep = _merged_repeat(cur, dims)
            if rep is None:
                break
            cur, group, crossed = rep
            skipped.extend(crossed)
            continue
        elif c.kind == "repeat_interleave" and strip_repeat and group == 1:
            rep = _interleaved_repeat(cur, c, dims)
            if rep is None:
                break
            group = rep
        elif c.kind == "expand" and strip_repeat and group == 1:
            rep = _broadcast_head(cur, c, dims)
            if rep is None:
                break
            group = rep
        elif c.kind == "pad" and strip_pad and pad == 0:
            pad = _zero_pad(c, dims)
            if not pad:
                break
        else:
            break
        skipped.append(cur)
        cur = c.input
    return TracedOperand(cur, "".join(dims), group, skipped, pad)


def _trims(node: Node, c: Canon, dims: list[str], keep: int) -> bool:
    """``node`` takes exactly the first ``keep`` entries of the head dim."""
    dim, start, _, step = c.params
    out = shape(node)
    return (dims[dim] == "d" and start in (None, 0) and step in (None, 1) and out is not None
            and isinstance(out[dim], int) and out[dim] == keep)


def _follow(node: Node, first: Node, trim_to: Optional[int]) -> Optional[OutputUse]:
    """The furthest kernel-layout node on the chain from ``node`` through its user ``first``,
    then single users only (past the trimming slice when ``trim_to`` is given)."""
    dims, cur, user, skipped = list("bhsd"), node, first, []
    trimmed, best = trim_to is None, None
    while True:
        c = canonical(user)
        if c is None or c.input is not cur:
            break
        if c.kind == "transpose":
            dims = _transposed(dims, *c.params)
        elif c.kind == "permute":
            dims = [dims[p] for p in c.params]
        elif c.kind == "slice" and not trimmed and _trims(user, c, dims, trim_to):
            trimmed = True
        elif not _is_identity(user, c):
            break
        skipped.append(user)
        cur = user
        layout = "".join(dims)
        if trimmed and layout in KERNEL_LAYOUTS:
            best = OutputUse(cur, layout, list(skipped))
        if len(cur.users) != 1:
            break
        user = next(iter(cur.users))
    return best


def trace_output(node: Node, trim_to: Optional[int] = None) -> Optional[OutputUse]:
    """Where the consumers read the output: the furthest node of a transpose/permute/copy chain
    whose value is the output in a kernel layout (the attention node itself, as bhsd, when there
    is none). Other readers of the [B, H, S, D] output may remain; the lowering serves them a view.

    With ``trim_to`` the chain must slice the head dim down to its first ``trim_to`` entries (the
    output of a zero-padded V) and nothing else may read the padded output; None otherwise.
    """
    if trim_to is not None:
        return _follow(node, next(iter(node.users)), trim_to) if len(node.users) == 1 else None
    chains = [use for user in node.users if (use := _follow(node, user, None)) is not None]
    return max(chains, key=lambda use: (use.layout != "bhsd", len(use.skipped)), default=OutputUse(node, "bhsd"))
