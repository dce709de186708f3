"""torchtitan's Llama 3 and Qwen 3 decoders with its flex attention backend, small, as torchtitan
writes them (torchtitan/models/attention.py, llama3/model, qwen3/model):

- attention masks made outside the model, once per batch (``model.get_attention_masks``), with
  ``create_block_mask(and_masks(causal, document | sliding window | fixed block), ...)``; the
  document mask reads the sequence indices cut at EOS tokens (``get_document_mask_mod``, in place
  writes included), or, in torchtitan's packed [T] format, document ids from positions that restart
  at 0 (``doc_ids[q_idx] == doc_ids[kv_idx]``, batch of one);
- projections viewed as [B, S, H, D], Llama's complex rotary embedding, Qwen's q/k RMSNorm and
  rotate-half rotary embedding; K/V repeated on [B, S, Hkv, D] (``repeat_kv``) or passed with
  fewer heads (``enable_gqa``); transposed to [B, H, S, D] for flex_attention and back, output
  ``.contiguous().view(B, S, -1)`` into ``wo``.

torchtitan computes the rotary embedding in float32 (``.float()``); here in float32 or the model's
dtype where that is wider, so that float64 runs compare at float64 precision.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, and_masks, create_block_mask, flex_attention

EOS = 3


@dataclass
class Args:
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    vocab_size: int = 32
    qwen: bool = False  # q/k norms, rotate-half rotary embedding, enable_gqa instead of repeat_kv
    mask: str = "block_causal"  # causal | block_causal | sliding_window | fixed_block
    window: int = 48
    block: int = 64


# --- masks, as torchtitan/models/attention.py makes them ------------------------------------------
def get_causal_mask_mod():
    def _causal_mask(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return _causal_mask


def get_document_mask_mod(batch: torch.Tensor, eos_id: int):
    eos_mask = batch == eos_id
    eos_mask[:, -1] = True
    cumulative_mask = torch.cumsum(torch.where(eos_mask, 1, 0), dim=1)
    sequence_indices = torch.zeros_like(cumulative_mask, dtype=torch.int32)
    sequence_indices[:, 1:] = cumulative_mask[:, :-1]

    def document_mask(b, h, q_idx, kv_idx):
        return sequence_indices[b, q_idx] == sequence_indices[b, kv_idx]

    return document_mask


def get_packed_document_mask_mod(positions: torch.Tensor):
    doc_ids = torch.cumsum((positions == 0).int(), dim=0) - 1

    def document_mask(b, h, q_idx, kv_idx):
        return doc_ids[q_idx] == doc_ids[kv_idx]

    return document_mask


def get_sliding_window_mask_mod(window_size: int):
    def sliding_window_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window_size)

    return sliding_window_mod


def get_fixed_block_mask_mod(fixed_block_size: int):
    def blocked_mask_mod(b, h, q_idx, kv_idx):
        return q_idx // fixed_block_size == kv_idx // fixed_block_size

    return blocked_mask_mod


def attention_masks(args: Args, tokens: torch.Tensor) -> BlockMask:
    """``model.get_attention_masks``: the BlockMask for a batch of token ids."""
    b, s = tokens.shape
    mods = [get_causal_mask_mod()]
    if args.mask == "block_causal":
        mods.append(get_document_mask_mod(tokens, EOS))
    elif args.mask == "sliding_window":
        mods.append(get_sliding_window_mask_mod(args.window))
    elif args.mask == "fixed_block":
        mods.append(get_fixed_block_mask_mod(args.block))
    batch = b if args.mask == "block_causal" else 1
    return create_block_mask(and_masks(*mods), batch, None, s, s, device=tokens.device)


def packed_attention_masks(positions: torch.Tensor) -> BlockMask:
    """torchtitan's packed format: [T] tokens, documents where positions restart at 0."""
    t = positions.shape[0]
    mask_mod = and_masks(get_causal_mask_mod(), get_packed_document_mask_mod(positions))
    return create_block_mask(mask_mod, 1, None, t, t, device=positions.device)


# --- the model --------------------------------------------------------------------------------------
def _rope_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 at least (torchtitan's ``.float()``), float64 kept."""
    return torch.promote_types(dtype, torch.float32)


def precompute_freqs_cis(dim: int, end: int, dtype: torch.dtype, theta: float = 500000.0) -> torch.Tensor:
    dtype = _rope_dtype(dtype)
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=dtype)[: (dim // 2)] / dim))
    freqs = torch.outer(torch.arange(end, dtype=dtype), freqs)
    return torch.polar(torch.ones_like(freqs), freqs)


def apply_rotary_emb(xq, xk, freqs_cis):
    xq_ = torch.view_as_complex(xq.to(_rope_dtype(xq.dtype)).reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.to(_rope_dtype(xk.dtype)).reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = freqs_cis[: xq.shape[1]].view(1, xq.shape[1], 1, -1)
    return torch.view_as_real(xq_ * freqs_cis).flatten(3).type_as(xq), \
        torch.view_as_real(xk_ * freqs_cis).flatten(3).type_as(xk)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_emb_cos_sin(xq, xk, freqs_cis):
    cos = torch.cat([freqs_cis.real, freqs_cis.real], -1)[: xq.shape[1]][None, :, None, :].to(xq.dtype)
    sin = torch.cat([freqs_cis.imag, freqs_cis.imag], -1)[: xq.shape[1]][None, :, None, :].to(xq.dtype)
    return xq * cos + rotate_half(xq) * sin, xk * cos + rotate_half(xk) * sin


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    bs, slen, n_kv_heads, head_dim = x.shape
    if n_rep == 1:
        return x
    return torch.unsqueeze(x, dim=3).expand(bs, slen, n_kv_heads, n_rep, head_dim) \
        .reshape(bs, slen, n_kv_heads * n_rep, head_dim)


class FlexAttentionWrapper(nn.Module):
    def forward(self, q, k, v, *, block_mask: BlockMask, scale=None, enable_gqa: bool = False):
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


class Attention(nn.Module):
    def __init__(self, args: Args):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.qwen = args.n_heads, args.n_kv_heads, args.qwen
        self.n_rep = args.n_heads // args.n_kv_heads
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        if args.qwen:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.inner_attention = FlexAttentionWrapper()

    def forward(self, x, freqs_cis, block_mask):
        bs, seqlen, _ = x.shape
        xq = self.wq(x).view(bs, seqlen, -1, self.head_dim)
        xk = self.wk(x).view(bs, seqlen, -1, self.head_dim)
        xv = self.wv(x).view(bs, seqlen, -1, self.head_dim)
        if self.qwen:
            xq, xk = self.q_norm(xq), self.k_norm(xk)
            xq, xk = apply_rotary_emb_cos_sin(xq, xk, freqs_cis)
            keys, values = xk, xv
        else:
            xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
            keys, values = repeat_kv(xk, self.n_rep), repeat_kv(xv, self.n_rep)
        xq, xk, xv = xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        output = self.inner_attention(xq, xk, xv, block_mask=block_mask, enable_gqa=self.qwen)
        output = output.transpose(1, 2).contiguous().view(bs, seqlen, -1)
        return self.wo(output)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(dim, 2 * dim, bias=False), nn.Linear(2 * dim, dim, bias=False), \
            nn.Linear(dim, 2 * dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: Args):
        super().__init__()
        self.attention, self.feed_forward = Attention(args), FeedForward(args.dim)
        self.attention_norm, self.ffn_norm = nn.RMSNorm(args.dim, eps=1e-5), nn.RMSNorm(args.dim, eps=1e-5)

    def forward(self, x, freqs_cis, block_mask):
        h = x + self.attention(self.attention_norm(x), freqs_cis, block_mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: Args, max_seq_len: int, dtype: torch.dtype):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = nn.RMSNorm(args.dim, eps=1e-5)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.to(dtype)
        self.register_buffer("freqs_cis", precompute_freqs_cis(args.dim // args.n_heads, max_seq_len, dtype),
                             persistent=False)

    def forward(self, tokens, block_mask):
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, self.freqs_cis, block_mask)
        return self.output(self.norm(h))


class MaskingTransformer(nn.Module):
    """The transformer with its mask made inside ``forward`` from the token ids (how a program is
    exported: a BlockMask is not an input torch.export takes)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        return self.model(tokens, attention_masks(self.model.args, tokens))


def tokens(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    """Token ids with a few EOS tokens per row (several documents)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(EOS + 1, 32, (batch, seq), generator=g)
    for row in range(batch):
        t[row, torch.randperm(seq, generator=g)[:3]] = EOS
    return t
