"""What an attention site runs instead of its mask: one typed plan per site.

The plan is derived in one place from the mask's proven structure, the causal flag the call
was given (the two intersect) and the shapes:

- ``flags``: only a causal/window band: the mask is dropped for ``is_causal``/``window_size``;
- ``batches``: chunks (causal inside) run as batches of whole chunks;
- ``thd``: documents (and the chunks inside them) run as packed sequences, the band inside each;
- ``key_padding``: the band as flags, key padding as the model's [B, 1, 1, Sk] vector;
- ``key_lengths``/``cache_lengths``: a decode query's key limit, or the keys after a cache's
  fill, as per-batch key lengths (inference only);
- ``kept``: the explicit mask, with the reason (unproven, written in place, not expressible).

A plan also says whether every query row provably keeps a key: where one may keep none, the
original's edge behaviour (zeros for SDPA, NaN for a hand-written ``-inf`` softmax, the average of
every key for a finite fill) has to be reproduced or the mask kept.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch.fx import Node

from ..fx import Writes
from ..fx.normalize import meta, op_name, same
from .interpret import Interpretation, Unproven, interpret
from .structure import Band, CacheOffset, KeyLimit, MaskStructure, structure_of

ACTIONS = ("none", "flags", "batches", "thd", "key_padding", "key_lengths", "cache_lengths", "kept")


@dataclass(frozen=True)
class BandFlags:
    """A band as the op's arguments: ``window`` is (left, right) around the diagonal that
    ``causal_align`` places, -1 for an unbounded side (the op's own convention)."""

    is_causal: bool = False
    causal_align: str = "top_left"
    window: tuple[int, int] = (-1, -1)


def band_flags(band: Band, sq: Any, sk: Any) -> Optional[BandFlags]:
    """The op's flags for ``band`` over [Sq, Sk] scores, or None when no flags express it
    (an empty band, or one that leaves out the diagonal on both alignments: ``k < q``)."""
    if band.unbounded:
        return BandFlags()
    if band.empty:
        return None
    bottom_right = band.upper is not None and band.upper != 0 and same(band.upper, sk - sq)
    base = band.upper if bottom_right else 0  # the diagonal: k - q == base
    right = None if band.upper is None else band.upper - base
    left = None if band.lower is None else base - band.lower
    if not all(side is None or (isinstance(side, int) and side >= 0) for side in (left, right)):
        return None
    is_causal = right == 0
    window = (-1 if left is None else left, -1 if right is None or is_causal and left is None else right)
    return BandFlags(is_causal, "bottom_right" if bottom_right else "top_left", window)


@dataclass
class MaskPlan:
    """What one site runs: ``action`` (one of ``ACTIONS``), the band's flags, the graph tensors
    the action needs, and ``note``, the account a report gives of the mask."""

    action: str
    flags: BandFlags = BandFlags()
    mask: Optional[Node] = None  # kept: the explicit mask, True = attend unless ``negated``
    negated: bool = False
    chunk: Optional[int] = None
    chunk_positions: bool = False  # thd pieces: chunks over the position ids rather than the indices
    documents: Optional[Node] = None
    padding: Optional[Node] = None
    key_limit: Optional[KeyLimit] = None
    cache: Optional[tuple[CacheOffset, Node]] = None  # and the keep-mask the lengths are counted from
    rows_keep_a_key: bool = True
    fill: Optional[float] = None  # what masks a key: -inf, a finite fill, or None when not known
    note: Optional[str] = None


@dataclass(frozen=True)
class MaskRequest:
    """What a recogniser hands over about a site's mask: the mask node as written (bool keep-mask,
    additive, or the mask a ``masked_fill``/``where`` applies), how it masks, and the site's shapes."""

    mask: Optional[Node]
    negated: bool  # masked_fill(m, fill): True in ``m`` drops the key
    fill: Optional[float]  # the fill of masked_fill/where; None: additive, or an SDPA bool mask
    flags: BandFlags  # the band the call itself states (SDPA: is_causal; flash-attn: causal, window)
    node: Node  # the attention call that reads the mask
    sq: Any
    sk: Any
    batch_axis: bool  # q, k and v have one batch axis (per-batch tensors can be built)
    trains: bool  # some operand requires grad


Proofs = dict  # (keep-mask node, negated) -> MaskStructure or the reason it is not proven


def _is_zero(x: object) -> bool:
    """0, or a graph-made zero scalar tensor (``torch.zeros(())``)."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return x == 0
    return isinstance(x, Node) and op_name(x) == "zeros" and meta(x) is not None and meta(x).numel() == 1


def _keep_mask(req: MaskRequest) -> tuple[Optional[Node], bool, Optional[float], Optional[str]]:
    """(bool mask to analyse, negated, fill, None) or (None, ..., why not).

    An additive mask is analysed when built as ``where(keep, 0, fill)`` with a fill of -inf or
    at most its dtype's lowest finite value; the fill decides what a row masked entirely gives.
    """
    mask, value = req.mask, meta(req.mask)
    if value.dtype == torch.bool:
        return mask, req.negated, req.fill if req.fill is not None else -math.inf, None
    if op_name(mask) == "where" and len(mask.args) == 3:
        cond, zero, fill = mask.args
        if isinstance(cond, Node) and meta(cond) is not None and meta(cond).dtype == torch.bool and _is_zero(zero) \
                and isinstance(fill, float) and (fill == -math.inf or fill <= torch.finfo(value.dtype).min):
            return cond, False, fill, None
    return None, False, None, "an additive mask not built as where(keep, 0, -inf)"


def _written(interp: Interpretation, req: MaskRequest, keep: Node, reads: list[Node],
             writes: Writes) -> Optional[str]:
    """Why the proof does not hold where attention reads the mask: a tensor the proof read is
    written in place while it is being read, or the mask, or a tensor the lowering reads at the
    call, is written before the call."""
    spans = [(req.mask, req.mask, req.node)] if req.mask is not keep else []
    for node, last in interp.spans.items():
        readers = [u for u in node.users if u in interp.spans]
        start = min(readers, key=writes.position, default=node) if node.op in ("placeholder", "get_attr") else node
        spans.append((node, start, req.node if node is keep or node in reads else last))
    for node, start, end in spans:
        writer = writes.first_write([node], after=start, before=end)
        if writer is not None:
            return f"{node.name} is written in place by {writer.name} before attention reads it"
    return None


def _analyse(keep: Node, negated: bool, proofs: Proofs) -> Union[tuple[Interpretation, MaskStructure], str]:
    key = (keep, negated)
    if key not in proofs:
        try:
            interp = interpret(keep)
            proofs[key] = (interp, structure_of(interp, negate=negated))
        except Unproven as e:
            proofs[key] = f"mask not recognised: {e}"
        except Exception as e:  # noqa: BLE001 - anything the analysis trips on is simply not a proof
            proofs[key] = f"mask not recognised: {type(e).__name__} while analysing it: {e}"
    return proofs[key]


def rows_keep_a_key(s: MaskStructure, sq: Any, sk: Any) -> bool:
    """Every query row keeps at least one key, for every input."""
    if s.terms() - {"chunk", "documents"}:
        return False
    if not s.terms():
        return s.band.keeps_a_key(sq, sk)
    diagonal = (s.band.lower is None or s.band.lower <= 0) and (s.band.upper is None or s.band.upper >= 0)
    return diagonal and same(sq, sk)  # k == q is in q's chunk and document


def _kept(req: MaskRequest, note: str) -> MaskPlan:
    return MaskPlan("kept", req.flags, mask=req.mask, negated=req.negated, rows_keep_a_key=False, note=note)


def causal_flags(is_causal: bool) -> BandFlags:
    return BandFlags(is_causal=True) if is_causal else BandFlags()


def plan_mask(req: MaskRequest, writes: Writes, proofs: Optional[Proofs] = None) -> MaskPlan:
    """The plan for a site's mask (``proofs`` memoises the analysis over one graph: models build
    one mask and hand it to every layer, and the symbolic proof is the costly part)."""
    if req.mask is None:
        return MaskPlan("none", req.flags)
    if req.flags not in (BandFlags(), BandFlags(is_causal=True)):
        return _kept(req, "a mask beside a window or bottom-right causality: kept as an explicit mask")
    keep, negated, fill, why_not = _keep_mask(req)
    if keep is None:
        return _kept(req, f"{why_not}: kept as an explicit mask")
    plan = _plan_analysed(req, keep, negated, fill, writes, proofs)
    plan.fill = fill
    return plan


def _plan_analysed(req: MaskRequest, keep: Node, negated: bool, fill: float, writes: Writes,
                   proofs: Optional[Proofs]) -> MaskPlan:
    """The plan for a mask whose keep-mask ``keep`` can be analysed."""
    analysed = _analyse(keep, negated, {} if proofs is None else proofs)
    if isinstance(analysed, str):
        return _kept(req, analysed)
    interp, structure = analysed
    if req.flags.is_causal:
        structure = structure.with_band(Band(upper=0))
    found = structure.describe() + (" & causal (is_causal)" if req.flags.is_causal else "")
    plan = _choose(req, structure, keep)
    reads = [n for n in (plan.documents, plan.padding, plan.key_limit and plan.key_limit.positions) if n is not None]
    written = _written(interp, req, keep, reads, writes)
    if written is not None:
        return _kept(req, f"{found}: kept as an explicit mask ({written})")
    if plan.action == "kept":
        return _kept(req, f"{found}: kept as an explicit mask ({plan.note})")
    if fill is not None and fill != -math.inf and not plan.rows_keep_a_key:
        return _kept(req, f"{found}: kept as an explicit mask (masked with {fill:g}, not -inf: a row masked "
                          "entirely averages every key)")
    plan.note = f"{found}: {plan.note}"
    return plan


def _choose(req: MaskRequest, s: MaskStructure, keep: Node) -> MaskPlan:
    """The plan for a proven structure (``note`` says what was done, or why not for ``kept``)."""
    sq, sk, terms = req.sq, req.sk, s.terms()
    if s.never:
        return MaskPlan("kept", note="nothing attends")
    flags = band_flags(s.band, sq, sk)
    inside = rows_keep_a_key(s, sq, sk)
    if not terms:
        if flags is None:
            return MaskPlan("kept", note="band not expressible as a causal/window diagonal")
        return MaskPlan("flags", flags, rows_keep_a_key=inside, note="mask removed")
    if terms in ({"documents"}, {"documents", "chunk"}):
        positions = meta(s.documents)
        if not same(sq, sk):
            return MaskPlan("kept", note="documents need self-attention (equal query and key lengths)")
        if not req.batch_axis or positions.dim() != 2 or not same(positions.shape[1], sq):
            return MaskPlan("kept", note="documents need [B, S] position ids of the attention's length")
        if flags is None:
            return MaskPlan("kept", note="band not expressible as a causal/window diagonal")
        if s.chunk is None:
            return MaskPlan("thd", flags, documents=s.documents, rows_keep_a_key=inside,
                            note="mask removed, documents run as packed sequences (thd)")
        return MaskPlan("thd", flags, chunk=s.chunk, chunk_positions=s.chunk_positions is not None,
                        documents=s.documents, rows_keep_a_key=inside,
                        note="mask removed, the chunks of each document run as packed sequences (thd)")
    if terms == {"chunk"} and s.chunk_positions is None:
        c = s.chunk
        if not (isinstance(sq, int) and isinstance(sk, int)) or sq != sk or sq % c:
            return MaskPlan("kept", note=f"chunks need a static self-attention length divisible by {c}")
        if s.band.lower is not None or s.band.upper not in (None, 0):
            return MaskPlan("kept", note="chunks with a window inside")
        return MaskPlan("batches", causal_flags(s.band.upper == 0), chunk=c, rows_keep_a_key=inside,
                        note="mask removed, chunks run as batches")
    if terms == {"padding"}:
        if not req.batch_axis:
            return MaskPlan("kept", note="key padding needs a batch axis")
        if flags is None:
            return MaskPlan("kept", note="band not expressible as a causal/window diagonal")
        return MaskPlan("key_padding", flags, padding=s.padding, rows_keep_a_key=False,
                        note="dense mask removed, key padding passed as a [B, 1, 1, Sk] mask")
    if terms == {"cache_offset"} and s.band.unbounded:
        if not req.batch_axis:
            return MaskPlan("kept", note="key lengths need a batch axis")
        if req.trains:
            return MaskPlan("kept", note="key lengths are lowered for inference only")
        return MaskPlan("cache_lengths", BandFlags(True, "bottom_right"), cache=(s.cache_offset, keep),
                        rows_keep_a_key=False,
                        note="mask removed, keys limited per batch (seqused_k), bottom-right causal")
    if terms == {"key_limit"} and s.band.unbounded:
        if sq != 1:
            return MaskPlan("kept", note="a key limit per query needs a single query position")
        if req.trains:
            return MaskPlan("kept", note="key lengths are lowered for inference only")
        return MaskPlan("key_lengths", key_limit=s.key_limit, rows_keep_a_key=False,
                        note="mask removed, keys limited per batch (seqused_k)")
    return MaskPlan("kept", note="no lowering combines " + " and ".join(sorted(terms | ({"band"} if not s.band.unbounded else set()))))


__all__ = ["ACTIONS", "BandFlags", "MaskPlan", "MaskRequest", "band_flags", "causal_flags", "plan_mask",
           "rows_keep_a_key"]
