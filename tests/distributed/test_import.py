"""``import attnopt`` works where torch.distributed is not available, and then registers nothing for it."""
from __future__ import annotations

import subprocess
import sys


def test_import_without_torch_distributed():
    code = ("import sys, torch; torch.distributed.is_available = lambda: False; import attnopt; "
            "assert 'attnopt.distributed.sharding' not in sys.modules; "
            "print(attnopt.attention(*[torch.randn(1, 2, 4, 8)] * 3).shape)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "torch.Size([1, 2, 4, 8])" in proc.stdout
