"""Run attnopt's passes on a graph, falling back to the original graph on any error.

Shared by the torch.compile backend and ``attnopt.optimize`` so both IR levels get the same
rewrites and the same report.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Optional, Union

from torch.fx import Graph, GraphModule

from ..fx import Writes, may_mask
from ..masks import BandFlags, MaskRequest, plan_mask
from ..masks.lower import erase_dead_masks
from ..patterns import AttentionSite, find_sites
from ..fx.normalize import meta, shape
from ..report import source
from ..report.accounting import annotate
from .cache_writes import keep_cache_writes_in_place
from .choose_call import sdpa_instead
from .lower_attention import lower_to_op
from .lower_flex import flex_refusal, lower_flex, uses_flex
from .lower_portable import lower_to_sdpa, sdpa_refusal

log = logging.getLogger("attnopt")
TARGETS = ("auto", "op", "portable")


def check_target(target: str, kernel: str) -> None:
    """Reject a lowering target that does not exist, or a forced kernel the target cannot honour."""
    if target not in TARGETS:
        raise ValueError(f"attnopt: target must be one of {TARGETS}, got {target!r}")
    if target == "portable" and kernel != "auto":
        raise ValueError(f"attnopt: target='portable' emits plain SDPA, which cannot force kernel={kernel!r}")


@dataclass
class SiteReport:
    """One attention site: where it is, what was found, what was done or why not."""

    name: str  # the graph node's name (differs between Dynamo and export: reports name sites by module)
    kind: str
    status: str  # "lowered" or "skipped"
    reason: Optional[str] = None
    module: Optional[str] = None  # submodule path as written in the model ("" for the root module)
    location: Optional[str] = None  # 'File "...", line N, in f': the attention call in the module's file
    module_type: Optional[str] = None  # class name of that module
    layout: Optional[str] = None  # q layout as produced
    kv_layout: Optional[str] = None
    out_layout: Optional[str] = None
    gqa_group: int = 1
    heads: Optional[tuple] = None  # (Hq, Hkv)
    head_dims: Optional[tuple] = None  # (Dqk, Dv)
    is_causal: bool = False
    window: tuple = (-1, -1)  # (left, right) around the diagonal; -1 = unbounded
    has_mask: bool = False
    dropout_p: Union[float, str] = 0.0  # str: the graph value holding a symbolic dropout
    removed: list[str] = field(default_factory=list)
    new_node: Optional[str] = None
    mask: Optional[str] = None  # what the explicit mask was proven to be, and what became of it
    mask_action: Optional[str] = None  # what the site runs instead of its mask: one of attnopt.masks.ACTIONS
    copies_removed: int = 0  # removed nodes that materialised memory, per forward call
    bytes_removed: Optional[int] = 0  # what those copies wrote; None when a size is unknown
    kernel: Optional[str] = None  # the kernel the new op picks on its inputs' device and shapes
    call: Optional[str] = None  # why SDPA on views was emitted for target "auto" (passes/choose_call.py)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PassResult:
    """The sites a run found, in graph order, and whether the run fell back."""

    sites: list[SiteReport] = field(default_factory=list)
    error: Optional[str] = None
    masks_removed: list[str] = field(default_factory=list)  # mask-building nodes left unused
    cache_writes: int = 0  # KV-cache index_copy writes rewritten to stay in place (passes/cache_writes.py)

    @property
    def lowered(self) -> int:
        return sum(s.status == "lowered" for s in self.sites)


def _describe(site: AttentionSite) -> SiteReport:
    rep = SiteReport(site.name, site.kind, "skipped" if site.skip_reason else "lowered", site.skip_reason,
                     source.module_path(site.node), source.location(site.node), source.module_type(site.node),
                     has_mask=site.attn_mask is not None)
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


def _unsupported(site: AttentionSite) -> Optional[str]:
    """Why the op cannot compute the site as planned (None when it can)."""
    plan = site.plan
    finite_rows = site.mask_fill is None and site.attn_mask is not None and meta(site.attn_mask).is_floating_point() \
        and not plan.rows_keep_a_key and plan.fill != -math.inf and may_mask(site.attn_mask)
    if finite_rows and (site.kind != "sdpa" or _changes_torchs_kernel(site)):
        return ("an additive mask may mask a row entirely with finite values, where the softmax averages every "
                "key and differentiates through them as the kernel that runs does: torch's own kernels differ there")
    return None


def _nan_readers(sites: list[AttentionSite]) -> set[int]:
    """The hand-written sites reading what an attention before them may leave NaN (a written
    softmax's row that keeps no key): plain SDPA does not spread a NaN query or key as the
    softmax written there does (the op does). By ``id``: sites are not hashable."""
    sources = [s.node for s in sites if s.kind == "hand_written"
               and (s.plan is None or (s.empty_rows != "zero" and not s.plan.rows_keep_a_key))]
    reached, stack = set(sources), list(sources)
    while stack:
        node = stack.pop()
        for user in node.users:
            if user not in reached:
                reached.add(user)
                stack.append(user)
    return {id(site) for site in sites if site.kind == "hand_written" and site.skip_reason is None
            and any(op.source in reached for op in (site.query, site.key, site.value))}


def _changes_torchs_kernel(site: AttentionSite) -> bool:
    """The rewrite hands the op operands for which torch's SDPA would pick another CPU kernel: a V
    padded for it (equal head dims) read unpadded, or a head dim that is not unit-stride (torch's
    math kernel, the op's fused one after a copy)."""
    operands = (site.query, site.key, site.value)
    return getattr(site.value, "pad", 0) > 0 or any(meta(op.source).stride(-1) != 1 for op in operands)


def _remap(site: AttentionSite, replaced: dict) -> None:
    """Point the site at the nodes that replaced what it reads (attention reading the output of
    attention lowered before it)."""
    for op in (site.query, site.key, site.value):
        op.source = replaced.get(op.source, op.source)
    plan = site.plan
    site.attn_mask = replaced.get(site.attn_mask, site.attn_mask)
    if plan.mask is not None:
        plan.mask = replaced.get(plan.mask, plan.mask)


def _mask_request(site: AttentionSite) -> MaskRequest:
    q, k = site.query, site.key
    operands = (site.query, site.key, site.value)
    if q.dims == "thd":
        sq, sk = site.max_seqlen_q, site.max_seqlen_k
    else:
        sq, sk = shape(q.source)[q.dims.index("s")], shape(k.source)[k.dims.index("s")]
    flags = BandFlags(site.is_causal, site.causal_align, tuple(site.window))
    batch_axis = all(op.dims.count("b") == 1 for op in operands)
    batch = shape(q.source)[q.dims.index("b")] if batch_axis else None
    return MaskRequest(site.attn_mask, site.mask_negated, site.mask_fill, flags, site.node, sq, sk, batch_axis,
                       any(meta(op.source).requires_grad for op in operands), site.mask_mod, site.empty_rows, batch)


def _copy(gm: GraphModule) -> GraphModule:
    """A GraphModule sharing gm's parameters and submodules but owning a fresh graph.

    Dynamo's bookkeeping travels along: AOTAutograd reads ``_param_name_to_source`` and each
    placeholder's ``_dynamo_source`` to tell parameters, buffers and static inputs from the rest
    (without them, CUDA graphs copy every parameter into the graph on each replay).

    Every node keeps its name: ``graph_copy`` renames a node whose name shadows a Python builtin
    (export names the argument of ``nn.Linear.forward`` ``input``), and an exported program's
    signature refers to its inputs and outputs by name.
    """
    graph = Graph()
    copies: dict = {}
    out = graph.graph_copy(gm.graph, copies)
    graph.output(out)
    for old, node in copies.items():
        if node.name != old.name:
            node.name = old.name
            graph._graph_namespace._rename_object(node, old.name)
    new = GraphModule(gm, graph, gm.__class__.__name__)
    new.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        new._param_name_to_source = gm._param_name_to_source
    for old, node in zip(gm.graph.find_nodes(op="placeholder"), graph.find_nodes(op="placeholder")):
        if hasattr(old, "_dynamo_source"):
            node._dynamo_source = old._dynamo_source
    return new


def optimize_graph(gm: GraphModule, *, kernel: str = "auto", strict: bool = False, target: str = "auto",
                   constants: Optional[dict] = None, report: bool = True) -> tuple[GraphModule, PassResult]:
    """Lower every provable attention site of ``gm``. Returns (new module, report).

    ``target`` "auto" lowers each site to the cheaper of two exact calls: plain SDPA on strided
    views where SDPA computes it and the op would run no faster kernel (``choose_call``), else
    ``torch.ops.attnopt.attention``; "op" lowers every site to the op; "portable" to plain SDPA on
    strided views with ``enable_gqa`` (ATen ops only, for programs that must load without attnopt).
    ``constants`` are the values of placeholders that stand for constant tensors (an exported
    program's lifted constants), by name. KV-cache writes spelled ``index_copy(_)`` become
    ``index_put(_)``, which Inductor keeps in place (``cache_writes``). On an error the original
    ``gm`` is returned with a warning (an exception when strict). ``report`` False leaves out what only a report reads:
    each site's expected kernel and the copies its rewrite removed.
    """
    check_target(target, kernel)
    result = PassResult()
    try:
        work = _copy(gm)
        for node in work.graph.find_nodes(op="placeholder"):
            if constants and node.name in constants:
                node.meta["attnopt_constant"] = constants[node.name]
        result.cache_writes = keep_cache_writes_in_place(work)
        writes = Writes(work.graph, work)
        order = {n: i for i, n in enumerate(work.graph.nodes)}
        found = find_sites(work.graph, writes)
        sites = sorted(found, key=lambda s: order[s.node])
        proofs: dict = {}
        for site in sites:  # plan every site on the graph as written, then lower
            if site.skip_reason is None:
                site.plan = plan_mask(_mask_request(site), writes, proofs)
                site.skip_reason = flex_refusal(site, target) or _unsupported(site)
            if site.skip_reason is None and target == "portable":
                site.skip_reason = sdpa_refusal(site)
        nan_readers = _nan_readers(sites)
        to_sdpa: dict[int, str] = {}  # by id: for target "auto", the sites SDPA on views runs for less
        for site in sites:
            if site.skip_reason is not None:
                continue
            if id(site) in nan_readers:  # the op spreads the NaN as written; SDPA does not
                if target == "portable":
                    site.skip_reason = ("reads the output of an attention that may leave a row NaN, which plain "
                                        "SDPA does not spread as the softmax written here does: left as written "
                                        "for target='portable'")
            elif target == "auto" and not uses_flex(site):
                why = sdpa_instead(site, kernel)
                if why is not None:
                    to_sdpa[id(site)] = why
        replaced: dict = {}  # nodes an earlier lowering replaced, which a later site may read
        for site in sites:
            rep = _describe(site)
            if site.plan is not None:
                rep.mask, rep.mask_action = site.plan.note, site.plan.action
                rep.is_causal, rep.window = site.plan.flags.is_causal, site.plan.flags.window
                rep.has_mask = site.plan.action in ("kept", "key_padding")
            if site.skip_reason is None:
                _remap(site, replaced)
                if uses_flex(site):
                    done = lower_flex(work, site, kernel, target)
                else:
                    sdpa = target == "portable" or id(site) in to_sdpa
                    done = lower_to_sdpa(work, site) if sdpa else lower_to_op(work, site, kernel)
                    rep.call = to_sdpa.get(id(site))
                replaced.update(done.replaced)
                if target == "portable" and site.plan.action not in ("none", "kept") \
                        and done.node.kwargs.get("attn_mask") is not None:
                    rep.has_mask, rep.mask_action = True, "kept"
                    rep.mask = f"{rep.mask}; kept as written: SDPA has no such band"
                rep.removed, rep.new_node = done.removed, done.node.name
            result.sites.append(rep)
        result.masks_removed = erase_dead_masks(work, [s.attn_mask for s in sites if s.plan and s.attn_mask is not None])
        work.graph.lint()
        work.recompile()
        if report:
            annotate(gm, work, result)
    except Exception as e:  # noqa: BLE001 - a pass failure must never break the user's compile
        if strict:
            raise
        warnings.warn(f"attnopt: passes failed, graph left unchanged: {type(e).__name__}: {e}", stacklevel=2)
        return gm, PassResult(error=f"{type(e).__name__}: {e}")
    log.info("attnopt: lowered %d of %d attention sites", result.lowered, len(result.sites))
    if result.cache_writes:
        log.info("attnopt: %d KV-cache writes (index_copy_) kept in place as index_put_", result.cache_writes)
    for s in result.sites:
        if s.status == "skipped":
            log.info("attnopt: left %s as written: %s", s.name, s.reason)
    return work, result


__all__ = ["TARGETS", "PassResult", "SiteReport", "check_target", "optimize_graph"]
