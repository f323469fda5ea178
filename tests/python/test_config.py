"""MaruConfig: defaults, validation, the MARU_EAGER_MAP override, and import paths."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

import maru
from maru import MaruConfig, MaruHandler

MIB = 1024 * 1024


def test_every_field_has_the_original_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MARU_EAGER_MAP", raising=False)
    c = MaruConfig()
    assert c.server_url == "tcp://localhost:5555"
    assert uuid.UUID(c.instance_id).version == 4
    assert c.instance_id != MaruConfig().instance_id
    assert c.pool_size == 100 * MIB
    assert c.chunk_size_bytes == 1 * MIB
    assert c.auto_connect is True
    assert c.timeout_ms == 2000
    assert c.use_async_rpc is True
    assert c.max_inflight == 64
    assert c.eager_map is True
    assert c.auto_expand is True
    assert c.expand_size is None
    assert c.busy_poll is True


@pytest.mark.parametrize(
    "kw",
    [
        {"chunk_size_bytes": 0},
        {"chunk_size_bytes": -4096},
        {"pool_size": MIB - 1},
        {"pool_size": 0},
        {"auto_expand": False, "expand_size": 8 * MIB},
        {"expand_size": 1024},
        {"timeout_ms": 0},
        {"max_inflight": 0},
        {"server_url": "http://localhost:5555"},
        {"server_url": "tcp://localhost"},
        {"server_url": "tcp://localhost:99999"},
        {"server_url": "unix://relative.sock"},
        {"server_url": 5555},
        {"instance_id": ""},
        {"pool_size": "100"},
        {"chunk_size_bytes": True},
        {"eager_map": "yes"},
        {"busy_poll": 1},
    ],
)
def test_invalid_values_raise_value_error(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        MaruConfig(**kw)


def test_unix_and_tcp_urls_are_accepted() -> None:
    assert MaruConfig(server_url="unix:///run/maru/server.sock").server_url.startswith("unix://")
    MaruConfig(server_url="tcp://127.0.0.1:1")
    MaruConfig(server_url="tcp://[::1]:5555")
    MaruConfig(auto_expand=True, expand_size=4 * MIB)


def test_maru_eager_map_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARU_EAGER_MAP", "0")
    assert MaruConfig().eager_map is False
    assert MaruConfig(eager_map=True).eager_map is False
    monkeypatch.setenv("MARU_EAGER_MAP", "true")
    assert MaruConfig(eager_map=False).eager_map is True
    monkeypatch.setenv("MARU_EAGER_MAP", "maybe")
    with pytest.raises(ValueError):
        MaruConfig()


def test_handler_validates_a_config_that_bypassed_the_dataclass() -> None:
    c = MaruConfig(auto_connect=False)
    c.chunk_size_bytes = 0  # mutated after validation
    with pytest.raises(ValueError):
        MaruHandler(c)
    c = MaruConfig(auto_connect=False)
    c.pool_size = -1
    with pytest.raises(ValueError):
        MaruHandler(c)


def test_import_paths() -> None:
    import maru_handler
    import maru_handler.memory
    import maru_handler.memory.types

    assert maru_handler.MaruHandler is maru.MaruHandler
    assert maru_handler.MaruConfig is maru.MaruConfig
    assert maru_handler.memory.AllocHandle is maru.AllocHandle
    assert maru_handler.memory.MemoryInfo is maru.MemoryInfo
    assert maru_handler.memory.types.MemoryInfo is maru.MemoryInfo
    assert maru_handler.memory.types.MappedRegion is maru.MappedRegion
    assert issubclass(maru.MaruError, RuntimeError)
    assert isinstance(maru.__version__, str)


def test_value_types_construct_like_the_original() -> None:
    info = maru.MemoryInfo(view=memoryview(b"abc"))
    assert bytes(info.view) == b"abc" and info.region_id is None and info.page_index is None
    info = maru.MemoryInfo(bytearray(b"xyz"), region_id=3, page_index=4)
    assert isinstance(info.view, memoryview) and (info.region_id, info.page_index) == (3, 4)
    h = maru.AllocHandle(buf=memoryview(bytearray(8)), _region_id=1, _page_index=2, _size=8)
    assert (h.region_id, h.page_index, h.size) == (1, 2, 8)
    assert (h._region_id, h._page_index, h._size) == (1, 2, 8)
    r = maru.MappedRegion(region_id=7, size=16, _buffer_view=memoryview(bytearray(16)))
    assert r.is_mapped and r.get_buffer_view(4, 4) is not None and r.get_buffer_view(15, 4) is None
