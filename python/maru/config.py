"""MaruConfig: every field of the original, with its default, validated on creation."""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass

from ._settings import bool_word
from .errors import InvalidArgumentError

__all__ = ["MaruConfig", "MIB"]

MIB = 1024 * 1024

_ADDRESS = r"(?P<host>\[[^\]/]+\]|[^:/\[\]]+):(?P<port>\d{1,5})$"
_TCP = re.compile(r"^(?:tcp://)?" + _ADDRESS)
_HOST_PORT = re.compile("^" + _ADDRESS)


def _check_url(url: object) -> None:
    if not isinstance(url, str):
        raise InvalidArgumentError(f"server_url must be a str, not {type(url).__name__}")
    if url.startswith("unix://"):
        path = url[len("unix://") :]
        if not path.startswith("/"):
            raise InvalidArgumentError(f"invalid server_url {url!r}: unix:// needs an absolute path (unix:///path)")
        return
    m = _TCP.match(url)
    if m is None or not 0 < int(m.group("port")) < 65536:
        raise InvalidArgumentError(f"invalid server_url {url!r}: expected tcp://host:port or unix:///path")


def _env_bool(name: str) -> bool | None:
    """The value of a boolean environment variable, None when it is unset."""
    env = os.environ.get(name)
    if env is None:
        return None
    v = bool_word(env)
    if v is not None:
        return v
    raise InvalidArgumentError(f"{name}={env!r}: expected 1/0, true/false, yes/no or on/off")


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"{name} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise InvalidArgumentError(f"{name} must be >= {minimum}, got {value}")


@dataclass
class MaruConfig:
    """Configuration of a MaruHandler.

    ``MARU_EAGER_MAP`` overrides ``eager_map`` and ``MARU_STAT`` overrides ``enable_stats``
    (1/0, true/false, yes/no, on/off). ``instance_id=None`` (the default) gets a fresh
    UUID. Raises InvalidArgumentError (a ValueError) on invalid values.
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
    #: Maru's own: the tenant whose keys this handler sees and writes. "" (the default) is the
    #: shared namespace; handlers of different namespaces never see each other's keys.
    namespace: str = ""
    #: Maru's own: what a handler connected before ``os.fork()`` does in the child. False
    #: (default): every call raises ForkedHandlerError. True: the child's first call connects
    #: a session of its own. Either way the child never touches the parent's session or
    #: sockets, so the parent keeps working. (docs/RELIABILITY.md, "fork")
    reconnect_after_fork: bool = False
    #: Maru's own: the cluster secret file (mode 0600). Over TCP the handler proves it holds
    #: it, and checks the server does, before anything else. None: the MARU_SECRET_FILE
    #: environment variable, else no proof. ``maru up`` prints where its secret is.
    secret_file: str | None = None
    #: Maru's own: this host's path of the pool's file or device (for an FS_DAX pool, its
    #: directory), when it names it differently from the daemons' host. None: the
    #: MARU_POOL_PATH environment variable, else the path the server reports. The file's pool
    #: header must be the granting pool's, or mapping raises WrongPoolError.
    pool_path: str | None = None

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
        """Raises InvalidArgumentError (a ValueError) if any field is invalid."""
        _check_url(self.server_url)
        if not isinstance(self.instance_id, str) or not self.instance_id:
            raise InvalidArgumentError("instance_id must be a non-empty str")
        _check_int("chunk_size_bytes", self.chunk_size_bytes, 1)
        _check_int("pool_size", self.pool_size, 1)
        if self.pool_size < self.chunk_size_bytes:
            raise InvalidArgumentError(
                f"pool_size {self.pool_size} is smaller than chunk_size_bytes {self.chunk_size_bytes}"
            )
        _check_int("timeout_ms", self.timeout_ms, 1)
        _check_int("max_inflight", self.max_inflight, 1)
        rm = _HOST_PORT.match(self.rm_address) if isinstance(self.rm_address, str) else None
        if rm is None or not 0 < int(rm.group("port")) < 65536:
            raise InvalidArgumentError(f"invalid rm_address {self.rm_address!r}: expected host:port")
        names = ("auto_connect", "use_async_rpc", "eager_map", "auto_expand", "enable_stats", "busy_poll", "write_behind", "reconnect_after_fork")
        for name in names:
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgumentError(f"{name} must be a bool, not {type(getattr(self, name)).__name__}")
        if not isinstance(self.namespace, str):
            raise InvalidArgumentError(f"namespace must be a str, not {type(self.namespace).__name__}")
        if len(self.namespace.encode()) > 255:
            raise InvalidArgumentError("namespace must be at most 255 bytes (UTF-8)")
        if self.secret_file is not None and not isinstance(self.secret_file, str):
            raise InvalidArgumentError(f"secret_file must be a str path, not {type(self.secret_file).__name__}")
        if self.pool_path is not None and (not isinstance(self.pool_path, str) or not self.pool_path.startswith("/")):
            raise InvalidArgumentError(f"pool_path must be an absolute str path, not {self.pool_path!r}")
        if self.expand_size is not None:
            if not self.auto_expand:
                raise InvalidArgumentError("expand_size is set but auto_expand is False (it would never be used)")
            _check_int("expand_size", self.expand_size, self.chunk_size_bytes)
