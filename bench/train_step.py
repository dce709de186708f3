"""Training step of a transformers Llama (random init, built from a config in code).

Tokens/s, peak memory and the activations autograd saves for backward (measured with saved-tensor
hooks, so also on CPU) for eager, torch.compile (Inductor) and torch.compile(backend="attnopt"),
plus the time attnopt's passes take against Inductor's compile time.

    python bench/train_step.py                 # 16 layers, hidden 2048, 32/8 heads, S=4096, B=1, bf16
    python bench/train_step.py --small --cpu   # a tiny model on CPU, to try the script anywhere
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attnopt.passes import optimize_graph  # noqa: E402
from common import environment, write_json  # noqa: E402


def saved_activation_mib(step_loss) -> float:
    """MiB of distinct storages autograd saves for backward during one forward (any device)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step_loss()
    loss.backward()
    return sum(storages.values()) / 2**20


def timed_attnopt_backend(stats: dict):
    """backend="attnopt" with Inductor inside, timing the passes and the inner compile apart."""
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        t0 = time.perf_counter()
        new_gm, result = optimize_graph(gm)
        t1 = time.perf_counter()
        with torch._functorch.config.patch(enable_autograd_cache=False), \
                torch._inductor.config.patch(fx_graph_cache=False):  # time a real compile, not a cache hit
            compiled = compile_fx(new_gm, example_inputs)
        t2 = time.perf_counter()
        stats["passes_s"] = stats.get("passes_s", 0.0) + t1 - t0
        stats["inductor_s"] = stats.get("inductor_s", 0.0) + t2 - t1
        stats["sites"] = stats.get("sites", 0) + len(result.sites)
        stats["lowered"] = stats.get("lowered", 0) + result.lowered
        return compiled

    return backend


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--variants", default="eager,inductor,attnopt")
    p.add_argument("--small", action="store_true", help="2 layers, hidden 256, S=512")
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args()
    device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.small:
        cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                          num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=args.seq)
    else:
        cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=args.layers,
                          num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=args.seq)
    cfg._attn_implementation = "sdpa"
    seq = 512 if args.small else args.seq
    rows = []
    for variant in args.variants.split(","):
        torch.manual_seed(0)
        torch._dynamo.reset()
        model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
        stats: dict = {}
        if variant == "inductor":
            fwd = torch.compile(model)
        elif variant == "attnopt":
            fwd = torch.compile(model, backend=timed_attnopt_backend(stats))
        else:
            fwd = model
        ids = torch.randint(0, cfg.vocab_size, (1, seq), device=device)

        def forward_loss():
            return fwd(input_ids=ids, labels=ids, use_cache=False).loss

        def step():
            loss = forward_loss()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        t0 = time.perf_counter()
        loss0 = float(step())
        first = time.perf_counter() - t0
        step()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        saved = saved_activation_mib(forward_loss)
        opt.zero_grad(set_to_none=True)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        rows.append({"variant": variant, "step_ms": med * 1e3, "tokens_per_s": seq / med, "peak_gib": peak,
                     "saved_mib": saved,
                     "first_step_s": first, "loss0": loss0, **stats})
        if device == "cuda":  # the next variant starts from an empty cache
            model = opt = fwd = None
            torch.cuda.empty_cache()
    env = environment()
    print(f"\nLlama train step: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, S={seq}, B=1, {dtype}, AdamW; "
          f"{env.get('device', 'cpu')} torch {env['torch']}")
    print(f"{'variant':10} {'step ms':>9} {'tokens/s':>10} {'peak GiB':>9} {'saved MiB':>10} {'1st step s':>10} "
          f"{'loss0':>7}  notes")
    for r in rows:
        notes = ""
        if "passes_s" in r:
            notes = (f"attnopt passes {r['passes_s']:.2f} s vs Inductor {r['inductor_s']:.1f} s "
                     f"({100 * r['passes_s'] / r['inductor_s']:.1f}%), {r['lowered']}/{r['sites']} sites lowered")
        print(f"{r['variant']:10} {r['step_ms']:9.1f} {r['tokens_per_s']:10.0f} {r['peak_gib']:9.2f} "
              f"{r['saved_mib']:10.1f} {r['first_step_s']:10.1f} {r['loss0']:7.3f}  {notes}")
    write_json("train_step", {"env": env, "rows": rows})


if __name__ == "__main__":
    main()
