"""One decode attention call against the bandwidth limit: the time to read the filled K/V once.

    python bench/decode_kernel.py                  # batch 8, cache 8192 with 4096 filled, 32/8 heads, D=128
    python bench/decode_kernel.py --tune           # and the split-KV kernel's launch configurations

The call is ``attnopt.attention`` on a [B, Hkv, cache, D] bf16 cache with per-batch key lengths
(``seqused_k``), as attnopt lowers transformers' StaticCache mask, captured in a CUDA graph and
replayed (its device time, as inside a captured decode step). The limit is the filled K/V bytes
divided by the measured copy bandwidth (bytes read plus bytes written by a device-to-device copy of
1 GiB, per second), i.e. the time a kernel that reads the filled keys and values once at the speed
a copy moves memory would take.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attnopt  # noqa: E402
from attnopt.runtime_ops.kernels import decode as decode_kernel  # noqa: E402
from common import environment, graph_replay_ms, time_ms, write_json  # noqa: E402


def copy_bandwidth(gib: float = 1.0) -> float:
    """Bytes per second a device-to-device copy moves (read + written)."""
    n = int(gib * 2**30)
    src, dst = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, device="cuda")
    ms = time_ms(lambda: dst.copy_(src), warmup=5, iters=20)["median_ms"]
    return 2 * n / (ms / 1e3)


def cache_inputs(batch: int, heads: int, kv_heads: int, dim: int, cache: int, filled: int):
    torch.manual_seed(0)
    q = torch.randn(batch, heads, 1, dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, kv_heads, cache, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lengths = torch.full((batch,), filled, device="cuda", dtype=torch.int32)
    return q, k, v, lengths


def kv_read_us(batch: int, kv_heads: int, dim: int, filled: int, bandwidth: float) -> float:
    return 2 * batch * kv_heads * filled * dim * 2 / bandwidth * 1e6


def op_us(q, k, v, lengths, kernel: str) -> float:
    call = lambda: attnopt.attention(q, k, v, seqused_k=lengths, layout="bhsd", kernel=kernel)
    return 1e3 * graph_replay_ms(call)["median_ms"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", default="32/8")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--cache", type=int, default=8192)
    p.add_argument("--filled", type=int, default=4096)
    p.add_argument("--tune", action="store_true", help="time the split-KV kernel's launch configurations")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("decode_kernel.py times CUDA kernels; no CUDA device is visible")
    h, hkv = map(int, args.heads.split("/"))
    b, d = args.batch, args.head_dim
    q, k, v, lengths = cache_inputs(b, h, hkv, d, args.cache, args.filled)
    bandwidth = copy_bandwidth()
    limit = kv_read_us(b, hkv, d, args.filled, bandwidth)
    ref = attnopt.attention(q.double(), k[:, :, :args.filled].double(), v[:, :, :args.filled].double(), layout="bhsd")
    rows = []
    for kernel in ("decode", "flash"):
        out = attnopt.attention(q, k, v, seqused_k=lengths, layout="bhsd", kernel=kernel)
        err = float((out.double() - ref).norm() / ref.norm())
        us = op_us(q, k, v, lengths, kernel)
        rows.append({"kernel": kernel, "us": us, "vs_kv_read": us / limit, "rel_err": err})
    env = environment()
    print(f"{env.get('device')} torch {env['torch']}; copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)")
    print(f"batch {b}, {h}/{hkv} heads, D={d}, cache {args.cache} with {args.filled} filled: reading the filled "
          f"K/V once takes {limit:.1f} us")
    for r in rows:
        print(f"  {r['kernel']:8} {r['us']:7.1f} us  {r['vs_kv_read']:5.2f}x the K/V read  rel err {r['rel_err']:.1e}")
    tuned = []
    if args.tune:
        scale, sms = d ** -0.5, torch.cuda.get_device_properties(0).multi_processor_count
        for block, warps, stages, per_sm in itertools.product((32, 64, 128), (2, 4, 8), (2, 3), (4, 8, 16)):
            per_split = decode_kernel.split_len(b, hkv, args.cache, sms, block, per_sm)
            call = lambda: decode_kernel.decode(q, k, v, lengths, scale, block=block, warps=warps, stages=stages,
                                                keys_per_split=per_split)
            try:
                us = 1e3 * graph_replay_ms(call, iters=50, repeats=3)["median_ms"]
            except Exception as e:  # noqa: BLE001 - a configuration the compiler rejects (shared memory)
                print(f"  block {block} warps {warps} stages {stages} {per_sm}/SM: {type(e).__name__}")
                continue
            tuned.append({"block": block, "warps": warps, "stages": stages, "ctas_per_sm": per_sm,
                          "keys_per_split": per_split, "us": us})
        tuned.sort(key=lambda r: r["us"])
        print("fastest split-KV configurations:")
        for r in tuned[:8]:
            print(f"  block {r['block']:3d} warps {r['warps']} stages {r['stages']} {r['ctas_per_sm']:2d}/SM "
                  f"({r['keys_per_split']} keys a split): {r['us']:.1f} us")
    write_json(f"decode_kernel_batch{b}", {"env": env, "copy_bandwidth": bandwidth, "kv_read_us": limit, "rows": rows,
                                           "tuned": tuned})


if __name__ == "__main__":
    main()
