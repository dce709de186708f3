"""Query rows that keep no key, for ``empty_rows="nan"`` and ``"nan_additive"``: which rows they
are, and the NaNs eager autograd gives them.

Eager ``softmax(s') @ v`` over a row whose scores are all -inf gives that row NaN probabilities,
so its output is NaN and dV = P^T dO is NaN for every key of the row's batch and key/value head
(every query head of the group adds into it). What reaches the scores depends on how they were
masked:

- ``s.masked_fill(~keep, -inf)`` or ``where(keep, s, -inf)`` ("nan"): a filled score passes no
  gradient back, so dQ, dK and a bias added before the fill get nothing from the row;
- ``s + bias`` with -inf in the bias ("nan_additive"): the row's NaN score gradient reaches dQ (the
  row), dK (every key of its batch and key/value head) and the bias (the entries the row reads).

Kernels run such a row as empty (out 0, no gradient); the op then writes these NaNs. Rows are
found from the mask, band and key lengths, not from a kernel's lse (kernels mark them
differently). Packed sequences are separate attentions: the NaNs stay in the row's sequence, and a
sequence with no keys at all gives 0, as eager's softmax over no scores does (so does Sk = 0).
Key lengths (``seqused_k``) stand for a mask over the whole cache: a length of 0 gives NaN.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .kernels.base import fold_key_lengths, full_mask
from .spec import AttnSpec, per_row

NAN = float("nan")


def _band_empty(pos: Tensor, keys: Tensor, window: tuple[int, int]) -> Tensor:
    """Rows at diagonal position ``pos`` over ``keys`` keys whose (left, right) window keeps none."""
    left, right = window
    lo = (pos - left).clamp_min(0) if left >= 0 else torch.zeros_like(pos)
    hi = torch.minimum(pos + right, keys - 1) if right >= 0 else keys - 1
    return lo > hi


def find_dense(spec: AttnSpec, mask: Optional[Tensor], seqused_k: Optional[Tensor], device: torch.device) -> Tensor:
    """Bool, broadcastable to [B, Hq, Sq]: the rows that keep none of the keys."""
    sq, sk = spec.seqlen_q, spec.seqlen_k
    if mask is None:
        i = torch.arange(sq, device=device)
        keys = torch.tensor(sk, device=device) if seqused_k is None else seqused_k.long()[:, None, None]
        pos = i + (keys - sq) if spec.causal_align == "bottom_right" else i
        rows = _band_empty(pos, keys, spec.window) & (sk > 0)
    else:
        m = full_mask(spec, mask, sq, sk, device) if seqused_k is None else fold_key_lengths(spec, mask, seqused_k)[1]
        keep = m if m.dtype == torch.bool else ~torch.isneginf(m)
        rows = ~keep.any(-1)
    return rows.reshape((1,) * (3 - rows.dim()) + tuple(rows.shape))


def keep_dense(spec: AttnSpec, mask: Optional[Tensor], seqused_k: Optional[Tensor], device: torch.device) -> Tensor:
    """Bool, broadcastable to [B, Hq, Sq, Sk]: the keys each row keeps (mask, band and key lengths)."""
    sq, sk = spec.seqlen_q, spec.seqlen_k
    m = full_mask(spec, mask, sq, sk, device) if seqused_k is None else fold_key_lengths(spec, mask, seqused_k)[1]
    if m is None:
        return torch.ones((1, 1, sq, sk), dtype=torch.bool, device=device)
    keep = m if m.dtype == torch.bool else ~torch.isneginf(m)
    return keep.reshape((1,) * (4 - keep.dim()) + tuple(keep.shape))


def nan_query_grads(mode: str, rows: Tensor, q: Tensor, keep: Tensor, spec: AttnSpec, dq: Tensor, dk: Tensor,
                    dv: Tensor, dmask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Eager's NaNs in [B, H, S, D] gradients for query rows holding a NaN (``rows``, [B, Hq, Sq]).

    Their scores are NaN where kept (everywhere for an added mask), so are the row's probabilities
    everywhere, so dV is NaN over the row's batch and key/value head and dQ over the row; dK_j =
    sum_i dS_ij q_i is NaN for every key the row's NaN scores reach, and, since 0 * NaN is NaN, in
    every component where the query itself is NaN."""
    hq, hkv = spec.heads_q, spec.heads_kv
    b, sq, sk = spec.batch, spec.seqlen_q, spec.seqlen_k

    def per_group(t: Tensor) -> Tensor:  # [B, Hq, ...] -> [B, Hkv, ...]: any over the group's query heads
        return t.unflatten(1, (hkv, hq // hkv)).any(2)

    rows = rows.expand(b, hq, sq)
    dq = dq.masked_fill(rows[..., None], NAN)
    dv = dv.masked_fill(per_group(rows).any(-1)[..., None, None], NAN)
    reached = keep.expand(b, hq, sq, sk) if mode == "nan" else torch.ones_like(rows[..., None]).expand(b, hq, sq, sk)
    keys = per_group((reached & rows[..., None]).any(-2))  # [B, Hkv, Sk]
    parts = per_group((q.isnan() & rows[..., None]).any(-2))  # [B, Hkv, D]
    dk = dk.masked_fill(keys[..., None] | parts[:, :, None, :], NAN)
    if dmask is not None and mode == "nan_additive":
        dmask = dmask.masked_fill(rows[..., None], NAN)
    return dq, dk, dv, dmask


def _sequence_of(cu: Tensor, n: int) -> Tensor:
    """The packed sequence each of ``n`` tokens belongs to."""
    return torch.searchsorted(cu[1:], torch.arange(n, device=cu.device), right=True)


def find_packed(spec: AttnSpec, cu_q: Tensor, cu_k: Tensor, total_q: int) -> Tensor:
    """Bool [1, T]: the packed query rows that keep none of their own sequence's keys."""
    cu_q, cu_k = cu_q.long(), cu_k.long()
    seq = _sequence_of(cu_q, total_q)
    len_q, len_k = (cu_q[1:] - cu_q[:-1])[seq], (cu_k[1:] - cu_k[:-1])[seq]
    pos = torch.arange(total_q, device=cu_q.device) - cu_q[seq]
    if spec.causal_align == "bottom_right":
        pos = pos + len_k - len_q
    return (_band_empty(pos, len_k, spec.window) & (len_k > 0))[None]


def write(out: Tensor, rows: Tensor, thd: bool, value: float) -> Tensor:
    """``out`` ([B, Hq, Sq, D] view; thd [T, Hq, D]) with ``value`` in the given rows."""
    return out.masked_fill(per_row(rows, thd), value)


def nan_grads_dense(mode: str, rows: Tensor, spec: AttnSpec, dq: Tensor, dk: Tensor, dv: Tensor,
                    dmask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Eager's NaNs in [B, H, S, D] gradients (``dmask`` [B, Hq, Sq, Sk] before its reduction)."""
    hq, hkv = spec.heads_q, spec.heads_kv
    rows = rows.expand(spec.batch, hq, spec.seqlen_q)
    groups = rows.unflatten(1, (hkv, hq // hkv)).flatten(2).any(-1)[:, :, None, None]  # [B, Hkv, 1, 1]
    dv = dv.masked_fill(groups, NAN)
    if mode == "nan_additive":
        dq, dk = dq.masked_fill(rows[..., None], NAN), dk.masked_fill(groups, NAN)
        dmask = None if dmask is None else dmask.masked_fill(rows[..., None], NAN)
    return dq, dk, dv, dmask


def nan_grads_packed(mode: str, rows: Tensor, spec: AttnSpec, cu_q: Tensor, cu_k: Tensor, dq: Tensor, dk: Tensor,
                     dv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Eager's NaNs in packed [T, H, D] gradients, each sequence on its own."""
    hq, hkv = spec.heads_q, spec.heads_kv
    cu_q, cu_k = cu_q.long(), cu_k.long()
    rows = rows.expand(hq, dq.shape[0])
    per_group = rows.unflatten(0, (hkv, hq // hkv)).any(1).transpose(0, 1)  # [Tq, Hkv]
    counts = torch.zeros(cu_q.shape[0] - 1, hkv, dtype=torch.int64, device=dq.device)
    counts.index_add_(0, _sequence_of(cu_q, dq.shape[0]), per_group.long())
    groups = (counts > 0)[_sequence_of(cu_k, dk.shape[0])][..., None]  # [Tk, Hkv, 1]
    dv = dv.masked_fill(groups, NAN)
    if mode == "nan_additive":
        dq, dk = dq.masked_fill(per_row(rows, True), NAN), dk.masked_fill(groups, NAN)
    return dq, dk, dv
