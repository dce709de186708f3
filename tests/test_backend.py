"""attnopt.backend checks every argument when it is built, not at the first compile."""
from __future__ import annotations

import pytest
import torch

import attnopt
from attnopt.demo_model import LlamaAttention


@pytest.mark.parametrize("args, kwargs, error, message", [
    ((), {"kernel": "bogus"}, ValueError, "unknown kernel 'bogus'; choose from auto, "),
    ((), {"kernel": None}, TypeError, "kernel must be a string"),
    ((), {"target": "bogus"}, ValueError, "target must be one of"),
    ((), {"target": "portable", "kernel": "math"}, ValueError, "cannot force kernel='math'"),
    ((), {"strict": "yes"}, TypeError, "strict must be True or False"),
    ((), {"on_result": 3}, TypeError, "on_result must be callable"),
    ((), {"dump_dir": 3}, TypeError, "dump_dir must be a path"),
    (("bogus",), {}, ValueError, "'bogus' is not a torch.compile backend"),
    (("attnopt",), {}, ValueError, "would run attnopt's passes twice"),
    ((3,), {}, TypeError, "inner must be a backend name or a callable"),
    (("aot_eager",), {"max_autotune": True}, ValueError, "only understood by inner='inductor'"),
    ((lambda gm, ex: gm,), {"max_autotune": True}, ValueError, "only understood by inner='inductor'"),
    (("inductor",), {"not_an_option": 1}, ValueError, r"\['not_an_option'\] are not Inductor options"),
])
def test_bad_arguments_fail_where_the_backend_is_built(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        attnopt.backend(*args, **kwargs)


def test_dump_dir_that_is_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        attnopt.backend(dump_dir=blocker)


def test_good_arguments_build_and_compile(tmp_path):
    seen = []
    backend = attnopt.backend("aot_eager", kernel="math", strict=True, dump_dir=tmp_path / "new",
                              on_result=lambda before, after, result: seen.append(result))
    attnopt.backend("inductor", max_autotune=False)  # a real Inductor option
    torch._dynamo.reset()
    model = LlamaAttention(64, 4, 2)
    x = torch.randn(2, 8, 64)
    torch.testing.assert_close(torch.compile(model, backend=backend)(x), model(x))
    torch._dynamo.reset()
    assert seen[-1].lowered == 1 and (tmp_path / "new" / "graph_000" / "index.html").exists()
