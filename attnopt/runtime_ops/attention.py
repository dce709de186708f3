"""The ``attnopt::attention`` custom op: layout-native, GQA-native, MLA-aware attention.

Speaks SDPA's and flash-attn's language (``query``, ``key``, ``value``, ``attn_mask``,
``is_causal``, ``scale``, ``dropout_p``, ``window_size``, ``cu_seqlens_q/k``,
``max_seqlen_q/k``, ``softcap``) plus ``layout``: where the head axis is (bhsd, bshd, sbhd, or packed
thd). Its arguments are declared once, in :mod:`.args`.
Inputs are read in place with any strides; the output is contiguous in ``out_layout``.

The op returns (out, lse, rng_state) so that backward runs the matching kernel's backward
without recomputing the forward; lse and rng_state are not differentiable. The backward op returns
(dq, dk, dv, d attn_mask or None, d sinks or None).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
from typing import Iterator, Optional

import torch
from torch import Tensor

from . import empty_rows, kernels, sinks as sink_math
from .args import (DEFAULTS, FRONT_TO_OP, INDEX, NAMES, POSITIONAL, SCHEMA, TENSORS, Call, bind, complete, front_doc,
                   front_signature)
from .spec import (FROM_BHSD, TO_BHSD, AttnSpec, build_spec, capturing, check_cu_seqlens, check_seqused_k,
                   lse_shape, out_shape)

log = logging.getLogger("attnopt")


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


@dataclasses.dataclass(frozen=True)
class _Packed:
    """Packed-sequence offsets, trimmed to the sequences that hold tokens, on the device and (read
    once per offsets tensor) on the host."""

    cu_q: Tensor
    cu_k: Tensor
    host: Optional[tuple[list[int], list[int]]]

    def offsets(self) -> tuple[list[int], list[int]]:
        """The offsets on the host, for kernels that run one sequence at a time."""
        if self.host is None:
            raise RuntimeError("attnopt.attention: this kernel runs packed sequences one at a time, from offsets "
                               "read on the host, which a CUDA graph cannot capture; use a kernel with packed "
                               "sequences of its own (kernel='auto' picks one where the GPU has it)")
        return self.host


def _varlen_spec(spec: AttnSpec, q: Tensor, k: Tensor, cu_q: Tensor, cu_k: Tensor) -> tuple[AttnSpec, _Packed]:
    """Check the offsets; drop the empty sequences at their end and tighten the maxima: kernels
    size their grid and scratch memory by the number of sequences times the longest one."""
    found = check_cu_seqlens(cu_q, cu_k, q.shape[0], k.shape[0], spec.seqlen_q, spec.seqlen_k)
    n = found.sequences
    spec = dataclasses.replace(spec, batch=n, seqlen_q=found.longest_q, seqlen_k=found.longest_k,
                               equal_seqlens=found.same)
    host = None if found.host_q is None else (found.host_q, found.host_k)
    return spec, _Packed(cu_q[: n + 1], cu_k[: n + 1], host)


def _select(spec: AttnSpec, kernel: str) -> kernels.Kernel:
    kern = kernels.select(spec, kernel)
    if spec.varlen and not kern.varlen_native and spec.dropout_p > 0:
        raise ValueError(f"attnopt.attention: kernel {kern.name!r} has no packed-sequence dropout")
    return kern


def _describe(call: Call) -> tuple[AttnSpec, Optional[_Packed]]:
    """The call's spec (packed offsets read and trimmed) and the offsets."""
    spec = build_spec(call)
    if not spec.varlen:
        return spec, None
    return _varlen_spec(spec, call.query, call.key, call.cu_seqlens_q, call.cu_seqlens_k)


def _fill_drops_keys(spec: AttnSpec, call: Call) -> bool:
    """A finite ``mask_fill`` gives every masked key exactly weight 0, as -inf does, when every row
    keeps a key and no kept score can come within the float's underflow of the fill: scores are
    bounded by the softcap, or by scale * max |q| * max |k|. One host read per call; none while a
    CUDA graph is captured, whose replays see other values: the math kernel then runs the fill as
    written."""
    device = call.query.device
    if capturing(call.query):
        return False
    underflow = 746.0 if spec.dtype == torch.float64 else 104.0  # exp(-x) is 0 beyond (float64 / float32)
    if spec.softcap:
        bound = torch.tensor(spec.softcap, device=device)
    else:
        norm = lambda t: torch.linalg.vector_norm(t.float(), dim=-1).amax()
        bound = spec.scale * norm(call.query) * norm(call.key)
    fits = spec.mask_fill + bound < -underflow
    rows = empty_rows.find_dense(spec, call.attn_mask, None, device)
    return bool(fits & ~rows.any())


def _signature(call: Call) -> tuple:
    """What a dense call's spec and kernel depend on: every argument, tensors by shape, dtype
    and device (the spec reads no values and no strides)."""
    return tuple((x.shape, x.dtype, x.device) if isinstance(x, Tensor) else
                 tuple(x) if isinstance(x, list) else x for x in call)


# signature -> (spec, kernel) of dense calls seen before: a model's layers repeat a few shapes
_planned: dict[tuple, tuple[AttnSpec, kernels.Kernel]] = {}


def _plan(call: Call) -> tuple[AttnSpec, kernels.Kernel, Optional[_Packed]]:
    """The call's spec, the kernel that runs it, and the packed offsets. A dense call without a
    finite fill (whose kernel depends on values) is validated and its kernel chosen once per
    signature."""
    cached = call.cu_seqlens_q is None and call.mask_fill is None
    if cached:
        key = _signature(call)
        hit = _planned.get(key)
        if hit is not None:
            return (*hit, None)
    spec, packed = _describe(call)
    if spec.mask_fill is not None and _fill_drops_keys(spec, call):
        spec = dataclasses.replace(spec, mask_fill=None)
    kern = _select(spec, call.kernel_name)
    if cached:
        if len(_planned) >= 1024:
            _planned.clear()
        _planned[key] = (spec, kern)
    return spec, kern, packed


def _readable(kern: kernels.Kernel, *tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors as ``kern`` can read them: a head dim that is not unit-stride (a ``[..., D, H]``
    buffer viewed head-major) is copied, unless the kernel reads any strides."""
    if kern.strided_head_dim:
        return tensors
    for t in tensors:
        if t.stride(-1) != 1 and t.shape[-1] != 1:
            return tuple(x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous() for x in tensors)
    return tensors


def _kernel_args(kern: kernels.Kernel, spec: AttnSpec, call: Call, forward: bool) -> tuple[AttnSpec, dict]:
    """The spec and keyword arguments a dense kernel call takes: the mask, native sinks (forward),
    and per-batch key lengths (native ``seqused_k``, or folded into the mask)."""
    extra: dict = {"mask": call.attn_mask}
    if forward and call.sinks is not None and kern.sinks == "native":
        extra["sinks"] = call.sinks
    if call.seqused_k is None:
        return spec, extra
    if kern.seqused_native:
        extra["seqused_k"] = call.seqused_k
        return spec, extra
    spec, extra["mask"] = kernels.base.fold_key_lengths(spec, call.attn_mask, call.seqused_k)
    return dataclasses.replace(spec, mask_dtype=extra["mask"].dtype), extra


def _sequences(kern: kernels.Kernel, spec: AttnSpec, offs_q: list[int],
               offs_k: list[int]) -> Iterator[tuple[slice, slice, AttnSpec, kernels.Kernel]]:
    """Per-sequence dense specs and the kernel for each, for kernels without native packed-sequence
    support: a sequence the kernel cannot take (cuDNN: a single token) runs on the math kernel."""
    for i in range(spec.batch):
        sq, sk = offs_q[i + 1] - offs_q[i], offs_k[i + 1] - offs_k[i]
        if sq == 0 or sk == 0:
            continue
        sub = dataclasses.replace(spec, layout="bhsd", out_layout="bhsd", batch=1, seqlen_q=sq, seqlen_k=sk,
                                  equal_seqlens=sq == sk)
        run = kern if kern.unsupported(sub) is None else kernels.KERNELS["math"]
        yield slice(offs_q[i], offs_q[i + 1]), slice(offs_k[i], offs_k[i + 1]), sub, run


def _dense(t: Tensor) -> Tensor:
    """[S, H, D] slice of a packed tensor -> [1, H, S, D] view."""
    return t.transpose(0, 1).unsqueeze(0)


def _forward_varlen(kern, spec: AttnSpec, packed: _Packed, q, k, v, sinks: Optional[Tensor]):
    extra = {} if sinks is None else {"sinks": sinks}
    if kern.varlen_native:
        return kern.forward_varlen(spec, q, k, v, packed.cu_q, packed.cu_k, **extra)
    out = q.new_zeros(q.shape[0], spec.heads_q, spec.dim_v)
    lse = q.new_full((spec.heads_q, q.shape[0]), float("-inf"), dtype=spec.lse_dtype)
    for sq, sk, sub, run in _sequences(kern, spec, *packed.offsets()):
        o, l, _ = run.forward(sub, _dense(q[sq]), _dense(k[sk]), _dense(v[sk]), None, **extra)
        out[sq] = o[0].transpose(0, 1)
        lse[:, sq] = l[0]
    return out, lse, kernels.base.empty_rng(q.device)


def _backward_varlen(kern, spec: AttnSpec, packed: _Packed, grad_out, q, k, v, out, lse, rng_state):
    if kern.varlen_native:
        return kern.backward_varlen(spec, grad_out, q, k, v, out, lse, rng_state, packed.cu_q, packed.cu_k)[:3]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for sq, sk, sub, run in _sequences(kern, spec, *packed.offsets()):
        g = run.backward(sub, _dense(grad_out[sq]), _dense(q[sq]), _dense(k[sk]), _dense(v[sk]),
                          _dense(out[sq]), lse[:, sq].unsqueeze(0).contiguous(), rng_state, None)
        dq[sq], dk[sk], dv[sk] = (t[0].transpose(0, 1) for t in g[:3])
    return dq, dk, dv


def _empty_rows(spec: AttnSpec, call: Call, packed: Optional[_Packed]) -> Optional[Tensor]:
    """The rows that keep no key, where the call asks for eager's NaNs there (never with sinks,
    which leave every row a logit)."""
    if call.empty_rows == "zero" or call.sinks is not None:
        return None
    if packed is not None:
        return empty_rows.find_packed(spec, packed.cu_q, packed.cu_k, call.query.shape[0])
    return empty_rows.find_dense(spec, call.attn_mask, call.seqused_k, call.query.device)


def _nan_inputs(call: Call, kern: kernels.Kernel, q: Tensor, k: Tensor,
                v: Tensor) -> tuple[Optional[Tensor], kernels.Kernel]:
    """Where the call asks for eager's NaNs (a hand-written softmax) on the CPU: the query rows
    holding a NaN ([B, Hq, Sq], from [B, H, S, D] views; None when there are none), which spread
    over their row and, through backward, over their key/value head; and the kernel to run: a NaN
    in K or V reaches rows and gradients through the scores and the product with V as the written
    chain's own ops take it, which the math kernel repeats and fused kernels need not (unless a
    kernel was forced). One reduction of each and one host read; nothing more in the usual case.

    On an accelerator that host read would stall every call (and cannot be captured in a CUDA
    graph), so NaN inputs go through the fused kernel as it propagates them: a row that reads a
    NaN is NaN, but gradients may not be NaN in every entry where eager's are."""
    if call.empty_rows == "zero" or call.sinks is not None or q.device.type != "cpu":
        return None, kern
    rows = q.isnan().any(-1)
    found_q, found_kv = torch.stack([rows.any(), k.isnan().any() | v.isnan().any()]).tolist()
    if found_kv and call.kernel_name == "auto":
        kern = kernels.KERNELS["math"]
    return (rows if found_q else None), kern


def _reduce_to(grad: Tensor, mask: Tensor) -> Tensor:
    """A [B, Hq, Sq, Sk] gradient summed over the dims ``mask`` broadcasts, in the mask's shape and dtype."""
    shape = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    return grad.to(torch.promote_types(grad.dtype, torch.float32)).sum_to_size(shape).reshape(mask.shape).to(mask.dtype)


# Defined with torch.library.define/impl rather than custom_op: the custom_op wrapper re-binds
# all its arguments on every call, which costs more host time than a fast kernel launch.
torch.library.define("attnopt::attention", f"({SCHEMA}) -> (Tensor, Tensor, Tensor)")
torch.library.define("attnopt::attention_backward",
                     f"(Tensor grad_out, Tensor out, Tensor lse, Tensor rng_state, {SCHEMA}) "
                     "-> (Tensor, Tensor, Tensor, Tensor?, Tensor?)")
_OP = torch.ops.attnopt.attention.default
_BACKWARD_OP = torch.ops.attnopt.attention_backward.default


@torch.library.impl("attnopt::attention", "CompositeExplicitAutograd")
def _attention(*args):
    call = complete(args)
    spec, kern, packed = _plan(call)
    q, k, v = _readable(kern, call.query, call.key, call.value)
    sinks, nan_q = call.sinks, None
    if packed is not None:
        _record("forward", kern.name, spec)
        out, lse, rng = _forward_varlen(kern, spec, packed, q, k, v, sinks if kern.sinks == "native" else None)
    else:
        if call.seqused_k is not None:
            check_seqused_k(call.seqused_k, spec.seqlen_k)
        q, k, v = (t.permute(TO_BHSD[call.layout]) for t in (q, k, v))
        nan_q, kern = _nan_inputs(call, kern, q, k, v)
        if nan_q is not None:  # the kernel runs them as zeros; eager's NaN rows are written below
            q = q.masked_fill(nan_q[..., None], 0.0)
        _record("forward", kern.name, spec)
        kspec, extra = _kernel_args(kern, spec, call, forward=True)
        out, lse, rng = kern.forward(kspec, q, k, v, **extra)
    if sinks is not None and kern.sinks == "lse":
        out, lse = sink_math.fold(out, lse, sinks, spec.varlen)
    if call.empty_rows != "zero":
        rows = _empty_rows(spec, call, packed)
        if packed is None and nan_q is not None:
            rows = nan_q if rows is None else rows | nan_q
        if rows is not None:
            out = empty_rows.write(out, rows, spec.varlen, empty_rows.NAN)
    if packed is None:
        out = out.permute(FROM_BHSD[spec.out_layout])
    return out.contiguous(), lse.contiguous(), rng


@torch.library.register_fake("attnopt::attention")
def _attention_fake(*args):
    call = complete(args)
    spec = build_spec(call)
    if call.kernel_name not in kernels.KERNEL_NAMES:
        raise ValueError(f"attnopt.attention: unknown kernel {call.kernel_name!r}; choose from {kernels.KERNEL_NAMES}")
    query = call.query
    total_q = query.shape[0]
    out = query.new_empty(out_shape(spec, total_q))
    lse = query.new_empty(lse_shape(spec, total_q), dtype=spec.lse_dtype)
    rng = query.new_empty((2,) if call.dropout_p > 0 else (0,), dtype=torch.int64)
    return out, lse, rng


@torch.library.impl("attnopt::attention_backward", "CompositeExplicitAutograd")
def _attention_backward(grad_out, out, lse, rng_state, *args):
    call = complete(args)
    spec, kern, packed = _plan(call)
    q, k, v, grad_out, out = _readable(kern, call.query, call.key, call.value, grad_out, out)
    nan_q = None
    if packed is None:
        q, k, v = (t.permute(TO_BHSD[call.layout]) for t in (q, k, v))
        grad_out, out = (t.permute(TO_BHSD[spec.out_layout]) for t in (grad_out, out))
        nan_q, kern = _nan_inputs(call, kern, q, k, v)
    _record("backward", kern.name, spec)
    rows = _empty_rows(spec, call, packed) if call.empty_rows != "zero" else None
    if nan_q is not None:
        q_read, q = q, q.masked_fill(nan_q[..., None], 0.0)
    quiet = rows if nan_q is None else nan_q if rows is None else rows | nan_q
    if quiet is not None:  # the kernel runs those rows as empty; their NaNs are written below
        grad_out, out = (empty_rows.write(t, quiet, spec.varlen, 0.0) for t in (grad_out, out))
    dmask = None
    if packed is not None:
        dq, dk, dv = _backward_varlen(kern, spec, packed, grad_out, q, k, v, out, lse, rng_state)
        if rows is not None:
            dq, dk, dv = empty_rows.nan_grads_packed(call.empty_rows, rows, spec, packed.cu_q, packed.cu_k, dq, dk, dv)
    else:
        kspec, extra = _kernel_args(kern, spec, call, forward=False)
        dq, dk, dv, dmask = kern.backward(kspec, grad_out, q, k, v, out, lse, rng_state, **extra)
        if rows is not None:
            dq, dk, dv, dmask = empty_rows.nan_grads_dense(call.empty_rows, rows, spec, dq, dk, dv, dmask)
        if nan_q is not None:
            keep = empty_rows.keep_dense(spec, call.attn_mask, call.seqused_k, q.device)
            dq, dk, dv, dmask = empty_rows.nan_query_grads(call.empty_rows, nan_q, q_read, keep, spec, dq, dk, dv, dmask)
        dq, dk, dv = (t.permute(FROM_BHSD[call.layout]) for t in (dq, dk, dv))
        if dmask is not None:
            dmask = _reduce_to(dmask, call.attn_mask).contiguous()
    dsinks = None if call.sinks is None else sink_math.grad(grad_out, out, lse, call.sinks, spec.varlen)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dmask, dsinks


@torch.library.register_fake("attnopt::attention_backward")
def _attention_backward_fake(grad_out, out, lse, rng_state, *args):
    call = complete(args)
    spec = build_spec(call)
    grads = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (call.query, call.key, call.value))
    dmask = call.attn_mask.new_empty(call.attn_mask.shape) if spec.mask_grad else None
    dsinks = None if call.sinks is None else call.sinks.new_empty(call.sinks.shape)
    return (*grads, dmask, dsinks)


_MASK, _MASK_GRAD = INDEX["attn_mask"], INDEX["mask_grad"]
_TENSORS_IN = [tuple(i for i in TENSORS if i < n) for n in range(len(NAMES) + 1)]  # those among n arguments
# Where the backward op's (dq, dk, dv, d attn_mask, d sinks) go among apply's inputs (the arguments tuple first).
_GRAD_AT = tuple(1 + TENSORS.index(INDEX[n]) for n in ("query", "key", "value", "attn_mask", "sinks"))


class _AttentionFunction(torch.autograd.Function):
    """Autograd for attnopt::attention; registered by hand rather than with register_autograd,
    whose per-call re-binding of all its arguments costs more host time than the kernel.

    ``apply`` takes the call's arguments as one tuple (as the dispatcher delivered them: trailing
    defaults dropped) followed by its tensor arguments, which autograd tracks: its per-argument
    work then scales with the few tensors rather than with the whole schema."""

    @staticmethod
    def forward(ctx, args, *tensors):
        with torch._C._AutoDispatchBelowAutograd():
            output = _OP(*args)
        out, lse, rng = output
        ctx.mark_non_differentiable(lse, rng)
        ctx.save_for_backward(*tensors, out, lse, rng)
        statics = list(args)
        for i in _TENSORS_IN[len(statics)]:
            statics[i] = None
        ctx.statics = statics
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_lse, grad_rng):
        *tensors, out, lse, rng = ctx.saved_tensors
        args = list(ctx.statics)
        for i, t in zip(_TENSORS_IN[len(args)], tensors):
            args[i] = t
        grads = _BACKWARD_OP(grad_out, out, lse, rng, *args)
        result: list = [None] * (1 + len(TENSORS))
        for i, grad in zip(_GRAD_AT, grads):
            result[i] = grad
        return tuple(result)


@torch.library.impl("attnopt::attention", "Autograd")
def _attention_autograd(*args):
    mask = args[_MASK] if len(args) > _MASK else None
    if mask is not None and mask.requires_grad and torch.is_grad_enabled():
        # recorded in the call, so that a compiled forward picks the kernel its backward needs
        full = list(args + DEFAULTS[len(args):])
        full[_MASK_GRAD] = True
        args = tuple(full)
    n = len(args)
    return _AttentionFunction.apply(args, *(args[i] if i < n else None for i in TENSORS))


_RENAMED = tuple(FRONT_TO_OP.items())


def attention(*args, return_lse: bool = False, **options):
    if len(args) > POSITIONAL:
        raise TypeError(f"attnopt.attention() takes {POSITIONAL} positional arguments; give the rest by keyword")
    for front, name in _RENAMED:
        if front in options:
            options[name] = options.pop(front)
    out, lse, _ = _OP(*args, **options)
    return (out, lse) if return_lse else out


attention.__signature__ = front_signature(
    inspect.Parameter("return_lse", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=bool))
attention.__doc__ = front_doc("""Fused attention on tensors in any supported layout; returns out, and (out, lse) with
``return_lse``. Query head h reads key/value head h // (Hq // Hkv). Bad input raises ValueError
naming the problem; a forced kernel that cannot run the call says why.""")


def _bind_front(args: tuple, options: dict) -> Call:
    """A front call's arguments, ``mask_grad`` set as the op's autograd would set it."""
    call = bind(args, options)
    mask = call.attn_mask
    if mask is not None and mask.requires_grad and torch.is_grad_enabled():
        call = call._replace(mask_grad=True)
    return call


def kernel_for(*args, **options) -> str:
    return _plan(_bind_front(args, options))[1].name


def spec_for(*args, **options) -> AttnSpec:
    return _describe(_bind_front(args, options))[0]


kernel_for.__signature__ = spec_for.__signature__ = front_signature()
kernel_for.__doc__ = front_doc("The name of the kernel :func:`attention` would run for these arguments.")
spec_for.__doc__ = front_doc("The validated description of a call (packed offsets read) that the kernel policy sees.")
