"""Prove what an in-graph attention mask computes.

transformers (and others) build boolean masks in the graph from ``arange`` index vectors,
``position_ids`` and 2-D padding masks, and hand them to SDPA even when the mask is plain causal,
which keeps attention off the fast kernels. This module interprets the subgraph that builds a
mask symbolically: every tensor becomes a function of its own indices ``i0, i1, ...`` (a sympy
expression; graph inputs are uninterpreted functions of their indices), so the mask's value is
one boolean formula over (batch, head, query, key). That formula is then split into known
structures: a causal/sliding-window band around a diagonal, chunks, same document (from
position_ids), key padding, all-true. Anything the interpreter does not model ends the proof,
and the mask is kept as written.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import sympy
import torch
from torch.fx import Node

from .normalize import meta, op_name, same

_I = [sympy.Symbol(f"i{d}", integer=True, nonnegative=True) for d in range(8)]


class Unproven(Exception):
    """The mask subgraph uses something the interpreter does not model."""


@dataclass(frozen=True)
class Sym:
    """A tensor as a function of its indices: ``expr`` over i0..i{rank-1}, of ``shape``."""

    expr: Any
    shape: tuple
    tag: Optional[tuple] = None  # provenance for multi-node idioms (document ids)


@dataclass
class MaskStructure:
    """A mask proven equal to: keys k with q + offset - left <= k <= q + offset + right (when bounded),
    same chunk, same document and not padded, for every batch, head, query and key."""

    upper: Optional[int] = None  # k - q <= upper
    lower: Optional[int] = None  # k - q >= lower
    chunk: Optional[int] = None
    document: Optional[Node] = None  # position_ids whose restarts start documents
    position_band: Any = None  # positions P whose differences P[b, k] - P[b, q] bound the band
    document_positions: Any = None  # the positions function the document ids were cut from
    padding: Optional[Node] = None  # [B, Sk] keep-mask over keys
    key_limit: Optional[tuple[Node, int]] = None  # (P, e): keys k < P[q] + e, P a 1-D graph input
    cache_offset: Optional[tuple[Node, int]] = None  # (L, c): k - q <= L + c, L a one-element graph input
    never: bool = False  # the mask is all false
    atoms: list[str] = field(default_factory=list)

    @property
    def band_only(self) -> bool:
        """True when the whole mask is a causal/window band (or all true): no tensor needed."""
        return (self.chunk is None and self.document is None and self.padding is None and self.key_limit is None
                and self.cache_offset is None and not self.never)

    def describe(self) -> str:
        return " & ".join(self.atoms) if self.atoms else "all true"

    def band(self, seqlen_q: int, seqlen_k: int) -> Optional[tuple[bool, str, tuple[int, int]]]:
        """(is_causal, causal_align, window) for attnopt.attention, or None if not expressible."""
        if self.upper is None and self.lower is None:
            return False, "top_left", (-1, -1)
        if self.upper is not None and self.upper != 0 and same(self.upper, seqlen_k - seqlen_q):
            align, base = "bottom_right", seqlen_k - seqlen_q
        else:
            align, base = "top_left", 0
        right = -1 if self.upper is None else self.upper - base
        left = -1 if self.lower is None else base - self.lower
        if (right != -1 and right < 0) or (left != -1 and left < 0):
            return None
        return right == 0, align, (left, right)


def _sub(expr: Any, mapping: dict) -> Any:
    """Simultaneous substitution of index symbols."""
    return sympy.sympify(expr).xreplace(mapping) if mapping else expr


def _shift(expr: Any, at: int, by: int, rank: int) -> Any:
    """Renumber i_d -> i_{d+by} for d >= at (an axis inserted or removed at ``at``)."""
    return _sub(expr, {_I[d]: _I[d + by] for d in range(at, rank)})


def _broadcast(a: Sym, shape: tuple) -> Any:
    """``a``'s expression read at the indices of a tensor of ``shape`` it broadcasts to."""
    off = len(shape) - len(a.shape)
    if off < 0:
        raise Unproven("broadcast to fewer dims")
    mapping = {}
    for d, size in enumerate(a.shape):
        mapping[_I[d]] = sympy.Integer(0) if (size == 1 and shape[d + off] != 1) else _I[d + off]
    return _sub(a.expr, mapping)


def _result_shape(node: Node) -> tuple:
    v = meta(node)
    if not isinstance(v, torch.Tensor):
        raise Unproven(f"{node.name} has no tensor metadata")
    return tuple(v.shape)


def _leaf(node: Node) -> Sym:
    """A graph input (position_ids, attention_mask...): an uninterpreted function of its indices."""
    shape = _result_shape(node)
    v = meta(node)
    f = sympy.Function(f"in_{node.name}")
    value = f(*_I[: len(shape)]) if shape else f(sympy.Integer(0))
    if v.dtype == torch.bool:
        value = sympy.Ne(value, 0)
    return Sym(value, shape)


_CMP: dict[str, Callable] = {
    "le": sympy.Le, "lt": sympy.Lt, "ge": sympy.Ge, "gt": sympy.Gt,
    "eq": lambda a, b: sympy.Eq(a, b), "ne": lambda a, b: sympy.Ne(a, b),
}
_ARITH: dict[str, Callable] = {"add": operator.add, "sub": operator.sub, "mul": operator.mul,
                               "floordiv": lambda a, b: sympy.floor(a / b)}
_LOGIC: dict[str, Callable] = {"and_": sympy.And, "__and__": sympy.And, "bitwise_and": sympy.And,
                               "logical_and": sympy.And, "or_": sympy.Or, "__or__": sympy.Or,
                               "bitwise_or": sympy.Or, "logical_or": sympy.Or}
_IDENTITY = {"to", "bool", "_to_copy", "contiguous", "clone", "alias", "detach", "lift_fresh_copy"}


class _Interpreter:
    def __init__(self) -> None:
        self.env: dict[Node, Sym] = {}

    def value(self, x: Any) -> Sym:
        if isinstance(x, Node):
            if x not in self.env:
                self.env[x] = self.run(x)
            return self.env[x]
        if isinstance(x, (bool, int)):
            return Sym(sympy.true if x is True else sympy.false if x is False else sympy.Integer(x), ())
        raise Unproven(f"constant {x!r} of type {type(x).__name__}")

    def run(self, node: Node) -> Sym:
        if node.op == "placeholder" or node.op == "get_attr":
            return _leaf(node)
        if node.op not in ("call_function", "call_method"):
            raise Unproven(f"{node.op} {node.name}")
        name = op_name(node)
        args, kwargs = node.args, node.kwargs
        shape = _result_shape(node)
        if name == "arange":
            return self._arange(args, kwargs, shape)
        if name in ("new_ones", "ones") and kwargs.get("dtype") == torch.bool:
            return Sym(sympy.true, shape)
        if name in ("zeros", "zeros_like", "new_zeros", "new_ones", "ones", "ones_like", "full", "full_like",
                    "new_full"):
            return self._constant(node, name, shape)
        if name in ("view", "reshape", "_unsafe_view"):
            return self._unit_reshape(node, shape)
        if name == "expand":
            x = self.value(args[0])
            return Sym(_broadcast(x, shape), shape, x.tag)
        if name in _IDENTITY:
            x = self.value(args[0])
            src, dst = meta(args[0]).dtype, meta(node).dtype
            if dst == torch.bool and src != torch.bool:
                return Sym(sympy.Ne(x.expr, 0), shape, x.tag)
            if dst.is_floating_point:
                raise Unproven(f"{node.name} converts to {dst}")
            return Sym(x.expr, shape, x.tag)
        if name == "unsqueeze":
            x = self.value(args[0])
            d = args[1] if len(args) > 1 else kwargs["dim"]
            d = d + len(shape) if d < 0 else d
            return Sym(_shift(x.expr, d, 1, len(x.shape)), shape, x.tag)
        if name in ("getitem", "index", "slice", "select"):
            return self._index(node, name, shape)
        if name in _CMP or name in ("__eq__", "__ne__", "__le__", "__lt__", "__ge__", "__gt__"):
            op = _CMP[name.strip("_")]
            a, b = (self.value(x) for x in args[:2])
            starts = name.strip("_") == "ne" and a.tag and a.tag[0] == "step" and b.expr == 1
            return Sym(op(_broadcast(a, shape), _broadcast(b, shape)), shape,
                       ("segment_start", *a.tag[1:]) if starts else None)
        if name in _ARITH or name in ("floor_divide",) or (name == "div" and kwargs.get("rounding_mode") == "floor"):
            fn = _ARITH.get(name, _ARITH["floordiv"])
            a, b = (self.value(x) for x in args[:2])
            if name == "mul" and (a.expr.is_Boolean or b.expr.is_Boolean):
                return Sym(sympy.And(_broadcast(a, shape), _broadcast(b, shape)), shape)
            return Sym(fn(_broadcast(a, shape), _broadcast(b, shape)), shape)
        if name in _LOGIC:
            a, b = (self.value(x) for x in args[:2])
            return Sym(_LOGIC[name](_broadcast(a, shape), _broadcast(b, shape)), shape)
        if name in ("invert", "__invert__", "bitwise_not", "logical_not"):
            return Sym(sympy.Not(_broadcast(self.value(args[0]), shape)), shape)
        if name == "diff":
            return self._diff(node, shape)
        if name == "cumsum":
            return self._cumsum(node, shape)
        raise Unproven(f"{node.name} ({name})")

    def _constant(self, node: Node, name: str, shape: tuple) -> Sym:
        """A filled tensor: zeros, ones, or full with a literal value (integers and booleans)."""
        if "full" in name:
            value = node.args[-1] if name != "new_full" else node.args[2] if len(node.args) > 2 else None
            value = node.kwargs.get("fill_value", value)
        else:
            value = 0 if "zeros" in name else 1
        if isinstance(value, bool) or meta(node).dtype == torch.bool:
            return Sym(sympy.true if value else sympy.false, shape)
        if not isinstance(value, int) or meta(node).is_floating_point():
            raise Unproven(f"{node.name} fills with {value!r}")
        return Sym(sympy.Integer(value), shape)

    def _unit_reshape(self, node: Node, shape: tuple) -> Sym:
        """A view/reshape that only adds or drops size-1 dims (``mask.view(B, 1, 1, S)``)."""
        x = self.value(node.args[0])
        keep_in = [d for d, n in enumerate(x.shape) if n != 1]
        keep_out = [d for d, n in enumerate(shape) if n != 1]
        if len(keep_in) != len(keep_out) or any(not same(x.shape[a], shape[b]) for a, b in zip(keep_in, keep_out)):
            raise Unproven(f"{node.name} reshapes more than unit dims")
        mapping = {_I[d]: sympy.Integer(0) for d, n in enumerate(x.shape) if n == 1}
        mapping.update({_I[a]: _T[b] for a, b in zip(keep_in, keep_out)})
        expr = _sub(x.expr, mapping)
        return Sym(_sub(expr, {_T[d]: _I[d] for d in range(len(shape))}), shape, x.tag)

    def _arange(self, args, kwargs, shape) -> Sym:
        if len(args) == 1:
            start, step = 0, 1
        else:
            start, step = args[0], (args[2] if len(args) > 2 else kwargs.get("step", 1))
        if not all(isinstance(v, int) for v in (start, step)):
            raise Unproven("arange with computed bounds")
        return Sym(start + step * _I[0], shape)

    def _index(self, node: Node, name: str, shape: tuple) -> Sym:
        x = self.value(node.args[0])
        if name == "slice":
            dim, start = node.args[1], node.args[2] if len(node.args) > 2 else 0
            step = node.args[4] if len(node.args) > 4 else 1
            idx = [slice(None)] * len(x.shape)
            idx[dim] = slice(start, None, step)
            return self._basic(x, tuple(idx), shape)
        if name == "select":
            idx = [slice(None)] * len(x.shape)
            idx[node.args[1]] = node.args[2]
            return self._basic(x, tuple(idx), shape)
        index = node.args[1]
        if name == "index":  # aten.index.Tensor: list of optional index tensors for leading dims
            return self._advanced(x, list(index), shape)
        index = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, Node) for i in index):
            if not all(isinstance(i, Node) for i in index):
                raise Unproven("mixed basic and advanced indexing")
            return self._advanced(x, list(index), shape)
        return self._basic(x, index, shape)

    def _basic(self, x: Sym, index: tuple, shape: tuple) -> Sym:
        if Ellipsis in index:
            e = index.index(Ellipsis)
            fill = len(x.shape) - sum(i is not None for i in index if i is not Ellipsis)
            index = index[:e] + (slice(None),) * fill + index[e + 1:]
        mapping, out_d, in_d = {}, 0, 0
        for i in index:
            if i is None:
                out_d += 1
                continue
            if isinstance(i, int):
                mapping[_I[in_d]] = sympy.Integer(i if i >= 0 else i + x.shape[in_d])
                in_d += 1
                continue
            if not isinstance(i, slice) or not all(isinstance(v, (int, type(None))) for v in (i.start, i.step)):
                raise Unproven(f"index {i!r}")
            start, step = i.start or 0, i.step or 1
            if start < 0:
                start += x.shape[in_d]
            mapping[_I[in_d]] = start + step * _T[out_d]
            in_d += 1
            out_d += 1
        for d in range(in_d, len(x.shape)):
            mapping[_I[d]] = _T[out_d]
            out_d += 1
        expr = _sub(x.expr, mapping)
        return Sym(_sub(expr, {_T[d]: _I[d] for d in range(len(shape))}), shape, x.tag)

    def _advanced(self, x: Sym, index: list, shape: tuple) -> Sym:
        if any(i is None for i in index) or len(index) > len(x.shape):
            raise Unproven("advanced indexing with gaps")
        idx = [self.value(i) for i in index]
        bshape = shape[: len(shape) - (len(x.shape) - len(index))]
        mapping = {_I[d]: _sub(_broadcast(v, bshape), {s: _T[k] for k, s in enumerate(_I[: len(bshape)])})
                   for d, v in enumerate(idx)}
        for d in range(len(index), len(x.shape)):
            mapping[_I[d]] = _T[len(bshape) + d - len(index)]
        expr = _sub(x.expr, mapping)
        return Sym(_sub(expr, {_T[d]: _I[d] for d in range(len(shape))}), shape, x.tag)

    def _diff(self, node: Node, shape: tuple) -> Sym:
        args = list(node.args) + [None] * 4
        x = self.value(args[0])
        n = args[1] if args[1] is not None else node.kwargs.get("n", 1)
        dim = args[2] if args[2] is not None else node.kwargs.get("dim", -1)
        prepend = args[3] if args[3] is not None else node.kwargs.get("prepend")
        if n != 1 or dim not in (-1, len(shape) - 1) or prepend is None or node.kwargs.get("append") is not None:
            raise Unproven("diff other than first differences with prepend along the last dim")
        p = self.value(prepend)
        j = _I[len(shape) - 1]
        prev = _sub(x.expr, {j: j - 1})
        first = _sub(x.expr, {j: sympy.Integer(0)}) - _sub(p.expr, {j: sympy.Integer(0)})
        expr = sympy.piecewise_fold(sympy.Piecewise((x.expr - prev, j >= 1), (first, True)))
        simple = sympy.simplify(expr)
        leaf = x.expr.func if isinstance(x.expr, sympy.core.function.AppliedUndef) else None
        # transformers: diff(position_ids, prepend=position_ids[:, :1] - 1) != 1 starts a document
        tag = ("step", args[0], leaf) if leaf is not None and sympy.simplify(first - 1) == 0 else None
        return Sym(simple, shape, tag)

    def _cumsum(self, node: Node, shape: tuple) -> Sym:
        x = self.value(node.args[0])
        dim = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
        if dim not in (-1, len(shape) - 1):
            raise Unproven("cumsum along another dim")
        if x.expr in (sympy.false, sympy.Integer(0)):
            return Sym(sympy.Integer(0), shape)
        if x.tag and x.tag[0] == "segment_start":
            doc = sympy.Function(f"doc_{x.tag[1].name}")
            return Sym(doc(*_I[: len(shape)]), shape, ("document", x.tag[1], x.tag[2]))
        raise Unproven("cumsum of a general tensor")


_T = [sympy.Symbol(f"t{d}", integer=True, nonnegative=True) for d in range(8)]


def _linear_qk(expr: Any, q: sympy.Symbol, k: sympy.Symbol) -> Optional[tuple[int, int, int]]:
    """(a, b, c) with expr == a*q + b*k + c for integer a, b, c, else None."""
    expr = sympy.expand(expr)
    if expr.free_symbols - {q, k}:
        return None
    try:
        poly = sympy.Poly(expr, q, k)
    except sympy.PolynomialError:
        return None
    if poly.total_degree() > 1:
        return None
    a, b, c = poly.coeff_monomial(q), poly.coeff_monomial(k), poly.coeff_monomial(1)
    if not all(v.is_Integer for v in (a, b, c)):
        return None
    return int(a), int(b), int(c)


def _as_nonpositive(atom: Any) -> Any:
    """An integer inequality as ``x`` with the atom equivalent to ``x <= 0``."""
    if isinstance(atom, sympy.Le):
        return atom.lhs - atom.rhs
    if isinstance(atom, sympy.Lt):
        return atom.lhs - atom.rhs + 1
    if isinstance(atom, sympy.Ge):
        return atom.rhs - atom.lhs
    return atom.rhs - atom.lhs + 1


def _cache_offset(atom: Any, q: sympy.Symbol, k: sympy.Symbol, scalars: dict) -> Optional[tuple[Node, int]]:
    """(L, c) when the atom says ``k - q <= L + c`` for a one-element graph input L (the number of
    tokens already in a KV cache: transformers' static-cache masks), else None."""
    x = sympy.expand(_as_nonpositive(atom))
    found = [a for a in x.atoms(sympy.core.function.AppliedUndef) if a.func in scalars]
    if len(found) != 1 or x.coeff(found[0]) != -1:
        return None
    lin = _linear_qk(x + found[0], q, k)
    if lin is None or lin[:2] != (-1, 1):
        return None
    return scalars[found[0].func], -lin[2]


def _band_term(atom: Any, s: MaskStructure, q: sympy.Symbol, k: sympy.Symbol, diff: str) -> bool:
    """Record ``atom`` as a bound on k - q when it is one (``diff`` names the difference)."""
    lin = _linear_qk(atom.lhs - atom.rhs, q, k)
    if not (lin and abs(lin[0]) == 1 and lin[1] == -lin[0]):
        return False
    # lhs - rhs = a*(q - k) + c; bring to  -a*(k - q) + c <= 0  (integers: x < 0 is x + 1 <= 0)
    a, _, c = lin
    if isinstance(atom, (sympy.Ge, sympy.Gt)):
        a, c = -a, -c
    if isinstance(atom, (sympy.Lt, sympy.Gt)):
        c += 1
    if a == -1:  # (k - q) + c <= 0
        s.upper = -c if s.upper is None else min(s.upper, -c)
        s.atoms.append(f"{diff} <= {-c}")
    else:  # -(k - q) + c <= 0
        s.lower = c if s.lower is None else max(s.lower, c)
        s.atoms.append(f"{diff} >= {c}")
    return True


def _over_positions(atom: Any, b: sympy.Symbol, q: sympy.Symbol, k: sympy.Symbol) -> Optional[tuple[Any, Any]]:
    """(P, the atom with P[b, k] -> k and P[b, q] -> q) when the atom compares position
    differences P[b, k] - P[b, q] of one input P (causality or a window over position ids)."""
    calls = (atom.lhs - atom.rhs).atoms(sympy.core.function.AppliedUndef)
    funcs = {c.func for c in calls}
    if len(funcs) != 1 or {c.args for c in calls} != {(b, k), (b, q)}:
        return None
    (func,) = funcs
    mapping = {func(b, k): k, func(b, q): q}
    return func, atom.func(atom.lhs.xreplace(mapping), atom.rhs.xreplace(mapping))


def _classify(atom: Any, s: MaskStructure, b: sympy.Symbol, q: sympy.Symbol, k: sympy.Symbol,
              docs: dict, pads: dict, limits: dict, scalars: dict) -> None:
    if atom == sympy.true:
        return
    if atom == sympy.false:
        s.never = True
        s.atoms.append("false")
        return
    if isinstance(atom, (sympy.Le, sympy.Lt, sympy.Ge, sympy.Gt)):
        if _band_term(atom, s, q, k, "k - q"):
            return
        positional = _over_positions(atom, b, q, k)
        if positional is not None:
            func, index_atom = positional
            if s.position_band not in (None, func):
                raise Unproven("bands over two different position tensors")
            name = str(func).removeprefix("in_")
            if _band_term(index_atom, s, q, k, f"{name}[b, k] - {name}[b, q]"):
                s.position_band = func
                return
    if isinstance(atom, sympy.Eq):
        lhs, rhs = atom.lhs, atom.rhs
        chunk = _chunk(lhs, rhs, q, k)
        if chunk is not None:
            s.chunk = chunk
            s.atoms.append(f"q // {chunk} == k // {chunk}")
            return
        if (isinstance(lhs, sympy.core.function.AppliedUndef) and lhs.func == rhs.func and lhs.func in docs
                and {lhs.args, rhs.args} == {(b, q), (b, k)}):
            s.document, s.document_positions = docs[lhs.func][1], docs[lhs.func][2]
            s.atoms.append(f"same document ({s.document.name})")
            return
    if isinstance(atom, (sympy.Le, sympy.Lt, sympy.Ge, sympy.Gt)) and s.cache_offset is None:
        offset = _cache_offset(atom, q, k, scalars)
        if offset is not None:
            s.cache_offset = offset
            s.atoms.append(f"k - q <= {offset[0].name} + {offset[1]}")
            return
    if isinstance(atom, (sympy.Le, sympy.Lt)) and atom.lhs == k and isinstance(atom.rhs, sympy.core.function.AppliedUndef):
        if atom.rhs.func in limits and atom.rhs.args == (q,):
            s.key_limit = (limits[atom.rhs.func], 1 if isinstance(atom, sympy.Le) else 0)
            s.atoms.append(f"k {'<=' if isinstance(atom, sympy.Le) else '<'} {limits[atom.rhs.func].name}[q]")
            return
    if isinstance(atom, sympy.Ne) and atom.rhs == 0 and isinstance(atom.lhs, sympy.core.function.AppliedUndef):
        if atom.lhs.func in pads and atom.lhs.args == (b, k):
            s.padding = pads[atom.lhs.func]
            s.atoms.append(f"key padding ({s.padding.name})")
            return
    raise Unproven(f"mask term {atom}")


def _chunk(lhs: Any, rhs: Any, q: sympy.Symbol, k: sympy.Symbol) -> Optional[int]:
    if not (isinstance(lhs, sympy.floor) and isinstance(rhs, sympy.floor)):
        return None
    for a, c in ((lhs, rhs), (rhs, lhs)):
        ca, cc = sympy.simplify(a.args[0] / q), sympy.simplify(c.args[0] / k)
        if ca.is_Rational and ca == cc and ca > 0 and (1 / ca).is_Integer:
            return int(1 / ca)
    return None


def analyse_mask(mask: Node, negate: bool = False) -> Union[MaskStructure, str]:
    """The structure ``mask`` (bool, broadcastable to [B, H, Sq, Sk]; True = attend, or False =
    attend when ``negate``) is proven to have, or why not."""
    value = meta(mask)
    if not isinstance(value, torch.Tensor) or value.dtype != torch.bool:
        return "the mask is not a boolean tensor"
    interp = _Interpreter()
    try:
        sym = interp.value(mask)
    except Unproven as e:
        return f"mask not recognised: {e}"
    except Exception as e:  # noqa: BLE001 - anything the interpreter trips on is simply not a proof
        return f"mask not recognised: {type(e).__name__} while interpreting it: {e}"
    rank = len(sym.shape)
    if rank < 2:
        return "mask has fewer than 2 dims"
    q, k = _I[rank - 2], _I[rank - 1]
    b = _I[0] if rank == 4 else None
    docs = {sympy.Function(f"doc_{v.tag[1].name}"): v.tag for v in interp.env.values()
            if v.tag and v.tag[0] == "document"}
    inputs = [n for n in interp.env if n.op == "placeholder" and isinstance(meta(n), torch.Tensor)]
    pads = {sympy.Function(f"in_{n.name}"): n for n in inputs if meta(n).dim() == 2}
    limits = {sympy.Function(f"in_{n.name}"): n for n in inputs if meta(n).dim() == 1}
    scalars = {sympy.Function(f"in_{n.name}"): n for n in inputs if meta(n).numel() == 1 and meta(n).dim() <= 1
               and not meta(n).dtype.is_floating_point and meta(n).dtype != torch.bool}
    expr = sympy.Not(sym.expr) if negate else sym.expr
    atoms = expr.args if isinstance(expr, sympy.And) else (expr,)
    structure = MaskStructure()
    try:
        for atom in atoms:
            _classify(atom, structure, b, q, k, docs, pads, limits, scalars)
    except Unproven as e:
        return f"mask not recognised: {e}"
    except Exception as e:  # noqa: BLE001 - a term sympy cannot take apart is not a proof either
        return f"mask not recognised: {type(e).__name__} while classifying it: {e}"
    if structure.position_band is not None and structure.position_band != structure.document_positions:
        # Documents are cut where positions stop increasing by exactly 1, so inside one document
        # P[b, k] - P[b, q] == k - q and a band over positions is the same band over indices.
        return "mask not recognised: a band over positions outside a document structure"
    return structure
