"""What each rank runs in the two-rank tests (module level, so spawned ranks can import it).

Every function runs under an initialised default process group (see ``launch.run_ranks``) and
returns plain data for the test process to check.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

from torch.fx import GraphModule

import attnopt

from ..models.graph_checks import attention_overhead, attnopt_calls
from . import llama


def _device() -> str:
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def _graph_summary(before: GraphModule, after: GraphModule, result: attnopt.PassResult) -> dict[str, Any]:
    return {"sites": [(s.status, s.heads, s.gqa_group, s.reason) for s in result.sites],
            "attnopt_calls": len(attnopt_calls(after)),
            "overhead_left": sorted(attention_overhead(before) & {n.name for n in after.graph.nodes})}


def train_llama(meshes: list[tuple[int, int]], inner: str, dtype: torch.dtype = torch.float32) -> list[dict[str, Any]]:
    """For each (dp, tp): FSDP2 over dp and tensor parallel over tp (a dp x tp mesh), the whole model
    compiled with attnopt; the losses averaged over data-parallel ranks, and what attnopt did to each graph.
    Several runs share one launch because the ranks' start-up costs more than a run."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    device = _device()
    results = []
    for dp, tp in meshes:
        mesh = init_device_mesh(device, (dp, tp), mesh_dim_names=("dp", "tp"))
        model = llama.build().to(device, dtype)
        if tp > 1:
            for layer in model.model.layers:
                parallelize_module(layer, mesh["tp"], llama.tp_plan())
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        graphs: list[dict[str, Any]] = []
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=attnopt.backend(  # the op at every site: it is what runs sharded
            inner, strict=True, target="op", on_result=lambda *g: graphs.append(_graph_summary(*g))))
        rows = llama.BATCH // dp
        start = mesh["dp"].get_local_rank() * rows
        data = llama.batches()[:, start:start + rows].to(device)
        losses = torch.tensor(llama.train(model, data, compiled), device=device)
        dist.all_reduce(losses, group=mesh["dp"].get_group())
        results.append({"losses": (losses / dp).tolist(), "graphs": graphs})
    return results


def attention_checks(tp_cases: list[dict[str, Any]], cp_seq: int, cp_configs: list[tuple[bool, bool]]) -> dict:
    """``tp_attention`` and ``cp_attention`` in one launch."""
    return {"tp": tp_attention(tp_cases), "cp": cp_attention(cp_seq, cp_configs)}


def tp_attention(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """attnopt.attention on q/k/v sharded over heads: for each case, the placements that came out,
    the collectives that ran (forward and backward), and the largest difference of the gathered
    output and input gradients from the same call on whole tensors."""
    device = _device()
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    results = []
    for case in cases:
        case = dict(case)
        shapes, head_dim, kv_placement = case.pop("shapes"), case.pop("head_dim"), case.pop("kv_placement")
        torch.manual_seed(0)
        whole = [torch.randn(s, device=device, requires_grad=True) for s in shapes]
        placements = [[Shard(head_dim)], kv_placement, kv_placement]
        parts = [distribute_tensor(t.detach(), mesh, p).requires_grad_() for t, p in zip(whole, placements)]
        ref = attnopt.attention(*whole, **case)
        grad = torch.randn_like(ref)
        ref.backward(grad)
        with CommDebugMode() as forward:
            out = attnopt.attention(*parts, **case)
        grad = distribute_tensor(grad, mesh, out.placements)
        with CommDebugMode() as backward:
            out.backward(grad)
        results.append({
            "out_placements": tuple(out.placements),
            "grad_placements": [tuple(p.grad.placements) for p in parts],
            "collectives": forward.get_total_counts() + backward.get_total_counts(),
            "out_err": float((out.full_tensor() - ref).abs().max()),
            "grad_err": max(float((p.grad.full_tensor() - t.grad).abs().max()) for p, t in zip(parts, whole)),
        })
    return results


def cp_attention(seq: int, configs: list[tuple[bool, bool]], dtype: torch.dtype = torch.float32,
                 sdpa: bool = False) -> dict:
    """One attention layer (``cp_layer.AttentionLayer``) under torch's context parallel over all ranks, for
    each (load_balanced, compiled) config: the output, input gradient and summed parameter gradients,
    gathered back to natural order, and the attention kernels that ran."""
    from torch.distributed.tensor.experimental._context_parallel import (
        _context_parallel_shard, _ContextParallel, _disable_context_parallel_dispatcher,
        _enable_context_parallel_dispatcher, _HeadTailLoadBalancer, context_parallel_unshard)
    from torch.distributed.tensor.parallel import parallelize_module

    from .cp_layer import layer_inputs

    device = _device()
    world = dist.get_world_size()
    mesh = init_device_mesh(device, (world,))
    results = {}
    for balanced, compiled in configs:
        layer, x, grad = layer_inputs(seq, device, dtype, sdpa)
        style = _ContextParallel(seq_dim=1, attention_type=_ContextParallel.AttentionType.SDPA)
        parallelize_module(layer.core, mesh, style)
        balancer = _HeadTailLoadBalancer(seq, world, device) if balanced else None
        x, grad = _context_parallel_shard(mesh, [x, grad], [1, 1], load_balancer=balancer)
        x.requires_grad_()
        torch._dynamo.reset()
        run = torch.compile(layer, backend=attnopt.backend("aot_eager", strict=True, target="op")) if compiled else layer
        _enable_context_parallel_dispatcher()
        try:
            with attnopt.runtime_ops.trace_kernels() as calls:
                out = run(x)
                out.backward(grad)
        finally:
            _disable_context_parallel_dispatcher()
        out, dx = context_parallel_unshard(mesh, [out.detach(), x.grad], [1, 1], load_balancer=balancer)
        grads = {n: p.grad for n, p in layer.named_parameters()}
        for g in grads.values():
            dist.all_reduce(g)
        results[balanced, compiled] = {"out": out.cpu(), "dx": dx.cpu(),
                                       "grads": {n: g.cpu() for n, g in grads.items()},
                                       "kernels": sorted({(c.direction, c.kernel) for c in calls})}
    return results
