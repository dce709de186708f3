"""The canonical description of an attention site, shared by every recogniser and pass."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Union

from torch.fx import Node

if TYPE_CHECKING:
    from ..masks.mask_mod import MaskMod
    from ..masks.plan import MaskPlan


@dataclass
class Operand:
    """How q, k or v reaches attention: ``source`` as produced, read with ``dims`` axis labels.

    ``dims`` names the source's axes in b/h/s/d terms ("bshd": a [B, S, H, D] tensor). ``group``
    is the K/V head repetition stripped on the way (1 when none): attention head h reads
    source head h // group. ``skipped`` are the layout/repeat nodes between source and use.
    """

    source: Node
    dims: str
    group: int = 1
    skipped: list[Node] = field(default_factory=list)


@dataclass
class OutputUse:
    """Where the attention output is consumed: ``node`` equals the output in ``layout``.
    ``written``: the graph writes the output in place after the call (the op keeps its output
    for backward, so the readers get a copy)."""

    node: Node
    layout: str
    skipped: list[Node] = field(default_factory=list)
    written: bool = False


@dataclass
class AttentionSite:
    """One attention call found in a graph, as written, and what a lowering needs to rewrite it.

    Operands are labelled b/h/s/d, or t/h/d for packed sequences (``cu_seqlens_*`` then say where
    each starts). The mask fields say how the call masks (``attn_mask`` as the code passes it; for a
    hand-written ``masked_fill(m, fill)`` the mask ``m`` with ``mask_negated`` and ``mask_fill``);
    ``plan`` is what the site runs instead, filled in by ``attnopt.masks.plan_mask``.
    """

    node: Node  # the SDPA call (or the last node of a hand-written chain)
    kind: str  # "sdpa" | "hand_written"
    query: Optional[Operand] = None
    key: Optional[Operand] = None
    value: Optional[Operand] = None
    output: Optional[OutputUse] = None
    attn_mask: Optional[Node] = None
    mask_negated: bool = False
    mask_fill: Optional[float] = None
    dropout_p: Union[float, Node] = 0.0  # a Node when Dynamo made the number symbolic
    is_causal: bool = False
    causal_align: str = "top_left"  # where the call puts the diagonal when Sq != Sk (flash-attn: bottom right)
    window: tuple[int, int] = (-1, -1)  # the call's own (left, right) window around it; -1 = unbounded
    cu_seqlens_q: Optional[Node] = None  # packed ("thd") calls: the offsets and longest lengths they pass
    cu_seqlens_k: Optional[Node] = None
    max_seqlen_q: Union[int, Node, None] = None
    max_seqlen_k: Union[int, Node, None] = None
    scale: Union[float, Node, None] = None
    softcap: float = 0.0  # scores capped to softcap * tanh(scores / softcap) before the mask; 0 = none
    sinks: Optional[Node] = None  # [Hq] logits joining every row's softmax with no value (GPT-OSS)
    empty_rows: str = "zero"  # what the original gives a query row that keeps no key: "zero", "nan" for a
    # -inf fill (masked_fill/where), "nan_additive" for an added -inf (the op's empty_rows)
    chain: list[Node] = field(default_factory=list)  # the nodes of a hand-written chain, erased once dead
    mask_mod: Optional["MaskMod"] = None  # flex_attention: its mask_mod, buffers and block mask
    plan: Optional["MaskPlan"] = None
    skip_reason: Optional[str] = None

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def source_location(self) -> Optional[str]:
        trace = self.node.meta.get("stack_trace")
        if not trace:
            return None
        lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File ")]
        return lines[-1] if lines else None

    @property
    def module_path(self) -> Optional[str]:
        stack = self.node.meta.get("nn_module_stack")
        if not stack:
            return None
        path = list(stack.values())[-1]
        return path[0] if isinstance(path, tuple) else str(path)
