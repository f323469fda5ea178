"""The parts of maru_sglang that need no server: extra-config parsing, the key scheme and the
pin lease table (with a clock the test moves)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from maru_sglang.config import MaruSGLangConfig, parse_size
from maru_sglang.keys import KeyScheme, rank_tag
from maru_sglang.pins import PinLeases


def test_the_original_backends_keys_carry_over():
    c = MaruSGLangConfig.from_extra_config(
        {
            "backend_name": "maru",
            "maru_server_url": "maru://10.0.0.7:5555",
            "maru_pool_size": "1.5G",
            "maru_chunk_size_bytes": 2097152,
            "maru_instance_id": "node-a",
            "maru_timeout_ms": "500",
            "maru_use_async_rpc": False,
            "maru_max_inflight": 8,
            "maru_eager_map": "0",
            "maru_namespace": "prod.v2",
            "maru_pin_ttl_s": 2.5,
            "maru_index_reads": "off",
        }
    )
    assert c.server_url == "tcp://10.0.0.7:5555"
    assert (c.pool_size, c.chunk_size_bytes) == (3 << 29, 2 << 20)
    assert (c.instance_id, c.timeout_ms, c.use_async_rpc, c.max_inflight, c.eager_map) == (
        "node-a",
        500,
        False,
        8,
        False,
    )
    assert (c.namespace, c.pin_ttl_s, c.index_reads) == ("prod.v2", 2.5, False)
    assert MaruSGLangConfig.from_extra_config(None) == MaruSGLangConfig()


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"maru_pool_size": "4X"}, "maru_pool_size"),
        ({"maru_pool_size": 0}, "maru_pool_size"),
        ({"maru_chunk_size_bytes": True}, "maru_chunk_size_bytes"),
        ({"maru_timeout_ms": "soon"}, "maru_timeout_ms"),
        ({"maru_eager_map": "maybe"}, "maru_eager_map"),
        ({"maru_namespace": "a/b"}, "maru_namespace"),
        ({"maru_namespace": ""}, "maru_namespace"),
        ({"maru_pin_ttl_s": -1}, "maru_pin_ttl_s"),
        ({"maru_index_reads": "sometimes"}, "maru_index_reads"),
        ({"maru_server_url": 5555}, "maru_server_url"),
        ({"maru_instance_id": ""}, "maru_instance_id"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(extra, match):
    with pytest.raises(ValueError, match=match):
        MaruSGLangConfig.from_extra_config(extra)


def test_an_unknown_maru_key_is_a_warning(caplog):
    MaruSGLangConfig.from_extra_config({"maru_pool_sise": "1G", "other_backend_key": 1})
    assert "maru_pool_sise" in caplog.text and "other_backend_key" not in caplog.text


def test_sizes():
    assert [parse_size(v) for v in ("4G", "512M", "64k", "2MiB", "1.5g", 4096)] == [
        4 << 30,
        512 << 20,
        64 << 10,
        2 << 20,
        3 << 29,
        4096,
    ]


def _cfg(**kw):
    base = dict(
        tp_rank=0,
        tp_size=1,
        pp_rank=0,
        pp_size=1,
        attn_cp_rank=0,
        attn_cp_size=1,
        dp_rank=0,
        is_mla_model=False,
        model_name="org/model",
        dcp_size=1,
        dcp_rank=0,
        logical_page_size=None,
    )
    base.update(kw)
    return SimpleNamespace(**base)


def test_keys_name_namespace_model_rank_shards_and_format():
    k = KeyScheme(_cfg(tp_rank=1, tp_size=4), "ns")
    assert k.key("abc") == "ns/abc_org-model_1_4"
    k.set_format("page_first", "torch.bfloat16")
    assert k.keys(["abc", "def"]) == ["ns/abc_org-model_1_4/pf-bfloat16", "ns/def_org-model_1_4/pf-bfloat16"]
    mla = KeyScheme(_cfg(tp_rank=3, tp_size=4, is_mla_model=True, pp_size=2, pp_rank=1), "ns")
    assert mla.key("abc") == "ns/abc_org-model_2_1", "MLA keys are the same on every TP rank"
    assert KeyScheme(_cfg(dp_rank=2), "ns").key("a") == KeyScheme(_cfg(), "ns").key("a"), "DP groups share"
    assert rank_tag(_cfg(tp_rank=1, tp_size=2, dp_rank=3)) == "tp1-dp3" and rank_tag(_cfg()) == ""


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_leases_expire_and_readers_take_the_oldest_pin():
    clock = Clock()
    p = PinLeases(10.0, clock)
    p.add(["a", "b"])
    clock.t = 5
    p.add(["a"])
    assert p.held == 3
    assert p.take(["a", "c"]) == [True, False], "c was never pinned"
    clock.t = 10
    assert p.expired() == ["b"], "a's 0 s pin went to the reader; its 5 s one is still valid"
    clock.t = 15
    assert p.expired() == ["a"] and p.held == 0
    assert p.expired() == [] and p.take(["a"]) == [False]


def test_counted_pins_need_one_release_each():
    clock = Clock()
    p = PinLeases(1.0, clock)
    p.add(["k", "k"])
    assert p.take(["k"]) == [True] and p.held == 1
    clock.t = 1
    assert p.expired() == ["k"] and p.held == 0
    p.add(["x", "y", "x"])
    assert sorted(p.drain()) == ["x", "x", "y"] and p.held == 0
    clock.t = 5
    assert p.expired() == [], "drained leases do not come back"
