"""Connector statistics as vLLM handles them: drained per step, pickled across processes,
aggregated across workers, logged by vLLM's own KV-transfer logger."""

from __future__ import annotations

import pickle

from maru_vllm.stats import Counters, MaruKVConnectorStats
from vllm.config import KVTransferConfig
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorLogging


def test_counters_drain_intervals_and_keep_totals() -> None:
    c = Counters()
    assert c.drain() is None
    c.set_gauge("dma_needed", 0)
    c.add(hit_chunks=3, loaded_bytes=100)
    first = c.drain()
    assert first is not None and first.data["hit_chunks"] == 3
    assert c.drain() is None, "an interval without activity is empty"
    c.add(hit_chunks=1)
    assert c.totals()["hit_chunks"] == 4


def test_stats_pickle_and_aggregate_across_workers() -> None:
    a = MaruKVConnectorStats(
        data={**MaruKVConnectorStats().data, "loaded_bytes": 2e9, "load_seconds": 1.0, "dma_needed": 1}
    )
    b = pickle.loads(
        pickle.dumps(
            MaruKVConnectorStats(data={**MaruKVConnectorStats().data, "loaded_bytes": 2e9, "load_seconds": 1.0})
        )
    )
    total = a.aggregate(b)
    reduced = total.reduce()
    assert reduced["loaded_bytes"] == 4e9 and reduced["load_GBps"] == 2.0 and reduced["dma_needed"] == 1
    assert not total.is_empty() and MaruKVConnectorStats().is_empty()


def test_vllms_logger_builds_and_logs_the_connectors_stats() -> None:
    """vLLM resolves the stats class through the connector loaded by module path."""
    cfg = KVTransferConfig(
        kv_connector="MaruKVConnector", kv_connector_module_path="maru_vllm.connector", kv_role="kv_both"
    )
    logging = KVConnectorLogging(cfg)
    data = {**MaruKVConnectorStats().data, "hit_chunks": 2, "miss_chunks": 2, "load_errors": 1}
    logging.observe(data)
    logging.observe(data)
    lines: list[str] = []
    logging.log(log_fn=lambda fmt, *args: lines.append(fmt % args))
    assert len(lines) == 1 and "hit_chunks=4" in lines[0] and "load_errors=2" in lines[0] and "hit_rate=0.5" in lines[0]
