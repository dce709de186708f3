"""Every script in examples/ runs on CPU, well within a minute, and passes its own numerics check."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.py"))


def test_examples_exist():
    assert {p.stem for p in EXAMPLES} >= {"transformers_compile", "export_save_load", "megatron_sbhd", "mla"}


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs(script, tmp_path):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "numerics check: PASS" in proc.stdout and "lowered" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - start < 60
