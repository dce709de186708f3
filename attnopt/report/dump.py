"""Before/after dumps of what attnopt did to a graph: code, a unified diff, the report, a
drawing of each attention region and a page (``index.html``) with all of it, plus the same story
through logging.

Drawings are Graphviz DOT files written here (rendered to SVG when Graphviz's ``dot`` is on
PATH) rather than through ``torch.fx.passes.graph_drawer``: that draws whole modules and needs
pydot, while a region drawing should show a handful of nodes and mark what was removed, what
was a real copy, and what was added. ``index.html`` shows the same drawings inline, laid out by
``attnopt.report.page``, so the page needs no Graphviz.

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
from torch._logging._internal import trace_log
from torch.fx import GraphModule, Node
from torch.utils._dtype_abbrs import dtype_abbrs

from ..passes import PassResult, SiteReport
from ..fx.normalize import meta
from .accounting import copy_bytes, op_name
from .explain import HEADER, ExplainReport, GraphRecord, cells, format_bytes
from .page import SitePage, html_page, region_boxes, svg

log = logging.getLogger("attnopt")
graph_log = logging.getLogger("attnopt.graphs")

NO_GRAPHVIZ = ("graphviz is not installed (no `dot` on PATH): the drawings are on index.html; install graphviz "
               "to also get each .dot file as .svg")
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


def _label(node: Node) -> list[str]:
    """A node's drawing label: its name, what it calls, and its dtype and shape when recorded."""
    value = meta(node)
    what = node.op if node.op in ("placeholder", "output", "get_attr") else op_name(node)
    lines = [node.name, what]
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        lines.append(f"{dtype_abbrs.get(value.dtype, value.dtype)}{list(value.shape)}")
    return lines


def region_dot(gm: GraphModule, region: set[str], core: set[str], title: str, core_color: str) -> str:
    """Graphviz source for the ``region`` nodes of ``gm``: the core filled with ``core_color``,
    copies that materialise memory outlined in red with their size, neighbours dashed."""
    lines = [f'digraph "{title}" {{', f'  label="{title}"; labelloc=t; node [shape=box, fontname="monospace"];']
    for n in gm.graph.nodes:
        if n.name not in region:
            continue
        label = "\\n".join(_label(n))
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
        subprocess.run([dot, "-Tsvg", str(dot_file), "-o", str(dot_file.with_suffix(".svg"))], check=True, capture_output=True, timeout=120)


def graphviz_note() -> Optional[str]:
    """The one-line message to show when drawings cannot be rendered, else None."""
    return NO_GRAPHVIZ if shutil.which("dot") is None else None


def _region_svg(key: str, title: str, gm: GraphModule, region: set[str], core: set[str], color: str) -> str:
    labels = {n.name: _label(n) for n in gm.graph.nodes if n.name in region}
    copied = {n.name: copy_bytes(n) for n in gm.graph.nodes if n.name in core}
    copies = {name for name, size in copied.items() if size}
    for name in copies:
        labels[name].append(f"copy {format_bytes(copied[name])}")
    return svg(key, title, *region_boxes(gm, region, core, color, labels, copies))


def write_dump(directory: Union[str, os.PathLike], report: ExplainReport, record: GraphRecord) -> Path:
    """Write ``record``'s graph code before and after, their diff, ``report`` (text and JSON), a
    before and an after drawing of each attention site (``SITE.before.dot``, ``SITE.after.dot``,
    named by the report's site ids) and ``index.html`` with the table and the drawings to
    ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    before, after = record.before, record.after
    files = {"before.py": graph_code(before), "after.py": graph_code(after), "diff.patch": graph_diff(before, after),
             "report.txt": f"{report}\n", "report.json": report.to_json() + "\n"}
    for name, text in files.items():
        (out / name).write_text(text)
    sites = []
    for row in report.rows:
        region_b, core_b, region_a, core_a = regions(before, after, row.site)
        drawings = {}
        for when, gm, region, core, color in (("before", before, region_b, core_b, "#f4cccc"),
                                              ("after", after, region_a, core_a, "#d9ead3")):
            title = f"{row.id} {when} ({row.site.status})"
            dot_file = out / f"{row.id}.{when}.dot"
            dot_file.write_text(region_dot(gm, region, core, title, color))
            _render(dot_file)
            drawings[when] = _region_svg(f"{row.id}.{when}", title, gm, region, core, color)
        said = [f"left as written: {row.site.reason}"] if row.site.status == "skipped" else []
        said += [f"mask: {row.site.mask}"] if row.site.mask else []
        sites.append(SitePage(row.id, cells(row), said, drawings["before"], drawings["after"]))
    page = html_page(f"attnopt: {out.name}", report.summary(), HEADER, sites, report.notes(), list(files))
    (out / "index.html").write_text(page)
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


def _tracing() -> bool:
    """Whether TORCH_TRACE writes structured artifacts: torch keeps a handler that writes nothing
    without a folder to write to."""
    return any(getattr(h, "root_dir", "") is not None for h in trace_log.handlers)


def reporting(dump_dir: Union[str, os.PathLike, None]) -> bool:
    """Whether a compile's report will be read: a dump folder, attnopt's graph log, or a
    TORCH_TRACE run."""
    return bool(dump_dir) or graph_log.isEnabledFor(logging.DEBUG) or _tracing()


def observe(before: GraphModule, after: GraphModule, result: PassResult,
            dump_dir: Union[str, os.PathLike, None]) -> None:
    """Make one compiled graph's rewrite visible: logs, TORCH_TRACE artifacts, and a dump folder
    under ``dump_dir`` when one is given."""
    record = GraphRecord(before, after, result)
    if graph_log.isEnabledFor(logging.DEBUG):
        graph_log.debug("%s\n%s", ExplainReport.of([record]), graph_diff(before, after) or "(graph unchanged)")
    if _tracing():
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
