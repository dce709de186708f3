"""The command line: inspect and optimize on .pt2 files, their error paths, and demo."""
from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

import attnopt
from attnopt.__main__ import main
from attnopt.demo_model import LlamaAttention

ATTN = torch.ops.attnopt.attention.default


def _cli(*args: str, exe: tuple = (sys.executable, "-m", "attnopt")) -> subprocess.CompletedProcess:
    return subprocess.run([*exe, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def pt2(tmp_path_factory):
    torch.manual_seed(0)
    model = LlamaAttention(hidden_size=64, num_heads=4, num_kv_heads=2)
    path = tmp_path_factory.mktemp("pt2") / "attn.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 8, 64),)), path)
    return path


def test_inspect_prints_the_report_and_writes_dumps(pt2, tmp_path):
    proc = _cli("inspect", str(pt2), "--out", str(tmp_path / "dumps"))
    assert proc.returncode == 0, proc.stderr
    assert "1 lowered" in proc.stdout and "attnopt.attention" in proc.stdout and "cpu_flash" in proc.stdout
    assert "Traceback" not in proc.stderr
    folder = tmp_path / "dumps" / "graph_000"
    assert {"before.py", "after.py", "diff.patch", "report.txt", "report.json"} <= {p.name for p in folder.iterdir()}
    assert (folder / "report.txt").read_text().strip() in proc.stdout


def test_optimize_saves_a_program_that_loads_and_runs(pt2, tmp_path, capsys):
    out = tmp_path / "sub" / "opt.pt2"
    assert main(["optimize", str(pt2), str(out)]) == 0
    assert "1 lowered" in capsys.readouterr().out
    loaded = torch.export.load(out)
    assert sum(n.target is ATTN for n in loaded.graph.nodes) == 1
    x = torch.randn(2, 8, 64)
    torch.testing.assert_close(loaded.module()(x), torch.export.load(pt2).module()(x))
    assert main(["inspect", str(out)]) == 0
    assert "already calls attnopt.attention 1 time" in capsys.readouterr().out


def test_optimize_portable(pt2, tmp_path, capsys):
    code = main(["optimize", str(pt2), str(tmp_path / "p.pt2"), "--portable"])
    if "target" in inspect.signature(attnopt.optimize).parameters:
        assert code == 0
        assert not any(n.target is ATTN for n in torch.export.load(tmp_path / "p.pt2").graph.nodes)
    else:
        assert code == 1 and "--portable needs attnopt.optimize(target='portable')" in capsys.readouterr().err


def _bad_files(tmp_path, pt2) -> dict:
    text = tmp_path / "notes.pt2"
    text.write_text("not a model\n")
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(pt2.read_bytes()[:2000])
    checkpoint = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, checkpoint)
    other_zip = tmp_path / "other.pt2"
    with zipfile.ZipFile(other_zip, "w") as z:
        z.writestr("hello.txt", "hi")
    program = "not a torch.export program ("  # then torch's own first sentence on why
    return {tmp_path / "missing.pt2": "no such file", tmp_path: "not a file", text: program, truncated: program,
            checkpoint: program, other_zip: program}


@pytest.mark.parametrize("command", ["inspect", "optimize"])
def test_bad_files_give_one_line_errors(pt2, tmp_path, capsys, command):
    for path, expected in _bad_files(tmp_path, pt2).items():
        args = [command, str(path)] + ([str(tmp_path / "out.pt2")] if command == "optimize" else [])
        assert main(args) == 1, path
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert err.startswith(f"attnopt: error: {path}") and expected in err and "\n" not in err, err
        assert captured.out == ""
    assert not (tmp_path / "out.pt2").exists()


def test_bad_file_in_a_subprocess_prints_no_traceback(tmp_path):
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"\x00" * 64)
    proc = _cli("inspect", str(bad))
    assert proc.returncode == 1 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"attnopt: error: {bad}: not a torch.export program (") and line.endswith(")")


def test_unwritable_output_is_one_line(pt2, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["optimize", str(pt2), str(blocker / "out.pt2")]) == 1
    assert capsys.readouterr().err.strip().startswith(f"attnopt: error: {blocker / 'out.pt2'}: cannot save")


@pytest.mark.skipif(shutil.which("attnopt") is None, reason="attnopt is not installed as a console script")
def test_console_script(pt2):
    proc = _cli("inspect", str(pt2), exe=("attnopt",))
    assert proc.returncode == 0 and "1 lowered" in proc.stdout


def test_demo_still_runs():
    proc = _cli("demo", "--inner", "aot_eager", "--cpu")
    assert proc.returncode == 0, proc.stderr
    assert "1 lowered" in proc.stdout and "numerics check: PASS" in proc.stdout
