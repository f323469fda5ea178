"""The connector's settings, read from vLLM's ``kv_connector_extra_config``.

The keys are the ones the original Maru connector reads (``maru_server_url``,
``maru_pool_size``, ``maru_chunk_size``, ``maru_kv_chunk_tokens``, ``maru_instance_id``,
``maru_eager_map``) plus Maru's own ``maru_namespace``. Sizes take integers or strings such as
``"4G"``, ``"512M"``, ``"64KiB"``. A bad value raises ``ValueError`` naming the key, at engine
start: a connector that cannot run must stop the engine, not degrade to recomputing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from maru import _settings

__all__ = ["ConnectorConfig", "parse_size", "DEFAULT_KV_CHUNK_TOKENS"]

DEFAULT_KV_CHUNK_TOKENS = 256
DEFAULT_POOL_SIZE = 1 << 30

_KNOWN = {
    "maru_server_url",
    "maru_pool_size",
    "maru_chunk_size",
    "maru_kv_chunk_tokens",
    "maru_instance_id",
    "maru_eager_map",
    "maru_namespace",
    "maru_timeout_ms",
}


def parse_size(name: str, value: object) -> int:
    """Bytes from an int or a string like ``"4G"`` / ``"512MiB"`` (binary units)."""
    return _settings.parse_size(value, name)


def _parse_bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    word = _settings.bool_word(value) if isinstance(value, str) else None
    if word is not None:
        return word
    raise ValueError(f"{name}={value!r}: expected true/false")


def _parse_int(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int, not a bool")
    try:
        n = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r}: expected an integer") from None
    if n <= 0:
        raise ValueError(f"{name} must be positive, got {n}")
    return n


@dataclass(frozen=True)
class ConnectorConfig:
    """Validated connector settings."""

    server_url: str = "tcp://localhost:5555"
    #: Shared-memory bytes this instance's worker may own (pages it writes chunks into).
    pool_size: int = DEFAULT_POOL_SIZE
    #: Bytes per Maru page. None: one page holds a whole chunk of every layer. A smaller page
    #: splits a chunk's layers over several keys ("parts"); it must hold one layer's chunk.
    page_size: int | None = None
    #: Tokens per stored chunk, a multiple of vLLM's block size.
    chunk_tokens: int = DEFAULT_KV_CHUNK_TOKENS
    instance_id: str | None = None
    eager_map: bool = True
    #: Mixed into every key: instances share chunks only within one namespace.
    namespace: str = ""
    timeout_ms: int = 2000

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> ConnectorConfig:
        extra = dict(extra or {})
        unknown = sorted(k for k in extra if k.startswith("maru_") and k not in _KNOWN)
        if unknown:
            raise ValueError(f"unknown kv_connector_extra_config keys {unknown}; known: {sorted(_KNOWN)}")
        url = extra.get("maru_server_url", cls.server_url)
        if not isinstance(url, str) or not url:
            raise ValueError(f"maru_server_url must be a non-empty str, got {url!r}")
        page = extra.get("maru_chunk_size")
        namespace = extra.get("maru_namespace", "")
        if not isinstance(namespace, str):
            raise ValueError(f"maru_namespace must be a str, got {type(namespace).__name__}")
        instance_id = extra.get("maru_instance_id")
        if instance_id is not None and (not isinstance(instance_id, str) or not instance_id):
            raise ValueError(f"maru_instance_id must be a non-empty str, got {instance_id!r}")
        return cls(
            server_url=url,
            pool_size=parse_size("maru_pool_size", extra.get("maru_pool_size", DEFAULT_POOL_SIZE)),
            page_size=None if page is None else parse_size("maru_chunk_size", page),
            chunk_tokens=_parse_int("maru_kv_chunk_tokens", extra.get("maru_kv_chunk_tokens", DEFAULT_KV_CHUNK_TOKENS)),
            instance_id=instance_id,
            eager_map=_parse_bool("maru_eager_map", extra.get("maru_eager_map", True)),
            namespace=namespace,
            timeout_ms=_parse_int("maru_timeout_ms", extra.get("maru_timeout_ms", 2000)),
        )
