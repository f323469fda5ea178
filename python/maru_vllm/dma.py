"""Registering Maru's mapped regions for device DMA.

When the KV cache is on a CUDA device, a copy from a pageable host page goes through a
staging buffer of the driver; a page of a region registered with ``cudaHostRegister`` is
copied by DMA straight from the pool. So on CUDA every region the worker copies from or into
(its own pages, other instances' read-only regions) is registered once, the first time it is
seen. Elsewhere there is nothing to register: on CPU the KV cache is host memory and a copy is
a memcpy. :func:`decide` makes that choice in one place; the worker logs it once at start and
reports it in its statistics (``dma_needed``, ``dma_registered_regions``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

__all__ = ["DmaDecision", "DmaRegistrar", "decide"]

logger = logging.getLogger(__name__)

# cudaHostRegister flags (cuda_runtime_api.h).
HOST_REGISTER_PORTABLE = 0x01
HOST_REGISTER_READ_ONLY = 0x08


@dataclass(frozen=True)
class DmaDecision:
    #: The KV cache lives on a device that DMAs from host memory.
    needed: bool
    #: Regions are registered (cudaHostRegister) before copies.
    register: bool
    reason: str


def decide(kv_device_type: str, *, cudart_available: bool, env: dict[str, str] | None = None) -> DmaDecision:
    """Whether to register mapped regions for DMA, and why.

    `kv_device_type` is the KV cache tensors' device type; `cudart_available` whether the CUDA
    runtime's host-registration calls are reachable; ``MARU_VLLM_DMA=0`` in `env` turns
    registration off (copies still work, staged by the driver)."""
    env = os.environ if env is None else env
    if kv_device_type == "cpu":
        return DmaDecision(False, False, "KV cache is in host memory: copies are memcpy, no DMA registration needed")
    if kv_device_type != "cuda":
        return DmaDecision(
            True, False, f"no host-registration API for {kv_device_type} devices: the runtime stages copies"
        )
    if env.get("MARU_VLLM_DMA", "1").strip().lower() in {"0", "false", "no", "off"}:
        return DmaDecision(True, False, "MARU_VLLM_DMA=0: mapped regions are not registered; the driver stages copies")
    if not cudart_available:
        return DmaDecision(True, False, "the CUDA runtime is not reachable from torch: the driver stages copies")
    return DmaDecision(True, True, "KV cache on CUDA: mapped regions are registered with cudaHostRegister for DMA")


def cudart() -> Any | None:
    """torch's CUDA runtime binding, or None."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        return torch.cuda.cudart()
    except Exception:
        return None


class DmaRegistrar:
    """Registers each region once; unregisters them all at close."""

    def __init__(self, decision: DmaDecision, runtime: Any | None) -> None:
        self.decision = decision
        self._rt = runtime
        self._done: dict[int, tuple[int, int]] = {}
        self._failed: set[int] = set()

    @property
    def registered_regions(self) -> int:
        return len(self._done)

    @property
    def registered_bytes(self) -> int:
        return sum(size for _, size in self._done.values())

    def ensure(self, region_id: int, address: int, size: int, read_only: bool) -> bool:
        """Registers `size` bytes at `address` (region `region_id`) unless done already.
        False if registration is off or failed (copies then go through the driver's staging)."""
        if not self.decision.register or self._rt is None:
            return False
        if region_id in self._done:
            return True
        if region_id in self._failed:
            return False
        flags = HOST_REGISTER_PORTABLE | (HOST_REGISTER_READ_ONLY if read_only else 0)
        err = self._rt.cudaHostRegister(address, size, flags)
        code = getattr(err, "value", err)
        if code != 0:
            self._failed.add(region_id)
            logger.warning(
                "cudaHostRegister of region %d (%d bytes) failed with %s; its copies are staged", region_id, size, err
            )
            return False
        self._done[region_id] = (address, size)
        return True

    def close(self) -> None:
        for region_id, (address, _) in list(self._done.items()):
            try:
                self._rt.cudaHostUnregister(address)
            except Exception as e:
                logger.warning("cudaHostUnregister of region %d failed: %s", region_id, e)
        self._done.clear()
