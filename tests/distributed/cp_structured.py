"""Attention layers with structure (packed documents, Llama 4 chunks as packed sequences, sliding
windows) under context parallel, and the one-process computation they must reproduce; the worker
runs in spawned ranks (see ``launch.run_ranks``)."""
from __future__ import annotations

import time
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

import attnopt

def case(name: str, *, layout: str = "thd", docs: Optional[list[int]] = None, chunk: Optional[int] = None,
         seq: int = 96, window: tuple[int, int] = (-1, -1), causal: bool = True, balance: str = "documents",
         exchange: str = "ring", compiled: Optional[str] = None, width: tuple[int, int, int] = (32, 4, 2)
         ) -> dict[str, Any]:
    """One configuration: packed documents (lengths ``docs``, each cut into chunks of ``chunk`` tokens
    when given) or a dense bshd sequence of ``seq`` tokens; how the ranks hold it (``balance``:
    "documents" through shard_packed, torch's "head_tail", or "contiguous"); the K/V exchange; eager
    or compiled with attnopt over ``compiled`` (an inner compiler); ``width`` is (hidden, heads, kv heads)."""
    return dict(name=name, layout=layout, docs=docs, chunk=chunk, seq=seq, window=window, causal=causal,
                balance=balance, exchange=exchange, compiled=compiled, width=width)


def offsets(c: dict[str, Any]) -> Optional[Tensor]:
    """The packed offsets the one-process layer uses: documents, cut into chunks inside each."""
    if c["layout"] != "thd":
        return None
    cuts = [0]
    for n in c["docs"]:
        start = cuts[-1]
        cuts += [start + min(i + (c["chunk"] or n), n) for i in range(0, n, c["chunk"] or n)]
    return torch.tensor(cuts, dtype=torch.int32)


class Core(nn.Module):
    """The attention call on q, k, v; the offsets are an attribute, not an argument, because torch's
    context-parallel style shards every tensor argument on the sequence."""

    def __init__(self, c: dict[str, Any], cu: Optional[Tensor]):
        super().__init__()
        self.layout, self.window, self.causal = c["layout"], c["window"], c["causal"]
        self.cu = cu
        self.longest = None if cu is None else int((cu[1:] - cu[:-1]).max())

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        kw: dict[str, Any] = dict(layout=self.layout, is_causal=self.causal, window_size=self.window)
        if self.cu is not None:
            kw.update(cu_seqlens_q=self.cu, cu_seqlens_k=self.cu, max_seqlen_q=self.longest,
                      max_seqlen_k=self.longest)
        return attnopt.attention(q, k, v, **kw)


class Layer(nn.Module):
    """GQA attention with biased projections, over [T, hidden] (packed) or [B, S, hidden]."""

    def __init__(self, c: dict[str, Any], cu: Optional[Tensor]):
        super().__init__()
        hidden, heads, kv_heads = c["width"]
        self.head_dim = hidden // heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim)
        self.o_proj = nn.Linear(hidden, hidden)
        self.core = Core(c, cu)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (p(x).unflatten(-1, (-1, self.head_dim)) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.o_proj(self.core(q, k, v).flatten(-2))


def inputs(c: dict[str, Any], device: str = "cpu", dtype: torch.dtype = torch.float64
           ) -> tuple[Layer, Tensor, Tensor]:
    """The layer, an input and an output gradient, the same in every process."""
    torch.manual_seed(0)
    cu = offsets(c)
    layer = Layer(c, None if cu is None else cu.to(device)).to(device, dtype)
    hidden = c["width"][0]
    shape = (int(cu[-1]), hidden) if cu is not None else (2, c["seq"], hidden)
    x, grad = (torch.randn(shape, dtype=dtype, device=device) for _ in range(2))
    return layer, x, grad


def _timed(step, steps: int, device: str) -> dict[str, float]:
    """Milliseconds per step and peak memory (MiB) over ``steps`` steps after the first; CUDA only."""
    if not steps or device != "cuda":
        return {}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return {"ms": (time.perf_counter() - start) * 1e3 / steps, "peak_mib": torch.cuda.max_memory_allocated() / 2**20}


def reference(c: dict[str, Any], device: str = "cpu", dtype: torch.dtype = torch.float64, steps: int = 0
              ) -> dict[str, Any]:
    """Output, input gradient and parameter gradients in one process (and its step time and memory)."""
    layer, x, grad = inputs(c, device, dtype)
    x.requires_grad_()
    out = layer(x)
    out.backward(grad)
    result = {"out": out.detach(), "dx": x.grad.clone(), **{n: p.grad.clone() for n, p in layer.named_parameters()}}
    return {**result, **_timed(lambda: layer(x).backward(grad), steps, device)}


def run_cases(cases: list[dict[str, Any]], dtype: torch.dtype = torch.float64, steps: int = 0
              ) -> dict[str, dict[str, Any]]:
    """Each case under context parallel over all ranks: the results gathered back to the original
    order (parameter gradients summed over ranks) and the K/V exchanges that ran; on CUDA also the
    time per step and this rank's peak memory over ``steps`` more steps."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental._context_parallel import (
        _context_parallel_shard, _ContextParallel, _disable_context_parallel_dispatcher,
        _enable_context_parallel_dispatcher, _HeadTailLoadBalancer, context_parallel_unshard)
    from torch.distributed.tensor.parallel import parallelize_module

    from attnopt.distributed import exchange, shard_packed, unshard_packed

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    ran: list[str] = []
    blocks = exchange.blocks
    exchange.blocks = lambda kv, group, method: (ran.append(method), blocks(kv, group, method))[1]
    results = {}
    try:
        for c in cases:
            layer, x, grad = inputs(c, device, dtype)
            dim = 0 if c["layout"] == "thd" else 1
            if c["balance"] == "documents":
                shards = shard_packed(mesh, [x, grad], [0, 0], layer.core.cu)
                (x, grad), layer.core.cu, layer.core.longest = shards.buffers, shards.cu_seqlens, shards.max_seqlen
            else:
                balancer = _HeadTailLoadBalancer(x.shape[dim], mesh.size(), device) if c["balance"] == "head_tail" \
                    else None
                x, grad = _context_parallel_shard(mesh, [x, grad], [dim, dim], load_balancer=balancer)
            parallelize_module(layer.core, mesh,
                               _ContextParallel(seq_dim=dim, attention_type=_ContextParallel.AttentionType.SDPA))
            x.requires_grad_()
            torch._dynamo.reset()
            run = torch.compile(layer, backend=attnopt.backend(c["compiled"], strict=True)) if c["compiled"] else layer
            exchange.set_kv_exchange(c["exchange"])
            ran.clear()
            _enable_context_parallel_dispatcher()
            try:
                out = run(x)
                out.backward(grad)
                out, dx = out.detach(), x.grad.clone()
                grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
                timing = _timed(lambda: run(x).backward(grad), steps, device)
            finally:
                _disable_context_parallel_dispatcher()
                exchange.set_kv_exchange(None)
            if c["balance"] == "documents":
                out, dx = unshard_packed(mesh, [out, dx], [0, 0], shards)
            elif dim == 0:  # torch's unshard reads dim 0 as the batch
                out, dx = (t.squeeze(0) for t in context_parallel_unshard(
                    mesh, [out.unsqueeze(0), dx.unsqueeze(0)], [1, 1], load_balancer=balancer))
            else:
                out, dx = context_parallel_unshard(mesh, [out, dx], [1, 1], load_balancer=balancer)
            for g in grads.values():
                dist.all_reduce(g)
            results[c["name"]] = {"out": out.cpu(), "dx": dx.cpu(), **{n: g.cpu() for n, g in grads.items()},
                                  "exchanges": sorted(set(ran)), **timing}
    finally:
        exchange.blocks = blocks
    return results
