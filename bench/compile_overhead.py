"""attnopt's pass time against Inductor's compile time, for 8 to 64 transformers Llama layers.

The graph is the one Dynamo hands a backend for a training step (forward with loss); the model
is small in width because compile time depends on the graph, not on tensor sizes.

    python bench/compile_overhead.py                  # passes and Inductor, 8/16/32/64 layers
    python bench/compile_overhead.py --passes-only    # attnopt's passes alone (fast)

The graph lives on CUDA when a GPU is visible (Inductor then generates Triton), else on CPU
(C++); ``--device`` picks one.
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


def dynamo_graph(layers: int, device: str):
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).to(device)
    captured = []

    def capture(gm, example_inputs):
        captured.append((gm, example_inputs))
        return gm

    torch._dynamo.reset()
    ids = torch.randint(0, 256, (1, 64), device=device)
    torch.compile(model, backend=capture)(input_ids=ids, labels=ids, use_cache=False)
    return captured[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="8,16,32,64")
    p.add_argument("--passes-only", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    rows = []
    for layers in map(int, args.layers.split(",")):
        gm, example_inputs = dynamo_graph(layers, args.device)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            new_gm, result = optimize_graph(gm)
            times.append(time.perf_counter() - t)
        row = {"layers": layers, "nodes": len(gm.graph.nodes), "passes_s": statistics.median(times),
               "lowered": result.lowered}
        if not args.passes_only:
            from torch._inductor.compile_fx import compile_fx

            t = time.perf_counter()
            with torch._functorch.config.patch(enable_autograd_cache=False), \
                    torch._inductor.config.patch(fx_graph_cache=False):
                compile_fx(new_gm, example_inputs)
            row["inductor_s"] = time.perf_counter() - t
        rows.append(row)
        print(row, flush=True)
    env = environment()
    where = env.get("device", "cpu") if args.device == "cuda" else "cpu"
    print(f"\ncompile overhead, transformers Llama training graph on {args.device}; {where} torch {env['torch']}")
    print(f"{'layers':>6} {'nodes':>6} {'passes s':>9} {'per layer ms':>12} {'Inductor s':>10} {'share':>6}")
    for r in rows:
        ind = r.get("inductor_s")
        share = f"{100 * r['passes_s'] / ind:5.1f}%" if ind else "-"
        print(f"{r['layers']:6d} {r['nodes']:6d} {r['passes_s']:9.3f} {1000 * r['passes_s'] / r['layers']:12.1f} "
              f"{ind if ind else float('nan'):10.1f} {share:>6}")
    write_json("compile_overhead", {"env": env, "device": args.device, "rows": rows})


if __name__ == "__main__":
    main()
