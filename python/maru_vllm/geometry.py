"""What one stored chunk is: which layers, how many blocks, how many bytes, how many keys.

The scheduler and the worker derive the same geometry from vLLM's ``KVCacheConfig`` (the
scheduler never sees a KV tensor), so both compute the same keys. A chunk is
``chunk_tokens // block_size`` consecutive blocks of every layer. A Maru page holds the chunk's
blocks of ``layers_per_part`` layers, one after the other:

    part p page = [layer l0: block 0 | block 1 | ...][layer l0+1: block 0 | ...] ...

so a chunk of L layers is ``ceil(L / layers_per_part)`` keys ("parts"). One part per chunk
(the default page size) keeps a chunk atomic: present means present for every layer.

Only KV caches whose chunks are position-addressed prefixes can be shared this way: one KV
cache group of full attention or MLA, dense (unpadded, unpacked) pages. Everything else is
refused at start with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["ChunkGeometry", "UnsupportedKVCache"]

_SUPPORTED_SPECS = {"FullAttentionSpec": "attention", "MLAAttentionSpec": "mla"}
# Quantization modes whose KV is plain per-slot bytes (scales, if any, live outside the cache).
_PLAIN_QUANT_MODES = {"NONE", "FP8_PER_TENSOR"}


class UnsupportedKVCache(ValueError):
    """The engine's KV cache cannot be shared by chunks (refused at start)."""


@dataclass(frozen=True)
class ChunkGeometry:
    kind: str
    layer_names: tuple[str, ...]
    block_size: int
    chunk_tokens: int
    #: Bytes of one layer's share of one block (vLLM's page of one layer).
    block_bytes: int
    layers_per_part: int
    #: The KV spec fields that make caches incompatible, for the keys.
    spec_fields: tuple[tuple[str, str], ...]

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    @property
    def blocks_per_chunk(self) -> int:
        return self.chunk_tokens // self.block_size

    @property
    def layer_chunk_bytes(self) -> int:
        return self.blocks_per_chunk * self.block_bytes

    @property
    def num_parts(self) -> int:
        return -(-self.num_layers // self.layers_per_part)

    def part_layers(self, part: int) -> range:
        start = part * self.layers_per_part
        return range(start, min(start + self.layers_per_part, self.num_layers))

    def part_of_layer(self, layer: int) -> int:
        return layer // self.layers_per_part

    def part_bytes(self, part: int) -> int:
        return len(self.part_layers(part)) * self.layer_chunk_bytes

    @property
    def chunk_bytes(self) -> int:
        return self.num_layers * self.layer_chunk_bytes

    def layer_offset(self, layer: int) -> int:
        """Byte offset of `layer`'s blocks inside its part's page."""
        return (layer - self.part_layers(self.part_of_layer(layer)).start) * self.layer_chunk_bytes

    @classmethod
    def from_kv_cache_config(cls, kv_cache_config: Any, chunk_tokens: int, page_size: int | None) -> ChunkGeometry:
        groups = list(getattr(kv_cache_config, "kv_cache_groups", None) or [])
        if len(groups) != 1:
            raise UnsupportedKVCache(
                f"the model has {len(groups)} KV cache groups; Maru shares the KV of models with one "
                "group of full-attention or MLA layers (hybrid, sliding-window and Mamba models are not supported)"
            )
        group = groups[0]
        spec = group.kv_cache_spec
        spec_type = type(spec).__name__
        kind = _SUPPORTED_SPECS.get(spec_type)
        if kind is None:
            raise UnsupportedKVCache(
                f"KV cache spec {spec_type} is not supported (only {sorted(_SUPPORTED_SPECS)}): its blocks "
                "are not a plain position-addressed prefix"
            )
        for attr in (
            "sliding_window",
            "attention_chunk_size",
            "page_size_padded",
            "num_head_slots",
            "state_content_bytes",
        ):
            if getattr(spec, attr, None) is not None:
                raise UnsupportedKVCache(f"KV cache spec with {attr}={getattr(spec, attr)!r} is not supported")
        if getattr(spec, "tokens_per_state", 1) != 1:
            raise UnsupportedKVCache(f"KV cache spec with tokens_per_state={spec.tokens_per_state} is not supported")
        quant = getattr(getattr(spec, "kv_quant_mode", None), "name", "NONE")
        if quant not in _PLAIN_QUANT_MODES:
            raise UnsupportedKVCache(
                f"KV cache quantization {quant} is not supported (only {sorted(_PLAIN_QUANT_MODES)})"
            )
        block_size = int(spec.block_size)
        if chunk_tokens % block_size != 0:
            raise UnsupportedKVCache(
                f"maru_kv_chunk_tokens={chunk_tokens} is not a multiple of the block size {block_size}"
            )
        block_bytes = int(spec.page_size_bytes)
        layer_names = tuple(group.layer_names)
        if not layer_names:
            raise UnsupportedKVCache("the KV cache group has no layers")
        layer_chunk = (chunk_tokens // block_size) * block_bytes
        if page_size is None:
            layers_per_part = len(layer_names)
        else:
            layers_per_part = min(page_size // layer_chunk, len(layer_names))
            if layers_per_part == 0:
                raise UnsupportedKVCache(
                    f"maru_chunk_size={page_size} bytes cannot hold one layer's chunk of {layer_chunk} bytes "
                    f"({chunk_tokens} tokens); raise maru_chunk_size or lower maru_kv_chunk_tokens"
                )
        fields = {
            "spec": spec_type,
            "block_size": str(block_size),
            "num_kv_heads": str(getattr(spec, "num_kv_heads", "")),
            "head_size": str(getattr(spec, "head_size", "")),
            "head_size_v": str(getattr(spec, "head_size_v", "")),
            "dtype": str(getattr(spec, "dtype", "")),
            "kv_quant_mode": quant,
            "cache_dtype": str(getattr(spec, "cache_dtype_str", "") or ""),
            "page_bytes": str(block_bytes),
        }
        return cls(
            kind=kind,
            layer_names=layer_names,
            block_size=block_size,
            chunk_tokens=chunk_tokens,
            block_bytes=block_bytes,
            layers_per_part=layers_per_part,
            spec_fields=tuple(sorted(fields.items())),
        )
