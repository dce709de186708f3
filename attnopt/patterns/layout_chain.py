"""Walk layout chains around attention: from an operand back to the tensor as produced, and
from the output forward to the tensor its consumers read.

Only steps whose value is known exactly are crossed, each checked on the shapes recorded in
the graph (anything else ends the walk):

- value-preserving: transpose, permute, ``.contiguous()``/clone/alias copies, and reshape,
  view, expand or slice to the shape the tensor already has;
- K/V head repetition whose value is GQA's "head h reads kv head h // R": an axis inserted
  right after the head axis, expanded and merged back into it (transformers' ``repeat_kv``
  on BHSD or BSHD, ``[:, :, None] -> broadcast_to -> flatten``, einops' ``repeat``),
  ``repeat_interleave(R)`` on the head axis, and a size-1 head axis expanded to H heads (MQA);
  ``.repeat`` counts as ``expand`` where it only repeats axes of size 1;
- a zero pad appended to V's head dim (MLA written for kernels that need equal head dims),
  removed only together with the slice of the output that drops those columns again;
- for packed [T, H, D] operands (flash-attn's and torch's varlen calls), the reshape that
  merged two adjacent axes of a 4-D tensor into the token axis (torchtitan's [B, S, H, D] ->
  [B*S, H, D]): below it the walk goes on in 4-D, labelling the merged axes 'b' (outer) and 's'
  (inner), so that repetition and copies of the 4-D tensor are crossed as well;
- on the output side, a reshape merging the trailing head and head-dim axes (and one splitting
  them back), where the walk past it removes a copy or V's trim (TransformerEngine's
  ``view(B, S, H * D).transpose(0, 1).contiguous()``).

``.repeat(1, R, 1, 1)`` tiles heads (head h reads kv head h % G) and is never crossed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch.fx import Node

from ..fx.normalize import Canon, canonical, meta, op_name, same, shape
from .site import Operand, OutputUse

KERNEL_LAYOUTS = ("bhsd", "bshd", "sbhd")
PACKED = "thd"


@dataclass
class TracedOperand(Operand):
    """An operand traced to its source; ``pad`` zero columns were appended to its head dim on
    the way (only ever set for V, and only when asked to strip them). ``tokens`` is set for a
    packed operand read from a 4-D source: the reshape that merged the source's 'b' and 's' axes
    (in that order, 'b' outer) into the packed token axis."""

    pad: int = 0
    tokens: Optional[Node] = None


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


def _repeat_as_expand(node: Node) -> Optional[Canon]:
    """``x.repeat(...)`` read as ``expand`` when every repeated axis of ``x`` has size 1 (then
    each copy is the same element, as with expand); None for tiling or anything else."""
    if op_name(node) != "repeat" or not node.args or not isinstance(node.args[0], Node):
        return None
    reps = node.args[1:]
    if len(reps) == 1 and isinstance(reps[0], (list, tuple)):
        reps = tuple(reps[0])
    xs = shape(node.args[0])
    if xs is None or len(reps) != len(xs) or not all(isinstance(r, int) and r >= 1 for r in reps):
        return None
    if any(r != 1 and not (isinstance(x, int) and x == 1) for r, x in zip(reps, xs)):
        return None
    return Canon("expand", node.args[0])


def _canonical(node: Node) -> Optional[Canon]:
    """``canonical``, with ``.repeat`` over size-1 axes read as the expand it equals."""
    return canonical(node) or _repeat_as_expand(node)


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
    e = _canonical(expand)
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


def _merges_tokens(node: Node, c: Canon, dims: list[str]) -> bool:
    """``node`` is [T, H, D] made by merging the first two axes of a 4-D [X, Y, H, D] input (row
    major: token x * Y + y)."""
    xs, ys = shape(c.input), shape(node)
    if dims != list(PACKED) or xs is None or ys is None or len(xs) != 4 or len(ys) != 3:
        return False
    return same(xs[0] * xs[1], ys[0]) and same(xs[2], ys[1]) and same(xs[3], ys[2])


def trace_operand(node: Node, strip_repeat: bool = True, strip_pad: bool = False, dims: str = "bhsd",
                  unpack: bool = True) -> TracedOperand:
    """The tensor an attention operand is a view/copy/repeat (/zero pad) of, with its axis labels.

    ``dims`` labels the operand as the call reads it ("bhsd" for SDPA, "bshd" or "thd" for
    flash-attn). ``strip_repeat`` crosses one K/V head repetition; ``strip_pad`` one zero pad of
    the head dim; ``unpack`` the reshape that packed a 4-D tensor into a "thd" operand.
    """
    labels, group, pad, cur, skipped, tokens = list(dims), 1, 0, node, [], None
    while (c := _canonical(cur)) is not None:
        if _is_identity(cur, c):
            pass
        elif c.kind == "transpose":
            labels = _transposed(labels, *c.params)
        elif c.kind == "permute":
            new = [""] * len(labels)
            for k, p in enumerate(c.params):
                new[p] = labels[k]
            labels = new
        elif c.kind == "reshape":
            rep = _merged_repeat(cur, labels) if strip_repeat and group == 1 and "h" in labels else None
            if rep is not None:
                cur, group, crossed = rep
                skipped.extend(crossed)
                continue
            if not (unpack and _merges_tokens(cur, c, labels)):
                break
            labels, tokens = list("bshd"), cur
        elif c.kind == "repeat_interleave" and strip_repeat and group == 1:
            rep = _interleaved_repeat(cur, c, labels)
            if rep is None:
                break
            group = rep
        elif c.kind == "expand" and strip_repeat and group == 1:
            rep = _broadcast_head(cur, c, labels)
            if rep is None:
                break
            group = rep
        elif c.kind == "pad" and strip_pad and pad == 0:
            pad = _zero_pad(c, labels)
            if not pad:
                break
        else:
            break
        skipped.append(cur)
        cur = c.input
    return TracedOperand(cur, "".join(labels), group, skipped, pad, tokens)


def _trims(node: Node, c: Canon, dims: list[str], keep: int) -> bool:
    """``node`` takes exactly the first ``keep`` entries of the head dim."""
    dim, start, _, step = c.params
    out = shape(node)
    return (dims[dim] == "d" and start in (None, 0) and step in (None, 1) and out is not None
            and isinstance(out[dim], int) and out[dim] == keep)


def _regrouped(node: Node, c: Canon, groups: list[str], split: Optional[tuple]) -> Optional[list[str]]:
    """The axis groups after a reshape that merges the trailing head and head-dim axes into one
    (``view(B, S, H * D)``), or splits such a merge back into the (H, D) it merged (``split``)."""
    xs, ys = shape(c.input), shape(node)
    if xs is None or ys is None:
        return None
    if groups[-2:] == ["h", "d"] and len(ys) == len(xs) - 1 and same(xs[-2] * xs[-1], ys[-1]) \
            and all(same(a, b) for a, b in zip(xs[:-2], ys[:-1])):
        return groups[:-2] + ["hd"]
    if groups[-1] == "hd" and split is not None and len(ys) == len(xs) + 1 and same(ys[-2], split[0]) \
            and same(ys[-1], split[1]) and all(same(a, b) for a, b in zip(xs[:-1], ys[:-2])):
        return groups[:-1] + ["h", "d"]
    return None


def _follow(node: Node, first: Node, trim_to: Optional[int], start: str) -> Optional[OutputUse]:
    """The furthest node the op can write on the chain from ``node`` (read as ``start``) through
    its user ``first``, then single users only (past the trimming slice when ``trim_to`` is given):
    a kernel layout for 4-D outputs, the packed layout itself for packed ones.

    The chain may merge the trailing head and head-dim axes (and split them back): a node past
    such a merge is taken only where the walk since the merge removes a copy or the trimming slice
    (TransformerEngine: ``view(B, S, H * D).transpose(0, 1).contiguous()``; ``reshape(T, H * D)``
    ... ``reshape(T, H, D)[..., :Dv]``); a node read with the axes merged reads the op's output
    through a view."""
    groups, cur, user, skipped = list(start), node, first, []
    trimmed, best, split, merged, gained = trim_to is None, None, None, False, False
    writable = (PACKED,) if start == PACKED else KERNEL_LAYOUTS
    while True:
        c = canonical(user)
        if c is None or c.input is not cur:
            break
        if c.kind == "transpose":
            groups = _transposed(groups, *c.params)
        elif c.kind == "permute":
            groups = [groups[p] for p in c.params]
        elif c.kind == "slice" and not trimmed and _trims(user, c, groups, trim_to):
            trimmed, gained = True, merged
        elif c.kind == "reshape" and not _is_identity(user, c):
            regrouped = _regrouped(user, c, groups, split)
            if regrouped is None:
                break
            if regrouped[-1] == "hd":
                split, merged = shape(cur)[-2:], True
            groups = regrouped
        elif not _is_identity(user, c):
            break
        elif c.kind == "copy" and merged and not meta(cur).is_contiguous():
            gained = True
        skipped.append(user)
        cur = user
        layout = "".join(groups)
        if trimmed and layout in writable and (not merged or gained):
            best = OutputUse(cur, layout, list(skipped))
        if len(cur.users) != 1:
            break
        user = next(iter(cur.users))
    return best


def trace_output(node: Node, trim_to: Optional[int] = None, dims: str = "bhsd") -> Optional[OutputUse]:
    """Where the consumers read the output: the furthest node of a transpose/permute/copy chain
    whose value is the output in a layout the op writes (the attention node itself, as ``dims``,
    when there is none). Other readers of a [B, H, S, D] output may remain; the lowering serves
    them a view. An output in another layout (flash-attn's) gets no such view: a chain is taken
    only when nothing else reads the output.

    With ``trim_to`` the chain must slice the head dim down to its first ``trim_to`` entries (the
    output of a zero-padded V) and nothing else may read the padded output; None otherwise.
    """
    if trim_to is not None:
        return _follow(node, next(iter(node.users)), trim_to, dims) if len(node.users) == 1 else None
    whole = OutputUse(node, dims)
    if dims != "bhsd" and len(node.users) != 1:
        return whole
    chains = [use for user in node.users if (use := _follow(node, user, None, dims)) is not None]
    return max(chains, key=lambda use: (use.layout != dims, len(use.skipped)), default=whole)
