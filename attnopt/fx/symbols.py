"""Symbolic sizes as graph values.

A pass that computes a shape from recorded sizes gets SymInts under dynamic shapes. A graph cannot
hold a SymInt as a constant argument (its code would name a symbol nothing defines), so each one
is rebuilt from graph values: a size the graph already has as an input (Dynamo's ``s0``
placeholders), or ``aten.sym_size`` of an input tensor whose shape holds the symbol, combined with
``operator`` nodes for sums, products and floor divisions, as Dynamo and export spell them.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import sympy
import torch
from torch.fx import Graph, Node
from torch.utils._sympy.functions import FloorDiv

from .normalize import meta

aten = torch.ops.aten


class Symbols:
    """Graph values for the symbols of a graph's input sizes. ``make(target, *args)`` adds a node
    (the caller's builder, so that it is stamped and placed like every other new node)."""

    def __init__(self, graph: Graph, make: Callable[..., Node]) -> None:
        self.make = make
        self.inputs: dict[Any, Node] = {}  # a size input: its symbol -> the placeholder
        self.dims: dict[Any, tuple[Node, int]] = {}  # a symbol -> (input tensor, dim) holding it
        self.built: dict[Any, Node] = {}
        for n in graph.find_nodes(op="placeholder"):
            value = meta(n)
            if isinstance(value, torch.SymInt) and isinstance(value.node.expr, sympy.Symbol):
                self.inputs.setdefault(value.node.expr, n)
            elif isinstance(value, torch.Tensor):
                for d, size in enumerate(value.shape):
                    if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                        self.dims.setdefault(size.node.expr, (n, d))

    def value(self, x: Any) -> Any:
        """``x`` with every SymInt inside (lists, tuples and dict values too) replaced by a graph
        value."""
        if isinstance(x, torch.SymInt):
            return self._expr(x.node.expr)
        if isinstance(x, (list, tuple)):
            return type(x)(self.value(v) for v in x)
        if isinstance(x, dict):
            return {k: self.value(v) for k, v in x.items()}
        if isinstance(x, (torch.SymFloat, torch.SymBool)):
            raise ValueError(f"attnopt: cannot rebuild the symbolic value {x} in the graph")
        return x

    def _expr(self, expr: Any) -> Any:
        if expr.is_Integer:
            return int(expr)
        if expr in self.built:
            return self.built[expr]
        if isinstance(expr, sympy.Symbol):
            if expr in self.inputs:
                return self.inputs[expr]
            if expr not in self.dims:
                raise ValueError(f"attnopt: no graph input holds the size {expr}")
            node = self.make(aten.sym_size.int, *self.dims[expr])
        elif isinstance(expr, (sympy.Add, sympy.Mul)):
            fn = operator.add if isinstance(expr, sympy.Add) else operator.mul
            parts = [self._expr(a) for a in expr.args]
            node = parts[0]
            for part in parts[1:]:
                node = self.make(fn, node, part)
        elif isinstance(expr, FloorDiv):
            node = self.make(operator.floordiv, self._expr(expr.args[0]), self._expr(expr.args[1]))
        else:
            raise ValueError(f"attnopt: cannot rebuild the size {expr} in the graph")
        self.built[expr] = node
        return node


__all__ = ["Symbols"]
