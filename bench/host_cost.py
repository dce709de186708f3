"""Host time of a compiled attention core on the CPU, one thread, tiny shapes: where the launch
path, not the arithmetic, decides. Reproduces the host-cost comparison without a GPU.

    python bench/host_cost.py                    # B=1 S=16 Hq=4 Hkv=2 D=16, float32, forward+backward
    python bench/host_cost.py --profile attnopt  # and where that variant's host time goes (cProfile)

Variants: Inductor on the code as written; attnopt (its default choice of call); attnopt forced to
the op (``kernel="cpu_flash"``); attnopt's SDPA-on-views target. Median µs per step over repeats.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attnopt  # noqa: E402
from attention_core import hf_core  # noqa: E402
from common import add_shape_args, write_json  # noqa: E402


def _steps_us(steps: dict, iters: int, repeats: int) -> dict:
    """Median µs per step of each callable, the variants interleaved in every repeat so that a
    slow spell of the machine falls on all of them alike."""
    for step in steps.values():
        for _ in range(iters):
            step()
    runs: dict = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t = time.perf_counter()
            for _ in range(iters):
                step()
            runs[name].append((time.perf_counter() - t) / iters * 1e6)
    return {name: statistics.median(r) for name, r in runs.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(p, batch=1, seq=16, iters=200, heads=4, kv_heads=2, head_dim=16)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--profile", choices=["attnopt", "attnopt op"], default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    b, s, h, hkv, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    torch.manual_seed(0)
    mk = lambda n: torch.randn(b, s, n * d, requires_grad=True)
    q, k, v = mk(h), mk(hkv), mk(hkv)
    grad = torch.randn(b, s, h * d)
    core = lambda *t: hf_core(*t, h, hkv)
    variants = {
        "inductor": torch.compile(core),
        "attnopt": torch.compile(core, backend="attnopt"),
        "attnopt op": torch.compile(core, backend=attnopt.backend(kernel="cpu_flash")),
        "attnopt sdpa on views": torch.compile(core, backend=attnopt.backend(target="portable")),
    }
    steps = {name: (lambda fn=fn: fn(q, k, v).backward(grad)) for name, fn in variants.items()}
    rows = [{"variant": name, "host_us": us} for name, us in _steps_us(steps, args.iters, args.repeats).items()]
    base = rows[0]["host_us"]
    print(f"host time per forward+backward, CPU, 1 thread, B={b} S={s} Hq={h} Hkv={hkv} D={d} float32, "
          f"torch {torch.__version__}")
    for r in rows:
        print(f"  {r['variant']:24} {r['host_us']:8.1f} µs  {r['host_us'] / base:5.2f}x Inductor")
    write_json("host_cost", {"torch": torch.__version__, "shape": vars(args), "rows": rows})
    if args.profile:
        fn = variants[args.profile]
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.iters):
            fn(q, k, v).backward(grad)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
