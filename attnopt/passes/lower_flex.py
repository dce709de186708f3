"""Lowerings that involve ``flex_attention``, both ways:

- a flex_attention call whose mask_mod was proven (``site.kind == "flex"``) runs as the op (or
  plain SDPA for ``target="portable"``) with the plan's flags, batches, packed documents or key
  padding. flex also skips the blocks its BlockMask does not list and applies no mask_mod inside
  blocks listed as full, so that is the same call only where the block lists are those of the
  mask_mod (``create_block_mask`` makes them so): checked on the device before the call
  (``attnopt.masks.blocks.check_block_mask``), once per block mask and graph.
- a site whose plan is ``flex`` (a proven mask no flag or packing expresses) runs as flex_attention
  with a mask_mod and block lists built from the structure, reading q, k and v as produced (GQA by
  head count) and writing the output in the layout its consumers read.

``flex_refusal`` is the pipeline's check before lowering: a flex call whose mask stays unproven is
left as written, and a ``flex`` plan for a site flex cannot run (dropout, softcapping, packed
inputs, a symbolic scale) falls back to the dense mask.
"""
from __future__ import annotations

import math
import operator
from dataclasses import replace
from typing import Any, Callable, Optional

import torch
from torch.fx import GraphModule, Node
from torch.fx.experimental.proxy_tensor import make_fx
from torch.nn.attention.flex_attention import _DEFAULT_SPARSE_BLOCK_SIZE

from ..fx import Builder, erase_if_dead
from ..fx.normalize import meta
from ..masks import blocks
from ..masks.mask_mod import block_mask_tuple
from ..masks.structure import MaskStructure
from ..patterns.flex import FLEX
from ..patterns.site import AttentionSite
from .lower_attention import Lowered, in_layout, lower_to_op
from .lower_portable import _reshape_views, lower_to_sdpa, sdpa_causal

aten = torch.ops.aten
_COPIED_META = ("stack_trace", "nn_module_stack", "source_fn_stack", "from_node", "seq_nr")


def uses_flex(site: AttentionSite) -> bool:
    """The site is a flex call, or is to become one: lowered here."""
    return site.kind == "flex" or site.plan.action == "flex"


def _flex_cannot(site: AttentionSite) -> Optional[str]:
    """What the site computes that flex_attention (identity score_mod) does not."""
    if isinstance(site.dropout_p, Node) or site.dropout_p:
        return "dropout"
    if site.softcap:
        return "softcapping"
    if isinstance(site.scale, Node):
        return "scale known only at run time"
    if site.cu_seqlens_q is not None or "b" not in site.query.dims:
        return "packed sequences"
    return None


def flex_refusal(site: AttentionSite, target: str) -> Optional[str]:
    """Why the site is left as written (None: lower it). A ``flex`` plan the site cannot run is
    turned back into the dense mask it replaced."""
    plan = site.plan
    if plan.action == "flex":
        missing = _flex_cannot(site)
        if missing is not None:
            site.plan = replace(plan, action="kept", structure=None, rows_keep_a_key=False,
                                note=f"{plan.note}; kept as an explicit mask instead: flex_attention has no {missing}")
        return None
    if site.kind != "flex":
        return None
    if plan.action == "kept":
        return f"left as flex_attention: {plan.note}"
    if target == "portable" and sdpa_causal(site) is None:
        return f"{plan.note}; SDPA has no such arguments: left as flex_attention for target='portable'"
    return None


def lower_flex(gm: GraphModule, site: AttentionSite, kernel: str = "auto", target: str = "auto") -> Lowered:
    """Lower a site that ``uses_flex``."""
    if site.plan.action == "flex":
        return lower_to_flex(gm, site)
    s, mm = site.plan.structure, site.mask_mod
    _, _, sq, sk = mm.sizes
    build = Builder(gm, site.node)
    with gm.graph.inserting_before(site.node):
        some, every = blocks.occupancy(build, s, sq, sk, mm.block_mask.block_size, meta(site.query.source).device)
        blocks.check_block_mask(build, mm.block_mask, some, every, site.name)
    return lower_to_sdpa(gm, site) if target == "portable" else lower_to_op(gm, site, kernel)


# --- flex_attention from a structure -----------------------------------------------------------
_Term = Callable[..., Any]  # (b, q_idx, kv_idx, buffers) -> a bool scalar tensor


def _terms(build: Builder, s: MaskStructure, sk: int, batch: int) -> tuple[list[_Term], list[Node]]:
    """The mask_mod's conjuncts and the graph values they read (their ``buffers``): each term of
    ``s`` written over flex's (b, q_idx, kv_idx), reading per-batch or per-query tensors with 0-d
    indices (``aten.index``, as flex's own mask_mods read captured tensors)."""
    terms: list[_Term] = []
    buffers: list[Node] = []

    def buffer(node: Node) -> int:
        buffers.append(node)
        return len(buffers) - 1

    def kept(node: Node) -> Node:  # flex keeps its buffers for backward; the graph's own tensor may be written later
        return build(aten.clone.default, node)

    def at(x: Any, *index: Any) -> Any:
        return aten.index.Tensor(x, list(index))

    band = s.band
    if band.lower is not None:
        terms.append(lambda b, q, k, x, lo=band.lower: k - q >= lo)
    if band.upper is not None:
        terms.append(lambda b, q, k, x, hi=band.upper: k - q <= hi)
    if s.chunk is not None and s.chunk_positions is None:
        terms.append(lambda b, q, k, x, c=s.chunk: torch.floor_divide(q, c) == torch.floor_divide(k, c))
    if s.chunk is not None and s.chunk_positions is not None:
        i = buffer(kept(s.chunk_positions))
        terms.append(lambda b, q, k, x, c=s.chunk, i=i: torch.floor_divide(at(x[i], b, q), c)
                     == torch.floor_divide(at(x[i], b, k), c))
    if s.documents is not None:  # document ids: a running count of the document starts
        i = buffer(build(aten.cumsum.default, blocks.document_starts(build, s), 1))
        terms.append(lambda b, q, k, x, i=i: at(x[i], b, q) == at(x[i], b, k))
    if s.document_ids is not None:
        i = buffer(kept(s.document_ids))
        if meta(s.document_ids).dim() == 2:
            terms.append(lambda b, q, k, x, i=i: at(x[i], b, q) == at(x[i], b, k))
        else:
            terms.append(lambda b, q, k, x, i=i: at(x[i], q) == at(x[i], k))
    if s.padding is not None:
        i = buffer(build(aten.ne.Scalar, build(aten.slice.Tensor, s.padding, 1, 0, sk), 0))
        terms.append(lambda b, q, k, x, i=i: at(x[i], b, k))
    if s.key_limit is not None:
        i = buffer(kept(s.key_limit.positions))
        terms.append(lambda b, q, k, x, i=i, e=s.key_limit.extra: k < at(x[i], q) + e)
    if s.cache_offset is not None:
        length = build(aten.reshape.default, s.cache_offset.length, [1])
        i = buffer(kept(build(aten.expand.default, length, [batch])))
        terms.append(lambda b, q, k, x, i=i, c=s.cache_offset.offset: k - q <= at(x[i], b) + c)
    return terms, buffers


def _mask_mod_graph(terms: list[_Term], buffers: list[Node]) -> GraphModule:
    """The mask_mod (b, h, q_idx, kv_idx, *buffers) -> keep as an ATen graph (traced on meta
    tensors, so it holds no tensor constant: flex runs it on the call's device)."""
    def mask_mod(b: Any, h: Any, q: Any, k: Any, *x: Any) -> Any:
        keep = terms[0](b, q, k, x)
        for term in terms[1:]:
            keep = keep & term(b, q, k, x)
        return keep

    index = [torch.zeros((), dtype=torch.int32, device="meta") for _ in range(4)]
    shapes = [torch.empty(meta(n).shape, dtype=meta(n).dtype, device="meta") for n in buffers]
    return make_fx(mask_mod)(*index, *shapes)


def _score_mod_graph(dtype: torch.dtype) -> GraphModule:
    """The identity score_mod (score, b, h, q_idx, kv_idx) -> score."""
    index = [torch.zeros((), dtype=torch.int32, device="meta") for _ in range(4)]
    return make_fx(lambda score, b, h, q, k: score)(torch.zeros((), dtype=dtype, device="meta"), *index)


def _attach(gm: GraphModule, stem: str, module: GraphModule) -> Node:
    """A get_attr node for ``module`` under a fresh attribute name of ``gm``."""
    i = 0
    while hasattr(gm, f"{stem}_{i}"):
        i += 1
    gm.add_submodule(f"{stem}_{i}", module)
    return gm.graph.get_attr(f"{stem}_{i}")


def _kernel_options(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, trains: bool) -> dict:
    """flex's own defaults for these inputs (whether it writes the log-sum-exp follows grad mode)."""
    from torch.nn.attention.flex_attention import _apply_kernel_options

    with torch.set_grad_enabled(trains):
        return dict(_apply_kernel_options(q, k, v, False, None))


def _flex_node(build: Builder, args: tuple, modules: dict[Node, GraphModule]) -> Node:
    """The flex HOP call, stamped like ``Builder``'s nodes (its subgraph arguments are modules)."""
    node = build.graph.call_function(FLEX, args)
    for key in _COPIED_META:
        if key in build.anchor.meta:
            node.meta[key] = build.anchor.meta[key]

    def value(x: Any) -> Any:
        if isinstance(x, Node):
            return modules.get(x, meta(x))
        if isinstance(x, (tuple, list)):
            return type(x)(value(y) for y in x)
        return x

    values = value(args)
    with values[0].fake_mode, torch.no_grad():
        node.meta[build.key] = FLEX(*values)
    return node


def lower_to_flex(gm: GraphModule, site: AttentionSite) -> Lowered:
    """Replace ``site`` by flex_attention over its plan's structure, block-sparse."""
    s, out_use = site.plan.structure, site.output
    qv, kv = meta(site.query.source), meta(site.key.source)
    b, sq, sk = qv.shape[site.query.dims.index("b")], qv.shape[site.query.dims.index("s")], \
        kv.shape[site.key.dims.index("s")]
    block = (_DEFAULT_SPARSE_BLOCK_SIZE, _DEFAULT_SPARSE_BLOCK_SIZE)
    build = Builder(gm, site.node)
    with gm.graph.inserting_before(site.node):
        q, k, v = (in_layout(build, op, "bhsd") for op in (site.query, site.key, site.value))
        terms, buffers = _terms(build, s, sk, b)
        some, every = blocks.occupancy(build, s, sq, sk, block, qv.device)
        lists = blocks.block_lists(build, some, every)
        score_mod = _attach(gm, "attnopt_flex_score", _score_mod_graph(qv.dtype))
        mask_mod = _attach(gm, "attnopt_flex_mask", _mask_mod_graph(terms, buffers))
        modules = {score_mod: gm.get_submodule(score_mod.target), mask_mod: gm.get_submodule(mask_mod.target)}
        items = block_mask_tuple((sq, sk), lists, block, mask_mod)
        scale = site.scale if site.scale is not None else 1.0 / math.sqrt(qv.shape[-1])
        trains = any(meta(op.source).requires_grad for op in (site.query, site.key, site.value))
        options = _kernel_options(meta(q), meta(k), meta(v), trains)
        call = _flex_node(build, (q, k, v, score_mod, items, scale, options, (), tuple(buffers)), modules)
        out = first = build(operator.getitem, call, 0)
        if out_use.layout != "bhsd":
            out = build(aten.permute.default, out, ["bhsd".index(a) for a in out_use.layout])
        if len(meta(out_use.node).shape) == 3:  # a [B*H, Sq, Dv] product (bmm)
            out = build(aten.reshape.default, out, list(meta(out_use.node).shape))
        if out_use.written:  # the graph writes it in place: not the tensor flex keeps for backward
            out = build(aten.clone.default, out)
    out_use.node.replace_all_uses_with(out)
    _reshape_views(out)
    replaced = {out_use.node: out}
    chain = set(out_use.skipped)
    if any(u not in chain for u in site.node.users):  # other readers of the output as the site computed it
        view = first
        if len(meta(site.node).shape) == 3:
            with gm.graph.inserting_after(out):
                view = build(aten.reshape.default, first, list(meta(site.node).shape))
        site.node.replace_all_uses_with(view, delete_user_cb=lambda u: u not in chain)
        replaced.setdefault(site.node, view)
    dead = [site.node, *out_use.skipped, *site.query.skipped, *site.key.skipped, *site.value.skipped, *site.chain]
    return Lowered(call, erase_if_dead(gm, dead, frozenset(site.chain)), replaced)


__all__ = ["flex_refusal", "lower_flex", "lower_to_flex", "uses_flex"]
