"""Greedy decoding of a transformers Llama over a StaticCache, compiled: tokens/s.

    python bench/decode.py                # batch 1 and 8, 16 layers, hidden 2048, 32/8 heads
    python bench/decode.py --batch 8 --variants attnopt
    python bench/decode.py --profile      # and where each variant's step spends its device time

The model (random init, built from a config in code) prefills a prompt of ``--prompt`` tokens into
a cache of ``--cache`` tokens eagerly, then decodes ``--steps`` tokens one at a time through
``torch.compile``: Inductor with ``mode="reduce-overhead"`` (CUDA graphs), and attnopt with the
same Inductor option (``triton.cudagraphs``); eager for reference. Each variant starts from a
fresh prefill of the same prompt; the first decoded logits are compared with eager's. Tokens/s
come from the median step (CUDA events between consecutive steps, greedy token included).

``--profile`` adds, per variant, the device time of one step split into attention kernels and the
rest (``torch.profiler`` over steps compiled without CUDA graphs, which run the same kernels), and
the step's bandwidth limit: every weight and each layer's filled K/V read once at the measured
copy bandwidth (``decode_kernel.copy_bandwidth``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attnopt  # noqa: E402
from common import environment, write_json  # noqa: E402
from decode_kernel import copy_bandwidth  # noqa: E402

# kernels that compute attention: torch's SDPA kernels (cuDNN, flash, efficient), attnopt's
# split-KV decode; Inductor's own kernels named after an attention op they fused with are its
# inputs or outputs (a K/V repeat, a layout copy) and are counted apart, as "around attention"
ATTENTION_KERNELS = ("flash", "fmha", "sdpa", "cudnn", "_split_kernel", "_combine_kernel")
VARIANTS = {
    "eager": lambda f: f,
    "inductor": lambda f: torch.compile(f, mode="reduce-overhead", fullgraph=True),
    "attnopt": lambda f: torch.compile(f, backend=attnopt.backend(**{"triton.cudagraphs": True}), fullgraph=True),
}


def decode_run(model, prompt: torch.Tensor, cache_len: int, steps: int, variant: str) -> dict:
    """Prefill ``prompt`` eagerly, decode ``steps`` greedy tokens under ``variant``."""
    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    with torch.no_grad():
        logits = model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    step = VARIANTS[variant](lambda tok, c: model(tok, past_key_values=c, use_cache=True).logits[:, -1])
    tok = logits.argmax(-1, keepdim=True)
    first = None
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    t0 = time.perf_counter()
    with torch.no_grad(), attnopt.runtime_ops.trace_kernels() as calls:
        for i in range(steps + 3):  # three warm-up steps: compile, CUDA-graph warm-up and record
            if i == 3:
                torch.cuda.synchronize()
                warmup_s = time.perf_counter() - t0
            if i >= 3:
                marks[i - 3].record()
            torch.compiler.cudagraph_mark_step_begin()
            logits = step(tok, cache)
            if first is None:
                first = logits.float().clone()
            tok = logits.argmax(-1, keepdim=True)
        marks[-1].record()
        torch.cuda.synchronize()
    step_ms = statistics.median(a.elapsed_time(b) for a, b in zip(marks, marks[1:]))
    batch = prompt.shape[0]
    kernels = ",".join(sorted({c.kernel for c in calls})) or "(torch SDPA)"
    return {"variant": variant, "batch": batch, "tokens_per_s": 1e3 * batch / step_ms, "ms_per_step": step_ms,
            "warmup_s": warmup_s, "kernel": kernels, "first_logits": first}


def profile_step(model, prompt: torch.Tensor, cache_len: int, variant: str, steps: int = 8) -> dict:
    """Device µs per decode step in attention kernels, around them and in the rest, and the
    kernels that take most, without CUDA graphs."""
    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    compile_fn = {"eager": lambda f: f, "inductor": lambda f: torch.compile(f, fullgraph=True),
                  "attnopt": lambda f: torch.compile(f, backend="attnopt", fullgraph=True)}[variant]
    step = compile_fn(lambda tok, c: model(tok, past_key_values=c, use_cache=True).logits[:, -1])
    with torch.no_grad():
        logits = model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        tok = logits.argmax(-1, keepdim=True)
        for _ in range(3):
            tok = step(tok, cache).argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                tok = step(tok, cache).argmax(-1, keepdim=True)
            torch.cuda.synchronize()
    parts = {"attention": 0.0, "around attention": 0.0, "the rest": 0.0}
    kernels: dict = {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA or getattr(e, "is_user_annotation", False):
            continue  # host events, and annotations that span a range of kernels
        us = e.time_range.elapsed_us()
        name = e.name.lower()
        if not name.startswith("triton_") and any(k in name for k in ATTENTION_KERNELS):
            part = "attention"
        elif name.startswith("triton_") and "attention" in name:
            part = "around attention"
        else:
            part = "the rest"
        parts[part] += us
        kernels[e.name] = kernels.get(e.name, 0.0) + us
    top = sorted(kernels, key=kernels.get, reverse=True)[:6]
    return {**{f"{k} us": v / steps for k, v in parts.items()},
            "top_kernels": {n[:70]: kernels[n] / steps for n in top}}


def bandwidth_limit_ms(model, batch: int, filled: int, bandwidth: float) -> float:
    """Reading every weight and each layer's filled K/V once at ``bandwidth``."""
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * filled * head_dim * 2
    return (weights + kv) / bandwidth * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="*", default=[1, 8])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--prompt", type=int, default=4096)
    p.add_argument("--cache", type=int, default=8192)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--variants", default="eager,inductor,attnopt")
    p.add_argument("--profile", action="store_true", help="split each step's device time: attention and the rest")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("decode.py times CUDA decoding; no CUDA device is visible")
    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=args.layers,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=args.cache)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
    rows = []
    for batch in args.batch:
        prompt = torch.randint(0, cfg.vocab_size, (batch, args.prompt), device="cuda")
        ref = None
        for variant in args.variants.split(","):
            torch._dynamo.reset()
            row = decode_run(model, prompt, args.cache, args.steps, variant)
            first = row.pop("first_logits")
            ref = first if ref is None else ref
            row["rel_err_vs_first"] = float((first - ref).norm() / ref.norm())
            if args.profile:
                torch._dynamo.reset()
                row.update(profile_step(model, prompt, args.cache, variant))
            rows.append(row)
            torch.cuda.empty_cache()
    env = environment()
    bandwidth = copy_bandwidth()
    for r in rows:  # the prompt fills the cache; decoding adds --steps more keys, a few percent
        r["bandwidth_limit_ms"] = bandwidth_limit_ms(model, r["batch"], args.prompt, bandwidth)
    print(f"\nLlama decode: {args.layers} layers, hidden 2048, 32/8 heads, prompt {args.prompt}, cache {args.cache}, "
          f"bf16; {env.get('device')} torch {env['torch']}")
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; 'limit' reads every weight and the filled K/V once at it")
    print(f"{'batch':>5} {'variant':10} {'tokens/s':>10} {'ms/step':>8} {'limit ms':>8} {'warm-up s':>9} "
          f"{'logits err':>10} kernel")
    for r in rows:
        print(f"{r['batch']:5d} {r['variant']:10} {r['tokens_per_s']:10.0f} {r['ms_per_step']:8.2f} "
              f"{r['bandwidth_limit_ms']:8.2f} {r['warmup_s']:9.1f} {r['rel_err_vs_first']:10.1e} {r['kernel']}")
        if "attention us" in r:
            print(f"{'':16} device µs per step: attention {r['attention us']:.0f}, around attention "
                  f"{r['around attention us']:.0f}, the rest {r['the rest us']:.0f}")
            for name, us in r["top_kernels"].items():
                print(f"{'':20} {us:7.0f}  {name}")
    write_json("decode", {"env": env, "rows": rows})


if __name__ == "__main__":
    main()
