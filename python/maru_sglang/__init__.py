"""SGLang HiCache L3 storage in Maru shared memory: ``maru_sglang.maru_storage.MaruStorage``.

SGLang loads it with ``--hicache-storage-backend dynamic`` (docs/SGLANG.md). Importing this
package does not import SGLang; ``MaruStorage`` does, on first access.
"""

from typing import Any

from .config import MaruSGLangConfig

__all__ = ["MaruSGLangConfig", "MaruStorage"]


def __getattr__(name: str) -> Any:
    if name == "MaruStorage":
        from .maru_storage import MaruStorage

        return MaruStorage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
