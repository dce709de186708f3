"""The ``attnopt::attention`` custom op: layout-native, GQA-native, MLA-aware attention.

Speaks SDPA's and flash-attn's language (``query``, ``key``, ``value``, ``attn_mask``,
``is_causal``, ``scale``, ``dropout_p``, ``window_size``, ``cu_seqlens_q/k``,
``max_seqlen_q/k``, ``softcap``) plus ``layout``: where the head axis is (bhsd, bshd, sbhd, or packed
thd).
Inputs are read in place with any strides; the output is contiguous in ``out_layout``.

The op returns (out, lse, rng_state) so that backward runs the matching kernel's backward
without recomputing the forward; lse and rng_state are not differentiable.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from . import kernels
from .spec import FROM_BHSD, TO_BHSD, AttnSpec, build_spec, check_cu_seqlens, lse_shape, out_shape

log = logging.getLogger("attnopt")

_ARGS = (
    "Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, float dropout_p=0., "
    'bool is_causal=False, float? scale=None, str layout="bhsd", str? out_layout=None, '
    'str causal_align="top_left", int[2] window_size=[-1, -1], Tensor? cu_seqlens_q=None, '
    'Tensor? cu_seqlens_k=None, SymInt? max_seqlen_q=None, SymInt? max_seqlen_k=None, str kernel_name="auto", '
    "Tensor? seqused_k=None, float softcap=0."
)


@dataclasses.dataclass(frozen=True)
class KernelCall:
    """One kernel launch as recorded by :func:`trace_kernels`."""

    direction: str  # "forward" or "backward"
    kernel: str
    layout: str
    shape: tuple[int, ...]  # (B, Hq, Hkv, Sq, Sk, Dqk, Dv)


_traces: list[list[KernelCall]] = []


@contextlib.contextmanager
def trace_kernels() -> Iterator[list[KernelCall]]:
    """Record which kernel ran for every attention call (eager or compiled) inside the block."""
    calls: list[KernelCall] = []
    _traces.append(calls)
    try:
        yield calls
    finally:
        _traces.remove(calls)


def _record(direction: str, kernel: str, spec: AttnSpec) -> None:
    if not _traces and not log.isEnabledFor(logging.DEBUG):
        return
    call = KernelCall(direction, kernel, spec.layout, (spec.batch, spec.heads_q, spec.heads_kv, spec.seqlen_q,
                                                      spec.seqlen_k, spec.dim_qk, spec.dim_v))
    for calls in _traces:
        calls.append(call)
    log.debug("attention %s: kernel=%s layout=%s shape=%s", direction, kernel, spec.layout, call.shape)


def _spec(query, key, value, attn_mask, dropout_p, is_causal, scale, layout, out_layout, causal_align,
          window_size, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k=None, softcap=0.0) -> AttnSpec:
    return build_spec(query, key, value, attn_mask, dropout_p, is_causal, scale, layout, out_layout,
                      causal_align, window_size, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k,
                      softcap)


@dataclasses.dataclass(frozen=True)
class _Packed:
    """Packed-sequence offsets, trimmed to the sequences that hold tokens."""

    cu_q: Tensor
    cu_k: Tensor

    def offsets(self) -> tuple[list[int], list[int]]:
        """The offsets on the host, for kernels that run one sequence at a time."""
        return self.cu_q.tolist(), self.cu_k.tolist()


def _varlen_spec(spec: AttnSpec, q: Tensor, k: Tensor, cu_q: Tensor, cu_k: Tensor) -> tuple[AttnSpec, _Packed]:
    """Check the offsets; drop the empty sequences at their end and tighten the maxima: kernels
    size their grid and scratch memory by the number of sequences times the longest one."""
    n, longest_q, longest_k, equal = check_cu_seqlens(cu_q, cu_k, q.shape[0], k.shape[0], spec.seqlen_q,
                                                      spec.seqlen_k)
    cu_q, cu_k = cu_q[: n + 1], cu_k[: n + 1]
    spec = dataclasses.replace(spec, batch=n, seqlen_q=longest_q, seqlen_k=longest_k, equal_seqlens=equal)
    return spec, _Packed(cu_q, cu_k)


def _sequences(spec: AttnSpec, offs_q: list[int], offs_k: list[int]) -> Iterator[tuple[int, slice, slice, AttnSpec]]:
    """Per-sequence dense specs, for kernels without native packed-sequence support."""
    for i in range(spec.batch):
        sq, sk = offs_q[i + 1] - offs_q[i], offs_k[i + 1] - offs_k[i]
        sub = dataclasses.replace(spec, layout="bhsd", out_layout="bhsd", batch=1, seqlen_q=sq, seqlen_k=sk,
                                  equal_seqlens=sq == sk)
        yield i, slice(offs_q[i], offs_q[i + 1]), slice(offs_k[i], offs_k[i + 1]), sub


def _dense(t: Tensor) -> Tensor:
    """[S, H, D] slice of a packed tensor -> [1, H, S, D] view."""
    return t.transpose(0, 1).unsqueeze(0)


def _forward_varlen(kern, spec, packed: _Packed, q, k, v):
    if kern.varlen_native:
        return kern.forward_varlen(spec, q, k, v, packed.cu_q, packed.cu_k)
    out = q.new_zeros(q.shape[0], spec.heads_q, spec.dim_v)
    lse = q.new_full((spec.heads_q, q.shape[0]), float("-inf"), dtype=torch.float32)
    for _, sq, sk, sub in _sequences(spec, *packed.offsets()):
        if sub.seqlen_q == 0 or sub.seqlen_k == 0:
            continue
        o, l, _ = kern.forward(sub, _dense(q[sq]), _dense(k[sk]), _dense(v[sk]), None)
        out[sq] = o[0].transpose(0, 1)
        lse[:, sq] = l[0]
    return out, lse, kernels.base.empty_rng(q.device)


def _backward_varlen(kern, spec, packed: _Packed, grad_out, q, k, v, out, lse, rng_state):
    if kern.varlen_native:
        return kern.backward_varlen(spec, grad_out, q, k, v, out, lse, rng_state, packed.cu_q, packed.cu_k)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for _, sq, sk, sub in _sequences(spec, *packed.offsets()):
        if sub.seqlen_q == 0 or sub.seqlen_k == 0:
            continue
        g = kern.backward(sub, _dense(grad_out[sq]), _dense(q[sq]), _dense(k[sk]), _dense(v[sk]),
                          _dense(out[sq]), lse[:, sq].unsqueeze(0).contiguous(), rng_state, None)
        dq[sq], dk[sk], dv[sk] = (t[0].transpose(0, 1) for t in g)
    return dq, dk, dv


def _key_lengths(kern: kernels.Kernel, spec: AttnSpec, attn_mask, seqused_k) -> tuple[AttnSpec, dict]:
    """Kernel arguments for per-batch key lengths: native ``seqused_k``, or folded into the mask."""
    if seqused_k is None:
        return spec, {"mask": attn_mask}
    if kern.seqused_native:
        return spec, {"mask": attn_mask, "seqused_k": seqused_k}
    spec, mask = kernels.base.fold_key_lengths(spec, attn_mask, seqused_k)
    return dataclasses.replace(spec, mask_dtype=mask.dtype), {"mask": mask}


def _select(spec: AttnSpec, kernel: str) -> kernels.Kernel:
    kern = kernels.select(spec, kernel)
    if spec.varlen and not kern.varlen_native and spec.dropout_p > 0:
        raise ValueError(f"attnopt.attention: kernel {kern.name!r} has no packed-sequence dropout")
    return kern


# Defined with torch.library.define/impl rather than custom_op: the custom_op wrapper re-binds
# all its arguments on every call, which costs more host time than a fast kernel launch.
torch.library.define("attnopt::attention", f"({_ARGS}) -> (Tensor, Tensor, Tensor)")
torch.library.define("attnopt::attention_backward",
                     f"(Tensor grad_out, Tensor out, Tensor lse, Tensor rng_state, {_ARGS}) -> (Tensor, Tensor, Tensor)")


@torch.library.impl("attnopt::attention", "CompositeExplicitAutograd")
def _attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, layout="bhsd",
               out_layout=None, causal_align="top_left", window_size=(-1, -1), cu_seqlens_q=None,
               cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, kernel_name="auto", seqused_k=None,
               softcap=0.0):
    spec = _spec(query, key, value, attn_mask, dropout_p, is_causal, scale, layout, out_layout, causal_align,
                 window_size, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, softcap)
    if spec.varlen:
        spec, packed = _varlen_spec(spec, query, key, cu_seqlens_q, cu_seqlens_k)
    kern = _select(spec, kernel_name)
    _record("forward", kern.name, spec)
    if spec.varlen:
        out, lse, rng = _forward_varlen(kern, spec, packed, query, key, value)
    else:
        q, k, v = (t.permute(TO_BHSD[layout]) for t in (query, key, value))
        spec, extra = _key_lengths(kern, spec, attn_mask, seqused_k)
        out, lse, rng = kern.forward(spec, q, k, v, **extra)
        out = out.permute(FROM_BHSD[spec.out_layout])
    return out.contiguous(), lse.contiguous(), rng


@torch.library.register_fake("attnopt::attention")
def _attention_fake(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    layout="bhsd", out_layout=None, causal_align="top_left", window_size=(-1, -1),
                    cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, kernel_name="auto",
                    seqused_k=None, softcap=0.0):
    spec = _spec(query, key, value, attn_mask, dropout_p, is_causal, scale, layout, out_layout, causal_align,
                 window_size, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, softcap)
    if kernel_name not in kernels.KERNEL_NAMES:
        raise ValueError(f"attnopt.attention: unknown kernel {kernel_name!r}; choose from {kernels.KERNEL_NAMES}")
    total_q = query.shape[0]
    out = query.new_empty(out_shape(spec, total_q))
    lse = query.new_empty(lse_shape(spec, total_q), dtype=torch.float32)
    rng = query.new_empty((2,) if dropout_p > 0 else (0,), dtype=torch.int64)
    return out, lse, rng


@torch.library.impl("attnopt::attention_backward", "CompositeExplicitAutograd")
def _attention_backward(grad_out, out, lse, rng_state, query, key, value, attn_mask=None, dropout_p=0.0,
                        is_causal=False, scale=None, layout="bhsd", out_layout=None, causal_align="top_left",
                        window_size=(-1, -1), cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                        max_seqlen_k=None, kernel_name="auto", seqused_k=None, softcap=0.0):
    spec = _spec(query, key, value, attn_mask, dropout_p, is_causal, scale, layout, out_layout, causal_align,
                 window_size, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, softcap)
    if spec.varlen:
        spec, packed = _varlen_spec(spec, query, key, cu_seqlens_q, cu_seqlens_k)
    kern = _select(spec, kernel_name)
    _record("backward", kern.name, spec)
    if spec.varlen:
        grads = _backward_varlen(kern, spec, packed, grad_out, query, key, value, out, lse, rng_state)
    else:
        q, k, v = (t.permute(TO_BHSD[layout]) for t in (query, key, value))
        o, g = (t.permute(TO_BHSD[spec.out_layout]) for t in (out, grad_out))
        spec, extra = _key_lengths(kern, spec, attn_mask, seqused_k)
        grads = kern.backward(spec, g, q, k, v, o, lse, rng_state, **extra)
        grads = tuple(t.permute(FROM_BHSD[layout]) for t in grads)
    return tuple(t.contiguous() for t in grads)


@torch.library.register_fake("attnopt::attention_backward")
def _attention_backward_fake(grad_out, out, lse, rng_state, query, key, value, *args, **kwargs):
    return torch.empty_like(query, memory_format=torch.contiguous_format), \
        torch.empty_like(key, memory_format=torch.contiguous_format), \
        torch.empty_like(value, memory_format=torch.contiguous_format)


_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "layout", "out_layout",
          "causal_align", "window_size", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "kernel_name",
          "seqused_k", "softcap")


_TENSOR_ARGS = ("query", "key", "value", "attn_mask", "cu_seqlens_q", "cu_seqlens_k", "seqused_k")


def _setup_context(ctx, inputs, output) -> None:
    args = dict(zip(_NAMES, inputs))
    mask = args["attn_mask"]
    if mask is not None and mask.requires_grad:
        raise ValueError("attnopt.attention: attn_mask must not require grad (learned biases are not supported)")
    out, lse, rng = output
    ctx.mark_non_differentiable(lse, rng)
    ctx.save_for_backward(args["query"], args["key"], args["value"], mask, out, lse, rng,
                          args["cu_seqlens_q"], args["cu_seqlens_k"], args["seqused_k"])
    ctx.static = {n: args[n] for n in _NAMES if n not in _TENSOR_ARGS}


def _backward(ctx, grad_out, grad_lse, grad_rng):
    q, k, v, mask, out, lse, rng, cu_q, cu_k, seqused_k = ctx.saved_tensors
    dq, dk, dv = torch.ops.attnopt.attention_backward(
        grad_out, out, lse, rng, q, k, v, attn_mask=mask, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, seqused_k=seqused_k,
        **ctx.static
    )
    return (dq, dk, dv) + (None,) * (len(_NAMES) - 3)


_DEFAULTS = (None, 0.0, False, None, "bhsd", None, "top_left", [-1, -1], None, None, None, None, "auto", None, 0.0)


class _AttentionFunction(torch.autograd.Function):
    """Autograd for attnopt::attention; registered by hand rather than with register_autograd,
    whose per-call re-binding of all its arguments costs more host time than the kernel."""

    @staticmethod
    def forward(ctx, *args):
        args = args + _DEFAULTS[len(args) - 3:]  # the dispatcher drops trailing defaults
        with torch._C._AutoDispatchBelowAutograd():
            output = torch.ops.attnopt.attention.default(*args)
        _setup_context(ctx, args, output)
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_lse, grad_rng):
        return _backward(ctx, grad_out, grad_lse, grad_rng)


@torch.library.impl("attnopt::attention", "Autograd")
def _attention_autograd(*args):
    return _AttentionFunction.apply(*args)


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    *,
    layout: str = "bhsd",
    out_layout: Optional[str] = None,
    causal_align: str = "top_left",
    window_size: Sequence[int] = (-1, -1),
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    kernel: str = "auto",
    seqused_k: Optional[Tensor] = None,
    softcap: float = 0.0,
    return_lse: bool = False,
):
    """Fused attention on tensors in any supported layout; returns out (and lse if asked).

    Query head h reads key/value head ``h // (Hq // Hkv)``. ``attn_mask`` is bool (True =
    attend) or additive and broadcasts to [B, Hq, Sq, Sk]. ``window_size`` is (left, right)
    around the diagonal, which ``causal_align`` puts at the top-left (SDPA) or the bottom-right
    (flash-attn) corner when Sq != Sk. ``seqused_k`` (int32 [B]) limits batch b to its first
    ``seqused_k[b]`` keys (a partly filled KV cache). ``softcap`` > 0 caps the scaled scores to
    ``softcap * tanh(scores / softcap)`` before the mask (Gemma 2). ``kernel`` forces one of
    ``KERNEL_NAMES`` (the op's ``kernel_name`` argument).
    """
    out, lse, _ = torch.ops.attnopt.attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale, layout, out_layout, causal_align,
        list(window_size), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, kernel, seqused_k, softcap,
    )
    return (out, lse) if return_lse else out


def kernel_for(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
               is_causal: bool = False, scale: Optional[float] = None, *, layout: str = "bhsd",
               out_layout: Optional[str] = None, causal_align: str = "top_left",
               window_size: Sequence[int] = (-1, -1), max_seqlen_q: Optional[int] = None,
               max_seqlen_k: Optional[int] = None, cu_seqlens_q: Optional[Tensor] = None,
               cu_seqlens_k: Optional[Tensor] = None, kernel: str = "auto",
               seqused_k: Optional[Tensor] = None, softcap: float = 0.0) -> str:
    """The name of the kernel :func:`attention` would run for these arguments."""
    spec = _spec(query, key, value, attn_mask, dropout_p, is_causal, scale, layout, out_layout, causal_align,
                 window_size, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, softcap)
    if spec.varlen:
        spec, _ = _varlen_spec(spec, query, key, cu_seqlens_q, cu_seqlens_k)
    return _select(spec, kernel).name
