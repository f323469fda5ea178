"""MaruConfig: every field of the original, with its default, validated on creation."""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass

__all__ = ["MaruConfig", "MIB"]

MIB = 1024 * 1024

_ADDRESS = r"(?P<host>\[[^\]/]+\]|[^:/\[\]]+):(?P<port>\d{1,5})$"
_TCP = re.compile(r"^(?:tcp://)?" + _ADDRESS)
_HOST_PORT = re.compile("^" + _ADDRESS)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _check_url(url: object) -> None:
    if not isinstance(url, str):
        raise ValueError(f"server_url must be a str, not {type(url).__name__}")
    if url.startswith("unix://"):
        path = url[len("unix://") :]
        if not path.startswith("/"):
            raise ValueError(f"invalid server_url {url!r}: unix:// needs an absolute path (unix:///path)")
        return
    m = _TCP.match(url)
    if m is None or not 0 < int(m.group("port")) < 65536:
        raise ValueError(f"invalid server_url {url!r}: expected tcp://host:port or unix:///path")


def _env_bool(name: str) -> bool | None:
    """The value of a boolean environment variable, None when it is unset."""
    env = os.environ.get(name)
    if env is None:
        return None
    v = env.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"{name}={env!r}: expected 1/0, true/false, yes/no or on/off")


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


@dataclass
class MaruConfig:
    """Configuration of a MaruHandler.

    ``MARU_EAGER_MAP`` overrides ``eager_map`` and ``MARU_STAT`` overrides ``enable_stats``
    (1/0, true/false, yes/no, on/off). ``instance_id=None`` (the default) gets a fresh
    UUID. Raises ValueError on invalid values.
    """

    server_url: str = "tcp://localhost:5555"
    #: None: a fresh random id (a str once the config is created).
    instance_id: str | None = None
    pool_size: int = 100 * MIB
    chunk_size_bytes: int = 1 * MIB
    auto_connect: bool = True
    timeout_ms: int = 2000
    use_async_rpc: bool = True
    max_inflight: int = 64
    eager_map: bool = True
    auto_expand: bool = True
    expand_size: int | None = None
    #: The resource manager's address as the original's clients needed it (host:port).
    #: Accepted and validated; Maru's metadata server tells clients where regions live,
    #: so the handler never contacts the resource manager itself.
    rm_address: str = "127.0.0.1:9850"
    #: The original's handler-side statistics reporting. Accepted; Maru's server keeps
    #: per-operation statistics for every client (``maru stats``) whatever this says.
    enable_stats: bool = False
    #: Maru's own: wait for a reply's first 50 µs by polling the socket instead of sleeping
    #: (faster calls; at most 50 µs of CPU per call; off while other calls of the process wait).
    busy_poll: bool = True
    #: Maru's own: store() sends the registration and returns without waiting for the reply,
    #: so a stream of stores costs the copies, not a round trip each. This handler's later
    #: calls see its stores; other instances see them after flush(). Off by default.
    write_behind: bool = False

    def __post_init__(self) -> None:
        if self.instance_id is None:
            self.instance_id = str(uuid.uuid4())
        eager_map = _env_bool("MARU_EAGER_MAP")
        if eager_map is not None:
            self.eager_map = eager_map
        enable_stats = _env_bool("MARU_STAT")
        if enable_stats is not None:
            self.enable_stats = enable_stats
        self.validate()

    def validate(self) -> None:
        """Raises ValueError if any field is invalid."""
        _check_url(self.server_url)
        if not isinstance(self.instance_id, str) or not self.instance_id:
            raise ValueError("instance_id must be a non-empty str")
        _check_int("chunk_size_bytes", self.chunk_size_bytes, 1)
        _check_int("pool_size", self.pool_size, 1)
        if self.pool_size < self.chunk_size_bytes:
            raise ValueError(
                f"pool_size {self.pool_size} is smaller than chunk_size_bytes {self.chunk_size_bytes}"
            )
        _check_int("timeout_ms", self.timeout_ms, 1)
        _check_int("max_inflight", self.max_inflight, 1)
        rm = _HOST_PORT.match(self.rm_address) if isinstance(self.rm_address, str) else None
        if rm is None or not 0 < int(rm.group("port")) < 65536:
            raise ValueError(f"invalid rm_address {self.rm_address!r}: expected host:port")
        names = ("auto_connect", "use_async_rpc", "eager_map", "auto_expand", "enable_stats", "busy_poll", "write_behind")
        for name in names:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, not {type(getattr(self, name)).__name__}")
        if self.expand_size is not None:
            if not self.auto_expand:
                raise ValueError("expand_size is set but auto_expand is False (it would never be used)")
            _check_int("expand_size", self.expand_size, self.chunk_size_bytes)
