"""``attnopt.explain``: what attnopt found in a model, what it changed, and why it left the rest.

One row per attention site, built from the graphs before and after the passes and the passes'
own report, so the table, its JSON, the dumps (``attnopt.dump``) and the CLI tell one story.
"""
from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch.export import ExportedProgram
from torch.fx import GraphModule, Node
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from .accounting import is_attnopt_call, op_name
from .export import optimize
from .passes import PassResult, SiteReport, optimize_graph
from .patterns.normalize import SDPA_TARGETS, meta

_LOCATION = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)')


@dataclass
class GraphRecord:
    """One graph the passes ran on: as it came in, as it went out, and the passes' report."""

    before: GraphModule
    after: GraphModule
    result: PassResult


@dataclass
class ExplainRow:
    """One attention site, with where it is in the source and what it was lowered to."""

    graph: int
    site: SiteReport
    module_type: Optional[str] = None
    file: Optional[str] = None
    line: Optional[int] = None
    function: Optional[str] = None
    lowered_to: Optional[str] = None  # "attnopt.attention", "portable sdpa", or None when skipped

    @property
    def module(self) -> str:
        """The module path as a user would write it: ``model.layers.0.self_attn`` ("" for the root)."""
        path = self.site.module or ""
        path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
        path = re.sub(r"^L\['self'\]\.?", "", path)
        return re.sub(r"\[(\d+)\]", r".\1", path)

    def to_dict(self) -> dict:
        return {"graph": self.graph, **self.site.to_dict(), "module": self.module, "module_type": self.module_type,
                "file": self.file, "line": self.line, "function": self.function, "lowered_to": self.lowered_to}


def _module_type(node: Optional[Node]) -> Optional[str]:
    stack = node.meta.get("nn_module_stack") if node is not None else None
    if not stack:
        return None
    entry = list(stack.values())[-1]
    kind = entry[1] if isinstance(entry, tuple) else entry
    return getattr(kind, "__name__", str(kind).rsplit(".", 1)[-1].strip("'>"))


def _lowered_to(node: Optional[Node]) -> Optional[str]:
    if node is None:
        return None
    if is_attnopt_call(node):
        return "attnopt.attention"
    if node.op == "call_function" and node.target in SDPA_TARGETS:
        return "portable sdpa"
    return op_name(node)


def rows_for(index: int, record: GraphRecord) -> list[ExplainRow]:
    """The rows of one graph's sites."""
    before = {n.name: n for n in record.before.graph.nodes}
    after = {n.name: n for n in record.after.graph.nodes}
    rows = []
    for site in record.result.sites:
        row = ExplainRow(index, site, _module_type(before.get(site.name)))
        match = _LOCATION.search(site.location or "")
        if match:
            row.file, row.line, row.function = match["file"], int(match["line"]), match["func"]
        if site.status == "lowered":
            row.lowered_to = _lowered_to(after.get(site.new_node or ""))
        rows.append(row)
    return rows


def format_bytes(n: Optional[int]) -> str:
    if n is None:
        return "? B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _cells(row: ExplainRow) -> tuple[str, ...]:
    s = row.site
    where = f"{os.path.basename(row.file)}:{row.line}" if row.file else "-"
    heads = f"{s.heads[0]}/{s.heads[1]}" if s.heads else "-"
    if s.gqa_group > 1:
        heads += f" (GQA {s.gqa_group})"
    dims = f"{s.head_dims[0]}/{s.head_dims[1]}" if s.head_dims else "-"
    layouts = f"{s.layout}|{s.kv_layout}|{s.out_layout}" if s.layout else "-"
    if s.status == "lowered":
        done = row.lowered_to or "lowered"
        kernel = s.kernel or ("torch's choice" if done == "portable sdpa" else "-")
        copies = f"{s.copies_removed} ({format_bytes(s.bytes_removed)})"
    else:
        done, kernel, copies = "left as written", "-", "-"
    module = row.module or ("(root)" if s.module is not None else "-")
    return (s.name, module, where, layouts, heads, dims, "yes" if s.has_mask else "no",
            "yes" if s.is_causal else "no", str(s.dropout_p), done, kernel, copies)


_HEADER = ("site", "module", "source", "layout q|kv|out", "heads q/kv", "dims qk/v", "mask", "causal", "dropout",
           "done", "kernel", "copies removed")


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


@dataclass
class ExplainReport:
    """Every attention site attnopt saw, in graph order. ``print(report)`` for people,
    ``to_json()`` for tools, ``dump(directory)`` for the before/after graphs and drawings."""

    records: list[GraphRecord]
    rows: list[ExplainRow]

    @classmethod
    def of(cls, records: list[GraphRecord]) -> "ExplainReport":
        return cls(records, [row for i, rec in enumerate(records) for row in rows_for(i, rec)])

    @property
    def lowered(self) -> int:
        return sum(r.site.status == "lowered" for r in self.rows)

    @property
    def attnopt_calls_before(self) -> int:
        """attnopt.attention calls already in the input (a program optimized earlier)."""
        return sum(is_attnopt_call(n) for rec in self.records for n in rec.before.graph.nodes)

    def __str__(self) -> str:
        n = len(self.rows)
        graphs = f"{len(self.records)} graph{'s' * (len(self.records) != 1)}"
        lines = [f"attnopt: {n} attention site{'s' * (n != 1)} in {graphs}: {self.lowered} lowered, "
                 f"{n - self.lowered} left as written"]
        already = self.attnopt_calls_before
        if already:
            lines.append(f"(the input already calls attnopt.attention {already} time{'s' * (already != 1)})")
        if self.rows:
            lines += ["", _table([_HEADER] + [_cells(r) for r in self.rows])]
        notes = []
        for r in self.rows:
            if r.site.status == "skipped":
                notes.append(f"  {r.site.name}: left as written: {r.site.reason}")
            if r.site.mask:
                notes.append(f"  {r.site.name}: mask: {r.site.mask}")
        for i, rec in enumerate(self.records):
            if rec.result.error:
                notes.append(f"  graph {i}: passes failed, graph left unchanged: {rec.result.error}")
        if notes:
            lines += ["", "notes:"] + notes
        return "\n".join(lines)

    def to_json(self, indent: Optional[int] = 2) -> str:
        graphs = [{"graph": i, "error": rec.result.error, "masks_removed": rec.result.masks_removed}
                  for i, rec in enumerate(self.records)]
        return json.dumps({"graphs": graphs, "attnopt_calls_before": self.attnopt_calls_before, "sites": [r.to_dict() for r in self.rows]}, indent=indent, default=str)

    def dump(self, directory: Union[str, os.PathLike]) -> list[Path]:
        """Write each graph's code before and after, their diff, this report and a drawing of
        every attention region to ``directory/graph_NNN``; returns those folders."""
        from .dump import write_dump  # dump builds on this module's report

        return [write_dump(Path(directory) / f"graph_{i:03d}", ExplainReport.of([rec]), rec)
                for i, rec in enumerate(self.records)]


def _record_graphs(model: Callable, args: tuple, kwargs: dict) -> list[GraphRecord]:
    """Run ``model`` once under torch.compile with a backend that records attnopt's passes and runs
    the rewritten graph as is (no Inductor)."""
    records: list[GraphRecord] = []

    def recording_backend(gm: GraphModule, example_inputs: list) -> Callable:
        new_gm, result = optimize_graph(gm)
        records.append(GraphRecord(gm, new_gm, result))
        return new_gm.forward

    model = getattr(model, "_orig_mod", model)  # an already compiled module: explain the original
    # Each call brings a new backend, so Dynamo compiles again instead of reusing a cache entry;
    # lift the recompile limit so that explaining a model many times keeps working.
    with torch._dynamo.config.patch(recompile_limit=sys.maxsize, accumulated_recompile_limit=sys.maxsize):
        torch.compile(model, backend=recording_backend)(*args, **kwargs)
    return records


def _graph_module_record(gm: GraphModule, args: tuple) -> GraphRecord:
    if args and not any(meta(n) is not None for n in gm.graph.nodes if n.op == "placeholder"):
        FakeTensorProp(gm).propagate(*args)
    new_gm, result = optimize_graph(gm)
    return GraphRecord(gm, new_gm, result)


def explain(model: Any, *args: Any, **kwargs: Any) -> ExplainReport:
    """Report every attention site attnopt finds in ``model`` and what it does with each.

    ``model`` is a module or function (run once on ``args``/``kwargs`` under torch.compile, with
    a backend that records the graphs and skips Inductor), an ExportedProgram, or a GraphModule
    (whose shapes are recorded from ``args`` when it carries none). Nothing is modified.
    """
    if isinstance(model, ExportedProgram):
        new_ep, result = optimize(model, return_result=True)
        return ExplainReport.of([GraphRecord(model.graph_module, new_ep.graph_module, result)])
    if isinstance(model, GraphModule):
        return ExplainReport.of([_graph_module_record(model, args)])
    if not callable(model):
        raise TypeError(f"attnopt.explain expects a module, a function, an ExportedProgram or a GraphModule, "
                        f"got {type(model).__name__}")
    return ExplainReport.of(_record_graphs(model, args, kwargs))


__all__ = ["ExplainReport", "ExplainRow", "GraphRecord", "explain"]
