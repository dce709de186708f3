"""K/V repetition spellings around SDPA: those whose query head h reads key/value head h // R are
stripped (the op takes GQA natively), tilings (head h reads h % G) stay; an SDPA call given one
key/value head to broadcast (MQA, no ``enable_gqa``) is lowered with that head as is."""
from __future__ import annotations

import pytest

from tests.models.helpers import check_compiled, check_exported

from .qkv import B, D, G, H, R, S, bshd_out, case, sdpa, split_gqa

einops = pytest.importorskip("einops")


def mqa_broadcast(t):
    """One key/value head handed to SDPA, which broadcasts it over the query heads."""
    q, k, v = t.split([H * D, D, D], dim=-1)
    q = q.view(B, S, H, D).transpose(1, 2)
    k, v = (x.view(B, S, 1, D).transpose(1, 2) for x in (k, v))
    return bshd_out(sdpa(q, k, v, is_causal=True))


def mqa_repeat(t):
    """One key/value head tiled H times: every copy the same head, so GQA."""
    q, k, v = t.split([H * D, D, D], dim=-1)
    q = q.view(B, S, H, D).transpose(1, 2)
    k, v = (x.view(B, S, 1, D).transpose(1, 2).repeat(1, H, 1, 1) for x in (k, v))
    return bshd_out(sdpa(q, k, v, is_causal=True))


def gqa(repeat):
    return lambda t: bshd_out(sdpa(*split_gqa(t, repeat), is_causal=True))


def bshd_broadcast(t):
    """Repetition on [B, S, G, D] before the transpose, spelled with an index and broadcast_to."""
    q, k, v = t.split([H * D, G * D, G * D], dim=-1)
    k, v = (x.view(B, S, G, D)[:, :, :, None].broadcast_to(B, S, G, R, D).reshape(B, S, H, D) for x in (k, v))
    return bshd_out(sdpa(q.view(B, S, H, D).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)))


SPELLINGS = {  # name: (function, projection width, (stripped group, key/value heads the op reads))
    "mqa_broadcast": (mqa_broadcast, (H + 2) * D, (1, 1)),
    "mqa_repeat": (mqa_repeat, (H + 2) * D, (H, 1)),
    "index_expand_flatten": (gqa(lambda x: x[:, :, None].expand(B, G, R, S, D).flatten(1, 2)), (H + 2 * G) * D,
                             (R, G)),
    "einops_repeat": (gqa(lambda x: einops.repeat(x, "b h s d -> b (h r) s d", r=R)), (H + 2 * G) * D, (R, G)),
    "repeat_new_axis": (gqa(lambda x: x.unsqueeze(2).repeat(1, 1, R, 1, 1).flatten(1, 2)), (H + 2 * G) * D, (R, G)),
    "bshd_index_broadcast": (bshd_broadcast, (H + 2 * G) * D, (R, G)),
    "einops_tiling_kept": (gqa(lambda x: einops.repeat(x, "b h s d -> b (r h) s d", r=R)), (H + 2 * G) * D, (1, H)),
    "repeat_tiling_kept": (gqa(lambda x: x.repeat(1, R, 1, 1)), (H + 2 * G) * D, (1, H)),
}


def _assert_site(sites, expected) -> None:
    (site,) = sites
    assert site.status == "lowered", site.reason
    assert (site.gqa_group, site.heads) == (expected[0], (H, expected[1]))


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_compiled(name):
    fn, width, expected = SPELLINGS[name]
    _assert_site(check_compiled(*case(fn, width), rewritten=not name.endswith("_kept")), expected)


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_exported(name):
    fn, width, expected = SPELLINGS[name]
    _assert_site(check_exported(*case(fn, width), rewritten=not name.endswith("_kept"))[1], expected)
