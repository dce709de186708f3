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
