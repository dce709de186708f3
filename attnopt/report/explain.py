"""``attnopt.explain``: what attnopt found in a model, what it changed, and why it left the rest.

One row per attention site, built from the graphs before and after the passes and the passes'
own report, so the table, its JSON, the dumps (``attnopt.report.dump``) and the CLI tell one
story. Sites are named in the user's terms, the same under torch.compile, torch.export and the
CLI: the module path as written in the model and ``attention`` (``attention_1``, ... for a
module's later sites in the same graph); graph node names stay in the JSON as ``node``.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch.export import ExportedProgram
from torch.fx import GraphModule, Node
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from ..export import optimize
from ..passes import PassResult, SiteReport, optimize_graph
from ..fx.normalize import SDPA_TARGETS, meta
from .accounting import is_attnopt_call, op_name
from .source import split_location


@dataclass
class GraphRecord:
    """One graph the passes ran on: as it came in, as it went out, and the passes' report.
    ``training`` is the mode the model ran in when that is known (None otherwise)."""

    before: GraphModule
    after: GraphModule
    result: PassResult
    training: Optional[bool] = None


_MASK_CELLS = {"none": "none", "thd": "removed: varlen (thd)", "batches": "removed: chunks as batches",
               "key_padding": "key padding [B,1,1,Sk]", "key_lengths": "removed: key lengths",
               "cache_lengths": "removed: key lengths", "flex": "flex_attention", "kept": "kept"}


def mask_action(site: SiteReport) -> str:
    """What the site runs instead of the mask it was written with (one of ``attnopt.masks.ACTIONS``)."""
    if site.mask_action:
        return site.mask_action
    return "kept" if site.has_mask else "none"


def mask_cell(site: SiteReport) -> str:
    action = mask_action(site)
    if action == "flags":
        if tuple(site.window) != (-1, -1):
            return "removed: window_size"
        return "removed: is_causal" if site.is_causal else "removed"
    return _MASK_CELLS.get(action, action)


@dataclass
class ExplainRow:
    """One attention site, with where it is in the source and what it was lowered to."""

    graph: int
    site: SiteReport
    name: str = "attention"  # "attention", then "attention_1", ... within one module of one graph
    file: Optional[str] = None
    line: Optional[int] = None
    function: Optional[str] = None
    lowered_to: Optional[str] = None  # "attnopt.attention", "sdpa on views", or None when skipped
    training: Optional[bool] = None

    @property
    def module(self) -> str:
        """The module path as written in the model: ``model.layers.0.self_attn`` ("" for the root)."""
        return self.site.module or ""

    @property
    def module_type(self) -> Optional[str]:
        return self.site.module_type

    @property
    def id(self) -> str:
        """``model.layers.0.self_attn.attention``: unique within a graph, used for file names."""
        return f"{self.module}.{self.name}" if self.module else self.name

    @property
    def mode(self) -> str:
        return {True: "train", False: "eval", None: "-"}[self.training]

    def to_dict(self) -> dict:
        site = self.site.to_dict()
        node = site.pop("name")
        return {"graph": self.graph, "site": self.name, "id": self.id, "node": node, **site,
                "mask_action": mask_action(self.site), "file": self.file, "line": self.line,
                "function": self.function, "lowered_to": self.lowered_to, "training": self.training}


def _lowered_to(node: Optional[Node]) -> Optional[str]:
    if node is None:
        return None
    if is_attnopt_call(node):
        return "attnopt.attention"
    if node.op == "call_function" and node.target in SDPA_TARGETS:
        return "sdpa on views"
    return op_name(node)


def rows_for(index: int, record: GraphRecord) -> list[ExplainRow]:
    """The rows of one graph's sites."""
    after = {n.name: n for n in record.after.graph.nodes}
    seen: dict[Optional[str], int] = {}
    rows = []
    for site in record.result.sites:
        count = seen[site.module] = seen.get(site.module, -1) + 1
        row = ExplainRow(index, site, "attention" if count == 0 else f"attention_{count}",
                         *split_location(site.location), training=record.training)
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


HEADER = ("module", "site", "source", "layout q|kv|out", "heads q/kv", "dims qk/v", "mask", "causal", "dropout",
          "done", "kernel", "copies removed")


def cells(row: ExplainRow) -> tuple[str, ...]:
    """The row's table cells, in ``HEADER`` order."""
    s = row.site
    where = f"{os.path.basename(row.file)}:{row.line}" if row.file else "-"
    heads = f"{s.heads[0]}/{s.heads[1]}" if s.heads else "-"
    if s.gqa_group > 1:
        heads += f" (GQA {s.gqa_group})"
    dims = f"{s.head_dims[0]}/{s.head_dims[1]}" if s.head_dims else "-"
    layouts = f"{s.layout}|{s.kv_layout}|{s.out_layout}" if s.layout else "-"
    causal = "yes" if s.is_causal else "no"
    if tuple(s.window) != (-1, -1):
        causal += f", window {tuple(s.window)}"
    if s.status == "lowered":
        done = row.lowered_to or "lowered"
        kernel = s.kernel or ("torch's choice" if done == "sdpa on views" else "-")
        copies = f"{s.copies_removed} ({format_bytes(s.bytes_removed)})"
    else:
        done, kernel, copies = "left as written", "-", "-"
    module = row.module or "(root)"
    return (module, row.name, where, layouts, heads, dims, mask_cell(s), causal, str(s.dropout_p), done, kernel,
            copies)


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


# Why the same site can read differently in training and in evaluation, by the column that differs.
_MODE_CAUSES = {
    "dropout": "dropout runs only in training",
    "mask": "models build masks per mode and key lengths are lowered for inference only",
    "causal": "the model passes is_causal differently per mode",
    "done": "a rewrite proven for one mode may not hold in the other",
    "kernel": "kernels differ in what they run (dropout, masks)",
}


def mode_note(rows: list[ExplainRow]) -> Optional[str]:
    """One line on what differs between training and evaluation rows of the same sites, or None
    when the report does not hold both modes."""
    by_mode: dict[bool, dict[str, tuple[str, ...]]] = {True: {}, False: {}}
    for row in rows:
        if row.training is not None:
            by_mode[row.training].setdefault(row.id, cells(row))
    common = sorted(by_mode[True].keys() & by_mode[False].keys())
    if not by_mode[True] or not by_mode[False]:
        return None
    differing = [name for i, name in enumerate(HEADER)
                 if any(by_mode[True][site][i] != by_mode[False][site][i] for site in common)]
    sites = sum(by_mode[True][site] != by_mode[False][site] for site in common)
    if not differing:
        return f"train and eval: the same {len(common)} site{'s' * (len(common) != 1)}, done the same way"
    causes = "; ".join(_MODE_CAUSES[c] for c in differing if c in _MODE_CAUSES)
    return (f"train and eval differ at {sites} of {len(common)} site{'s' * (len(common) != 1)} in "
            f"{', '.join(differing)}" + (f": {causes}" if causes else ""))


@dataclass
class ExplainReport:
    """Every attention site attnopt saw, in graph order. ``print(report)`` for people,
    ``to_json()`` for tools, ``dump(directory)`` for the before/after graphs, drawings and a page.
    ``train_report + eval_report`` holds both modes and says what differs."""

    records: list[GraphRecord]
    rows: list[ExplainRow]

    @classmethod
    def of(cls, records: list[GraphRecord]) -> "ExplainReport":
        return cls(records, [row for i, rec in enumerate(records) for row in rows_for(i, rec)])

    def __add__(self, other: "ExplainReport") -> "ExplainReport":
        if not isinstance(other, ExplainReport):
            return NotImplemented
        return ExplainReport.of(self.records + other.records)

    @property
    def lowered(self) -> int:
        return sum(r.site.status == "lowered" for r in self.rows)

    @property
    def attnopt_calls_before(self) -> int:
        """attnopt.attention calls already in the input (a program optimized earlier)."""
        return sum(is_attnopt_call(n) for rec in self.records for n in rec.before.graph.nodes)

    @property
    def modes(self) -> set[Optional[bool]]:
        return {rec.training for rec in self.records}

    def table(self) -> str:
        """The rows as an aligned text table (with a mode column when the report holds both modes)."""
        both = {True, False} <= self.modes
        header = (("mode",) if both else ()) + HEADER
        return _table([header] + [((r.mode,) if both else ()) + cells(r) for r in self.rows])

    def notes(self) -> list[str]:
        """Why sites were left as written, what each mask was proven to be, why a site runs as
        SDPA on views rather than the op, passes that failed, and what differs between modes."""
        notes = []
        for r in self.rows:
            where = f"{r.id} ({r.mode})" if {True, False} <= self.modes else r.id
            if r.site.status == "skipped":
                notes.append(f"{where}: left as written: {r.site.reason}")
            if r.site.mask:
                notes.append(f"{where}: mask: {r.site.mask}")
            if r.site.call:
                notes.append(f"{where}: {r.site.call}")
        for i, rec in enumerate(self.records):
            if rec.result.error:
                notes.append(f"graph {i}: passes failed, graph left unchanged: {rec.result.error}")
            if rec.result.cache_writes:
                notes.append(f"graph {i}: {rec.result.cache_writes} KV-cache write(s) index_copy_ -> index_put_, "
                             f"which Inductor keeps in place instead of copying the cache")
        modes = mode_note(self.rows)
        return notes + ([modes] if modes else [])

    def summary(self) -> str:
        n = len(self.rows)
        graphs = f"{len(self.records)} graph{'s' * (len(self.records) != 1)}"
        mode = {frozenset({True}): " (training)", frozenset({False}): " (eval)",
                frozenset({True, False}): " (training and eval)"}.get(frozenset(self.modes - {None}), "")
        return (f"attnopt: {n} attention site{'s' * (n != 1)} in {graphs}{mode}: {self.lowered} lowered, "
                f"{n - self.lowered} left as written")

    def __str__(self) -> str:
        lines = [self.summary()]
        already = self.attnopt_calls_before
        if already:
            lines.append(f"(the input already calls attnopt.attention {already} time{'s' * (already != 1)})")
        if self.rows:
            lines += ["", self.table()]
        notes = self.notes()
        if notes:
            lines += ["", "notes:"] + [f"  {n}" for n in notes]
        return "\n".join(lines)

    def to_json(self, indent: Optional[int] = 2) -> str:
        graphs = [{"graph": i, "error": rec.result.error, "masks_removed": rec.result.masks_removed,
                   "cache_writes": rec.result.cache_writes, "training": rec.training}
                  for i, rec in enumerate(self.records)]
        return json.dumps({"graphs": graphs, "attnopt_calls_before": self.attnopt_calls_before,
                           "sites": [r.to_dict() for r in self.rows]}, indent=indent, default=str)

    def dump(self, directory: Union[str, os.PathLike]) -> list[Path]:
        """Write each graph's code before and after, their diff, this report, a drawing of every
        attention region and an ``index.html`` page of it all to ``directory/graph_NNN``; returns
        those folders."""
        from .dump import write_dump  # dump builds on this module's report

        return [write_dump(Path(directory) / f"graph_{i:03d}", ExplainReport.of([rec]), rec)
                for i, rec in enumerate(self.records)]


def _record_graphs(model: Callable, args: tuple, kwargs: dict) -> list[GraphRecord]:
    """Run ``model`` once under torch.compile with a backend that records attnopt's passes and runs
    the rewritten graph as is (no Inductor)."""
    records: list[GraphRecord] = []
    model = getattr(model, "_orig_mod", model)  # an already compiled module: explain the original
    training = model.training if isinstance(model, torch.nn.Module) else None

    def recording_backend(gm: GraphModule, example_inputs: list) -> Callable:
        new_gm, result = optimize_graph(gm)
        records.append(GraphRecord(gm, new_gm, result, training))
        return new_gm.forward

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
    (whose shapes are recorded from ``args`` when it carries none). Nothing is modified. A
    module's report says whether it ran in training or eval mode; ``explain(model.train(), x) +
    explain(model.eval(), x)`` reports both and what differs.
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


__all__ = ["ExplainReport", "ExplainRow", "GraphRecord", "cells", "explain", "format_bytes", "mask_action",
           "mask_cell", "mode_note"]
