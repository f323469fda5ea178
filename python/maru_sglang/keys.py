"""How SGLang page hashes become Maru keys.

A key is ``<namespace>/<page hash>_<model>[_<tp rank>_<tp size>][shards][/<format>]``:

- the namespace keeps deployments that share one Maru server apart (the server has no
  namespaces of its own, so it is a key prefix);
- MHA KV is sharded by tensor parallelism, so its keys name the TP rank and size; MLA KV is the
  same on every TP rank, so its keys do not, and every rank reads what one rank wrote;
- pipeline stages, attention context-parallel ranks and decode-context-parallel shards hold
  different bytes for the same page and get their own keys, as in SGLang's file backend;
  data-parallel attention groups hold the same bytes (the TP rank is local to the group), so
  they share keys;
- the format (host layout and dtype) is part of the key once a host pool is registered: a
  page written as ``page_first`` bytes must miss for a ``page_first_direct`` reader instead of
  loading scrambled KV.
"""

from __future__ import annotations

from typing import Any

__all__ = ["KeyScheme", "rank_tag"]

_LAYOUT_TAGS = {
    "page_first": "pf",
    "page_first_direct": "pfd",
    "layer_first": "lf",
    "page_head": "ph",
}


def rank_tag(storage_config: Any) -> str:
    """A short name of this rank among the parallel ranks of one SGLang instance."""
    parts = []
    for name, rank, size in (
        ("tp", "tp_rank", "tp_size"),
        ("pp", "pp_rank", "pp_size"),
        ("cp", "attn_cp_rank", "attn_cp_size"),
    ):
        if int(getattr(storage_config, size, 1) or 1) > 1:
            parts.append(f"{name}{getattr(storage_config, rank, 0)}")
    dp_rank = int(getattr(storage_config, "dp_rank", 0) or 0)
    if dp_rank:
        parts.append(f"dp{dp_rank}")
    return "-".join(parts)


class KeyScheme:
    """Maps page hashes to keys for one rank of one SGLang instance."""

    def __init__(self, storage_config: Any, namespace: str) -> None:
        c = storage_config
        self.is_mla = bool(c.is_mla_model)
        model = "-".join((c.model_name or "").split("/"))
        shards = ""
        if int(c.pp_size) > 1:
            shards += f"_{c.pp_size}_{c.pp_rank}"
        if int(getattr(c, "attn_cp_size", 1) or 1) > 1:
            shards += f"_cp{c.attn_cp_rank}_{c.attn_cp_size}"
        dcp_size = int(getattr(c, "dcp_size", 1) or 1)
        if dcp_size > 1:
            shards += f"_tp{c.tp_size}_dcp{c.dcp_rank}_{dcp_size}_page{c.logical_page_size}"
        rank = "" if self.is_mla else f"_{c.tp_rank}_{c.tp_size}"
        self._prefix = f"{namespace}/"
        self._base_suffix = f"_{model}{rank}{shards}"
        self._suffix = self._base_suffix

    def set_format(self, layout: str, dtype: Any) -> None:
        """Names the host pool's page format in every key from now on."""
        tag = _LAYOUT_TAGS.get(layout, layout)
        dtype_name = str(dtype).removeprefix("torch.")
        self._suffix = f"{self._base_suffix}/{tag}-{dtype_name}"

    def key(self, page_hash: str) -> str:
        return f"{self._prefix}{page_hash}{self._suffix}"

    def keys(self, page_hashes: list[str]) -> list[str]:
        p, s = self._prefix, self._suffix
        return [f"{p}{h}{s}" for h in page_hashes]
