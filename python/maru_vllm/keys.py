"""Chunk keys that are safe to share between instances.

A chunk's KV depends on every token before it and on everything that shapes the numbers and
their bytes. So a key is a hash chain over the token prefix, seeded with a fingerprint of the
engine (model identity, dtype, KV spec, layout, block and chunk geometry, how the chunk is split
into parts, the namespace) and the request's own salt (``cache_salt``, LoRA adapter), then
specialised per tensor-parallel rank and part:

    h_0     = H(fingerprint, salt)
    h_{c+1} = H(h_c, tokens of chunk c, multimodal items starting in chunk c)
    key     = "mv1:" + hex(H(h_{c+1}, tp_rank, tp_size, part))

Two engines share a chunk only if they agree on all of it; anything else yields other keys,
never wrong bytes. Namespaces are key derivation too: the server sees only opaque keys.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["KeyScheme", "request_salt", "KEY_PREFIX", "FORMAT_VERSION"]

KEY_PREFIX = "mv1:"
#: Bumped whenever the page format or the key derivation changes.
FORMAT_VERSION = "maru-vllm/1"
_DIGEST = 16


def _h(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=_DIGEST)
    for p in parts:
        # Length-prefixed, so ("ab", "c") and ("a", "bc") never collide.
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.digest()


def _canonical(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str).encode()


def request_salt(request: Any) -> bytes:
    """What makes a request's KV differ from another request's with the same tokens: its
    ``cache_salt`` and its LoRA adapter."""
    salt = getattr(request, "cache_salt", None)
    lora = getattr(request, "lora_request", None)
    lora_id = None if lora is None else [getattr(lora, "lora_name", None), getattr(lora, "lora_int_id", None)]
    if salt is None and lora_id is None:
        return b""
    return _canonical({"cache_salt": salt, "lora": lora_id})


def multimodal_items(request: Any) -> list[tuple[int, str]]:
    """(start offset, content identifier) of the request's multimodal inputs, in order."""
    items: list[tuple[int, str]] = []
    for feature in getattr(request, "mm_features", None) or ():
        pos = getattr(feature, "mm_position", None)
        ident = getattr(feature, "identifier", None) or getattr(feature, "mm_hash", None)
        if pos is None or ident is None:
            raise ValueError("a multimodal input without a position or identifier cannot be keyed")
        items.append((int(pos.offset), str(ident)))
    items.sort()
    return items


@dataclass(frozen=True)
class KeyScheme:
    """Derives chunk hashes from tokens and Maru keys from chunk hashes."""

    fingerprint: bytes
    chunk_tokens: int
    tp_size: int
    num_parts: int

    @classmethod
    def build(cls, *, chunk_tokens: int, tp_size: int, num_parts: int, **fields: Any) -> KeyScheme:
        """`fields`: everything else that makes KV incompatible (model, dtype, spec, layout,
        namespace, ...); their values are compared as text."""
        doc = {"format": FORMAT_VERSION, "chunk_tokens": chunk_tokens, "tp_size": tp_size, "parts": num_parts, **fields}
        return cls(fingerprint=_h(_canonical(doc)), chunk_tokens=chunk_tokens, tp_size=tp_size, num_parts=num_parts)

    def chunk_hashes(
        self,
        token_ids: Sequence[int],
        salt: bytes = b"",
        mm_items: Iterable[tuple[int, str]] = (),
        max_chunks: int | None = None,
    ) -> list[bytes]:
        """One hash per complete chunk of `token_ids` (at most `max_chunks`)."""
        t = self.chunk_tokens
        n = len(token_ids) // t
        if max_chunks is not None:
            n = min(n, max_chunks)
        if n == 0:
            return []
        tokens = np.asarray(token_ids[: n * t], dtype="<i8")
        mm = sorted(mm_items)
        h = _h(self.fingerprint, salt)
        out = []
        for c in range(n):
            start, end = c * t, (c + 1) * t
            extra = [ident.encode() for off, ident in mm if start <= off < end]
            h = _h(h, tokens[start:end].tobytes(), *extra)
            out.append(h)
        return out

    def key(self, chunk_hash: bytes, tp_rank: int, part: int) -> str:
        if not 0 <= tp_rank < self.tp_size or not 0 <= part < self.num_parts:
            raise ValueError(f"rank {tp_rank}/{self.tp_size} or part {part}/{self.num_parts} out of range")
        return KEY_PREFIX + _h(chunk_hash, tp_rank.to_bytes(4, "little"), part.to_bytes(4, "little")).hex()

    def rank_keys(self, chunk_hash: bytes, tp_rank: int) -> list[str]:
        """The keys one rank stores for one chunk (one per part)."""
        return [self.key(chunk_hash, tp_rank, p) for p in range(self.num_parts)]

    def all_keys(self, chunk_hash: bytes) -> list[str]:
        """Every key of one chunk across all ranks: the chunk is loadable only if all exist."""
        return [self.key(chunk_hash, r, p) for r in range(self.tp_size) for p in range(self.num_parts)]
