"""What the scheduler tells the worker each step: which chunks to load into which blocks, and
which chunks became complete and should be stored. Plain dataclasses of ints and bytes, so the
metadata pickles cheaply to vLLM's worker processes."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

__all__ = ["LoadChunk", "LoadRequest", "MaruConnectorMetadata", "StoreChunk", "StoreRequest"]


@dataclass
class LoadChunk:
    chunk_hash: bytes
    #: Position, inside the chunk, of the first block to fill (a chunk partly covered by
    #: vLLM's own prefix cache, or cut short before the prompt's last token, loads a tail
    #: or a head of its blocks).
    first_block: int
    #: vLLM block ids to fill with blocks first_block, first_block + 1, ... of the chunk.
    block_ids: list[int]


@dataclass
class LoadRequest:
    req_id: str
    chunks: list[LoadChunk]


@dataclass
class StoreChunk:
    chunk_hash: bytes
    #: The chunk's blocks, in order (all of them: only complete chunks are stored).
    block_ids: list[int]
    num_tokens: int


@dataclass
class StoreRequest:
    req_id: str
    chunks: list[StoreChunk]


@dataclass
class MaruConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadRequest] = field(default_factory=list)
    stores: list[StoreRequest] = field(default_factory=list)
