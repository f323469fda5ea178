"""The DMA-registration decision and the CUDA registration path (with a recording runtime:
this machine has no GPU), and that a CPU worker reports its absence."""

from __future__ import annotations

from typing import Any

import pytest
from maru_vllm.dma import HOST_REGISTER_PORTABLE, HOST_REGISTER_READ_ONLY, DmaRegistrar, decide


@pytest.mark.parametrize(
    ("device", "cudart", "env", "needed", "register", "reason"),
    [
        ("cpu", True, {}, False, False, "host memory"),
        ("cuda", True, {}, True, True, "cudaHostRegister"),
        ("cuda", False, {}, True, False, "not reachable"),
        ("cuda", True, {"MARU_VLLM_DMA": "0"}, True, False, "MARU_VLLM_DMA=0"),
        ("xpu", True, {}, True, False, "no host-registration API for xpu"),
    ],
)
def test_decisions(device: str, cudart: bool, env: dict[str, str], needed: bool, register: bool, reason: str) -> None:
    d = decide(device, cudart_available=cudart, env=env)
    assert (d.needed, d.register) == (needed, register)
    assert reason in d.reason


class _Runtime:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail = fail

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:  # noqa: N802 - CUDA's name
        self.calls.append(("register", ptr, size, flags))
        return 1 if self.fail else 0

    def cudaHostUnregister(self, ptr: int) -> int:  # noqa: N802
        self.calls.append(("unregister", ptr))
        return 0


def test_each_region_is_registered_once_and_released_at_close() -> None:
    rt = _Runtime()
    r = DmaRegistrar(decide("cuda", cudart_available=True, env={}), rt)
    assert r.ensure(7, 0x1000, 1 << 21, read_only=True)
    assert r.ensure(7, 0x1000, 1 << 21, read_only=True)
    assert r.ensure(8, 0x9000, 4096, read_only=False)
    assert rt.calls == [
        ("register", 0x1000, 1 << 21, HOST_REGISTER_PORTABLE | HOST_REGISTER_READ_ONLY),
        ("register", 0x9000, 4096, HOST_REGISTER_PORTABLE),
    ]
    assert (r.registered_regions, r.registered_bytes) == (2, (1 << 21) + 4096)
    r.close()
    assert rt.calls[2:] == [("unregister", 0x1000), ("unregister", 0x9000)]


def test_a_failed_registration_is_not_retried_and_copies_still_work() -> None:
    rt = _Runtime(fail=True)
    r = DmaRegistrar(decide("cuda", cudart_available=True, env={}), rt)
    assert not r.ensure(7, 0x1000, 4096, read_only=True)
    assert not r.ensure(7, 0x1000, 4096, read_only=True)
    assert len(rt.calls) == 1 and r.registered_regions == 0


def test_nothing_is_registered_on_cpu() -> None:
    rt = _Runtime()
    r = DmaRegistrar(decide("cpu", cudart_available=True, env={}), rt)
    assert not r.ensure(7, 0x1000, 4096, read_only=True)
    assert rt.calls == []
