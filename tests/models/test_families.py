"""transformers families that each take a path no other model test covers: softcapping, MQA by
broadcast, fused QKV, learned position biases, in-place score arithmetic, attention sinks, a
two-sided window, ALiBi. Tiny configs built in code, training mode, float32, through torch.compile
and torch.export: logits and every parameter gradient match eager, and each site is lowered or left
as written for the reason given here."""
from __future__ import annotations

import pytest
import torch
import transformers as T
from torch import nn

from .helpers import check_compiled, check_exported

_TOK = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)
_D = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0, **_TOK)

FAMILIES = {
    # name: (config, attention implementations)
    "gemma2": (lambda: T.Gemma2Config(**_D, head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
                                      attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
               ("eager",)),
    "gpt_bigcode": (lambda: T.GPTBigCodeConfig(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                               multi_query=True, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                                               **_TOK), ("sdpa", "eager")),
    "gpt_neox": (lambda: T.GPTNeoXConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=128, max_position_embeddings=64, rotary_pct=0.5,
                                         attention_dropout=0.0, hidden_dropout=0.0, **_TOK), ("sdpa",)),
    "falcon_alibi": (lambda: T.FalconConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            multi_query=True, alibi=True, attention_dropout=0.0, hidden_dropout=0.0,
                                            **_TOK), ("sdpa", "eager")),  # eager: see LEFT
    "falcon": (lambda: T.FalconConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      multi_query=True, alibi=False, new_decoder_architecture=False,
                                      attention_dropout=0.0, hidden_dropout=0.0, **_TOK), ("eager",)),
    "gpt_oss": (lambda: T.GptOssConfig(**{**_D, "intermediate_size": 64}, head_dim=16, num_local_experts=4,
                                       num_experts_per_tok=2, sliding_window=5,
                                       layer_types=["sliding_attention", "full_attention"]), ("eager",)),
    "t5": (lambda: T.T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                              relative_attention_num_buckets=8, dropout_rate=0.0, **_TOK), ("sdpa", "eager")),
    "modernbert": (lambda: T.ModernBertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, intermediate_size=128,
                                              max_position_embeddings=64, local_attention=4,
                                              global_attn_every_n_layers=2, attention_dropout=0.0,
                                              embedding_dropout=0.0, mlp_dropout=0.0, cls_token_id=0, sep_token_id=0,
                                              **_TOK), ("sdpa", "eager")),
}
CASES = [(name, impl) for name, (_, impls) in FAMILIES.items() for impl in impls]
# (family, attention, entry point) whose sites stay as written, and the reason the report gives
LEFT = {
    ("falcon_alibi", "eager", "compile"): "two masks",  # ALiBi added, then the causal mask filled in
    ("falcon_alibi", "eager", "export"): "two masks",
    ("t5", "eager", "export"): "two masks",  # export adds the (all-keep) padding mask beside the position bias
}


class Hidden(nn.Module):
    """The model called on token ids, returning its last hidden state (the encoder's for T5)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        kwargs = {} if self.model.config.model_type in ("t5", "modernbert") else {"use_cache": False}
        return self.model(input_ids=ids, **kwargs).last_hidden_state


def _build(name: str, impl: str) -> tuple[nn.Module, tuple]:
    config = FAMILIES[name][0]()
    config._attn_implementation = impl
    torch.manual_seed(0)
    model = T.T5EncoderModel(config) if name == "t5" else T.AutoModel.from_config(config)
    return Hidden(model).train(), (torch.randint(1, 100, (2, 12)),)


def _check(sites, case: tuple) -> None:
    reason = LEFT.get(case)
    expected = ("skipped", reason) if reason else ("lowered", None)
    assert sites and all((s.status, s.reason) == expected for s in sites), [(s.name, s.reason) for s in sites]


@pytest.mark.parametrize("name,impl", CASES)
def test_compiled(name, impl):
    model, inputs = _build(name, impl)
    _check(check_compiled(model, inputs, rewritten=False, rtol=1e-4, atol=1e-4), (name, impl, "compile"))


@pytest.mark.parametrize("name,impl", CASES)
def test_exported(name, impl):
    model, inputs = _build(name, impl)
    _, sites = check_exported(model, inputs, rewritten=False, rtol=1e-4, atol=1e-4)
    _check(sites, (name, impl, "export"))
