"""Before/after dumps of what attnopt did to a graph: code, a unified diff, the report, and a
drawing of each attention region, plus the same story through logging.

Drawings are Graphviz DOT files written here (rendered to SVG when Graphviz's ``dot`` is on
PATH) rather than through ``torch.fx.passes.graph_drawer``: that draws whole modules and needs
pydot, while a region drawing should show a handful of nodes and mark what was removed, what
was a real copy, and what was added.

Logging: ``TORCH_LOGS="+attnopt"`` (or the ``attnopt`` logger at DEBUG) prints each graph's
report and diff. torch parses ``TORCH_LOGS`` when torch is imported, before any third-party
package can register an artifact name, so attnopt uses its module name there; under
``TORCH_TRACE`` the report and diff are also written as ``attnopt_report``/``attnopt_diff``
artifacts for tlparse.
"""
from __future__ import annotations

import difflib
import logging
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Optional, Union

import networkx as nx
from torch._logging import trace_structured
from torch.fx import GraphModule, Node
from torch.utils._dtype_abbrs import dtype_abbrs

from .accounting import copy_bytes, op_name
from .explain import ExplainReport, GraphRecord, format_bytes
from .passes import PassResult, SiteReport
from .patterns.normalize import meta

log = logging.getLogger("attnopt")
graph_log = logging.getLogger("attnopt.graphs")

NO_GRAPHVIZ = ("graphviz is not installed (no `dot` on PATH): region drawings were written as .dot files only; "
               "install graphviz to get .svg")
_DELETIONS = re.compile(r";\s+(\w+ = )+None$")


def graph_code(gm: GraphModule) -> str:
    """The graph's code with shapes and source lines (``print_readable``), without the
    ``x = None`` deletions that only add noise to a diff."""
    code = gm.print_readable(print_output=False, include_stride=False, include_device=False)
    return "\n".join(_DELETIONS.sub("", ln) for ln in code.splitlines()) + "\n"


def graph_diff(before: GraphModule, after: GraphModule) -> str:
    """A unified diff of the two graphs' code."""
    return "".join(difflib.unified_diff(graph_code(before).splitlines(True), graph_code(after).splitlines(True),
                                        "before.py", "after.py"))


def _nx(gm: GraphModule) -> nx.DiGraph:
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        g.add_node(n.name)
        g.add_edges_from((n.name, u.name) for u in n.users)
    return g


def _with_neighbours(g: nx.DiGraph, core: set[str]) -> set[str]:
    keep = set(core)
    for name in core:
        keep.update(g.predecessors(name), g.successors(name))
    return keep


def regions(before: GraphModule, after: GraphModule, site: SiteReport) -> tuple[set[str], set[str], set[str], set[str]]:
    """(before region, before core, after region, after core) node names for one site.

    The core before is the attention call and every node the lowering removed; after, the
    nodes the lowering added, connected to the new op. Each region is its core plus the nodes
    one edge away (the q/k/v producers and the output's consumers).
    """
    gb, ga = _nx(before), _nx(after)
    core_before = {site.name, *site.removed} & set(gb)
    if site.new_node in ga:
        added = set(ga) - set(gb)
        core_after = nx.node_connected_component(ga.subgraph(added).to_undirected(), site.new_node)
    else:
        core_after = {site.name} & set(ga)
    return _with_neighbours(gb, core_before), core_before, _with_neighbours(ga, core_after), set(core_after)


def _label(node: Node) -> str:
    value = meta(node)
    shape = ""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        shape = f"\\n{dtype_abbrs.get(value.dtype, value.dtype)}{list(value.shape)}"
    what = node.op if node.op in ("placeholder", "output", "get_attr") else op_name(node)
    return f"{node.name}\\n{what}{shape}"


def region_dot(gm: GraphModule, region: set[str], core: set[str], title: str, core_color: str) -> str:
    """Graphviz source for the ``region`` nodes of ``gm``: the core filled with ``core_color``,
    copies that materialise memory outlined in red with their size, neighbours dashed."""
    lines = [f'digraph "{title}" {{', f'  label="{title}"; labelloc=t; node [shape=box, fontname="monospace"];']
    for n in gm.graph.nodes:
        if n.name not in region:
            continue
        label = _label(n)
        style = ['style="filled"', f'fillcolor="{core_color}"'] if n.name in core else ['style="dashed"']
        copied = copy_bytes(n) if n.name in core else 0
        if copied:
            label += f"\\ncopy {format_bytes(copied)}"
            style += ['color="red"', "penwidth=2"]
        lines.append(f'  "{n.name}" [label="{label}", {", ".join(style)}];')
        lines += [f'  "{n.name}" -> "{u.name}";' for u in n.users if u.name in region]
    return "\n".join(lines + ["}"]) + "\n"


def _render(dot_file: Path) -> None:
    """Write ``dot_file`` as SVG beside it, when Graphviz is installed."""
    dot = shutil.which("dot")
    if dot is not None:
        svg = dot_file.with_suffix(".svg")
        subprocess.run([dot, "-Tsvg", str(dot_file), "-o", str(svg)], check=True, capture_output=True, timeout=120)


def graphviz_note() -> Optional[str]:
    """The one-line message to show when drawings cannot be rendered, else None."""
    return NO_GRAPHVIZ if shutil.which("dot") is None else None


def write_dump(directory: Union[str, os.PathLike], report: ExplainReport, record: GraphRecord) -> Path:
    """Write ``record``'s graph code before and after, their diff, ``report`` (text and JSON) and
    a before and an after drawing of each attention site to ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    before, after = record.before, record.after
    (out / "before.py").write_text(graph_code(before))
    (out / "after.py").write_text(graph_code(after))
    (out / "diff.patch").write_text(graph_diff(before, after))
    (out / "report.txt").write_text(f"{report}\n")
    (out / "report.json").write_text(report.to_json() + "\n")
    for site in record.result.sites:
        region_b, core_b, region_a, core_a = regions(before, after, site)
        for when, gm, region, core, color in (("before", before, region_b, core_b, "#f4cccc"),
                                              ("after", after, region_a, core_a, "#d9ead3")):
            dot_file = out / f"{site.name}.{when}.dot"
            dot_file.write_text(region_dot(gm, region, core, f"{site.name} {when} ({site.status})", color))
            _render(dot_file)
    return out


def _next_folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    index = len(list(root.glob("graph_*")))
    while True:
        path = root / f"graph_{index:03d}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            index += 1


def observe(before: GraphModule, after: GraphModule, result: PassResult,
            dump_dir: Union[str, os.PathLike, None]) -> None:
    """Make one compiled graph's rewrite visible: logs, TORCH_TRACE artifacts, and a dump folder
    under ``dump_dir`` when one is given."""
    record = GraphRecord(before, after, result)
    if graph_log.isEnabledFor(logging.DEBUG):
        graph_log.debug("%s\n%s", ExplainReport.of([record]), graph_diff(before, after) or "(graph unchanged)")
    trace_structured("artifact", metadata_fn=lambda: {"name": "attnopt_report", "encoding": "json"},
                     payload_fn=lambda: ExplainReport.of([record]).to_json())
    trace_structured("artifact", metadata_fn=lambda: {"name": "attnopt_diff", "encoding": "string"},
                     payload_fn=lambda: graph_diff(before, after))
    if not dump_dir:
        return
    try:  # a dump is a diagnostic: failing to write one must not fail the compile
        path = write_dump(_next_folder(Path(dump_dir)), ExplainReport.of([record]), record)
    except (OSError, subprocess.SubprocessError) as e:
        warnings.warn(f"attnopt: could not write a graph dump to {dump_dir}: {e}", stacklevel=3)
        return
    log.info("attnopt: wrote graph dump %s", path)
    note = graphviz_note()
    if note:
        log.info("attnopt: %s", note)


__all__ = ["NO_GRAPHVIZ", "graph_code", "graph_diff", "graphviz_note", "observe", "region_dot", "regions",
           "write_dump"]
