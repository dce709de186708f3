"""The canonical description of one attention call, and the input checks behind it.

Everything a kernel policy needs is read from metadata (shapes, dtypes, devices and the
call's arguments), never from tensor contents, so the same checks run on real and fake
tensors and a bad call fails with a ValueError before any kernel is launched.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, replace
from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from .args import Call

LAYOUTS = ("bhsd", "bshd", "sbhd", "thd")
CAUSAL_ALIGNS = ("top_left", "bottom_right")
EMPTY_ROWS = ("zero", "nan", "nan_additive")
_PACKED_ONLY = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")

# Permutation taking a tensor in the given layout to a [B, H, S, D] view, and its inverse.
TO_BHSD = {"bhsd": (0, 1, 2, 3), "bshd": (0, 2, 1, 3), "sbhd": (1, 2, 0, 3)}
FROM_BHSD = {"bhsd": (0, 1, 2, 3), "bshd": (0, 2, 1, 3), "sbhd": (2, 0, 1, 3)}


@dataclass(frozen=True)
class AttnSpec:
    """Shape and semantics of one call, in layout-free terms.

    ``window`` is (left, right) around the diagonal chosen by ``causal_align``; -1 means
    unbounded. ``is_causal`` is folded into ``window[1] == 0``. For ``thd`` the batch is the
    number of sequences and the sequence lengths are the given maxima.
    """

    layout: str
    out_layout: str
    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    dim_qk: int
    dim_v: int
    dtype: torch.dtype
    device: torch.device
    scale: float
    dropout_p: float
    causal_align: str
    window: tuple[int, int]
    mask_dtype: Optional[torch.dtype]
    equal_seqlens: bool = False
    seqused: bool = False  # per-batch key lengths (seqused_k): as if batch b's keys were sliced to them
    softcap: float = 0.0  # scores become softcap * tanh(scores / softcap) before the mask; 0 = off
    sinks: bool = False  # per-head sink logits join every row's softmax denominator
    mask_grad: bool = False  # the backward returns the additive mask's gradient
    mask_fill: Optional[float] = None  # masked keys score this finite value instead of being dropped

    @property
    def varlen(self) -> bool:
        return self.layout == "thd"

    @property
    def lse_dtype(self) -> torch.dtype:
        """float32, or float64 for float64 inputs (kernels that take them compute in float64)."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    @property
    def has_mask(self) -> bool:
        return self.mask_dtype is not None

    @property
    def is_causal(self) -> bool:
        return self.window[1] == 0

    @property
    def has_band(self) -> bool:
        """True when causal or window restricts keys (beyond an explicit mask)."""
        return self.window != (-1, -1)

    @property
    def gqa_group(self) -> int:
        return self.heads_q // self.heads_kv

    def band_is_bottom_right(self) -> bool:
        """True when the band means the same thing under bottom-right alignment."""
        return self.causal_align == "bottom_right" or self.equal_seqlens

    def band_is_top_left(self) -> bool:
        return self.causal_align == "top_left" or self.equal_seqlens


def key_lengths_as_mask(spec: AttnSpec) -> AttnSpec:
    """The spec a kernel without native ``seqused_k`` runs: key lengths and the band, which
    aligns to them, both folded into one explicit mask (bool unless the given mask is additive)."""
    return replace(spec, seqused=False, window=(-1, -1), mask_dtype=spec.mask_dtype or torch.bool)


def capturing(t: Tensor) -> bool:
    """Whether a CUDA graph is being captured on ``t``'s device: no value may be read on the host then."""
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _fail(msg: str) -> None:
    raise ValueError(f"attnopt.attention: {msg}")


def build_spec(call: Call) -> AttnSpec:
    """Validate a call and describe it. Raises ValueError naming the first problem found."""
    query, key, value, attn_mask, layout = call.query, call.key, call.value, call.attn_mask, call.layout
    if layout not in LAYOUTS:
        _fail(f"layout must be one of {LAYOUTS}, got {layout!r}")
    out_layout = layout if call.out_layout is None else call.out_layout
    if out_layout not in LAYOUTS:
        _fail(f"out_layout must be one of {LAYOUTS}, got {out_layout!r}")
    if (layout == "thd") != (out_layout == "thd"):
        _fail(f"layout {layout!r} and out_layout {out_layout!r} must both be 'thd' or neither")
    causal_align = call.causal_align
    if causal_align not in CAUSAL_ALIGNS:
        _fail(f"causal_align must be one of {CAUSAL_ALIGNS}, got {causal_align!r}")
    if call.empty_rows not in EMPTY_ROWS:
        _fail(f"empty_rows must be one of {EMPTY_ROWS}, got {call.empty_rows!r}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not t.is_floating_point():
            _fail(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not (query.dtype == key.dtype == value.dtype):
        _fail(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if not (query.device == key.device == value.device):
        _fail(f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}")
    rank = 3 if layout == "thd" else 4
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != rank:
            _fail(f"{name} must have {rank} dims for layout {layout!r}, got shape {tuple(t.shape)}")
    window_size = call.window_size
    if len(window_size) != 2:
        _fail(f"window_size must be (left, right), got {tuple(window_size)}")
    left, right = int(window_size[0]), int(window_size[1])
    if left < -1 or right < -1:
        _fail(f"window_size entries must be >= 0 or -1 (unbounded), got {(left, right)}")
    if call.is_causal:
        if right > 0:
            _fail(f"is_causal=True admits no keys right of the diagonal, but window_size[1]={right}")
        right = 0
    if not 0.0 <= call.dropout_p < 1.0:
        _fail(f"dropout_p must be in [0, 1), got {call.dropout_p}")
    if not call.softcap >= 0.0:
        _fail(f"softcap must be >= 0 (0 = no softcapping), got {call.softcap}")

    cu_seqlens_q, cu_seqlens_k = call.cu_seqlens_q, call.cu_seqlens_k
    if layout == "thd":
        max_seqlen_q, max_seqlen_k = call.max_seqlen_q, call.max_seqlen_k
        if cu_seqlens_q is None or cu_seqlens_k is None or max_seqlen_q is None or max_seqlen_k is None:
            _fail("layout 'thd' needs cu_seqlens_q, cu_seqlens_k, max_seqlen_q and max_seqlen_k")
        for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            if t.dtype != torch.int32 or t.dim() != 1:
                _fail(f"{name} must be a 1-D int32 tensor, got {t.dtype} of shape {tuple(t.shape)}")
            if t.device != query.device:
                _fail(f"{name} is on {t.device} but query is on {query.device}")
        if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0] or cu_seqlens_q.shape[0] < 2:
            _fail(
                "cu_seqlens_q and cu_seqlens_k must both hold batch+1 >= 2 offsets, got "
                f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}"
            )
        if attn_mask is not None:
            _fail("attn_mask is not supported with layout 'thd'; describe structure with cu_seqlens and window_size")
        batch = cu_seqlens_q.shape[0] - 1
        hq, hkv, hv = query.shape[1], key.shape[1], value.shape[1]
        sq, sk = max_seqlen_q, max_seqlen_k
        if key.shape[0] != value.shape[0]:
            _fail(f"key and value must have the same number of tokens, got {key.shape[0]} and {value.shape[0]}")
    else:
        if (cu_seqlens_q is not None or cu_seqlens_k is not None or call.max_seqlen_q is not None
                or call.max_seqlen_k is not None):
            given = [n for n in _PACKED_ONLY if getattr(call, n) is not None]
            _fail(f"{', '.join(given)} describe packed sequences: they need layout 'thd', not {layout!r}")
        perm = TO_BHSD[layout]
        qs, ks, vs = ([t.shape[p] for p in perm] for t in (query, key, value))
        batch, hq, sq = qs[0], qs[1], qs[2]
        hkv, sk, hv = ks[1], ks[2], vs[1]
        if not (qs[0] == ks[0] == vs[0]):
            _fail(f"batch sizes differ: query {qs[0]}, key {ks[0]}, value {vs[0]} (layout {layout!r})")
        if ks[2] != vs[2]:
            _fail(f"key and value sequence lengths differ: {ks[2]} and {vs[2]} (layout {layout!r})")
    if hkv != hv:
        _fail(f"key and value must have the same number of heads, got {hkv} and {hv}")
    if hkv == 0 or hq % hkv != 0:
        _fail(f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) for grouped-query attention")
    dqk, dv = query.shape[-1], value.shape[-1]
    if key.shape[-1] != dqk:
        _fail(f"query and key head dims differ: {dqk} and {key.shape[-1]}")

    mask_dtype = None
    if attn_mask is not None:
        if attn_mask.device != query.device:
            _fail(f"attn_mask is on {attn_mask.device} but query is on {query.device}")
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype and attn_mask.dtype != torch.float32:
            _fail(f"attn_mask must be bool or additive of dtype {query.dtype} or float32, got {attn_mask.dtype}")
        if attn_mask.dim() > 4:
            _fail(f"attn_mask must have at most 4 dims, got shape {tuple(attn_mask.shape)}")
        target = (batch, hq, sq, sk)
        padded = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
        for have, want in zip(padded, target):
            if have != 1 and have != want:
                _fail(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to {target}")
        mask_dtype = attn_mask.dtype

    seqused_k = call.seqused_k
    if seqused_k is not None:
        if layout == "thd":
            _fail("seqused_k is for padded [B, S, H, D] key caches; packed 'thd' sequences use cu_seqlens_k")
        if seqused_k.dtype != torch.int32 or tuple(seqused_k.shape) != (batch,):
            _fail(f"seqused_k must be an int32 tensor of shape ({batch},), got {seqused_k.dtype} {tuple(seqused_k.shape)}")
        if seqused_k.device != query.device:
            _fail(f"seqused_k is on {seqused_k.device} but query is on {query.device}")

    sinks = call.sinks
    if sinks is not None:
        if sinks.dtype != torch.float32 and sinks.dtype != query.dtype:
            _fail(f"sinks must be float32 or of the query's dtype {query.dtype}, got {sinks.dtype}")
        if sinks.dim() != 1 or sinks.shape[0] != hq:
            _fail(f"sinks must have shape ({hq},), one logit per query head, got {tuple(sinks.shape)}")
        if sinks.device != query.device:
            _fail(f"sinks is on {sinks.device} but query is on {query.device}")

    return AttnSpec(
        layout=layout,
        out_layout=out_layout,
        batch=batch,
        heads_q=hq,
        heads_kv=hkv,
        seqlen_q=sq,
        seqlen_k=sk,
        dim_qk=dqk,
        dim_v=dv,
        dtype=query.dtype,
        device=query.device,
        scale=float(call.scale) if call.scale is not None else 1.0 / math.sqrt(dqk),
        dropout_p=float(call.dropout_p),
        causal_align=causal_align,
        window=(left, right),
        mask_dtype=mask_dtype,
        # with key lengths, a bottom-right band aligns to each batch's length, not to sk
        equal_seqlens=layout != "thd" and seqused_k is None and sq == sk,  # a SymBool stays unevaluated
        seqused=seqused_k is not None,
        softcap=float(call.softcap),
        sinks=sinks is not None,
        mask_grad=bool(call.mask_grad) and mask_dtype is not None and mask_dtype != torch.bool,
        mask_fill=_mask_fill(call, layout, mask_dtype),
    )


def _mask_fill(call: Call, layout: str, mask_dtype: Optional[torch.dtype]) -> Optional[float]:
    fill = call.mask_fill
    if fill is None:
        return None
    fill = float(fill)
    if not math.isfinite(fill):
        _fail(f"mask_fill must be finite (None means -inf), got {fill}")
    if layout == "thd" or call.seqused_k is not None:
        _fail("mask_fill is for dense masks and bands, not packed sequences or key lengths")
    if mask_dtype is not None and mask_dtype != torch.bool:
        _fail("mask_fill needs a bool attn_mask (an additive mask carries its own values)")
    return fill


def check_seqused_k(seqused_k: Tensor, seqlen_k: int) -> None:
    """Key lengths must lie in [0, Sk]: checked on the host on CPU; on other devices by a device-side
    assert, so that a decode step never waits for the device. Once per tensor and version (the
    layers of a model share one lengths tensor)."""
    key = (seqused_k._version, seqlen_k)
    if _checked_lengths.get(seqused_k) == key:
        return
    if seqused_k.device.type == "cpu":
        low, high = seqused_k.aminmax() if seqused_k.numel() else (0, 0)
        if low < 0 or high > seqlen_k:
            _fail(f"seqused_k must lie in [0, {seqlen_k}] (the key length), got values in [{int(low)}, {int(high)}]")
    else:
        torch._assert_async(torch.clamp(seqused_k, 0, seqlen_k).eq(seqused_k).all(),
                            f"attnopt.attention: seqused_k must lie in [0, {seqlen_k}] (the key length)")
    _checked_lengths[seqused_k] = key


_checked_lengths: WeakIdKeyDictionary = WeakIdKeyDictionary()


# offsets already checked: cu_q -> (cu_k, the arguments and versions they were checked with, result)
_checked: WeakIdKeyDictionary = WeakIdKeyDictionary()


class PackedOffsets(NamedTuple):
    """Checked packed offsets: the sequences up to the last that holds a token, the longest of
    each, whether q and k offsets agree, and the offsets of those sequences on the host (None
    while a CUDA graph is captured)."""

    sequences: int
    longest_q: int
    longest_k: int
    same: bool
    host_q: Optional[list[int]]
    host_k: Optional[list[int]]


def check_cu_seqlens(cu_q: Tensor, cu_k: Tensor, total_q: int, total_k: int, max_q: int,
                     max_k: int) -> PackedOffsets:
    """Check packed offsets against the packed tensors and describe them (offsets computed in a
    graph have a fixed worst-case size and end in empty sequences, which are dropped).

    One read of the offsets on the host, which waits for the GPU: done once per offsets tensor
    (the layers of a model share one, and backward sees the forward's), and again only when the
    tensor is written to in place; kernels that run one sequence at a time use the offsets read
    then. Not while a CUDA graph is captured: its replays read other offsets, so the given maxima
    stand and nothing is checked, trimmed or read."""
    key = (cu_q._version, cu_k._version, total_q, total_k, max_q, max_k)
    hit = _checked.get(cu_q)
    if hit is not None and hit[0]() is cu_k and hit[1] == key:
        return hit[2]
    if capturing(cu_q):
        return PackedOffsets(cu_q.shape[0] - 1, max(max_q, 1), max(max_k, 1), False, None, None)
    result = _read_cu_seqlens(cu_q, cu_k, total_q, total_k, max_q, max_k)
    _checked[cu_q] = (weakref.ref(cu_k), key, result)
    return result


def _read_cu_seqlens(cu_q: Tensor, cu_k: Tensor, total_q: int, total_k: int, max_q: int,
                     max_k: int) -> PackedOffsets:
    def summary(cu: Tensor) -> Tensor:
        lengths = cu[1:] - cu[:-1]
        return torch.stack([cu[0], cu[-1], lengths.min(), lengths.max()]), lengths

    (sq, len_q), (sk, len_k) = summary(cu_q), summary(cu_k)
    index = torch.arange(1, len_q.shape[0] + 1, device=cu_q.device, dtype=cu_q.dtype)
    used = torch.where((len_q > 0) | (len_k > 0), index, torch.zeros_like(index)).max()
    same = (cu_q == cu_k).all().to(cu_q.dtype) if cu_q.shape == cu_k.shape else torch.zeros_like(used)
    values = torch.cat([sq, sk, used[None], same[None], cu_q, cu_k]).tolist()
    (first_q, last_q, min_q, long_q, first_k, last_k, min_k, long_k, used, same) = values[:10]
    host_q, host_k = values[10:10 + cu_q.shape[0]], values[10 + cu_q.shape[0]:]
    for name, first, last, shortest, longest, total, most in (
            ("cu_seqlens_q", first_q, last_q, min_q, long_q, total_q, max_q),
            ("cu_seqlens_k", first_k, last_k, min_k, long_k, total_k, max_k)):
        if first != 0:
            _fail(f"{name} must start at 0, got {first}")
        if last != total:
            _fail(f"{name} must end at the number of packed tokens ({total}), got {last}")
        if shortest < 0:
            _fail(f"{name} must be non-decreasing")
        if longest > most:
            _fail(f"{name} holds a sequence of {longest} tokens, longer than its max_seqlen {most}")
    n = max(used, 1)
    return PackedOffsets(n, max(long_q, 1), max(long_k, 1), bool(same), host_q[:n + 1], host_k[:n + 1])


def out_shape(spec: AttnSpec, total_q: int) -> tuple[int, ...]:
    """Shape of the output in ``spec.out_layout``."""
    if spec.out_layout == "thd":
        return (total_q, spec.heads_q, spec.dim_v)
    bhsd = (spec.batch, spec.heads_q, spec.seqlen_q, spec.dim_v)
    return tuple(bhsd[i] for i in FROM_BHSD[spec.out_layout])


def lse_shape(spec: AttnSpec, total_q: int) -> tuple[int, ...]:
    """Log-sum-exp of the scores: [B, Hq, Sq], or [Hq, total_q] for packed sequences."""
    if spec.layout == "thd":
        return (spec.heads_q, total_q)
    return (spec.batch, spec.heads_q, spec.seqlen_q)


def per_row(x: Tensor, thd: bool) -> Tensor:
    """A value per row in lse's shape ([B, Hq, Sq]; thd [Hq, T]) broadcast against the output's
    rows ([B, Hq, Sq, Dv] view; thd [T, Hq, Dv])."""
    return x.transpose(0, 1).unsqueeze(-1) if thd else x.unsqueeze(-1)
