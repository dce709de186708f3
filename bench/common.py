"""Timing and memory helpers shared by the benchmarks: medians over CUDA-event timings."""
from __future__ import annotations

import json
import os
import platform
import statistics
from typing import Callable

import torch


def environment() -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        env.update(device=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    try:
        import importlib.metadata as md

        env["flash_attn_4"] = md.version("flash-attn-4")
    except Exception:  # noqa: BLE001 - not installed
        env["flash_attn_4"] = None
    return env


def time_ms(step: Callable[[], None], warmup: int = 10, iters: int = 50, repeats: int = 5) -> dict:
    """Median and spread of per-step milliseconds over ``repeats`` runs of ``iters`` steps."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    per_run = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        torch.cuda.synchronize()
        per_run.append(start.elapsed_time(end) / iters)
    return {"median_ms": statistics.median(per_run), "min_ms": min(per_run), "max_ms": max(per_run)}


def graph_replay_ms(step: Callable[[], object], iters: int = 100, repeats: int = 5) -> dict:
    """Median ms of ``step`` captured once in a CUDA graph and replayed: the device time of its
    kernels with no Python in between (what a step costs inside a larger captured graph)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return time_ms(graph.replay, warmup=10, iters=iters, repeats=repeats)


def peak_mib(step: Callable[[], None]) -> float:
    """Peak allocated memory during one step, counting everything alive (inputs included)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def write_json(name: str, payload: dict) -> str:
    out_dir = os.environ.get("ATTNOPT_BENCH_DIR", os.path.join(os.path.dirname(__file__), "results"))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    return path


def add_shape_args(parser, batch: int = 2, seq: int = 4096, iters: int = 20, heads: int = 32, kv_heads: int = 8,
                   head_dim: int = 128) -> None:
    """The attention shape every core benchmark takes (Llama-3-8B by default)."""
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--seq", type=int, default=seq)
    parser.add_argument("--heads", type=int, default=heads)
    parser.add_argument("--kv-heads", type=int, default=kv_heads)
    parser.add_argument("--head-dim", type=int, default=head_dim)
    parser.add_argument("--iters", type=int, default=iters)


def projections(args, split_heads: bool = False):
    """bf16 CUDA q, k, v as projections produce them ([B, S, H*D], or [B, S, H, D]) and a grad."""
    b, s, h, hkv, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    torch.manual_seed(0)
    shape = (lambda n: (b, s, n, d)) if split_heads else (lambda n: (b, s, n * d))
    mk = lambda n: torch.randn(*shape(n), device="cuda", dtype=torch.bfloat16, requires_grad=True)
    return mk(h), mk(hkv), mk(hkv), torch.randn(*shape(h), device="cuda", dtype=torch.bfloat16)


def measure_fwd_bwd(variants: dict, q, k, v, grad, ref, iters: int) -> list[dict]:
    """Per variant: median/min/max ms of forward+backward, peak MiB (everything alive, and the
    step's own: the peak less q, k, v and the output gradient it was given), error against
    ``ref`` (CPU, float32) and the attnopt kernels that ran."""
    import attnopt

    given = sum(t.numel() * t.element_size() for t in (q, k, v, grad)) / 2**20
    rows = []
    for name, fn in variants.items():
        def step(fn=fn):
            for t in (q, k, v):
                t.grad = None
            fn(q, k, v).backward(grad)

        with attnopt.runtime_ops.trace_kernels() as calls:
            out = fn(q, k, v).float().cpu()
        err = float((out - ref).norm() / ref.norm())
        del out
        times = time_ms(step, iters=iters)
        peak = peak_mib(step)
        rows.append({"variant": name, **times, "peak_mib": peak, "step_mib": peak - given, "rel_err": err,
                     "kernel": ",".join(sorted({c.kernel for c in calls})) or "(torch SDPA)"})
    return rows


def print_fwd_bwd(title: str, rows: list[dict], env: dict, baseline: str) -> None:
    """The table of :func:`measure_fwd_bwd` rows, each timed against the row named ``baseline``
    (as "time / baseline's time")."""
    base = next(r for r in rows if r["variant"] == baseline)["median_ms"]
    width = max(len(r["variant"]) for r in rows) + 2
    print(f"\n{title}")
    print(f"{env.get('device')} torch {env['torch']} cuDNN {env.get('cudnn')} flash-attn-4 {env['flash_attn_4']}; "
          f"'vs base': median / median of {baseline!r}")
    print(f"{'variant':{width}} {'median ms':>9} {'min':>7} {'max':>7} {'peak MiB':>9} {'step MiB':>9} "
          f"{'vs base':>8} {'rel err':>8} kernel")
    for r in rows:
        print(f"{r['variant']:{width}} {r['median_ms']:9.3f} {r['min_ms']:7.3f} {r['max_ms']:7.3f} {r['peak_mib']:9.0f} "
              f"{r['step_mib']:9.0f} {r['median_ms'] / base:7.3f}x {r['rel_err']:8.1e} {r['kernel']}")
