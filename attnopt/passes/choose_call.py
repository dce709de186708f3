"""Per site, for target "auto", the cheaper of two exact lowerings: plain SDPA on strided views, or the op.

Both compute the site exactly; they differ in cost. SDPA on views (``enable_gqa``, ``is_causal``,
``scale``) reaches torch's cuDNN or flash kernel with no Python in the launch path and with
Inductor's own backward. The op costs a Python launch path per forward and backward, which pays
off only where it runs a faster kernel than SDPA would, on calls long enough to hide the launch.
Measured with ``bench/sweep.py`` (H200, torch 2.11.0+cu130, cuDNN 9.19, flash-attn-4 4.0.0b36;
bf16, causal, forward+backward, B·S = 16384), median time relative to Inductor on the code as
written, 32/8 heads (32/32 falls within 0.02 of it):

    S                          256   512   1024  2048  4096  8192  16384
    D=128  op (flash-attn-4)   1.23  1.38  0.97  0.88  0.89  0.89  0.89
           SDPA on views       0.79  0.93  0.94  0.92  0.98  0.99  1.00
    D=64   op (flash-attn-4)               1.39  1.07  0.86  0.84  0.83
           SDPA on views       0.94  0.96  0.94  0.96  0.99  0.99  0.99

So the op is emitted where flash-attn-4 would run the call and its sequences are at least as
long as the crossover measured for its head dim; SDPA everywhere else it can compute the site
(with cuDNN under both, the op only adds its launch path). On the CPU the op runs the kernel SDPA
runs (``bench/host_cost.py``: 1.8x Inductor's host time at tiny shapes, SDPA on views 0.96x), so
SDPA on views wherever it computes the site, except for a written softmax (``empty_rows`` other
than "zero"), whose NaNs for a NaN input or a row with no key only the op reproduces. A
sequence length known only at run time gets SDPA, which is never slower than Inductor at either
end of the sweep. Sites SDPA has no spelling for (windows, packed sequences, key lengths,
softcapping, sinks, finite fills, NaN rows, masks the op turns into flags or key lengths) always
get the op.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..fx.normalize import meta, shape
from ..patterns.site import AttentionSite
from ..runtime_ops import kernel_for
from .lower_portable import sdpa_causal, sdpa_refusal

# head dim -> the shortest sequence at which the op on flash-attn-4 beats SDPA (bench/sweep.py)
FA4_CROSSOVER = {128: 2048, 64: 4096}


def _placeholder(like: torch.Tensor, size: list[int]) -> torch.Tensor:
    """A tensor of ``size`` that holds one element: all the kernel policy reads."""
    return torch.zeros((), dtype=like.dtype, device=like.device).expand(size)


def _bhsd(op) -> Optional[list[int]]:
    size = shape(op.source)
    if size is None or any(not isinstance(n, int) for n in size):
        return None
    return [size[op.dims.index(axis)] for axis in "bhsd"]


def sdpa_instead(site: AttentionSite, kernel: str) -> Optional[str]:
    """Why ``site`` is lowered to SDPA on views rather than to the op (None: the op)."""
    q = meta(site.query.source)
    if kernel != "auto" or q.device.type not in ("cuda", "cpu") or sdpa_refusal(site) is not None:
        return None
    causal = sdpa_causal(site)
    if causal is None or site.plan.action not in ("none", "flags"):
        return None  # the op runs what SDPA cannot: a band it has no flag for, or a mask it turned into one
    operands = (site.query, site.key, site.value)
    if any(set("bhsd") - set(op.dims) for op in operands):
        return None  # operands without a batch or head axis of their own (merged B·H): the op reads them
    if q.device.type == "cpu":
        if site.empty_rows != "zero":
            return None  # the op reproduces the NaNs a written softmax gives a NaN input or an empty row
        return "SDPA on views: on the CPU the op would run the kernel SDPA runs, plus its launch path"
    sizes = [_bhsd(op) for op in operands]
    if any(s is None for s in sizes):
        return "SDPA on views: sequence lengths known only at run time (SDPA is never slower there)"
    if not torch.cuda.is_available():
        return "SDPA on views: no GPU here to ask which kernel the op would run"
    (b, hq, sq, d), (_, hkv, sk, _), (_, _, _, dv) = sizes
    dropout = 0.5 if not isinstance(site.dropout_p, float) else site.dropout_p
    chosen = kernel_for(_placeholder(q, [b, hq, sq, d]), _placeholder(q, [b, hkv, sk, d]),
                        _placeholder(q, [b, hkv, sk, dv]), is_causal=causal, dropout_p=dropout)
    if chosen != "fa4":
        return f"SDPA on views: the op would run {chosen}, which SDPA reaches without the op's launch path"
    shortest = FA4_CROSSOVER.get(d)
    if shortest is None:
        return f"SDPA on views: no measured crossover for flash-attn-4 at head dim {d}"
    if min(sq, sk) < shortest:
        return f"SDPA on views: sequences of {min(sq, sk)} are shorter than the measured crossover ({shortest})"
    return None
