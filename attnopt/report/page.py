"""The dump folder's ``index.html``: the report table and every site's before/after drawing on one
self-contained page (drawings inline as SVG, no script, no other file needed to view it).

The drawings are laid out here, in layers by graph depth (``networkx.topological_generations``),
rather than by Graphviz: the page must show them on a machine without Graphviz, and a region is
a handful of nodes, which a layered layout draws legibly. Graphviz's own renderings of the
``.dot`` files are still written beside the page when ``dot`` is installed.
"""
from __future__ import annotations

from dataclasses import dataclass
from html import escape
from typing import Optional

import networkx as nx
from torch.fx import GraphModule

_CHAR_W, _LINE_H, _PAD, _GAP_X, _GAP_Y = 7.2, 15, 8, 24, 36


@dataclass
class Box:
    """One node of a drawing: its text lines and how it is drawn."""

    name: str
    lines: list[str]
    fill: Optional[str] = None  # the core's colour; None: a neighbour, drawn dashed
    copy: bool = False  # materialises memory: outlined in red
    x: float = 0.0
    y: float = 0.0

    @property
    def width(self) -> float:
        return max(len(line) for line in self.lines) * _CHAR_W + 2 * _PAD

    @property
    def height(self) -> float:
        return len(self.lines) * _LINE_H + _PAD


def _layout(boxes: dict[str, Box], edges: list[tuple[str, str]]) -> tuple[float, float]:
    """Place boxes in rows by depth, each row centred; returns the drawing's (width, height)."""
    g = nx.DiGraph()
    g.add_nodes_from(boxes)
    g.add_edges_from(edges)
    order = {name: i for i, name in enumerate(boxes)}
    rows = [sorted(layer, key=order.get) for layer in nx.topological_generations(g)]
    widths = [sum(boxes[n].width for n in row) + _GAP_X * (len(row) - 1) for row in rows]
    total_w = max(widths, default=0) + 2 * _GAP_X
    y = _LINE_H * 2.5
    for row, row_w in zip(rows, widths):
        x = (total_w - row_w) / 2
        for name in row:
            boxes[name].x, boxes[name].y = x, y
            x += boxes[name].width + _GAP_X
        y += max(boxes[n].height for n in row) + _GAP_Y
    return total_w, y


def svg(key: str, title: str, boxes: dict[str, Box], edges: list[tuple[str, str]]) -> str:
    """An inline SVG drawing of ``boxes`` (in graph order) joined by ``edges`` (name pairs); ``key``
    makes its element ids unique on the page."""
    width, height = _layout(boxes, edges)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'font-family="monospace" font-size="12">',
           f'<defs><marker id="{escape(key)}-arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" '
           'markerHeight="8" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z"/></marker></defs>',
           f'<text x="{width / 2:.0f}" y="{_LINE_H * 1.2:.0f}" text-anchor="middle" font-weight="bold">'
           f'{escape(title)}</text>']
    for a, b in edges:
        u, v = boxes[a], boxes[b]
        out.append(f'<line x1="{u.x + u.width / 2:.1f}" y1="{u.y + u.height:.1f}" x2="{v.x + v.width / 2:.1f}" '
                   f'y2="{v.y:.1f}" stroke="#555" marker-end="url(#{escape(key)}-arrow)"/>')
    for box in boxes.values():
        stroke = 'stroke="red" stroke-width="2"' if box.copy else 'stroke="#333"'
        dash = "" if box.fill else ' stroke-dasharray="4 3"'
        out.append(f'<g><title>{escape(box.name)}</title><rect x="{box.x:.1f}" y="{box.y:.1f}" '
                   f'width="{box.width:.1f}" height="{box.height:.1f}" fill="{box.fill or "white"}" {stroke}{dash}/>')
        for i, line in enumerate(box.lines):
            out.append(f'<text x="{box.x + _PAD:.1f}" y="{box.y + _PAD / 2 + _LINE_H * (i + 0.8):.1f}">'
                       f'{escape(line)}</text>')
        out.append("</g>")
    return "\n".join(out + ["</svg>"])


def region_boxes(gm: GraphModule, region: set[str], core: set[str], core_color: str,
                 labels: dict[str, list[str]], copies: set[str]) -> tuple[dict[str, Box], list[tuple[str, str]]]:
    """The boxes and edges of ``gm``'s ``region`` nodes, in graph order."""
    boxes = {n.name: Box(n.name, labels[n.name], core_color if n.name in core else None, n.name in copies)
             for n in gm.graph.nodes if n.name in region}
    edges = [(n.name, u.name) for n in gm.graph.nodes if n.name in region for u in n.users if u.name in region]
    return boxes, edges


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: left; white-space: nowrap; }
th { background: #f3f3f3; }
pre, code { font-size: 13px; }
section { margin-top: 2em; border-top: 1px solid #ddd; }
.pair { display: flex; flex-wrap: wrap; gap: 2em; align-items: flex-start; }
figure { margin: 0; overflow-x: auto; max-width: 100%; }
"""


@dataclass
class SitePage:
    """One site's part of the page: its anchor, table cells, what to say and its two drawings."""

    id: str
    cells: tuple[str, ...]
    notes: list[str]
    before: str  # inline SVG
    after: str


def html_page(title: str, summary: str, header: tuple[str, ...], sites: list[SitePage], notes: list[str],
              files: list[str]) -> str:
    """The page: summary, the table (each row linking its site and drawings), notes, links to the
    folder's other files, then each site's section with its drawings."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header) + "<th>drawings</th>"
    rows = []
    for s in sites:
        cells = [f'<td><a href="#{escape(s.id)}">{escape(c)}</a></td>' if i == 1 else f"<td>{escape(c)}</td>"
                 for i, c in enumerate(s.cells)]
        links = f'<a href="#{escape(s.id)}.before">before</a> / <a href="#{escape(s.id)}.after">after</a>'
        rows.append(f"<tr>{''.join(cells)}<td>{links}</td></tr>")
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
             f"<style>{_STYLE}</style></head><body>",
             f"<h1>{escape(title)}</h1>", f"<p>{escape(summary)}</p>"]
    if sites:
        parts.append(f"<table><tr>{head}</tr>\n" + "\n".join(rows) + "\n</table>")
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{escape(n)}</li>" for n in notes) + "</ul>")
    parts.append("<p>Files: " + ", ".join(f'<a href="{escape(f)}">{escape(f)}</a>' for f in files) + "</p>")
    for s in sites:
        said = "".join(f"<li>{escape(n)}</li>" for n in s.notes)
        parts.append(f'<section id="{escape(s.id)}"><h2>{escape(s.id)}</h2>' + (f"<ul>{said}</ul>" if said else "")
                     + f'<div class="pair"><figure id="{escape(s.id)}.before">{s.before}</figure>'
                     f'<figure id="{escape(s.id)}.after">{s.after}</figure></div></section>')
    return "\n".join(parts + ["</body></html>"]) + "\n"


__all__ = ["Box", "SitePage", "html_page", "region_boxes", "svg"]
