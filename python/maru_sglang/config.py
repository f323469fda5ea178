"""The backend's settings, read from SGLang's ``--hicache-storage-backend-extra-config``.

The keys are the original Maru SGLang backend's (``maru_server_url``, ``maru_pool_size``,
``maru_chunk_size_bytes``, ``maru_instance_id``, ``maru_timeout_ms``, ``maru_use_async_rpc``,
``maru_max_inflight``, ``maru_eager_map``), so existing launch configurations carry over, plus
``maru_namespace``, ``maru_pin_ttl_s`` and ``maru_index_reads``. This module does not import SGLang or torch.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from maru import _settings

__all__ = ["MaruSGLangConfig", "parse_size"]

logger = logging.getLogger(__name__)

_NAMESPACE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

#: Every key this backend reads; another ``maru_*`` key is a typo and gets a warning.
KNOWN_KEYS = frozenset(
    {
        "maru_server_url",
        "maru_pool_size",
        "maru_chunk_size_bytes",
        "maru_instance_id",
        "maru_timeout_ms",
        "maru_use_async_rpc",
        "maru_max_inflight",
        "maru_eager_map",
        "maru_namespace",
        "maru_pin_ttl_s",
        "maru_index_reads",
    }
)


def parse_size(value: object, name: str = "size") -> int:
    """Bytes from an int, a float without a fraction or a string such as ``"4G"``,
    ``"512MiB"``, ``"1.5g"``, ``"65536"``."""
    return _settings.parse_size(value, name, integral_floats=True)


def _as_bool(value: object, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    word = _settings.bool_word(value) if isinstance(value, str) else None
    if word is not None:
        return word
    raise ValueError(f"{name}={value!r}: expected true/false (or 1/0, yes/no, on/off)")


def _as_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, not a bool")
    try:
        n = int(value) if isinstance(value, (int, str)) else None
    except ValueError:
        n = None
    if n is None:
        raise ValueError(f"{name}={value!r} is not an integer")
    if n < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {n}")
    return n


def _as_seconds(value: object, name: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number of seconds, not a bool")
    try:
        s = float(value) if isinstance(value, (int, float, str)) else None
    except ValueError:
        s = None
    if s is None or s != s or s < 0 or s == float("inf"):
        raise ValueError(f"{name}={value!r}: expected a number of seconds >= 0")
    return s


@dataclass(frozen=True)
class MaruSGLangConfig:
    """Settings of one MaruStorage; ``from_extra_config`` validates them."""

    server_url: str = "tcp://localhost:5555"
    #: Bytes of the first shared-memory region this instance writes into (more regions of
    #: this size follow when it fills up).
    pool_size: int = 4 << 30
    #: Bytes per Maru page. None: exactly one SGLang host page, learned when the host pool
    #: is registered.
    chunk_size_bytes: int | None = None
    #: None: a random id. With several ranks, each rank's handler gets ``<id>-<rank tag>``.
    instance_id: str | None = None
    timeout_ms: int = 2000
    use_async_rpc: bool = True
    max_inflight: int = 64
    eager_map: bool = True
    #: Prefixes every key, so deployments sharing one Maru server do not see each other.
    namespace: str = "default"
    #: How long a pin taken by ``batch_exists`` waits for the ``batch_get_v1`` that uses it
    #: before it is released; 0 turns pins off.
    pin_ttl_s: float = 30.0
    #: Lookups and copies of contiguous pages from the server's key index in shared memory
    #: (no round trip, no pin; a page that changed meanwhile is a clean miss) whenever this
    #: host can read it; False keeps every read on the pin rule.
    index_reads: bool = True

    @staticmethod
    def from_extra_config(extra: dict[str, Any] | None) -> MaruSGLangConfig:
        """Reads the ``maru_*`` keys of SGLang's extra config; ValueError names a bad one."""
        extra = dict(extra or {})
        unknown = sorted(k for k in extra if k.startswith("maru_") and k not in KNOWN_KEYS)
        if unknown:
            logger.warning(
                "maru_sglang: ignoring unknown extra-config keys %s (known: %s)",
                ", ".join(unknown),
                ", ".join(sorted(KNOWN_KEYS)),
            )
        d = MaruSGLangConfig()
        url = extra.get("maru_server_url", d.server_url)
        if not isinstance(url, str) or not url:
            raise ValueError(f"maru_server_url={url!r}: expected tcp://host:port or unix:///path")
        if url.startswith("maru://"):
            # The form LMCache configurations use for the same server.
            url = "tcp://" + url[len("maru://") :]
        chunk = extra.get("maru_chunk_size_bytes")
        instance_id = extra.get("maru_instance_id")
        if instance_id is not None and (not isinstance(instance_id, str) or not instance_id):
            raise ValueError(f"maru_instance_id={instance_id!r}: expected a non-empty string")
        namespace = extra.get("maru_namespace", d.namespace)
        if not isinstance(namespace, str) or not _NAMESPACE.match(namespace):
            raise ValueError(f"maru_namespace={namespace!r}: expected 1-64 characters of A-Z a-z 0-9 . _ -")
        return MaruSGLangConfig(
            server_url=url,
            pool_size=parse_size(extra.get("maru_pool_size", d.pool_size), "maru_pool_size"),
            chunk_size_bytes=None if chunk is None else parse_size(chunk, "maru_chunk_size_bytes"),
            instance_id=instance_id,
            timeout_ms=_as_int(extra.get("maru_timeout_ms", d.timeout_ms), "maru_timeout_ms", 1),
            use_async_rpc=_as_bool(extra.get("maru_use_async_rpc", d.use_async_rpc), "maru_use_async_rpc"),
            max_inflight=_as_int(extra.get("maru_max_inflight", d.max_inflight), "maru_max_inflight", 1),
            eager_map=_as_bool(extra.get("maru_eager_map", d.eager_map), "maru_eager_map"),
            namespace=namespace,
            pin_ttl_s=_as_seconds(extra.get("maru_pin_ttl_s", d.pin_ttl_s), "maru_pin_ttl_s"),
            index_reads=_as_bool(extra.get("maru_index_reads", d.index_reads), "maru_index_reads"),
        )
