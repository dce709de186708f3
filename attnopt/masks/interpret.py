"""Interpret the subgraph that builds a mask, symbolically and with torch's typing.

Every tensor becomes a function of its own indices ``i0, i1, ...``: a sympy Boolean for a bool
tensor, an integer expression for an integer tensor (graph inputs are uninterpreted functions of
their indices). The interpreter follows torch's semantics, not Python's:

- bool and integer values are kept apart: comparing a bool with a number compares 0/1 with it,
  ``~`` and ``&`` on integers are bitwise (not modelled), ``bool + bool`` is a logical or;
- integer arithmetic wraps at the width of its dtype: every integer value carries bounds, and
  a result that may leave its dtype's range ends the proof. Values derived from int64 graph
  inputs (position ids, cache lengths) have no bound; their arithmetic is taken as exact, which
  is where int64 index arithmetic would have to pass 2**63 to differ;
- floating-point values are modelled only where every element is an integer the dtype holds
  exactly (``ones``, ``triu(ones)``, ``1 - mask``, a bool cast to float: Megatron's masks), and a
  floating graph input may be compared with a number; any other float ends the proof;
- a tensor written in place between where it is built and where it is read makes the proof
  void: ``interpret`` returns the nodes it read and the span each is read over, for the caller to
  check against the graph's writes (``attnopt.fx.Writes``).

Anything not modelled raises ``Unproven`` and the mask is kept as written.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import sympy
import torch
from torch.fx import Graph, Node

from ..fx.normalize import meta, op_name, same

I = [sympy.Symbol(f"i{d}", integer=True, nonnegative=True) for d in range(8)]
_T = [sympy.Symbol(f"t{d}", integer=True, nonnegative=True) for d in range(8)]


class Unproven(Exception):
    """The mask subgraph uses something the interpreter does not model."""


@dataclass(frozen=True)
class Value:
    """A tensor as a function of its indices: ``expr`` over i0..i{rank-1}, of ``shape`` and
    ``dtype``; for integers, ``lo``/``hi`` bound every element (None: unbounded)."""

    expr: Any
    shape: tuple
    dtype: torch.dtype
    lo: Optional[int] = None
    hi: Optional[int] = None

    @property
    def is_bool(self) -> bool:
        return self.dtype == torch.bool

    @property
    def is_int(self) -> bool:
        return not self.dtype.is_floating_point and not self.dtype.is_complex and self.dtype != torch.bool


_INT_RANGE = {torch.uint8: (0, 2**8 - 1), torch.int8: (-2**7, 2**7 - 1), torch.int16: (-2**15, 2**15 - 1),
              torch.int32: (-2**31, 2**31 - 1), torch.int64: (-2**63, 2**63 - 1)}


def _sub(expr: Any, mapping: dict) -> Any:
    """Simultaneous substitution of index symbols."""
    return sympy.sympify(expr).xreplace(mapping) if mapping else expr


def _shift(expr: Any, at: int, by: int, rank: int) -> Any:
    """Renumber i_d -> i_{d+by} for d >= at (an axis inserted at ``at``)."""
    return _sub(expr, {I[d]: I[d + by] for d in range(at, rank)})


def _broadcast(v: Value, shape: tuple) -> Any:
    """``v``'s expression read at the indices of a tensor of ``shape`` it broadcasts to."""
    off = len(shape) - len(v.shape)
    if off < 0:
        raise Unproven("broadcast to fewer dims")
    mapping = {}
    for d, size in enumerate(v.shape):
        mapping[I[d]] = sympy.Integer(0) if (size == 1 and shape[d + off] != 1) else I[d + off]
    return _sub(v.expr, mapping)


def boolean(expr: Any) -> Any:
    """A Boolean for a Piecewise whose values are Booleans (what folding a comparison into a
    Piecewise 0/1 leaves), else ``expr`` itself."""
    if not isinstance(expr, sympy.Piecewise):
        return expr
    result, earlier = sympy.false, sympy.true
    for value, cond in expr.args:
        if not isinstance(value, sympy.logic.boolalg.Boolean):
            return expr
        result = sympy.Or(result, sympy.And(earlier, cond, boolean(value)))
        earlier = sympy.And(earlier, sympy.Not(cond))
    return result


def _as_number(v: Value, shape: tuple) -> Any:
    """The value as a number: a bool is 0 or 1."""
    e = _broadcast(v, shape)
    return sympy.Piecewise((1, e), (0, True)) if v.is_bool else e


def _as_bool(v: Value, shape: tuple) -> Any:
    """The value as torch converts it to bool: nonzero is True."""
    e = _broadcast(v, shape)
    return e if v.is_bool else boolean(sympy.piecewise_fold(sympy.Ne(e, 0)))


def _bounds(v: Value) -> tuple[Optional[int], Optional[int]]:
    return (0, 1) if v.is_bool else (v.lo, v.hi)


_CMP: dict[str, Callable] = {"le": sympy.Le, "lt": sympy.Lt, "ge": sympy.Ge, "gt": sympy.Gt,
                             "eq": sympy.Eq, "ne": sympy.Ne}


def _range_of(op: str, a: tuple, b: tuple) -> tuple[Optional[int], Optional[int]]:
    """Interval arithmetic over possibly unbounded ends."""
    (alo, ahi), (blo, bhi) = a, b
    if op == "add":
        return (None if alo is None or blo is None else alo + blo, None if ahi is None or bhi is None else ahi + bhi)
    if op == "sub":
        return (None if alo is None or bhi is None else alo - bhi, None if ahi is None or blo is None else ahi - blo)
    if op == "mul":
        if None in (alo, ahi, blo, bhi):
            return None, None
        corners = [x * y for x in (alo, ahi) for y in (blo, bhi)]
        return min(corners), max(corners)
    raise AssertionError(op)


@dataclass
class Interpretation:
    """The mask's value and what the proof read: ``spans`` maps every node the value depends on
    to the last node (in graph order) that reads it within the mask subgraph, and ``leaves`` the
    sympy functions standing for graph inputs, and ``documents`` those standing for document ids
    cut from a position input. For a flex ``mask_mod``, ``buffers`` are the graph values its
    extra arguments are bound to (leaves like graph inputs: their values are read at the call)."""

    value: Value
    spans: dict[Node, Node]
    leaves: dict[Any, Node] = field(default_factory=dict)
    documents: dict[Any, Node] = field(default_factory=dict)
    buffers: tuple[Node, ...] = ()


class _Interpreter:
    def __init__(self, bound: Optional[dict[Node, Node]] = None) -> None:
        self.env: dict[Node, Value] = {}
        self.leaves: dict[Any, Node] = {}
        self.documents: dict[Any, Node] = {}
        self.bound = bound or {}  # a mask_mod's buffer placeholders -> the graph values they stand for

    def value(self, x: Any, like: Optional[torch.dtype] = None) -> Value:
        if isinstance(x, Node):
            if x not in self.env:
                self.env[x] = self.run(x)
            return self.env[x]
        if isinstance(x, bool):
            return Value(sympy.true if x else sympy.false, (), torch.bool)
        if isinstance(x, int):
            return Value(sympy.Integer(x), (), torch.int64, x, x)
        if isinstance(x, float) and abs(x) < 2**24:  # a Python float beside exact values
            whole = int(x) if x.is_integer() else None
            return Value(sympy.Rational(x), (), torch.float64, whole, whole)
        raise Unproven(f"constant {x!r} of type {type(x).__name__}")

    def run(self, node: Node) -> Value:
        if node.op in ("placeholder", "get_attr"):
            return self._leaf(node)
        if node.op not in ("call_function", "call_method"):
            raise Unproven(f"{node.op} {node.name}")
        v = meta(node)
        if isinstance(v, torch.SymInt):  # a size computed in the graph (Sk - Sq under dynamic shapes)
            expr = v.node.expr
            if not expr.is_Integer:
                raise Unproven(f"{node.name} is the size {expr}, known only at run time")
            return Value(sympy.Integer(int(expr)), (), torch.int64, int(expr), int(expr))
        if not isinstance(v, torch.Tensor):
            raise Unproven(f"{node.name} has no tensor metadata")
        name, shape, dtype = op_name(node), tuple(v.shape), v.dtype
        handler = _HANDLERS.get(name)
        if handler is None:
            raise Unproven(f"{node.name} ({name})")
        out = handler(self, node, shape, dtype)
        return self._checked(out, node)

    def _checked(self, out: Value, node: Node) -> Value:
        """An integer result must fit its dtype (torch would wrap where the proof would not); a
        floating result must be integers the dtype holds exactly."""
        if out.dtype.is_floating_point:
            if not _exact(out):
                raise Unproven(f"{node.name} computes {out.dtype} values that may not be exact")
            return out
        if not out.is_int:
            return out
        lo, hi = _INT_RANGE.get(out.dtype, (None, None))
        if lo is None:
            raise Unproven(f"{node.name} has dtype {out.dtype}")
        if out.dtype == torch.int64 and (out.lo is None or out.hi is None):
            return out  # derived from an unbounded int64 input: exact (see the module docstring)
        if out.lo is None or out.hi is None or out.lo < lo or out.hi > hi:
            raise Unproven(f"{node.name} may wrap around in {out.dtype}")
        return out

    def _leaf(self, node: Node) -> Value:
        """A graph input: an uninterpreted function of its indices."""
        v = meta(node)
        if not isinstance(v, torch.Tensor):
            raise Unproven(f"{node.name} has no tensor metadata")
        shape = tuple(v.shape)
        node = self.bound.get(node, node)
        f = sympy.Function(f"in_{node.name}", integer=not v.dtype.is_floating_point)
        self.leaves[f] = node
        expr = f(*I[: len(shape)]) if shape else f(sympy.Integer(0))
        if v.dtype == torch.bool:
            return Value(sympy.Ne(expr, 0), shape, torch.bool)
        if v.dtype.is_floating_point:
            return Value(expr, shape, v.dtype)
        lo, hi = _INT_RANGE.get(v.dtype, (None, None))
        if v.dtype == torch.int64:
            lo = hi = None
        return Value(expr, shape, v.dtype, lo, hi)

    # -- handlers ---------------------------------------------------------------------------

    def arange(self, node: Node, shape: tuple, dtype: torch.dtype) -> Value:
        args = node.args
        start = 0 if len(args) == 1 else args[0]  # the end is the recorded length
        step = args[2] if len(args) > 2 else node.kwargs.get("step", 1)
        if not all(isinstance(v, int) for v in (start, step)):
            raise Unproven("arange with computed bounds")
        if dtype.is_floating_point:
            raise Unproven(f"arange in {dtype}")
        if not isinstance(shape[0], int):  # a symbolic length: bounded on one side only
            return Value(start + step * I[0], shape, dtype, start if step > 0 else None, start if step < 0 else None)
        last = start + step * (shape[0] - 1) if shape[0] else start
        return Value(start + step * I[0], shape, dtype, min(start, last), max(start, last))

    def filled(self, node: Node, shape: tuple, dtype: torch.dtype) -> Value:
        """zeros, ones or full with a literal value."""
        name = op_name(node)
        if "full" in name:
            value = node.args[-1] if name != "new_full" else node.args[2] if len(node.args) > 2 else None
            value = node.kwargs.get("fill_value", value)
        else:
            value = 0 if "zeros" in name else 1
        if dtype == torch.bool:
            return Value(sympy.true if value else sympy.false, shape, dtype)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, (int, bool)):
            raise Unproven(f"{node.name} fills {dtype} with {value!r}")
        return Value(sympy.Integer(int(value)), shape, dtype, int(value), int(value))

    def reshape(self, node: Node, shape: tuple, dtype: torch.dtype) -> Value:
        """A view/reshape that only adds or drops size-1 dims (``mask.view(B, 1, 1, S)``)."""
        if any(isinstance(a, torch.dtype) for a in (*node.args[1:], *node.kwargs.values())):
            raise Unproven(f"{node.name} reinterprets bits")
        x = self.value(node.args[0])
        keep_in = [d for d, n in enumerate(x.shape) if n != 1]
        keep_out = [d for d, n in enumerate(shape) if n != 1]
        if len(keep_in) != len(keep_out) or any(not same(x.shape[a], shape[b]) for a, b in zip(keep_in, keep_out)):
            raise Unproven(f"{node.name} reshapes more than unit dims")
        mapping = {I[d]: sympy.Integer(0) for d, n in enumerate(x.shape) if n == 1}
        mapping.update({I[a]: _T[b] for a, b in zip(keep_in, keep_out)})
        expr = _sub(_sub(x.expr, mapping), {_T[d]: I[d] for d in range(len(shape))})
        return Value(expr, shape, x.dtype, x.lo, x.hi)

    def expand(self, node: Node, shape: tuple, dtype: torch.dtype) -> Value:
        x = self.value(node.args[0])
        return Value(_broadcast(x, shape), shape, x.dtype, x.lo, x.hi)

    def unsqueeze(self, node: Node, shape: tuple, dtype: torch.dtype) -> Value:
        x = self.value(node.args[0])
        d = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
        d = d + len(shape) if d < 0 else d
        return Value(_shift(x.expr, d, 1, len(x.shape)), shape, x.dtype, x.lo, x.hi)

    def cast(self, node: Node, shape: tuple, dtype: torch.dtype) -> Value:
        """``to``/``type``/``bool``/``long``/copies: a change of dtype with torch's conversions."""
        x = self.value(node.args[0])
        src = x.dtype
        if dtype == src:  # a copy, a device move or a no-op conversion keeps values
            return Value(x.expr, shape, dtype, x.lo, x.hi)
        if src.is_floating_point and not _exact(x) and not (dtype == torch.bool and _is_leaf(x)):
            raise Unproven(f"{node.name} converts a computed {src} to {dtype}")
        if dtype == torch.bool:
            return Value(_as_bool(x, shape), shape, dtype)
        lo, hi = _bounds(x)
        return Value(_as_number(x, shape), shape, dtype, lo, hi)  # checked to fit (or be exact in) dtype

    def compare(self, node: Node, shape: tuple, dtype: torch.dtype) -> Value:
        name = op_name(node).strip("_")
        a, b = (self.value(x) for x in node.args[:2])
        for side in (a, b):
            if side.dtype.is_floating_point and not _is_leaf(side) and not _exact(side) \
                    and not (side.shape == () and side.expr.is_Rational):
                raise Unproven(f"{node.name} compares a computed {side.dtype} value")
        if (a.dtype.is_floating_point or b.dtype.is_floating_point) and (a.is_int or b.is_int) \
                and not all(_small(v) for v in (a, b) if v.is_int):
            raise Unproven(f"{node.name} compares integers as floating point")
        if a.is_bool and b.is_bool and name in ("eq", "ne"):
            x, y = _broadcast(a, shape), _broadcast(b, shape)
            return Value(sympy.Equivalent(x, y) if name == "eq" else sympy.Xor(x, y), shape, torch.bool)
        expr = sympy.piecewise_fold(_CMP[name](_as_number(a, shape), _as_number(b, shape)))
        return Value(boolean(expr), shape, torch.bool)

    def arith(self, node: Node, shape: tuple, dtype: torch.dtype) -> Value:
        name = op_name(node)
        if name == "div" and node.kwargs.get("rounding_mode") != "floor":
            raise Unproven(f"{node.name} divides without rounding down")
        if any(k not in ("rounding_mode",) for k in node.kwargs):
            raise Unproven(f"{node.name} has arguments {sorted(node.kwargs)}")
        a, b = (self.value(x) for x in node.args[:2])
        if name == "rsub":  # aten's ``c - x``: rsub(x, c)
            name, a, b = "sub", b, a
        if dtype == torch.bool:  # bool + bool is or, bool * bool is and
            if name == "add":
                return Value(sympy.Or(_as_bool(a, shape), _as_bool(b, shape)), shape, dtype)
            if name == "mul":
                return Value(sympy.And(_as_bool(a, shape), _as_bool(b, shape)), shape, dtype)
            raise Unproven(f"{node.name} ({name}) on bool")
        if (dtype.is_floating_point or a.dtype.is_floating_point or b.dtype.is_floating_point) \
                and not (_exact(a) and _exact(b)):
            raise Unproven(f"{node.name} computes in {dtype}")
        x, y = _as_number(a, shape), _as_number(b, shape)
        if name in ("floordiv", "floor_divide", "div"):
            if not (b.lo is not None and b.lo == b.hi and b.lo > 0):
                raise Unproven(f"{node.name} divides by a value not known to be a positive constant")
            c = b.lo
            lo, hi = _bounds(a)
            return Value(sympy.floor(x / c), shape, dtype, None if lo is None else lo // c,
                         None if hi is None else hi // c)
        lo, hi = _range_of(name, _bounds(a), _bounds(b))
        fn = {"add": operator.add, "sub": operator.sub, "mul": operator.mul}[name]
        return Value(sympy.expand(fn(x, y)), shape, dtype, lo, hi)

    def logic(self, node: Node, shape: tuple, dtype: torch.dtype) -> Value:
        name = op_name(node)
        a, b = (self.value(x) for x in node.args[:2])
        if not name.startswith("logical") and not (a.is_bool and b.is_bool):
            raise Unproven(f"{node.name} ({name}) is bitwise on integers")
        fn = sympy.And if "and" in name else sympy.Or if "or" in name else sympy.Xor
        return Value(fn(_as_bool(a, shape), _as_bool(b, shape)), shape, torch.bool)

    def negate(self, node: Node, shape: tuple, dtype: torch.dtype) -> Value:
        x = self.value(node.args[0])
        if op_name(node) != "logical_not" and not x.is_bool:
            raise Unproven(f"{node.name} is a bitwise not of integers")
        return Value(sympy.Not(_as_bool(x, shape)), shape, torch.bool)

    def where(self, node: Node, shape: tuple, dtype: torch.dtype) -> Value:
        if len(node.args) != 3:
            raise Unproven(f"{node.name}: where with one argument")
        cond, a, b = node.args
        c = _as_bool(self.value(cond), shape)
        x, y = self.value(a), self.value(b)
        return self._select(c, x, y, shape, dtype)

    def masked_fill(self, node: Node, shape: tuple, dtype: torch.dtype) -> Value:
        x, m, fill = node.args[0], node.args[1], node.args[2] if len(node.args) > 2 else node.kwargs["value"]
        return self._select(_as_bool(self.value(m), shape), self.value(fill), self.value(x), shape, dtype)

    def _select(self, c: Any, x: Value, y: Value, shape: tuple, dtype: torch.dtype) -> Value:
        if dtype == torch.bool:
            if not (x.is_bool and y.is_bool):
                raise Unproven("a bool selection between non-bool values")
            xe, ye = _broadcast(x, shape), _broadcast(y, shape)
            return Value(sympy.Or(sympy.And(c, xe), sympy.And(sympy.Not(c), ye)), shape, dtype)
        if dtype.is_floating_point and not (_exact(x) and _exact(y)):
            raise Unproven(f"a selection in {dtype}")
        (xl, xh), (yl, yh) = _bounds(x), _bounds(y)
        lo = None if xl is None or yl is None else min(xl, yl)
        hi = None if xh is None or yh is None else max(xh, yh)
        expr = sympy.Piecewise((_as_number(x, shape), c), (_as_number(y, shape), True))
        return Value(expr, shape, dtype, lo, hi)

    def index(self, node: Node, shape: tuple, dtype: torch.dtype) -> Value:
        name = op_name(node)
        x = self.value(node.args[0])
        if name == "slice":
            dim = node.args[1] if len(node.args) > 1 else 0
            start = node.args[2] if len(node.args) > 2 else None
            step = node.args[4] if len(node.args) > 4 else 1
            idx = [slice(None)] * len(x.shape)
            idx[dim] = slice(start, None, step)
            return self._basic(x, tuple(idx), shape)
        if name == "select":
            idx = [slice(None)] * len(x.shape)
            idx[node.args[1]] = node.args[2]
            return self._basic(x, tuple(idx), shape)
        index = node.args[1]
        if name == "index":  # aten.index.Tensor: optional index tensors for the leading dims
            return self._advanced(x, list(index), shape)
        index = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, Node) for i in index):
            if not all(isinstance(i, Node) for i in index):
                raise Unproven("mixed basic and advanced indexing")
            return self._advanced(x, list(index), shape)
        return self._basic(x, index, shape)

    def wrapped_index(self, node: Node, shape: tuple, dtype: torch.dtype) -> Value:
        """``flat_apply(spec, ModIndex, "...ModIndex", x, *indices)``: export's spelling of ``x[indices]``
        inside a flex mask_mod (an autograd.Function that indexes with ``aten.index``)."""
        if len(node.args) < 5 or not str(node.args[2]).endswith(".ModIndex"):
            raise Unproven(f"{node.name} ({op_name(node)}) applies something other than an index")
        return self._advanced(self.value(node.args[3]), list(node.args[4:]), shape)

    def _basic(self, x: Value, index: tuple, shape: tuple) -> Value:
        if Ellipsis in index:
            e = index.index(Ellipsis)
            fill = len(x.shape) - sum(i is not None for i in index if i is not Ellipsis)
            index = index[:e] + (slice(None),) * fill + index[e + 1:]
        mapping, out_d, in_d = {}, 0, 0
        for i in index:
            if i is None:
                out_d += 1
                continue
            if isinstance(i, int) and not isinstance(i, bool):
                mapping[I[in_d]] = sympy.Integer(i if i >= 0 else i + x.shape[in_d])
                in_d += 1
                continue
            if not isinstance(i, slice) or not all(isinstance(v, (int, type(None))) for v in (i.start, i.step)):
                raise Unproven(f"index {i!r}")
            start, step = i.start or 0, i.step or 1
            if start < 0:
                start += x.shape[in_d]
            if step < 1 or start < 0:
                raise Unproven(f"index {i!r}")
            mapping[I[in_d]] = start + step * _T[out_d]
            in_d += 1
            out_d += 1
        for d in range(in_d, len(x.shape)):
            mapping[I[d]] = _T[out_d]
            out_d += 1
        expr = _sub(_sub(x.expr, mapping), {_T[d]: I[d] for d in range(len(shape))})
        return Value(expr, shape, x.dtype, x.lo, x.hi)

    def _advanced(self, x: Value, index: list, shape: tuple) -> Value:
        if any(i is None for i in index) or len(index) > len(x.shape):
            raise Unproven("advanced indexing with gaps")
        idx = [self.value(i) for i in index]
        for i, v in zip(index, idx):
            if not v.is_int:
                raise Unproven(f"index {getattr(i, 'name', i)} is not an integer tensor")
            if v.lo is None or v.lo < 0:
                raise Unproven(f"index {getattr(i, 'name', i)} may be negative")
        bshape = shape[: len(shape) - (len(x.shape) - len(index))]
        mapping = {I[d]: _sub(_broadcast(v, bshape), {s: _T[k] for k, s in enumerate(I[: len(bshape)])})
                   for d, v in enumerate(idx)}
        for d in range(len(index), len(x.shape)):
            mapping[I[d]] = _T[len(bshape) + d - len(index)]
        expr = _sub(_sub(x.expr, mapping), {_T[d]: I[d] for d in range(len(shape))})
        return Value(expr, shape, x.dtype, x.lo, x.hi)

    def diff(self, node: Node, shape: tuple, dtype: torch.dtype) -> Value:
        """First differences along the last dim with ``prepend`` (transformers cuts documents
        where ``diff(position_ids, prepend=position_ids[:, :1] - 1) != 1``)."""
        args = list(node.args) + [None] * 4
        x = self.value(args[0])
        n = args[1] if args[1] is not None else node.kwargs.get("n", 1)
        dim = args[2] if args[2] is not None else node.kwargs.get("dim", -1)
        prepend = args[3] if args[3] is not None else node.kwargs.get("prepend")
        if n != 1 or dim not in (-1, len(shape) - 1) or prepend is None or node.kwargs.get("append") is not None:
            raise Unproven("diff other than first differences with prepend along the last dim")
        if not x.is_int:
            raise Unproven(f"diff of {x.dtype}")
        p = self.value(prepend)
        if p.shape[-1:] != (1,):
            raise Unproven("diff with a prepend of more than one column")
        j = I[len(shape) - 1]
        prev = _sub(x.expr, {j: j - 1})
        first = _sub(x.expr, {j: sympy.Integer(0)}) - _sub(_broadcast(p, shape[:-1] + (1,)), {j: sympy.Integer(0)})
        expr = sympy.Piecewise((sympy.expand(x.expr - prev), j >= 1), (sympy.expand(first), True))
        lo, hi = _range_of("sub", _bounds(x), _bounds(x))
        plo, phi = _range_of("sub", _bounds(x), _bounds(p))
        lo = None if lo is None or plo is None else min(lo, plo)
        hi = None if hi is None or phi is None else max(hi, phi)
        return Value(expr, shape, x.dtype, lo, hi)

    def cumsum(self, node: Node, shape: tuple, dtype: torch.dtype) -> Value:
        """Document ids: the running count of document starts of a [B, S] position input P,
        where a start is a step of P other than +1. Proven from the expression being summed
        (its value at every j >= 1 must be exactly ``P[b, j] - P[b, j-1] != 1``), whatever
        indexing produced it; any other running sum is not modelled."""
        x = self.value(node.args[0])
        dim = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
        if dim not in (-1, len(shape) - 1) or len(shape) != 2:
            raise Unproven("cumsum other than along the last dim of a [B, S] tensor")
        if dtype != torch.int64:
            raise Unproven(f"cumsum in {dtype}")
        number = _as_number(x, shape)
        if number.is_Integer:  # a running sum of a constant (no document starts: all zeros)
            n = shape[1] if isinstance(shape[1], int) else None
            c = int(number)
            return Value(c * (I[1] + 1), shape, dtype, min(0, c * n) if n else None, max(0, c * n) if n else None)
        positions = _document_starts(x, shape, self.leaves)
        if positions is None:
            raise Unproven("cumsum of something other than the document starts of a position input")
        doc = sympy.Function(f"doc_{positions.name}", integer=True)
        self.documents[doc] = positions
        return Value(doc(*I[:2]), shape, dtype, 0, shape[1] if isinstance(shape[1], int) else None)


    def absolute(self, node: Node, shape: tuple, dtype: torch.dtype) -> Value:
        x = self.value(node.args[0])
        if not x.is_int and not _exact(x):
            raise Unproven(f"{node.name} (abs) of {x.dtype}")
        lo, hi = _bounds(x)
        top = None if lo is None or hi is None else max(abs(lo), abs(hi))
        return Value(sympy.Abs(_as_number(x, shape)), shape, dtype, 0, top)

    def band(self, node: Node, shape: tuple, dtype: torch.dtype) -> Value:
        """``triu``/``tril``: the elements on and above (below) the ``diagonal``-th diagonal of the
        last two dims, zero elsewhere."""
        x = self.value(node.args[0])
        d = node.args[1] if len(node.args) > 1 else node.kwargs.get("diagonal", 0)
        if not isinstance(d, int) or len(shape) < 2:
            raise Unproven(f"{node.name} with diagonal {d!r}")
        row, col = I[len(shape) - 2], I[len(shape) - 1]
        keep = col - row >= d if op_name(node) == "triu" else col - row <= d
        if x.is_bool:
            return Value(sympy.And(_broadcast(x, shape), keep), shape, dtype)
        lo, hi = _bounds(x)
        return Value(sympy.Piecewise((_broadcast(x, shape), keep), (0, True)), shape, dtype,
                     None if lo is None else min(lo, 0), None if hi is None else max(hi, 0))


_MANTISSA = {torch.float16: 11, torch.bfloat16: 8, torch.float32: 24, torch.float64: 53}


def _exact(v: Value) -> bool:
    """Every element is an integer the dtype holds exactly (bools and integers trivially)."""
    if not v.dtype.is_floating_point:
        return True
    bits = _MANTISSA.get(v.dtype)
    return bits is not None and v.lo is not None and v.hi is not None and -2**bits <= v.lo and v.hi <= 2**bits


def _is_leaf(v: Value) -> bool:
    return isinstance(v.expr, sympy.core.function.AppliedUndef)


def _small(v: Value) -> bool:
    """Integers exactly representable in float32 (comparisons promote to the float's dtype)."""
    return v.lo is not None and v.hi is not None and -2**24 <= v.lo and v.hi <= 2**24


def _document_starts(x: Value, shape: tuple, leaves: dict) -> Optional[Node]:
    """The position input P when ``x`` is, at every j >= 1, ``P[b, j] - P[b, j - 1] != 1``."""
    t = sympy.Symbol("t", integer=True, positive=True)
    b = I[0]
    expr = _as_bool(x, shape) if x.is_bool else boolean(sympy.piecewise_fold(sympy.Ne(x.expr, 0)))
    at = boolean(sympy.piecewise_fold(_sub(expr, {I[1]: t})))
    calls = at.atoms(sympy.core.function.AppliedUndef)
    funcs = {c.func for c in calls}
    if len(funcs) != 1 or {c.args for c in calls} != {(b, t), (b, t - 1)}:
        return None
    (func,) = funcs
    node = leaves.get(func)
    v = meta(node) if node is not None else None
    if v is None or v.dim() != 2 or v.dtype.is_floating_point or v.dtype == torch.bool:
        return None
    d, w = sympy.Symbol("d", integer=True), sympy.Symbol("w", integer=True)
    reduced = at.xreplace({func(b, t): w + d, func(b, t - 1): w})
    return node if sympy.simplify(reduced) == sympy.Ne(d, 1) else None


_HANDLERS: dict[str, Callable] = {"arange": _Interpreter.arange, "diff": _Interpreter.diff,
                                  "triu": _Interpreter.band, "tril": _Interpreter.band, "abs": _Interpreter.absolute,
                                  "cumsum": _Interpreter.cumsum, "where": _Interpreter.where,
                                  "masked_fill": _Interpreter.masked_fill, "expand": _Interpreter.expand,
                                  "unsqueeze": _Interpreter.unsqueeze, "flat_apply": _Interpreter.wrapped_index}
for _n in ("zeros", "zeros_like", "new_zeros", "new_ones", "ones", "ones_like", "full", "full_like", "new_full"):
    _HANDLERS[_n] = _Interpreter.filled
for _n in ("view", "reshape", "_unsafe_view"):
    _HANDLERS[_n] = _Interpreter.reshape
for _n in ("to", "bool", "long", "int", "short", "char", "byte", "float", "double", "half", "bfloat16", "type",
           "type_as", "_to_copy", "contiguous", "clone",
           "alias", "detach", "lift_fresh_copy"):
    _HANDLERS[_n] = _Interpreter.cast
for _n in ("le", "lt", "ge", "gt", "eq", "ne", "__le__", "__lt__", "__ge__", "__gt__", "__eq__", "__ne__"):
    _HANDLERS[_n] = _Interpreter.compare
for _n in ("add", "sub", "rsub", "mul", "floordiv", "floor_divide", "div"):
    _HANDLERS[_n] = _Interpreter.arith
for _n in ("and_", "__and__", "bitwise_and", "logical_and", "or_", "__or__", "bitwise_or", "logical_or",
           "xor", "__xor__", "bitwise_xor", "logical_xor"):
    _HANDLERS[_n] = _Interpreter.logic
for _n in ("invert", "__invert__", "bitwise_not", "logical_not"):
    _HANDLERS[_n] = _Interpreter.negate
for _n in ("getitem", "index", "slice", "select"):
    _HANDLERS[_n] = _Interpreter.index


def interpret(mask: Node) -> Interpretation:
    """The symbolic value of ``mask`` and the nodes it was read from; raises Unproven."""
    interp = _Interpreter()
    value = interp.value(mask)
    spans: dict[Node, Node] = {}
    for node in interp.env:
        readers = [u for u in node.users if u in interp.env]
        spans[node] = max(readers, key=_order(mask)) if readers else node
    return Interpretation(value, spans, interp.leaves, interp.documents)


MASK_MOD_INDICES = ("b", "h", "q_idx", "kv_idx")
_J = [sympy.Symbol(f"j_{name}", integer=True, nonnegative=True) for name in MASK_MOD_INDICES]


def interpret_mask_mod(graph: Graph, sizes: tuple, buffers: Sequence[Node]) -> Interpretation:
    """The value of a flex ``mask_mod`` graph as a [B, H, Sq, Sk] bool mask; raises Unproven.

    Its first four placeholders are (b, h, q_idx, kv_idx): int32 scalars bound to the mask's
    indices, within ``sizes``; the others stand for ``buffers``, the graph values the call passes
    (leaves, as graph inputs are for a tensor mask). The indices get symbols of their own while the
    graph runs, so that tensors it builds along the way keep i0, i1, ... for their own axes.
    """
    placeholders = list(graph.find_nodes(op="placeholder"))
    if len(placeholders) != 4 + len(buffers):
        raise Unproven(f"mask_mod takes {len(placeholders)} arguments, not 4 indices and {len(buffers)} buffers")
    interp = _Interpreter(dict(zip(placeholders[4:], buffers)))
    for p, symbol, size in zip(placeholders, _J, sizes):
        v = meta(p)
        if not isinstance(v, torch.Tensor) or v.dim() != 0 or v.dtype not in (torch.int32, torch.int64):
            raise Unproven(f"mask_mod index {p.name} is not an integer scalar")
        top = _INT_RANGE[v.dtype][1]
        interp.env[p] = Value(symbol, (), v.dtype, 0, min(size - 1, top) if isinstance(size, int) else top)
    (output,) = graph.find_nodes(op="output")
    result = output.args[0]
    result = result[0] if isinstance(result, (tuple, list)) and len(result) == 1 else result
    value = interp.value(result)
    if value.shape != () or not value.is_bool or sympy.sympify(value.expr).free_symbols & set(I):
        raise Unproven("mask_mod does not return a bool scalar")
    expr = sympy.sympify(value.expr).xreplace(dict(zip(_J, I)))
    return Interpretation(Value(expr, tuple(sizes), torch.bool), {}, interp.leaves, interp.documents, tuple(buffers))


def _order(anchor: Node) -> Callable[[Node], int]:
    index = {n: i for i, n in enumerate(anchor.graph.nodes)}
    return lambda n: index.get(n, -1)


__all__ = ["I", "MASK_MOD_INDICES", "Interpretation", "Unproven", "Value", "boolean", "interpret",
           "interpret_mask_mod"]
