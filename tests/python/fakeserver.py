"""A fake metadata server for failure tests: it speaks just enough of the wire protocol to
answer the handshake (and, optionally, hand out one region backed by a real shm file), then
either never replies (a stalled server) or answers every other request with an error."""

from __future__ import annotations

import re
import socket
import struct
import threading
from pathlib import Path

MAGIC = int.from_bytes(b"MARU", "little")
HEADER = struct.Struct("<IHHHHQI")  # magic, version, type, flags, reserved, request id, length
HELLO, REQUEST_REGION, LIST_REGIONS = 0x0001, 0x0201, 0x0212
R_HELLO, R_ERROR, R_REGION = 0x8001, 0x8003, 0x8201
FLAG_RESPONSE, FLAG_ERROR = 1, 2


def _protocol_version() -> int:
    """The wire protocol version of this build, read from maru-proto's source so that the
    fake never lags behind a version change."""
    src = Path(__file__).resolve().parents[2] / "crates/maru-proto/src/lib.rs"
    m = re.search(r"pub const PROTOCOL_VERSION: u16 = (\d+);", src.read_text())
    assert m, f"PROTOCOL_VERSION not found in {src}"
    return int(m.group(1))


PROTOCOL_VERSION = _protocol_version()
ERROR_INTERNAL = 21


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<I", len(b)) + b


def _frame(msg_type: int, flags: int, request_id: int, payload: bytes) -> bytes:
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, msg_type, flags, 0, request_id, len(payload)) + payload


class FakeServer:
    """`mode`: "stall" (never answer after the handshake/region) or "error" (answer with
    `error_code`, ErrorCode::Internal by default). `region`: a (path, length) file to hand out for RequestRegion, or
    None to stall/err on it too."""

    def __init__(self, mode: str, region: tuple[Path, int] | None = None, error_code: int = ERROR_INTERNAL) -> None:
        self.mode = mode
        self.error_code = error_code
        self.region = region
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.url = "tcp://127.0.0.1:%d" % self.listener.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.requests: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise ConnectionError
            buf += chunk
        return buf

    def _region_payload(self) -> bytes:
        assert self.region is not None
        path, length = self.region
        handle = struct.pack("<Q", 1) + _str(str(path)) + struct.pack("<QQ", 0, length) + _str("fake:1") + b"\0" * 32
        # No pool UUID (all zeroes): the fake names no pool identity, so nothing is checked.
        access = _str(str(path)) + struct.pack("<QQQ", 0, length, 4096) + b"\0" * 16
        return handle + access

    def _serve(self, conn: socket.socket) -> None:
        try:
            while True:
                _, _, msg_type, _, _, rid, length = HEADER.unpack(self._read(conn, HEADER.size))
                self._read(conn, length)
                self.requests.append(msg_type)
                if msg_type == HELLO:
                    payload = _str("fake") + _str("fake-host") + b"\1" * 16
                    conn.sendall(_frame(R_HELLO, FLAG_RESPONSE, rid, payload))
                elif msg_type == REQUEST_REGION and self.region is not None:
                    conn.sendall(_frame(R_REGION, FLAG_RESPONSE, rid, self._region_payload()))
                elif self.mode == "error":
                    payload = struct.pack("<H", self.error_code) + _str("fake failure")
                    conn.sendall(_frame(R_ERROR, FLAG_RESPONSE | FLAG_ERROR, rid, payload))
                # "stall": swallow the request, never answer.
        except (ConnectionError, OSError):
            pass

    def connections(self) -> int:
        return len(self.conns)

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass
