"""transformers models as users batch them: plain causal batches, packed batches (position ids that
restart) and padded batches (a 2-D ``attention_mask``), through torch.compile and torch.export.

For every model and batch the sites are lowered, forward and backward match eager, and the mask
transformers builds in the graph no longer reaches attention where its structure is recognised
(the report says what became of it); the combinations attnopt does not lower say so.
"""
from __future__ import annotations

import pytest
import torch
import transformers as T
from torch import nn

from .helpers import check_compiled, check_exported

_SMALL = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
CONFIGS = {
    "llama": lambda: T.LlamaConfig(**_SMALL),
    "qwen3": lambda: T.Qwen3Config(head_dim=16, **_SMALL),
    "mistral": lambda: T.MistralConfig(sliding_window=5, **_SMALL),
    "llama4_text": lambda: T.Llama4TextConfig(attention_chunk_size=4, head_dim=16, no_rope_layers=[1, 1], **_SMALL),
    "gpt2": lambda: T.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, attn_pdrop=0.0, resid_pdrop=0.0,
                                 embd_pdrop=0.0),
    "bert": lambda: T.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
}
_PACKED = torch.cat([torch.arange(10), torch.arange(6)]).repeat(2, 1)
_PADDED = torch.tensor([[0, 0, 0] + [1] * 13, [1] * 16])
BATCHES = {"plain": None, "packed": ("position_ids", _PACKED), "padded": ("attention_mask", _PADDED)}

_BAND = {"llama": "k - q <= 0", "qwen3": "k - q <= 0", "gpt2": "k - q <= 0", "mistral": "k - q <= 0 & k - q >= -4"}
# (model, batch): what the report may say became of the mask; None: the graph had no mask (under
# torch.compile transformers passes is_causal=True itself when nothing else constrains attention)
EXPECTED = {
    **{(m, "plain"): (None, f"{band}: mask removed") for m, band in _BAND.items()},
    **{(m, "packed"): ("documents run as packed sequences (thd)",) for m in _BAND},
    **{(m, "padded"): ("dense mask removed, key padding passed as a [B, 1, 1, Sk] mask",) for m in (*_BAND, "bert")},
    ("llama4_text", "plain"): ("mask removed, chunks run as batches",),
    # Llama 4 chunks positions, not indices: in a packed batch each document's chunks start where its
    # positions do; it shifts its chunks by the number of left-padding tokens (a data-dependent
    # offset), which stays a mask
    ("llama4_text", "packed"): ("the chunks of each document run as packed sequences (thd)",),
    ("llama4_text", "padded"): ("mask not recognised: ",),
    ("bert", "plain"): (None, "all true: mask removed"),
}


class Batch(nn.Module):
    """A transformers base model called on token ids plus one batch tensor (or none)."""

    def __init__(self, model: nn.Module, extra: str | None):
        super().__init__()
        self.model, self.extra = model, extra

    def forward(self, ids: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        kwargs = {self.extra: extra[0]} if self.extra else {}
        if not self.model.config.is_encoder_decoder and self.model.config.model_type != "bert":
            kwargs["use_cache"] = False  # as in training; with a cache transformers ignores packing
        return self.model(input_ids=ids, **kwargs).last_hidden_state


def _build(name: str, batch: str) -> tuple[nn.Module, tuple]:
    config = CONFIGS[name]()
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    extra = BATCHES[batch]
    module = Batch(T.AutoModel.from_config(config).eval(), extra and extra[0])
    return module, (torch.randint(0, 100, (2, 16)), *([extra[1]] if extra else []))


def _check_reports(name: str, batch: str, sites) -> None:
    expected = EXPECTED[(name, batch)]
    assert sites and all(s.status == "lowered" for s in sites), [(s.name, s.reason) for s in sites]
    for s in sites:
        assert s.kernel in ("cpu_flash", "math"), s.kernel  # the report names the kernel each site will run
        assert any(s.mask is None if e is None else (s.mask is not None and e in s.mask) for e in expected), s.mask
        if s.mask is None or "removed" in s.mask:  # no dense mask: none at all, or only the padding vector
            assert s.has_mask == (batch == "padded"), s.mask


CASES = [(m, b) for m, b in EXPECTED]


@pytest.mark.parametrize("name,batch", CASES)
def test_compiled(name, batch):
    model, inputs = _build(name, batch)
    _check_reports(name, batch, check_compiled(model, inputs, rtol=1e-4, atol=1e-4))


@pytest.mark.parametrize("name,batch", CASES)
def test_exported(name, batch):
    model, inputs = _build(name, batch)
    _, sites = check_exported(model, inputs, atol=1e-4)
    _check_reports(name, batch, sites)
