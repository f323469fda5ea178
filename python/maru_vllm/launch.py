"""Starting a vLLM engine with Maru's connector, as this repository's tests and benchmarks do.

Importing this module does not import vLLM; its functions do.
"""

from __future__ import annotations

from typing import Any

__all__ = ["cpu_engine", "kv_transfer_config"]


def kv_transfer_config(extra_config: dict[str, Any]) -> Any:
    """vLLM's ``KVTransferConfig`` that loads ``MaruKVConnector`` by module path, in both roles,
    recomputing whatever a failed load leaves out; `extra_config` is the connector's
    (``maru_server_url`` and the other ``maru_*`` settings)."""
    from vllm.config import KVTransferConfig

    return KVTransferConfig(
        kv_connector="MaruKVConnector",
        kv_connector_module_path="maru_vllm.connector",
        kv_role="kv_both",
        kv_load_failure_policy="recompute",
        kv_connector_extra_config=extra_config,
    )


def cpu_engine(model: str, kv: Any, **engine: Any) -> Any:
    """A vLLM ``LLM`` on token ids, eager, in float32, with vLLM's own prefix cache off (a
    repeated prompt goes through the connector again), and `kv` (a ``KVTransferConfig``, or
    None: no connector). `engine` adds the rest of the engine's arguments."""
    from vllm import LLM

    return LLM(
        model=model,
        skip_tokenizer_init=True,
        enforce_eager=True,
        dtype="float32",
        enable_prefix_caching=False,
        kv_transfer_config=kv,
        **engine,
    )
