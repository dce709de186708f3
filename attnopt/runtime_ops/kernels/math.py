"""Reference attention with an explicit softmax in float32 (float64 for float64 inputs):
every feature (softcapping, attention sinks, the gradient of an additive mask included), any
device, any strides.

Used as the last resort and as the reference the tests compare fused kernels against. GQA is
computed by grouping query heads ([B, Hkv, R, S, D] views), so K and V are never repeated.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..spec import AttnSpec
from .base import Grads, Kernel, empty_rng, fold_key_lengths, full_mask


def _acc(t: Tensor) -> Tensor:
    """Upcast to the accumulation dtype: float32, or float64 when the input is float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _grouped(t: Tensor, groups: int) -> Tensor:
    """[B, Hq, S, D] -> [B, Hkv, R, S, D] (a view)."""
    return t.unflatten(1, (groups, t.shape[1] // groups))


class MathKernel(Kernel):
    name = "math"
    strided_head_dim = True
    sinks = "native"
    mask_grad = True

    def _scores(self, spec: AttnSpec, q: Tensor, k: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """Scaled scores [B, Hq, Sq, Sk], softcapped when asked, and the softcap's derivative
        d(cap * tanh(s / cap))/ds = 1 - tanh(s / cap)^2 (None without softcapping)."""
        qg = _grouped(_acc(q), spec.heads_kv)
        s = torch.matmul(qg, _acc(k).unsqueeze(2).transpose(-1, -2)) * spec.scale
        s = s.flatten(1, 2)  # [B, Hq, Sq, Sk]
        if not spec.softcap:
            return s, None
        t = torch.tanh(s / spec.softcap)
        return t * spec.softcap, 1 - t * t

    def _probs(self, spec: AttnSpec, q: Tensor, k: Tensor, mask: Optional[Tensor], sinks: Optional[Tensor] = None,
               lse: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Probabilities, log-sum-exp and the softcap's derivative (see ``_scores``). The sinks'
        logits join the log-sum-exp; a given log-sum-exp (a forward's, sinks folded in) is used as is.

        The probabilities are the row's softmax (max subtracted, as eager computes it), scaled by
        exp(lse(scores) - lse) for the sinks' share: not exp(scores - lse), which a row whose
        scores all carry a finite fill such as finfo.min (lse rounds to the fill) turns into 1 for
        every key instead of the average eager takes. Rows that keep no key (log-sum-exp -inf, or
        +inf from FlashAttention) get probabilities 0; NaN scores give NaN, as in eager."""
        s, dcap = self._scores(spec, q, k)
        m = full_mask(spec, mask, q.shape[2], k.shape[2], q.device)
        if m is not None:
            fill = float("-inf") if spec.mask_fill is None else spec.mask_fill
            s = s.masked_fill(~m, fill) if m.dtype == torch.bool else s + _acc(m)
        own = torch.logsumexp(s, dim=-1)
        if lse is None:
            lse = own
            if sinks is not None:
                lse = torch.logaddexp(lse, sinks.to(lse.dtype)[:, None])
        total = _acc(lse)
        empty = torch.isneginf(own) | torch.isinf(total)  # no key (NaN scores stay NaN, as in eager)
        share = torch.where(empty, torch.zeros_like(own), torch.exp(own - torch.where(empty, own, total)))
        p = torch.softmax(s, dim=-1) * share.unsqueeze(-1)
        p = torch.where(empty.unsqueeze(-1), torch.zeros_like(p), p)
        return p, lse, dcap

    def _dropout_keep(self, spec: AttnSpec, rng_state: Tensor, shape: torch.Size, device: torch.device) -> Tensor:
        gen = torch.Generator(device=device)
        gen.manual_seed(int(rng_state[0]))
        return torch.rand(shape, generator=gen, device=device) >= spec.dropout_p

    def forward(self, spec, q, k, v, mask, sinks=None):
        p, lse, _ = self._probs(spec, q, k, mask, sinks)
        rng = empty_rng(q.device)
        if spec.dropout_p > 0:
            seed = int(torch.randint(0, 2**62, (1,)).item())
            rng = torch.tensor([seed, 0], dtype=torch.int64, device=q.device)
            p = p * self._dropout_keep(spec, rng, p.shape, q.device) / (1.0 - spec.dropout_p)
        out = torch.matmul(_grouped(p, spec.heads_kv), _acc(v).unsqueeze(2)).flatten(1, 2)
        return out.to(q.dtype), lse, rng

    def backward(self, spec, grad_out, q, k, v, out, lse, rng_state, mask) -> Grads:
        hkv = spec.heads_kv
        p, _, dcap = self._probs(spec, q, k, mask, lse=lse)
        do = _acc(grad_out)
        dp = torch.matmul(_grouped(do, hkv), _acc(v).unsqueeze(2).transpose(-1, -2)).flatten(1, 2)
        pd = p
        if spec.dropout_p > 0:
            keep = self._dropout_keep(spec, rng_state, p.shape, q.device) / (1.0 - spec.dropout_p)
            pd, dp = p * keep, dp * keep
        dv = torch.matmul(_grouped(pd, hkv).transpose(-1, -2), _grouped(do, hkv)).sum(2)
        delta = (do * _acc(out)).sum(-1, keepdim=True)
        ds = p * (dp - delta)  # the gradient of the masked scores, which is an additive mask's
        if spec.mask_fill is not None:  # a filled score passes no gradient back
            m = full_mask(spec, mask, q.shape[2], k.shape[2], q.device)
            ds = ds if m is None else ds.masked_fill(~m, 0.0)
        dmask = ds if spec.mask_grad else None
        if dcap is not None:
            ds = ds * dcap
        ds = ds * spec.scale
        dq = torch.matmul(_grouped(ds, hkv), _acc(k).unsqueeze(2)).flatten(1, 2)
        dk = torch.matmul(_grouped(ds, hkv).transpose(-1, -2), _grouped(_acc(q), hkv)).sum(2)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dmask


def backward_with_key_lengths(spec: AttnSpec, grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                              lse: Tensor, seqused_k: Tensor) -> Grads:
    """The backward of a fused kernel's forward over a partly filled cache, recomputed in the
    math kernel (from the forward's lse) with the key lengths as a mask: the fused backwards take
    no key lengths (FA2's) or get them wrong (FA4 4.0.0b36, measured on the H100). Key lengths are
    lowered for inference, so this serves only direct calls that train through a cache."""
    spec, mask = fold_key_lengths(spec, None, seqused_k)
    return MathKernel().backward(spec, grad_out, q, k, v, out, lse, empty_rng(q.device), mask)
