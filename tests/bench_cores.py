"""The benchmarks' attention cores, importable by the tests (bench/ is not a package)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from structured_masks import chunked_core, decode_core, static_cache_core  # noqa: E402

__all__ = ["chunked_core", "decode_core", "static_cache_core"]
