"""Run attnopt's passes on a graph, falling back to the original graph on any error.

Shared by the torch.compile backend and ``attnopt.optimize`` so both IR levels get the same
rewrites and the same report.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass, field
from typing import Optional, Union

from torch.fx import Graph, GraphModule

from ..accounting import annotate
from ..patterns import AttentionSite, find_hand_written_sites, find_sdpa_sites
from ..patterns.normalize import shape
from .lower_attention import lower_to_op
from .lower_portable import lower_to_sdpa, sdpa_refusal
from .recover_mask import erase_dead_masks, recover_mask

log = logging.getLogger("attnopt")
TARGETS = ("op", "portable")


def check_target(target: str, kernel: str) -> None:
    """Reject a lowering target that does not exist, or a forced kernel the target cannot honour."""
    if target not in TARGETS:
        raise ValueError(f"attnopt: target must be one of {TARGETS}, got {target!r}")
    if target == "portable" and kernel != "auto":
        raise ValueError(f"attnopt: target='portable' emits plain SDPA, which cannot force kernel={kernel!r}")


@dataclass
class SiteReport:
    """One attention site: where it is, what was found, what was done or why not."""

    name: str
    kind: str
    status: str  # "lowered" or "skipped"
    reason: Optional[str] = None
    module: Optional[str] = None
    location: Optional[str] = None
    layout: Optional[str] = None  # q layout as produced
    kv_layout: Optional[str] = None
    out_layout: Optional[str] = None
    gqa_group: int = 1
    heads: Optional[tuple] = None  # (Hq, Hkv)
    head_dims: Optional[tuple] = None  # (Dqk, Dv)
    is_causal: bool = False
    has_mask: bool = False
    dropout_p: Union[float, str] = 0.0  # str: the graph value holding a symbolic dropout
    removed: list[str] = field(default_factory=list)
    new_node: Optional[str] = None
    mask: Optional[str] = None  # what the explicit mask was proven to be, and what became of it
    copies_removed: int = 0  # removed nodes that materialised memory, per forward call
    bytes_removed: Optional[int] = 0  # what those copies wrote; None when a size is unknown
    kernel: Optional[str] = None  # the kernel the new op picks on its inputs' device and shapes

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PassResult:
    """The sites a run found, in graph order, and whether the run fell back."""

    sites: list[SiteReport] = field(default_factory=list)
    error: Optional[str] = None
    masks_removed: list[str] = field(default_factory=list)  # mask-building nodes left unused

    @property
    def lowered(self) -> int:
        return sum(s.status == "lowered" for s in self.sites)


def _describe(site: AttentionSite) -> SiteReport:
    rep = SiteReport(site.name, site.kind, "skipped" if site.skip_reason else "lowered", site.skip_reason,
                     site.module_path, site.source_location,
                     has_mask=site.attn_mask is not None or site.extra.get("key_padding") is not None)
    if site.query is None:
        return rep
    q, k, v = site.query, site.key, site.value
    qs, ks, vs = shape(q.source), shape(k.source), shape(v.source)
    if any(s is None or len(s) != len(op.dims) for s, op in ((qs, q), (ks, k), (vs, v))):
        return rep  # skipped for its shapes: nothing more to describe
    rep.layout, rep.gqa_group = q.dims, k.group
    rep.kv_layout = k.dims if k.dims == v.dims else f"{k.dims}/{v.dims}"
    rep.heads = (qs[q.dims.index("h")], ks[k.dims.index("h")])
    rep.head_dims = (qs[-1] if q.dims[-1] == "d" else None, vs[v.dims.index("d")])
    rep.heads = tuple(int(h) if isinstance(h, int) else str(h) for h in rep.heads)
    rep.head_dims = tuple(int(d) if isinstance(d, int) else str(d) for d in rep.head_dims)
    rep.is_causal = site.is_causal
    rep.dropout_p = site.dropout_p if isinstance(site.dropout_p, float) else str(site.dropout_p)
    rep.out_layout = site.output.layout if site.output else None
    return rep


def _copy(gm: GraphModule) -> GraphModule:
    """A GraphModule sharing gm's parameters and submodules but owning a fresh graph.

    Dynamo's bookkeeping travels along: AOTAutograd reads ``_param_name_to_source`` and each
    placeholder's ``_dynamo_source`` to tell parameters, buffers and static inputs from the rest
    (without them, CUDA graphs copy every parameter into the graph on each replay).
    """
    graph = Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    new = GraphModule(gm, graph, gm.__class__.__name__)
    new.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        new._param_name_to_source = gm._param_name_to_source
    for old, node in zip(gm.graph.find_nodes(op="placeholder"), graph.find_nodes(op="placeholder")):
        if hasattr(old, "_dynamo_source"):
            node._dynamo_source = old._dynamo_source
    return new


def optimize_graph(gm: GraphModule, *, kernel: str = "auto", strict: bool = False,
                   target: str = "op") -> tuple[GraphModule, PassResult]:
    """Lower every provable attention site of ``gm``. Returns (new module, report).

    ``target`` "op" lowers to ``torch.ops.attnopt.attention``; "portable" to plain SDPA on strided
    views with ``enable_gqa`` (ATen ops only, for programs that must load without attnopt).
    On an error the original ``gm`` is returned with a warning (an exception when strict).
    """
    check_target(target, kernel)
    result = PassResult()
    try:
        work = _copy(gm)
        masks, proofs = [], {}
        order = {n: i for i, n in enumerate(work.graph.nodes)}
        found = find_sdpa_sites(work.graph) + find_hand_written_sites(work.graph)
        for site in sorted(found, key=lambda s: order[s.node]):
            if target == "portable" and site.skip_reason is None:
                site.skip_reason = sdpa_refusal(site)
            written_mask = site.attn_mask
            if site.skip_reason is None and site.attn_mask is not None:
                masks.append(site.attn_mask)
                mask_note = recover_mask(site, proofs)
            else:
                mask_note = None
            rep = _describe(site)
            rep.mask = mask_note
            if site.skip_reason is None:
                if target == "op":
                    done = lower_to_op(work, site, kernel)
                else:
                    done = lower_to_sdpa(work, site, written_mask)
                    if site.attn_mask is None and done.node.kwargs.get("attn_mask") is not None:
                        rep.has_mask, rep.mask = True, f"{rep.mask}; kept as written: SDPA has no such band"
                rep.removed, rep.new_node = done.removed, done.node.name
            result.sites.append(rep)
        result.masks_removed = erase_dead_masks(work, masks)
        work.graph.lint()
        work.recompile()
        annotate(gm, work, result)
    except Exception as e:  # noqa: BLE001 - a pass failure must never break the user's compile
        if strict:
            raise
        warnings.warn(f"attnopt: passes failed, graph left unchanged: {type(e).__name__}: {e}", stacklevel=2)
        return gm, PassResult(error=f"{type(e).__name__}: {e}")
    log.info("attnopt: lowered %d of %d attention sites", result.lowered, len(result.sites))
    for s in result.sites:
        if s.status == "skipped":
            log.info("attnopt: left %s as written: %s", s.name, s.reason)
    return work, result


__all__ = ["TARGETS", "PassResult", "SiteReport", "check_target", "optimize_graph"]
