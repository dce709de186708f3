"""Training step of a decoder stack (random init, built in code): tokens/s and peak memory.

Tokens/s, peak memory and the activations autograd saves for backward (measured with saved-tensor
hooks, so also on CPU) for eager, torch.compile (Inductor) and torch.compile(backend="attnopt"),
plus the time attnopt's passes take against Inductor's compile time.

    python bench/train_step.py                   # transformers Llama: 16 layers, hidden 2048, 32/8 heads
    python bench/train_step.py --model mla       # transformers DeepSeek-V3 attention (MLA), dense MLPs
    python bench/train_step.py --model megatron  # a Megatron-style GPT on [S, B, hidden] activations
    python bench/train_step.py --documents 4     # Llama on packed rows: 4 documents, position ids restart
    python bench/train_step.py --small --cpu     # 2 layers of hidden 256 on CPU, to try the script anywhere

All at S=4096, B=1 (``--seq``, ``--batch``), bf16, fused AdamW on the GPU.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, LlamaConfig, LlamaForCausalLM

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


class MegatronBlock(nn.Module):
    """megatron-core's local transformer layer on [S, B, hidden]: pre-norm, one fused QKV
    projection viewed per query group and split, K/V repeated with ``repeat_interleave``,
    ``transpose(0, 1).contiguous()`` to batch-first around SDPA and back, SwiGLU MLP."""

    def __init__(self, hidden: int, heads: int, groups: int, ffn: int):
        super().__init__()
        self.heads, self.groups, self.head_dim = heads, groups, hidden // heads
        self.norm1, self.norm2 = nn.RMSNorm(hidden), nn.RMSNorm(hidden)
        self.linear_qkv = nn.Linear(hidden, (heads + 2 * groups) * self.head_dim, bias=False)
        self.linear_proj = nn.Linear(hidden, hidden, bias=False)
        self.fc1 = nn.Linear(hidden, 2 * ffn, bias=False)
        self.fc2 = nn.Linear(ffn, hidden, bias=False)

    def attention(self, x: Tensor) -> Tensor:
        s, b, _ = x.shape
        per_group, d = self.heads // self.groups, self.head_dim
        mixed = self.linear_qkv(x).view(s, b, self.groups, (per_group + 2) * d)
        q, k, v = torch.split(mixed, [per_group * d, d, d], dim=3)
        q = q.reshape(s, b, self.heads, d)
        k, v = (t.repeat_interleave(per_group, dim=2) for t in (k, v))
        q, k, v = (t.transpose(0, 1).contiguous().transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.linear_proj(out.transpose(1, 2).transpose(0, 1).contiguous().view(s, b, -1))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.norm1(x))
        gate, up = self.fc1(self.norm2(x)).chunk(2, dim=-1)
        return x + self.fc2(F.silu(gate) * up)


class MegatronGPT(nn.Module):
    """Embedding, Megatron blocks on [S, B, hidden], output layer and cross-entropy loss."""

    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, groups: int, ffn: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(MegatronBlock(hidden, heads, groups, ffn) for _ in range(layers))
        self.norm = nn.RMSNorm(hidden)
        self.output = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids.t())  # [S, B, hidden]
        for block in self.blocks:
            x = block(x)
        logits = self.output(self.norm(x)).float()
        return F.cross_entropy(logits[:-1].flatten(0, 1), ids.t()[1:].flatten())


def build(name: str, layers: int, seq: int, small: bool) -> tuple[nn.Module, int, str]:
    """(model, vocab size, description) for ``name``; ``small``: 2 layers of hidden 256."""
    vocab, hidden, ffn, heads = (1000, 256, 512, 8) if small else (32000, 2048, 8192, 32)
    layers = 2 if small else layers
    if name == "megatron":
        model = MegatronGPT(vocab, hidden, layers, heads=heads, groups=heads // 4, ffn=ffn)
        return model, vocab, (f"Megatron-style GPT on [S, B, hidden], {layers} layers, hidden {hidden}, "
                              f"{heads} heads in {heads // 4} groups, SwiGLU {ffn}")
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                  max_position_embeddings=seq)
    if name == "llama":
        cfg = LlamaConfig(num_attention_heads=heads, num_key_value_heads=heads // 4, **common)
        desc = f"transformers Llama, {layers} layers, hidden {hidden}, {heads}/{heads // 4} heads, intermediate {ffn}"
        model_cls = LlamaForCausalLM
    else:
        h, rope, nope, v, q_rank, kv_rank = (heads // 2, 64, 128, 128, 1536, 512) if not small \
            else (heads // 2, 16, 32, 32, 128, 64)
        cfg = DeepseekV3Config(num_attention_heads=h, num_key_value_heads=h, q_lora_rank=q_rank, kv_lora_rank=kv_rank,
                               qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v, first_k_dense_replace=layers,
                               n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=ffn // 8, n_group=1,
                               topk_group=1, **common)
        desc = (f"transformers DeepSeek-V3 attention (MLA: q/k head dim {nope + rope}, v {v}, kv rank {kv_rank}), "
                f"{layers} layers, hidden {hidden}, {h} heads, dense MLPs {ffn}")
        model_cls = DeepseekV3ForCausalLM
    cfg._attn_implementation = "sdpa"
    return model_cls(cfg), vocab, desc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["llama", "mla", "megatron"], default="llama")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--variants", default="eager,inductor,attnopt")
    p.add_argument("--small", action="store_true", help="2 layers, hidden 256, S=512 (any --model)")
    p.add_argument("--documents", type=int, default=1,
                   help="documents packed per row (transformers models: position ids restart at each)")
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args()
    device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    seq = 512 if args.small else args.seq
    rows = []
    for variant in args.variants.split(","):
        torch.manual_seed(0)
        torch._dynamo.reset()
        model, vocab, desc = build(args.model, args.layers, seq, args.small)
        model = model.to(device=device, dtype=dtype)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
        stats: dict = {}
        if variant == "inductor":
            fwd = torch.compile(model)
        elif variant == "attnopt":
            fwd = torch.compile(model, backend=timed_attnopt_backend(stats))
        else:
            fwd = model
        ids = torch.randint(0, vocab, (args.batch, seq), device=device)
        packed = {}
        if args.documents > 1:
            if isinstance(model, MegatronGPT) or seq % args.documents:
                sys.exit("--documents needs a transformers model and a sequence it divides")
            packed["position_ids"] = torch.arange(seq // args.documents, device=device).repeat(1, args.documents)

        def forward_loss():
            if isinstance(model, MegatronGPT):
                return fwd(ids)
            return fwd(input_ids=ids, labels=ids, use_cache=False, **packed).loss

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
        rows.append({"variant": variant, "step_ms": med * 1e3, "tokens_per_s": args.batch * seq / med, "peak_gib": peak,
                     "saved_mib": saved,
                     "first_step_s": first, "loss0": loss0, **stats})
        if device == "cuda":  # the next variant starts from an empty cache
            model = opt = fwd = None
            torch.cuda.empty_cache()
    env = environment()
    docs = f", {args.documents} documents per row" if args.documents > 1 else ""
    print(f"\ntrain step: {desc}; S={seq}, B={args.batch}{docs}, {dtype}, AdamW; {env.get('device', 'cpu')} torch {env['torch']}")
    print(f"{'variant':10} {'step ms':>9} {'tokens/s':>10} {'peak GiB':>9} {'saved MiB':>10} {'1st step s':>10} "
          f"{'loss0':>7}  notes")
    for r in rows:
        notes = ""
        if "passes_s" in r:
            notes = (f"attnopt passes {r['passes_s']:.2f} s vs Inductor {r['inductor_s']:.1f} s "
                     f"({100 * r['passes_s'] / r['inductor_s']:.1f}%), {r['lowered']}/{r['sites']} sites lowered")
        print(f"{r['variant']:10} {r['step_ms']:9.1f} {r['tokens_per_s']:10.0f} {r['peak_gib']:9.2f} "
              f"{r['saved_mib']:10.1f} {r['first_step_s']:10.1f} {r['loss0']:7.3f}  {notes}")
    name = "train_step" + ("" if args.model == "llama" else f"_{args.model}") + f"_s{seq}_b{args.batch}" + \
        (f"_{args.documents}docs" if args.documents > 1 else "")
    write_json(name, {"env": env, "model": desc, "documents": args.documents, "rows": rows})


if __name__ == "__main__":
    main()
