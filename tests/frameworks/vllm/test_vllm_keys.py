"""Chunk keys: prefix hashing, and everything that makes KV incompatible yields other keys."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from maru_vllm.keys import KEY_PREFIX, KeyScheme, multimodal_items, request_salt

BASE: dict[str, Any] = dict(
    chunk_tokens=4, tp_size=2, num_parts=2, model="m", dtype="float16", layout="LBHNC", namespace=""
)
TOKENS = list(range(100, 118))  # 4 complete chunks of 4, and 2 tokens over


def scheme(**changes: Any) -> KeyScheme:
    return KeyScheme.build(**{**BASE, **changes})


def test_a_chunk_key_covers_the_whole_prefix() -> None:
    s = scheme()
    a = s.chunk_hashes(TOKENS)
    assert len(a) == 4
    changed_last = s.chunk_hashes(TOKENS[:13] + [999] + TOKENS[14:])  # a token of chunk 3
    assert changed_last[:3] == a[:3] and changed_last[3] != a[3]
    changed_first = s.chunk_hashes([999] + TOKENS[1:])
    assert all(x != y for x, y in zip(changed_first, a, strict=True)), "every later chunk depends on chunk 0"
    assert s.chunk_hashes(TOKENS, max_chunks=2) == a[:2]
    assert s.chunk_hashes(TOKENS[:3]) == []


@pytest.mark.parametrize(
    "change",
    [
        {"model": "other"},
        {"dtype": "bfloat16"},
        {"layout": "LBNHC"},
        {"chunk_tokens": 8},
        {"tp_size": 4},
        {"num_parts": 1},
        {"namespace": "tenant-b"},
        {"spec": {"block_size": 64}},
    ],
    ids=lambda c: next(iter(c)),
)
def test_anything_that_makes_kv_incompatible_changes_every_key(change: dict[str, Any]) -> None:
    a, b = scheme(), scheme(**change)
    ha, hb = a.chunk_hashes(TOKENS), b.chunk_hashes(TOKENS)
    assert ha and hb and not set(ha) & set(hb)


def test_rank_and_part_have_keys_of_their_own() -> None:
    s = scheme()
    h = s.chunk_hashes(TOKENS)[0]
    keys = s.all_keys(h)
    assert len(keys) == len(set(keys)) == 4 and all(k.startswith(KEY_PREFIX) for k in keys)
    assert s.rank_keys(h, 1) == [s.key(h, 1, 0), s.key(h, 1, 1)]
    with pytest.raises(ValueError):
        s.key(h, 2, 0)


@dataclass
class _Req:
    cache_salt: str | None = None
    lora_request: Any = None
    mm_features: tuple[Any, ...] = ()


@dataclass
class _Lora:
    lora_name: str
    lora_int_id: int


def test_cache_salt_and_lora_separate_requests() -> None:
    s = scheme()
    plain = s.chunk_hashes(TOKENS, request_salt(_Req()))
    salted = s.chunk_hashes(TOKENS, request_salt(_Req(cache_salt="x")))
    lora = s.chunk_hashes(TOKENS, request_salt(_Req(lora_request=_Lora("sql", 1))))
    assert plain == s.chunk_hashes(TOKENS)
    assert len({plain[0], salted[0], lora[0]}) == 3


@dataclass
class _Pos:
    offset: int
    length: int


@dataclass
class _Feature:
    identifier: str
    mm_position: _Pos


def test_multimodal_inputs_change_the_chunks_from_where_they_start() -> None:
    s = scheme()
    img_a = _Req(mm_features=(_Feature("img-a", _Pos(9, 4)),))
    img_b = _Req(mm_features=(_Feature("img-b", _Pos(9, 4)),))
    a = s.chunk_hashes(TOKENS, mm_items=multimodal_items(img_a))
    b = s.chunk_hashes(TOKENS, mm_items=multimodal_items(img_b))
    # Same placeholder tokens: chunks 0-1 (tokens 0-7) agree, chunk 2 holds the image.
    assert a[:2] == b[:2] and a[2] != b[2] and a[3] != b[3]


def test_keys_are_the_same_in_another_process() -> None:
    """Instances are separate processes: no per-process hash seed may leak into keys."""
    code = (
        "import json, sys; from maru_vllm.keys import KeyScheme\n"
        f"s = KeyScheme.build(**json.loads({json.dumps(json.dumps(BASE))}))\n"
        f"print(json.dumps([k for h in s.chunk_hashes({TOKENS}) for k in s.all_keys(h)]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"},
        cwd=Path(__file__).parent,
    )
    s = scheme()
    assert json.loads(out.stdout) == [k for h in s.chunk_hashes(TOKENS) for k in s.all_keys(h)]
