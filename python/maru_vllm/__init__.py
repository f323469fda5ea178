"""Maru for vLLM: instances reuse each other's prefill KV through shared memory.

Load the connector by module path (nothing to register)::

    KVTransferConfig(
        kv_connector="MaruKVConnector",
        kv_connector_module_path="maru_vllm.connector",
        kv_role="kv_both",
        kv_load_failure_policy="recompute",
        kv_connector_extra_config={"maru_server_url": "unix:///dev/shm/maru/maru-5555.sock"},
    )

Importing this package does not import vLLM; ``maru_vllm.connector`` does.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MaruKVConnector", "ConnectorConfig"]


def __getattr__(name: str) -> Any:
    if name == "MaruKVConnector":
        from .connector import MaruKVConnector

        return MaruKVConnector
    if name == "ConnectorConfig":
        from .config import ConnectorConfig

        return ConnectorConfig
    raise AttributeError(f"module 'maru_vllm' has no attribute {name!r}")
