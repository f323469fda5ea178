"""Sessions, namespaces and pins as leases, from Python, against the real daemons.

A pin belongs to the handler that took it: another handler cannot unpin it, and it ends with
the handler's unpin, with its session (close, or the process killed), or when the server's
pin TTL passes without renew_pins(). Lookups never extend a pin.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from maru import MaruConfig, MaruHandler
from conftest import KIB, MIB, Cluster, ConfigFactory, running_cluster, wait_until

PINNER = r"""
import sys
from maru import MaruConfig, MaruHandler

url, key = sys.argv[1], sys.argv[2]
h = MaruHandler(MaruConfig(server_url=url, pool_size=1024 * 1024, chunk_size_bytes=65536))
assert h.pin(key), "the key to pin exists"
print("pinned", flush=True)
sys.stdin.readline()  # killed while waiting here
"""


@pytest.fixture
def short_ttl_cluster() -> Iterator[Cluster]:
    """A cluster whose pins live 0.5 s unless renewed."""
    with running_cluster("ttl", pool_size=64 * MIB, server_args=["--pin-ttl", "0.5"]) as c:
        yield c


def config(url: str, **kw: object) -> MaruConfig:
    return MaruConfig(server_url=url, pool_size=2 * MIB, chunk_size_bytes=64 * KIB, **kw)  # type: ignore[arg-type]


def test_a_sigkilled_pinners_pins_end_with_its_session(
    make_config: ConfigFactory, handlers: list[MaruHandler], key: Callable[[str], str], transport: str, cluster: Cluster
) -> None:
    owner = MaruHandler(make_config())
    handlers.append(owner)
    k = key("killed-pinner")
    assert owner.store(k, b"value")
    child = subprocess.Popen(
        [sys.executable, "-c", PINNER, cluster.url(transport), k],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline().strip()
        assert line == "pinned", child.stderr.read() if child.stderr else ""
        assert owner.delete_status(k) == "pinned"
        killed_at = time.monotonic()
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        # The kernel closes the child's sockets; the server ends its session and its pin with
        # it, long before the 30 s pin TTL could.
        wait_until("the killed pinner's pin to go", lambda: owner.delete_status(k) == "deleted", timeout=10)
        assert time.monotonic() - killed_at < 10
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_an_abandoned_pin_expires_and_an_exists_storm_does_not_extend_it(short_ttl_cluster: Cluster) -> None:
    url = short_ttl_cluster.tcp_url
    with MaruHandler(config(url)) as owner, MaruHandler(config(url)) as pinner:
        assert owner.store("k", b"v")
        pinned_at = time.monotonic()
        assert pinner.pin("k")
        lookups = 0
        status = "pinned"
        while status == "pinned" and time.monotonic() - pinned_at < 10:
            pinner.exists("k")
            pinner.batch_exists(["k", "k"])
            lookups += 1
            status = owner.delete_status("k")
        waited = time.monotonic() - pinned_at
        assert status == "deleted", "the abandoned pin never expired"
        assert waited >= 0.5, f"the pin went before its TTL ({waited:.3f} s)"
        assert lookups > 10
        assert owner.get_stats()["server"]["pins_expired"] >= 1
        assert not pinner.unpin("k")


def test_renew_pins_keeps_pins_past_their_ttl(short_ttl_cluster: Cluster) -> None:
    url = short_ttl_cluster.tcp_url
    with MaruHandler(config(url)) as owner, MaruHandler(config(url)) as pinner:
        assert owner.store("k", b"v")
        assert pinner.pin("k")
        started = time.monotonic()
        while time.monotonic() - started < 1.5:
            pinner.renew_pins()
            assert owner.delete_status("k") == "pinned"
            time.sleep(0.1)
        wait_until("the unrenewed pin to run out", lambda: owner.delete_status("k") == "deleted", timeout=10)


def test_unpinning_another_handlers_pin_is_refused(
    make_config: ConfigFactory, handlers: list[MaruHandler], key: Callable[[str], str]
) -> None:
    a, b = MaruHandler(make_config()), MaruHandler(make_config())
    handlers += [a, b]
    k = key("theirs")
    assert a.store(k, b"v") and a.pin(k)
    assert not b.unpin(k)
    assert b.batch_unpin([k]) == [False]
    assert not b.delete(k) and b.delete_status(k) == "pinned"
    assert a.unpin(k)
    assert b.delete_status(k) == "deleted"
    assert b.delete_status(k) == "not_found"


def test_namespaces_keep_their_keys_apart(
    make_config: ConfigFactory, handlers: list[MaruHandler], key: Callable[[str], str]
) -> None:
    red = MaruHandler(make_config(namespace="red"))
    blue = MaruHandler(make_config(namespace="blue"))
    shared = MaruHandler(make_config())
    handlers += [red, blue, shared]
    k = key("ns")
    assert red.store(k, b"red")
    for other in (blue, shared):
        assert not other.exists(k)
        assert other.retrieve(k) is None
        assert not other.pin(k)
        assert other.delete_status(k) == "not_found"
    assert blue.store(k, b"blue")
    red_info, blue_info = red.retrieve(k), blue.retrieve(k)
    assert red_info is not None and bytes(red_info.view) == b"red"
    assert blue_info is not None and bytes(blue_info.view) == b"blue"
    with pytest.raises(ValueError, match="namespace"):
        make_config(namespace="x" * 256)
