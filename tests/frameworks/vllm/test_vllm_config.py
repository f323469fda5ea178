"""kv_connector_extra_config: the original connector's keys, Maru's namespace, clear errors."""

from __future__ import annotations

import pytest
from maru_vllm.config import ConnectorConfig, parse_size


def test_defaults() -> None:
    c = ConnectorConfig.from_extra_config({})
    assert (c.server_url, c.pool_size, c.page_size, c.chunk_tokens, c.eager_map, c.namespace) == (
        "tcp://localhost:5555",
        1 << 30,
        None,
        256,
        True,
        "",
    )


def test_the_original_connectors_keys_are_read() -> None:
    c = ConnectorConfig.from_extra_config(
        {
            "maru_server_url": "unix:///dev/shm/maru/maru-5555.sock",
            "maru_pool_size": "4G",
            "maru_chunk_size": "8M",
            "maru_kv_chunk_tokens": "512",
            "maru_instance_id": "vllm-a",
            "maru_eager_map": "false",
            "maru_namespace": "tenant-a",
        }
    )
    assert (c.pool_size, c.page_size, c.chunk_tokens, c.instance_id, c.eager_map, c.namespace) == (
        4 << 30,
        8 << 20,
        512,
        "vllm-a",
        False,
        "tenant-a",
    )


@pytest.mark.parametrize(
    ("value", "expected"), [(4096, 4096), ("64KiB", 64 << 10), ("1.5G", 3 << 29), ("512 MB", 512 << 20), ("7", 7)]
)
def test_sizes(value: object, expected: int) -> None:
    assert parse_size("x", value) == expected


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"maru_pool_size": "lots"}, "maru_pool_size"),
        ({"maru_chunk_size": 0}, "maru_chunk_size must be positive"),
        ({"maru_kv_chunk_tokens": "many"}, "maru_kv_chunk_tokens"),
        ({"maru_eager_map": "sometimes"}, "maru_eager_map"),
        ({"maru_namespace": 3}, "maru_namespace"),
        ({"maru_server_url": ""}, "maru_server_url"),
        ({"maru_chunk_tokens": 256}, "unknown kv_connector_extra_config keys"),
    ],
)
def test_bad_values_name_the_key(extra: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ConnectorConfig.from_extra_config(extra)
