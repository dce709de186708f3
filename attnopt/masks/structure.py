"""The structure a mask was proven to have, as typed values.

A proven mask is a conjunction of terms over (batch b, query q, key k), each one of:

- a band: bounds on ``k - q`` (over indices, or over position ids inside one document);
- chunks: ``q // C == k // C``, or over position ids inside one document: ``P[b, q] // C ==
  P[b, k] // C`` (Llama 4's chunks in packed batches);
- documents: ``doc[b, q] == doc[b, k]``, document ids cut from a [B, S] position input where it
  does not step by exactly +1 (what transformers builds for packed batches);
- document ids: ``ids[b, q] == ids[b, k]`` (or ``ids[q] == ids[k]``) for an integer input
  (torchtitan's flex document mask). That is packed documents only where each id is one
  contiguous run of its row, which nothing here proves: a lowering checks it at run time;
- key padding: ``pad[b, k] != 0`` for a [B, >= Sk] input;
- a key limit ``k < P[q] + e`` (a decode query's position), or a cache offset ``k - q <= L + c``
  (queries after L cached tokens, L a one-element input);
- false (nothing attends).

Bounds are explicit and optional: a strict ``k < q`` is ``k - q <= -1``, never a sentinel.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

import sympy
import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..fx.normalize import meta, same
from .interpret import I, Interpretation, Unproven


@dataclass(frozen=True)
class Band:
    """Keys k with ``lower <= k - q <= upper``; None leaves that side unbounded."""

    lower: Optional[int] = None
    upper: Optional[int] = None

    def __and__(self, other: "Band") -> "Band":
        lows = [b for b in (self.lower, other.lower) if b is not None]
        highs = [b for b in (self.upper, other.upper) if b is not None]
        return Band(max(lows) if lows else None, min(highs) if highs else None)

    @property
    def unbounded(self) -> bool:
        return self.lower is None and self.upper is None

    @property
    def empty(self) -> bool:
        return self.lower is not None and self.upper is not None and self.lower > self.upper

    def keeps_a_key(self, sq: Any, sk: Any) -> bool:
        """Every query row 0 <= q < Sq keeps some key 0 <= k < Sk (static lengths, or equal ones
        with the diagonal inside the band)."""
        if self.empty:
            return False
        if self.unbounded:
            return sk > 0 if isinstance(sk, int) else bool(statically_known_true(sk >= 1))
        if isinstance(sq, int) and isinstance(sk, int):
            if sq == 0:
                return True
            if sk == 0:
                return False

            def row(q: int) -> bool:
                first = max(0, q + self.lower) if self.lower is not None else 0
                last = min(sk - 1, q + self.upper) if self.upper is not None else sk - 1
                return first <= last

            return row(0) and row(sq - 1)  # kept keys per row are a concave function of q
        return same(sq, sk) and (self.lower is None or self.lower <= 0) and (self.upper is None or self.upper >= 0)


@dataclass(frozen=True)
class KeyLimit:
    """Keys ``k < positions[q] + extra`` for a 1-D position input."""

    positions: Node
    extra: int


@dataclass(frozen=True)
class CacheOffset:
    """Keys ``k - q <= length + offset`` for a one-element input ``length``."""

    length: Node
    offset: int


@dataclass
class MaskStructure:
    """A mask proven equal to the conjunction of its terms, for every batch, head, query and key."""

    band: Band = Band()
    band_positions: Optional[Node] = None  # the band bounds P[b, k] - P[b, q], not k - q
    chunk: Optional[int] = None
    chunk_positions: Optional[Node] = None  # the chunks are over P[b, q] // C, not q // C
    documents: Optional[Node] = None  # [B, S] positions whose steps other than +1 start documents
    document_ids: Optional[Node] = None  # [B, S] or [S] integer ids: same id, same document
    padding: Optional[Node] = None  # [B, >= Sk] keep-mask over keys (nonzero = keep)
    key_limit: Optional[KeyLimit] = None
    cache_offset: Optional[CacheOffset] = None
    never: bool = False
    atoms: list[str] = field(default_factory=list)

    def terms(self) -> set[str]:
        """The kinds of terms present, besides the band."""
        names = ("chunk", "documents", "document_ids", "padding", "key_limit", "cache_offset")
        return {n for n in names if getattr(self, n) is not None} | ({"never"} if self.never else set())

    def inputs(self) -> list[Node]:
        """The graph values the terms read (a lowering that rebuilds the mask reads them at the call)."""
        nodes = (self.band_positions, self.chunk_positions, self.documents, self.document_ids, self.padding,
                 self.key_limit and self.key_limit.positions, self.cache_offset and self.cache_offset.length)
        return list(dict.fromkeys(n for n in nodes if n is not None))

    def with_band(self, band: Band) -> "MaskStructure":
        return replace(self, band=self.band & band)

    def describe(self) -> str:
        return " & ".join(self.atoms) if self.atoms else "all true"


def _linear_qk(expr: Any, q: sympy.Symbol, k: sympy.Symbol) -> Optional[tuple[int, int, int]]:
    """(a, b, c) with expr == a*q + b*k + c for integers a, b, c, else None."""
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


def _nonpositive(atom: Any) -> Any:
    """An integer inequality as ``x`` with the atom equivalent to ``x <= 0``."""
    if isinstance(atom, sympy.Le):
        return atom.lhs - atom.rhs
    if isinstance(atom, sympy.Lt):
        return atom.lhs - atom.rhs + 1
    if isinstance(atom, sympy.Ge):
        return atom.rhs - atom.lhs
    return atom.rhs - atom.lhs + 1


def _band_bound(atom: Any, q: sympy.Symbol, k: sympy.Symbol) -> Optional[Band]:
    """The bound on k - q an inequality states, if it is one (integers: a bound c / a rounds
    inwards)."""
    lin = _linear_qk(_nonpositive(atom), q, k)
    if not (lin and lin[0] != 0 and lin[1] == -lin[0]):
        return None
    a, _, c = lin  # a * (q - k) + c <= 0
    if a < 0:  # (k - q) * |a| <= -c
        return Band(upper=(-c) // -a)
    return Band(lower=-((-c) // a))  # (k - q) * a >= c: k - q >= ceil(c / a)


def _describe_band(band: Band, diff: str) -> list[str]:
    out = []
    if band.upper is not None:
        out.append(f"{diff} <= {band.upper}")
    if band.lower is not None:
        out.append(f"{diff} >= {band.lower}")
    return out


def _over_positions(atom: Any, b: Any, q: sympy.Symbol, k: sympy.Symbol) -> Optional[tuple[Any, Any]]:
    """(P, the atom with P[b, k] -> k and P[b, q] -> q) when the atom compares position
    differences P[b, k] - P[b, q] of one input P."""
    calls = (atom.lhs - atom.rhs).atoms(sympy.core.function.AppliedUndef)
    funcs = {c.func for c in calls}
    if b is None or len(funcs) != 1 or {c.args for c in calls} != {(b, k), (b, q)}:
        return None
    (func,) = funcs
    mapping = {func(b, k): k, func(b, q): q}
    return func, atom.func(atom.lhs.xreplace(mapping), atom.rhs.xreplace(mapping))


def _chunk(atom: Any, q: sympy.Symbol, k: sympy.Symbol) -> Optional[int]:
    lhs, rhs = atom.lhs, atom.rhs
    if not (isinstance(lhs, sympy.floor) and isinstance(rhs, sympy.floor)):
        return None
    for a, c in ((lhs, rhs), (rhs, lhs)):
        ca, cc = sympy.simplify(a.args[0] / q), sympy.simplify(c.args[0] / k)
        if ca.is_Rational and ca == cc and ca > 0 and (1 / ca).is_Integer:
            return int(1 / ca)
    return None


def _position_chunk(atom: Any, b: Any, q: sympy.Symbol, k: sympy.Symbol) -> Optional[tuple[Any, int]]:
    """(P, C) for ``P[b, q] // C == P[b, k] // C`` over one input P."""
    lhs, rhs = atom.lhs, atom.rhs
    if b is None or not (isinstance(lhs, sympy.floor) and isinstance(rhs, sympy.floor)):
        return None
    sides = []
    for side in (lhs.args[0], rhs.args[0]):
        calls = side.atoms(sympy.core.function.AppliedUndef)
        if len(calls) != 1:
            return None
        (call,) = calls
        ratio = sympy.simplify(side / call)
        if not (ratio.is_Rational and ratio > 0 and (1 / ratio).is_Integer):
            return None
        sides.append((call, int(1 / ratio)))
    (a, ca), (c, cc) = sides
    if a.func != c.func or ca != cc or {a.args, c.args} != {(b, q), (b, k)}:
        return None
    return a.func, ca


def _cache_offset(atom: Any, q: sympy.Symbol, k: sympy.Symbol, scalars: dict) -> Optional[CacheOffset]:
    """``k - q <= L + c`` for a one-element graph input L (a KV cache's fill)."""
    x = sympy.expand(_nonpositive(atom))
    found = [a for a in x.atoms(sympy.core.function.AppliedUndef) if a.func in scalars]
    if len(found) != 1 or x.coeff(found[0]) != -1:
        return None
    lin = _linear_qk(x + found[0], q, k)
    if lin is None or lin[:2] != (-1, 1):
        return None
    return CacheOffset(scalars[found[0].func], -lin[2])


class _Classifier:
    def __init__(self, interp: Interpretation, rank: int) -> None:
        self.q, self.k = I[rank - 2], I[rank - 1]
        self.b = I[0] if rank == 4 else None
        self.documents = interp.documents
        inputs = {f: n for f, n in interp.leaves.items() if n.op == "placeholder" or n in interp.buffers}
        self.pads = {f: n for f, n in inputs.items() if meta(n).dim() == 2}
        self.limits = {f: n for f, n in inputs.items() if meta(n).dim() == 1 and not meta(n).dtype.is_floating_point}
        self.scalars = {f: n for f, n in inputs.items() if meta(n).numel() == 1 and meta(n).dim() <= 1
                        and not meta(n).dtype.is_floating_point and meta(n).dtype != torch.bool}
        self.position_funcs: dict[Any, Node] = dict(interp.leaves)
        self.ids = {f: n for f, n in inputs.items() if meta(n).dim() in (1, 2) and not meta(n).dtype.is_floating_point
                    and meta(n).dtype != torch.bool}

    def add(self, atom: Any, s: MaskStructure) -> MaskStructure:
        q, k, b = self.q, self.k, self.b
        if isinstance(atom, (sympy.Le, sympy.Lt)) and isinstance(atom.lhs, sympy.Abs):  # |x| <= c: -c <= x <= c
            x = atom.lhs.args[0]
            return self.add(atom.func(-atom.rhs, x), self.add(atom.func(x, atom.rhs), s))
        if isinstance(atom, (sympy.Ge, sympy.Gt)) and isinstance(atom.rhs, sympy.Abs):
            return self.add(atom.reversed, s)
        if atom == sympy.true:
            return s
        if atom == sympy.false:
            s.never = True
            s.atoms.append("false")
            return s
        inequality = isinstance(atom, (sympy.Le, sympy.Lt, sympy.Ge, sympy.Gt))
        if inequality:
            band = _band_bound(atom, q, k)
            if band is not None:
                s.band = s.band & band
                s.atoms.extend(_describe_band(band, "k - q"))
                return s
            positional = _over_positions(atom, b, q, k)
            if positional is not None:
                func, index_atom = positional
                band = _band_bound(index_atom, q, k)
                node = self.position_funcs.get(func)
                if band is not None and node is not None:
                    if s.band_positions not in (None, node):
                        raise Unproven("bands over two different position tensors")
                    s.band, s.band_positions = s.band & band, node
                    s.atoms.extend(_describe_band(band, f"{node.name}[b, k] - {node.name}[b, q]"))
                    return s
            offset = _cache_offset(atom, q, k, self.scalars) if s.cache_offset is None else None
            if offset is not None:
                s.cache_offset = offset
                s.atoms.append(f"k - q <= {offset.length.name} + {offset.offset}")
                return s
            if isinstance(atom, (sympy.Le, sympy.Lt)) and atom.lhs == k \
                    and isinstance(atom.rhs, sympy.core.function.AppliedUndef) \
                    and atom.rhs.func in self.limits and atom.rhs.args == (q,) and s.key_limit is None:
                node = self.limits[atom.rhs.func]
                s.key_limit = KeyLimit(node, 1 if isinstance(atom, sympy.Le) else 0)
                s.atoms.append(f"k {'<=' if isinstance(atom, sympy.Le) else '<'} {node.name}[q]")
                return s
        if isinstance(atom, sympy.Eq):
            chunk = _chunk(atom, q, k)
            if chunk is not None and s.chunk is None:
                s.chunk = chunk
                s.atoms.append(f"q // {chunk} == k // {chunk}")
                return s
            over = _position_chunk(atom, b, q, k)
            if over is not None and s.chunk is None and over[0] in self.position_funcs:
                node = self.position_funcs[over[0]]
                s.chunk, s.chunk_positions = over[1], node
                s.atoms.append(f"{node.name}[b, q] // {over[1]} == {node.name}[b, k] // {over[1]}")
                return s
            lhs, rhs = atom.lhs, atom.rhs
            if (isinstance(lhs, sympy.core.function.AppliedUndef) and lhs.func == rhs.func
                    and lhs.func in self.documents and b is not None and {lhs.args, rhs.args} == {(b, q), (b, k)}):
                node = self.documents[lhs.func]
                if s.documents not in (None, node):
                    raise Unproven("documents of two different position tensors")
                s.documents = node
                s.atoms.append(f"same document ({node.name})")
                return s
            node = self._document_ids(lhs, rhs)
            if node is not None and s.document_ids in (None, node):
                s.document_ids = node
                s.atoms.append(f"same document id ({node.name})")
                return s
        if isinstance(atom, sympy.Ne) and atom.rhs == 0 and isinstance(atom.lhs, sympy.core.function.AppliedUndef) \
                and atom.lhs.func in self.pads and b is not None and s.padding is None \
                and (atom.lhs.args == (b, k) or atom.lhs.args == (0, k) and same(meta(self.pads[atom.lhs.func]).shape[0], 1)):
            # (0, k): a [1, Sk] padding input, its batch index dropped as a broadcast
            s.padding = self.pads[atom.lhs.func]
            s.atoms.append(f"key padding ({s.padding.name})")
            return s
        raise Unproven(f"mask term {atom}")

    def _document_ids(self, lhs: Any, rhs: Any) -> Optional[Node]:
        """The input ``ids`` when ``lhs == rhs`` reads ``ids[b, q] == ids[b, k]`` (or ``ids[q] == ids[k]``)."""
        q, k, b = self.q, self.k, self.b
        if not (isinstance(lhs, sympy.core.function.AppliedUndef) and lhs.func == rhs.func and lhs.func in self.ids):
            return None
        node = self.ids[lhs.func]
        pairs = {((b, q), (b, k)), ((b, k), (b, q))} if meta(node).dim() == 2 else {((q,), (k,)), ((k,), (q,))}
        return node if b is not None and (lhs.args, rhs.args) in pairs else None


def structure_of(interp: Interpretation, negate: bool = False) -> MaskStructure:
    """Split the interpreted mask (True = attend; False = attend when ``negate``) into terms;
    raises Unproven for a term that is none of them."""
    value = interp.value
    if value.dtype != torch.bool:
        raise Unproven("the mask is not a boolean tensor")
    rank = len(value.shape)
    if rank < 2:
        raise Unproven("mask has fewer than 2 dims")
    expr = sympy.to_nnf(sympy.Not(value.expr) if negate else value.expr, simplify=False)
    atoms = expr.args if isinstance(expr, sympy.And) else (expr,)
    classify = _Classifier(interp, rank)
    structure = MaskStructure()
    for atom in atoms:
        structure = classify.add(atom, structure)
    if structure.chunk_positions is not None and structure.chunk_positions is not structure.documents:
        raise Unproven("chunks over positions outside documents cut from the same positions")
    if structure.band_positions is not None and structure.band_positions is not structure.documents:
        # Documents are cut where positions stop stepping by exactly 1, so inside one document
        # P[b, k] - P[b, q] == k - q and a band over positions is the same band over indices.
        raise Unproven("a band over positions outside documents cut from the same positions")
    return structure


__all__ = ["Band", "CacheOffset", "KeyLimit", "MaskStructure", "structure_of"]
