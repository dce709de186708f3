"""What an attention site runs instead of its mask: one typed plan per site.

The plan is derived in one place from the mask's proven structure, the causal flag the call
was given (the two intersect) and the shapes:

- ``flags``: only a causal/window band: the mask is dropped for ``is_causal``/``window_size``;
- ``batches``: chunks (causal inside) run as batches of whole chunks;
- ``thd``: documents (and the chunks inside them) run as packed sequences, the band inside each;
- ``key_padding``: the band as flags, key padding as the model's [B, 1, 1, Sk] vector;
- ``key_lengths``/``cache_lengths``: a decode query's key limit, or the keys after a cache's
  fill, as per-batch key lengths (inference only);
- ``kept``: the explicit mask, with the reason (unproven, written in place, not expressible);
- ``flex``: a proven structure that no flag or packing expresses, run by ``flex_attention`` with a
  mask_mod and block lists built from the structure, on devices where that beats the dense mask
  (``FLEX_DEVICES``), and only where it gives what the original gives on rows that keep no key.

A flex_attention call's own mask (``MaskRequest.mask_mod``) is planned the same way from its
mask_mod; ``kept`` then means the call stays flex_attention.

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
from .interpret import Interpretation, Unproven, interpret, interpret_mask_mod
from .mask_mod import MaskMod
from .structure import Band, CacheOffset, KeyLimit, MaskStructure, structure_of

ACTIONS = ("none", "flags", "batches", "thd", "key_padding", "key_lengths", "cache_lengths", "kept", "flex")
# Device types where flex_attention over a proven structure beats the dense masked kernel. On CPU
# it does not (torch's CPU flex path is no faster than the dense mask), so there the mask is kept.
FLEX_DEVICES: frozenset[str] = frozenset({"cuda"})


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
    structure: Optional[MaskStructure] = None  # flex, and flex calls lowered: the structure proven
    document_ids: bool = False  # thd: ``documents`` holds document ids (each one run, checked), not positions
    batch: Any = None  # thd: the attention's batch, over which [1, S] position ids broadcast


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
    mask_mod: Optional[MaskMod] = None  # a flex_attention call's mask (``mask`` is then None)
    empty_rows: str = "zero"  # what the original gives a query row that keeps no key ("zero", "nan")
    batch: Any = None  # the attention's batch size (None when its operands have no batch axis)


Proofs = dict  # (keep-mask node, negated) -> MaskStructure or the reason it is not proven


def _is_zero(x: object) -> bool:
    """0, or a graph-made zero scalar tensor (``torch.zeros(())``, ``torch.tensor(0.0)``)."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return x == 0
    if not isinstance(x, Node) or meta(x) is None or meta(x).numel() != 1:
        return False
    while op_name(x) in ("lift_fresh_copy", "detach", "detach_", "clone", "alias") and isinstance(x.args[0], Node):
        x = x.args[0]
    constant = x.meta.get("attnopt_constant")
    if constant is not None:  # an exported program's lifted constant
        return bool(constant.reshape(()) == 0)
    name = op_name(x)
    if name in ("zeros", "zeros_like", "new_zeros"):
        return True
    value = x.args[0] if name in ("tensor", "scalar_tensor") and x.args else None
    value = x.args[1] if name == "full" and len(x.args) > 1 else value
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def _all_zeros(node: object, like: Node) -> bool:
    """A graph-made tensor of zeros with ``like``'s shape (what a mask is filled into)."""
    return isinstance(node, Node) and op_name(node) in ("zeros", "zeros_like", "new_zeros") \
        and meta(node) is not None and tuple(meta(node).shape) == tuple(meta(like).shape)


def _keep_mask(req: MaskRequest) -> tuple[Optional[Node], bool, Optional[float], Optional[str]]:
    """(bool mask to analyse, negated, fill, None) or (None, ..., why not).

    An additive mask is analysed when built as ``where(keep, 0, fill)`` or
    ``zeros(...).masked_fill(~keep, fill)`` with a fill of -inf or at most its dtype's lowest finite
    value; the fill decides what a row masked entirely gives.
    """
    mask, value = req.mask, meta(req.mask)
    if value.dtype == torch.bool:
        return mask, req.negated, req.fill if req.fill is not None else -math.inf, None
    masking = lambda fill: isinstance(fill, float) and (fill == -math.inf or fill <= torch.finfo(value.dtype).min)
    is_bool = lambda node: isinstance(node, Node) and meta(node) is not None and meta(node).dtype == torch.bool
    if op_name(mask) == "where" and len(mask.args) == 3:
        cond, zero, fill = mask.args
        if is_bool(cond) and _is_zero(zero) and masking(fill):
            return cond, False, fill, None
    if op_name(mask) == "masked_fill" and len(mask.args) == 3:  # zeros(...).masked_fill(~keep, -inf)
        zeros, dropped, fill = mask.args
        if is_bool(dropped) and _all_zeros(zeros, mask) and masking(fill):
            return dropped, True, fill, None
    return None, False, None, "an additive mask or bias (not built as where(keep, 0, -inf))"


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
    if s.terms() - {"chunk", "documents", "document_ids"}:
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
    if req.mask_mod is not None:
        return _plan_mask_mod(req, {} if proofs is None else proofs)
    if req.mask is None:
        return MaskPlan("none", req.flags)
    if req.flags not in (BandFlags(), BandFlags(is_causal=True)):
        return _kept(req, "a mask beside a window or bottom-right causality: kept as an explicit mask")
    keep, negated, fill, why_not = _keep_mask(req)
    if keep is None:
        return _kept(req, f"{why_not}: passed to the op as written")
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
    plan = _choose(req, structure, keep, negated)
    if plan.action == "kept" and not structure.never:
        plan = _flex_target(req, structure, fill, plan)
    reads = [n for n in (plan.documents, plan.padding, plan.key_limit and plan.key_limit.positions) if n is not None]
    if plan.action == "flex":
        reads = structure.inputs()
    written = _written(interp, req, keep, reads, writes)
    if written is not None:
        return _kept(req, f"{found}: kept as an explicit mask ({written})")
    if plan.action == "kept":  # the mask is unchanged, and what its structure proves still holds
        kept = _kept(req, f"{found}: kept as an explicit mask ({plan.note})")
        kept.rows_keep_a_key = rows_keep_a_key(structure, req.sq, req.sk)
        return kept
    finite = fill is not None and fill != -math.inf
    if finite and req.fill is None and not plan.rows_keep_a_key and plan.action != "flex":
        return _kept(req, f"{found}: kept as an explicit mask (added {fill:g}, not -inf: a row masked "
                          "entirely averages every key)")
    if finite and req.fill is not None and plan.action in ("batches", "thd", "key_lengths", "cache_lengths", "flex"):
        return _kept(req, f"{found}: kept as an explicit mask (a fill of {fill:g} keeps masked keys in the "
                          "softmax, which packing would take away)")
    plan.note = f"{found}: {plan.note}"
    return plan


def _choose(req: MaskRequest, s: MaskStructure, keep: Node, negated: bool = False) -> MaskPlan:
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
        if not req.batch_axis or positions.dim() != 2 or not same(positions.shape[1], sq) \
                or not (same(positions.shape[0], req.batch) or same(positions.shape[0], 1)):
            return MaskPlan("kept", note="documents need [B, S] (or [1, S]) position ids of the attention's length")
        if flags is None:
            return MaskPlan("kept", note="band not expressible as a causal/window diagonal")
        if s.chunk is None:
            return MaskPlan("thd", flags, documents=s.documents, rows_keep_a_key=inside, batch=req.batch,
                            note="mask removed, documents run as packed sequences (thd)")
        return MaskPlan("thd", flags, chunk=s.chunk, chunk_positions=s.chunk_positions is not None,
                        documents=s.documents, rows_keep_a_key=inside, batch=req.batch,
                        note="mask removed, the chunks of each document run as packed sequences (thd)")
    if terms in ({"document_ids"}, {"document_ids", "chunk"}) and s.chunk_positions is None:
        ids = meta(s.document_ids)
        if not same(sq, sk):
            return MaskPlan("kept", note="documents need self-attention (equal query and key lengths)")
        if not req.batch_axis or not same(ids.shape[-1], sq):
            return MaskPlan("kept", note="document ids need a batch axis and the attention's length")
        if ids.dim() == 1 and not same(req.batch, 1):
            return MaskPlan("kept", note="document ids without a batch axis over a batch of more than one")
        if flags is None:
            return MaskPlan("kept", note="band not expressible as a causal/window diagonal")
        return MaskPlan("thd", flags, chunk=s.chunk, documents=s.document_ids, document_ids=True,
                        rows_keep_a_key=inside, note="mask removed, documents (each id one run of its row, checked "
                        "on the device) run as packed sequences (thd)")
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
        return MaskPlan("cache_lengths", BandFlags(True, "bottom_right"), cache=(s.cache_offset, keep), negated=negated,
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


def _flex_target(req: MaskRequest, s: MaskStructure, fill: Optional[float], kept: MaskPlan) -> MaskPlan:
    """``flex`` for a proven structure the op cannot take without its dense mask, where flex is
    faster (``FLEX_DEVICES``) and equal: flex gives a row that keeps no key zeros, as SDPA's
    definition (its math backend) does, so such rows must not be possible where the original gives
    NaN or averages every key. ``flags`` stay the call's, for the dense mask a lowering may fall back to."""
    device = getattr(meta(req.node), "device", None)
    if device is None or device.type not in FLEX_DEVICES:
        return kept
    if not (isinstance(req.sq, int) and isinstance(req.sk, int)) or not req.batch_axis:
        return kept
    inside = rows_keep_a_key(s, req.sq, req.sk)
    if not inside and (req.empty_rows != "zero" or fill != -math.inf):
        return kept
    return MaskPlan("flex", req.flags, mask=req.mask, negated=req.negated, structure=s, rows_keep_a_key=inside,
                    note=f"dense mask replaced by flex_attention over its structure, block-sparse ({kept.note})")


_FROM_MASK_MOD = ("flags", "batches", "thd", "key_padding")  # what a flex call's mask is lowered to


def _plan_mask_mod(req: MaskRequest, proofs: Proofs) -> MaskPlan:
    """The plan for a flex call's mask_mod: its structure lowered as a tensor mask's would be, or
    ``kept`` (the call stays flex_attention) with the reason. A mask_mod that keeps every key
    leaves the block mask alone to decide, which is data: lowered only where it has one block."""
    mm = req.mask_mod
    key = (mm.graph, mm.buffers, mm.sizes)
    if key not in proofs:
        try:
            proofs[key] = structure_of(interpret_mask_mod(mm.graph.graph, mm.sizes, mm.buffers))
        except Unproven as e:
            proofs[key] = f"mask_mod not recognised: {e}"
        except Exception as e:  # noqa: BLE001 - anything the analysis trips on is simply not a proof
            proofs[key] = f"mask_mod not recognised: {type(e).__name__} while analysing it: {e}"
    s = proofs[key]
    if isinstance(s, str):
        return MaskPlan("kept", rows_keep_a_key=False, note=s)
    found = f"mask_mod {s.describe()}"
    if not (isinstance(req.sq, int) and isinstance(req.sk, int)):
        return MaskPlan("kept", rows_keep_a_key=False, note=f"{found}: its block mask is checked at static lengths only")
    qb, kb = mm.block_mask.block_size
    if not s.terms() and s.band.unbounded and (req.sq > qb or req.sk > kb):
        return MaskPlan("kept", rows_keep_a_key=False,
                        note=f"{found}: every key, so the block mask alone decides which blocks attend")
    plan = _choose(req, s, None)
    if plan.action not in _FROM_MASK_MOD:
        why = plan.note if plan.action == "kept" else f"no lowering of a flex mask to {plan.action}"
        return MaskPlan("kept", rows_keep_a_key=False, note=f"{found}: {why}")
    plan.structure, plan.note = s, f"{found}: {plan.note}; block mask checked against it on the device"
    return plan


__all__ = ["ACTIONS", "FLEX_DEVICES", "BandFlags", "MaskPlan", "MaskRequest", "band_flags", "causal_flags", "plan_mask",
           "rows_keep_a_key"]
