"""Every error a Maru call raises, in one hierarchy under :class:`MaruError`.

Each class is one kind of failure. ``MaruError`` is a ``RuntimeError`` (as every server and
connection error of the package always was, so ``except RuntimeError`` keeps catching them).
Where the documented handler API names a built-in exception for a case (``alloc`` raises
``RuntimeError`` when the handler is not connected or closed, ``ValueError`` when the size is
too large or the allocation fails), the class also derives from it, so ``except ValueError``
keeps working; other kinds derive from the built-in that fits them (``TimeoutError``,
``ConnectionError``, ``PermissionError``, ``OSError``). Every instance has ``code`` (a stable
name of the kind, or the server's error code, e.g. ``"PoolExhausted"``) and ``op`` (the
handler operation that failed, or ``""``).

- ``InvalidArgumentError`` (``ValueError``, ``TypeError``): an argument is missing, of the
  wrong type or out of range, or two arguments contradict each other; the message names it.
- ``InvalidKeyError`` (an ``InvalidArgumentError``): a key is empty, longer than the protocol
  carries, or not a str / bytes / int.
- ``PoolExhaustedError`` (``ValueError``): no page is free and no region could be had.
- ``PoolUnhealthyError`` (``ValueError``): the pool's file or device is gone, so the resource
  manager gives no new regions from it.
- ``NotConnectedError``: the handler is not connected (the message says why the last connect
  failed).
- ``HandlerClosedError``: the handler was closed.
- ``ForkedHandlerError``: the handler was connected in the parent of this forked process
  (see ``MaruConfig.reconnect_after_fork``).
- ``MaruTimeoutError`` (``TimeoutError``): no reply within ``timeout_ms``.
- ``ConnectFailedError`` (``ConnectionError``): the server cannot be reached, or refuses the
  handshake; ``ServerBusyError`` (a ``ConnectFailedError``) when it is at ``--max-clients``.
- ``ConnectionLostError`` (``ConnectionError``): a connection broke during a call;
  ``ServerLostError`` (a ``ConnectionLostError``) when the metadata server died or shut down
  (close the handler and connect a new one).
- ``PermissionDeniedError`` (``PermissionError``): a forged or stale token, or a region of
  another owner.
- ``ProtocolError``: a reply or a frame made no sense, or the protocol versions differ.
- ``MapFailedError`` (``OSError``): a region could not be mapped.
- ``WrongPoolError``: the file or device this host would map a region from is not the pool the
  region was granted from (its pool header carries another UUID, or none): this host's
  ``pool_path`` / ``MARU_POOL_PATH`` names the wrong device. Nothing was mapped.
- ``ServerError``: the server failed for a reason of its own (storage, internal, a service it
  needs is unavailable); ``code`` says which.
"""

from __future__ import annotations

__all__ = [
    "ConnectFailedError",
    "ConnectionLostError",
    "ForkedHandlerError",
    "HandlerClosedError",
    "InvalidArgumentError",
    "InvalidKeyError",
    "MapFailedError",
    "MaruError",
    "MaruTimeoutError",
    "NotConnectedError",
    "PermissionDeniedError",
    "PoolExhaustedError",
    "PoolUnhealthyError",
    "ProtocolError",
    "ServerBusyError",
    "ServerError",
    "ServerLostError",
    "WrongPoolError",
]


class MaruError(RuntimeError):
    """The base of every error Maru raises; ``code`` names the kind, ``op`` the operation.

    A subclass names its kind in its header, ``class X(MaruError, code="Kind")``; without
    one it keeps its base's ``code``.
    """

    code: str = "MaruError"
    op: str = ""

    def __init_subclass__(cls, code: str | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.code = code


class InvalidArgumentError(MaruError, ValueError, TypeError, code="InvalidArgument"):
    """An argument the call cannot use; the message names the argument."""


class InvalidKeyError(InvalidArgumentError, code="InvalidKey"):
    """A key that is empty, longer than the protocol allows, or of an unusable type."""


class PoolExhaustedError(MaruError, ValueError, code="PoolExhausted"):
    """No free page, and no region to be had (everything left is in use)."""


class PoolUnhealthyError(MaruError, ValueError, code="PoolUnhealthy"):
    """The pool's backing file or device is gone; no new region can come from it."""


class NotConnectedError(MaruError, code="NotConnected"):
    """The handler is not connected (yet); the message carries the last connect failure."""


class HandlerClosedError(MaruError, code="Closed"):
    """The handler was closed; create a new one."""


class ForkedHandlerError(MaruError, code="Forked"):
    """The handler's session belongs to the process this one was forked from."""


class MaruTimeoutError(MaruError, TimeoutError, code="Timeout"):
    """The server did not answer (or take the request) within ``timeout_ms``."""


class ConnectFailedError(MaruError, ConnectionError, code="ConnectFailed"):
    """The server could not be reached, or refused the handshake."""


class ServerBusyError(ConnectFailedError, code="TooManyClients"):
    """The server serves as many clients as it may (``--max-clients``)."""


class ConnectionLostError(MaruError, ConnectionError, code="ConnectionLost"):
    """A connection to the server broke during a call."""


class ServerLostError(ConnectionLostError, code="ServerLost"):
    """The metadata server was lost, and this handler's session with it."""


class PermissionDeniedError(MaruError, PermissionError, code="PermissionDenied"):
    """The server refused a handle: forged or stale token, or another owner's region."""


class ProtocolError(MaruError, code="BadReply"):
    """A reply that makes no sense, a frame the peer refused, or a version mismatch."""


class MapFailedError(MaruError, OSError, code="MapFailed"):
    """A region could not be mapped (its pool file is gone or too short)."""


class WrongPoolError(MaruError, code="WrongPool"):
    """The pool file this host maps is another pool than the one the region came from."""


class ServerError(MaruError, code="Internal"):
    """The server failed the request for a reason of its own (see ``code``)."""
