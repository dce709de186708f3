"""Profile the attention core step (see attention_core.py) under one backend: where host time goes.

    python bench/profile_core.py --backend attnopt
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_core import hf_core  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="attnopt")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args()
    b, s, h, hkv, d = 2, args.seq, 32, 8, 128
    mk = lambda n: torch.randn(b, s, n * d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = mk(h), mk(hkv), mk(hkv)
    grad = torch.randn(b, s, h * d, device="cuda", dtype=torch.bfloat16)
    fn = torch.compile(lambda *t: hf_core(*t, h, hkv), backend=args.backend)

    def step():
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).backward(grad)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))


if __name__ == "__main__":
    main()
