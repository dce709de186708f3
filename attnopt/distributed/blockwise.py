"""Context-parallel attention on one rank's shard: ``attnopt::context_parallel_attention`` and its
backward, custom ops so that a compiled graph holds one opaque call whose block plan is read at run
time from the document offsets (which are data) and whose K/V exchange runs then.

Forward attends this rank's rows to every source block the plan keeps (``plan.block_calls``),
merging the partial results by their log-sum-exp: out = sum_i exp(lse_i - lse) out_i with lse =
logsumexp_i lse_i, rows that see nothing in a block having lse_i = -inf. Backward runs each call's
kernel backward with the merged out and lse, which gives that block's exact share of dQ, dK and dV.
"""
from __future__ import annotations

import functools
import itertools
from typing import Optional

import torch
from torch import Tensor
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.utils.weak import WeakIdKeyDictionary

from ..runtime_ops.spec import FROM_BHSD, TO_BHSD
from . import exchange, plan
from .sharding import SEQ_DIM

_FORWARD = torch.ops.attnopt.attention.default
_BACKWARD = torch.ops.attnopt.attention_backward.default


def _out_shape(query: Tensor, value: Tensor, layout: str, out_layout: str) -> list[int]:
    if layout == "thd":
        return [query.shape[0], query.shape[1], value.shape[-1]]
    bhsd = [query.shape[i] for i in TO_BHSD[layout]][:3] + [value.shape[-1]]
    return [bhsd[i] for i in FROM_BHSD[out_layout]]


def _lse_shape(query: Tensor, layout: str) -> list[int]:
    if layout == "thd":
        return [query.shape[1], query.shape[0]]
    b, h, s, _ = (query.shape[i] for i in TO_BHSD[layout])
    return [b, h, s]


def _lse_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _lse_as_out(lse: Tensor, out_layout: str) -> Tensor:
    """The lse broadcast against the output rows it belongs to."""
    if out_layout == "thd":
        return lse.t().unsqueeze(-1)
    return lse.unsqueeze(-1).permute(FROM_BHSD[out_layout])


_offsets: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _documents(cu: Optional[Tensor], global_len: int) -> tuple[int, ...]:
    """The global document offsets: read on the host once per offsets tensor and version (the layers
    of a model share one); one document for dense layouts."""
    if cu is None:
        return (0, global_len)
    hit = _offsets.get(cu)
    if hit is None or hit[0] != cu._version:
        hit = (cu._version, tuple(cu.tolist()))
        _offsets[cu] = hit
    return hit[1]


@functools.lru_cache(maxsize=256)
def _calls(balance: str, rank: int, world: int, local_len: int, docs: tuple[int, ...], window: tuple[int, int],
           packed: bool) -> tuple[tuple[plan.Call, ...], ...]:
    """This rank's calls against each source rank's block."""
    plan.check_documents(balance, world, docs)
    q_runs = plan.runs(balance, rank, world, local_len, docs)
    return tuple(tuple(plan.block_calls(q_runs, plan.runs(balance, src, world, local_len, docs), docs, window,
                                        packed)) for src in range(world))


@functools.lru_cache(maxsize=4096)
def _packed_offsets(call: plan.Call, device: torch.device) -> dict:
    """A packed call's offsets, built once per call and device: the op reads offsets on the host once
    per offsets tensor, so the same tensors each step cost no further device reads."""
    rows, keys = zip(*call.segments)
    cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(s)], dtype=torch.int32, device=device) for s in (rows, keys))
    return dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(rows), max_seqlen_k=max(keys))


class _Context:
    """One call's shard, its plan and the per-call arguments of the op."""

    def __init__(self, query: Tensor, key: Tensor, value: Tensor, cu_seqlens_q: Optional[Tensor],
                 cu_seqlens_k: Optional[Tensor], group_name: str, balance: str, layout: str, out_layout: str,
                 window: list[int], statics: dict):
        self.group = _resolve_process_group(group_name)
        self.seq, self.out_seq = SEQ_DIM[layout], SEQ_DIM[out_layout]
        self.lse_seq = 1 if layout == "thd" else 2
        self.key_shape, self.value_shape = key.shape, value.shape
        rank, world = self.group.rank(), self.group.size()
        local = query.shape[self.seq]
        docs = _documents(cu_seqlens_q, local * world)
        if cu_seqlens_k is not cu_seqlens_q and _documents(cu_seqlens_k, local * world) != docs:
            raise NotImplementedError("attnopt.attention under context parallel: cu_seqlens_q and cu_seqlens_k differ")
        self.calls = _calls(balance, rank, world, local, docs, (int(window[0]), int(window[1])), layout == "thd")
        self.statics = {**statics, "layout": layout, "out_layout": out_layout}

    @staticmethod
    def flat(key: Tensor, value: Tensor) -> Tensor:
        return torch.cat([key.reshape(-1), value.reshape(-1)])

    def split(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        n = self.key_shape.numel()
        return flat[:n].view(self.key_shape), flat[n:].view(self.value_shape)

    def args(self, call: plan.Call, device: torch.device) -> dict:
        """The op's arguments for one call."""
        args = {**self.statics, "window_size": list(call.window), "causal_align": call.align}
        if call.segments is not None:
            args.update(_packed_offsets(call, device))
        return args

    def rows(self, t: Tensor, call: plan.Call, dim: int) -> Tensor:
        return t.narrow(dim, call.q0, call.q1 - call.q0)

    def keys(self, t: Tensor, call: plan.Call) -> Tensor:
        return t.narrow(self.seq, call.k0, call.k1 - call.k0)


def _merge(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor, out_layout: str) -> None:
    """Fold one block's partial result into the running (out, lse) in place; rows that are -inf in
    both stay 0 and -inf."""
    merged = torch.logaddexp(lse, block_lse)
    finite = torch.where(merged == float("-inf"), 0.0, merged)
    keep, add = torch.exp(lse - finite), torch.exp(block_lse - finite)
    out.copy_(out * _lse_as_out(keep, out_layout) + block_out * _lse_as_out(add, out_layout))
    lse.copy_(merged)


@torch.library.custom_op("attnopt::context_parallel_attention", mutates_args=())
def context_parallel_attention(query: Tensor, key: Tensor, value: Tensor, cu_seqlens_q: Optional[Tensor],
                               cu_seqlens_k: Optional[Tensor], group_name: str, balance: str, method: str,
                               layout: str, out_layout: str, window: list[int], scale: Optional[float],
                               softcap: float, kernel_name: str) -> tuple[Tensor, Tensor]:
    """This rank's rows of attention over the whole sequence: (out, lse) as attnopt::attention gives them."""
    ctx = _Context(query, key, value, cu_seqlens_q, cu_seqlens_k, group_name, balance, layout, out_layout, window,
                   dict(scale=scale, softcap=softcap, kernel_name=kernel_name))
    acc = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    out = query.new_zeros(_out_shape(query, value, layout, out_layout), dtype=acc)
    lse = query.new_full(_lse_shape(query, layout), float("-inf"), dtype=_lse_dtype(query))
    for src, kv in exchange.blocks(ctx.flat(key, value), ctx.group, method):
        k, v = ctx.split(kv)
        for call in ctx.calls[src]:
            o, l, _ = _FORWARD(ctx.rows(query, call, ctx.seq), ctx.keys(k, call), ctx.keys(v, call),
                               **ctx.args(call, query.device))
            _merge(ctx.rows(out, call, ctx.out_seq), ctx.rows(lse, call, ctx.lse_seq), o, l, out_layout)
    return out.to(query.dtype), lse


@context_parallel_attention.register_fake
def _(query, key, value, cu_seqlens_q, cu_seqlens_k, group_name, balance, method, layout, out_layout, window, scale,
      softcap, kernel_name):
    return (query.new_empty(_out_shape(query, value, layout, out_layout)),
            query.new_empty(_lse_shape(query, layout), dtype=_lse_dtype(query)))


@torch.library.custom_op("attnopt::context_parallel_attention_backward", mutates_args=())
def context_parallel_attention_backward(grad_out: Tensor, out: Tensor, lse: Tensor, query: Tensor, key: Tensor,
                                        value: Tensor, cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                                        group_name: str, balance: str, method: str, layout: str, out_layout: str,
                                        window: list[int], scale: Optional[float], softcap: float, kernel_name: str
                                        ) -> tuple[Tensor, Tensor, Tensor]:
    """dQ of this rank's rows and dK, dV of its own keys, summed over every rank's queries."""
    ctx = _Context(query, key, value, cu_seqlens_q, cu_seqlens_k, group_name, balance, layout, out_layout, window,
                   dict(scale=scale, softcap=softcap, kernel_name=kernel_name))
    acc = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    dq = torch.zeros_like(query, dtype=acc)
    rng = torch.empty(0, dtype=torch.int64, device=query.device)
    passes = exchange.BlocksWithGrads(ctx.flat(key, value), ctx.group, method, acc)
    for src, kv, grad in passes:
        k, v = ctx.split(kv)
        dk, dv = ctx.split(grad)
        for call in ctx.calls[src]:
            dq_c, dk_c, dv_c, _, _ = _BACKWARD(
                ctx.rows(grad_out, call, ctx.out_seq), ctx.rows(out, call, ctx.out_seq),
                ctx.rows(lse, call, ctx.lse_seq).contiguous(), rng, ctx.rows(query, call, ctx.seq), ctx.keys(k, call),
                ctx.keys(v, call), **ctx.args(call, query.device))
            ctx.rows(dq, call, ctx.seq).add_(dq_c)
            ctx.keys(dk, call).add_(dk_c)
            ctx.keys(dv, call).add_(dv_c)
    dk, dv = ctx.split(passes.grad)  # views of one buffer: the op's outputs may not alias
    return dq.to(query.dtype), dk.to(key.dtype, copy=True), dv.to(value.dtype, copy=True)


@context_parallel_attention_backward.register_fake
def _(grad_out, out, lse, query, key, value, cu_seqlens_q, cu_seqlens_k, group_name, balance, method, layout,
      out_layout, window, scale, softcap, kernel_name):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)

