//! The Prometheus exposition of a server's state.

use maru_proto::request_name;
use maru_proto::stats::{ClientStats, NamespaceStats, ServerStats};
use maru_telemetry::{PromWriter, RowFamily};

use crate::state::{ServerState, OP_NAMES};

/// Renders every metric. Pool gauges come from the resource manager and are left out (with
/// `maru_rm_up 0`) when it cannot be reached.
pub(crate) fn render(state: &ServerState) -> String {
    let s = state.stats();
    let mut w = PromWriter::new();
    w.singles(&[
        ("maru_keys", "gauge", "Registered keys", s.keys as f64),
        (
            "maru_key_bytes",
            "gauge",
            "Bytes referenced by registered keys",
            s.bytes as f64,
        ),
        (
            "maru_pinned_keys",
            "gauge",
            "Keys with at least one pin",
            s.pinned_keys as f64,
        ),
        (
            "maru_pins_expired_total",
            "counter",
            "Pins dropped because their lease ran out",
            s.pins_expired as f64,
        ),
        ("maru_regions", "gauge", "Live regions", s.regions as f64),
        (
            "maru_region_bytes",
            "gauge",
            "Bytes in live regions",
            s.region_bytes as f64,
        ),
        (
            "maru_clients",
            "gauge",
            "Connected client instances",
            state.session_count() as f64,
        ),
        (
            "maru_connections",
            "gauge",
            "Open connections (all roles)",
            state.connections.load(std::sync::atomic::Ordering::Relaxed) as f64,
        ),
    ]);
    w.ops(
        &state.ops,
        OP_NAMES.iter().map(|t| request_name(*t)),
        ("maru_ops_total", "Requests answered, by operation"),
        ("maru_op_seconds", "Time to answer a request, by operation"),
    );
    w.family(
        "maru_op_errors_total",
        "counter",
        "Requests answered with an error, by operation",
    );
    for (op, o) in &s.ops {
        w.sample("maru_op_errors_total", &[("op", op)], o.errors as f64);
    }
    capacity(&mut w, &s);
    w.single(
        "maru_rm_up",
        "gauge",
        "Whether the resource manager answered",
        s.rm_error.is_none() as u8 as f64,
    );
    if s.rm_error.is_none() {
        w.per_rows(
            &s.pools,
            |p| [("pool", &p.path)],
            &[
                ("maru_pool_total_bytes", "gauge", "Size of each pool", |p| {
                    p.total_bytes as f64
                }),
                (
                    "maru_pool_free_bytes",
                    "gauge",
                    "Free bytes in each pool",
                    |p| p.free_bytes as f64,
                ),
            ],
        );
    }
    w.finish()
}

/// Capacity management: the watermarks, and per namespace and per instance what keys hold,
/// how reads went and what was evicted.
fn capacity(w: &mut PromWriter, s: &ServerStats) {
    let e = &s.eviction;
    w.family(
        "maru_evict_high_ratio",
        "gauge",
        "Fraction of the pool above which the evictor starts (--evict-high)",
    )
    .sample("maru_evict_high_ratio", &[("policy", &e.policy)], e.high);
    w.family(
        "maru_evict_low_ratio",
        "gauge",
        "Fraction of the pool below which the evictor stops (--evict-low)",
    )
    .sample("maru_evict_low_ratio", &[("policy", &e.policy)], e.low);
    w.single(
        "maru_capacity_bytes",
        "gauge",
        "Bytes of the pools this server allocates from (0 while unknown)",
        e.pool_bytes as f64,
    );

    let per_namespace: [RowFamily<NamespaceStats>; 7] = [
        (
            "maru_namespace_keys",
            "gauge",
            "Keys of each namespace",
            |n| n.keys as f64,
        ),
        (
            "maru_namespace_bytes",
            "gauge",
            "Bytes referenced by each namespace's keys",
            |n| n.bytes as f64,
        ),
        (
            "maru_namespace_pins",
            "gauge",
            "Pins held by each namespace's sessions",
            |n| n.pins as f64,
        ),
        (
            "maru_hits_total",
            "counter",
            "Reads that found their key, by namespace",
            |n| n.hits as f64,
        ),
        (
            "maru_misses_total",
            "counter",
            "Reads that found no key, by namespace",
            |n| n.misses as f64,
        ),
        (
            "maru_evictions_total",
            "counter",
            "Keys evicted, by namespace",
            |n| n.evictions as f64,
        ),
        (
            "maru_evicted_bytes_total",
            "counter",
            "Bytes of evicted keys, by namespace",
            |n| n.evicted_bytes as f64,
        ),
    ];
    w.per_rows(
        &s.namespaces,
        |n| [("namespace", &n.namespace)],
        &per_namespace,
    );
    w.family(
        "maru_namespace_quota_bytes",
        "gauge",
        "Byte quota of each namespace that has one (--quota)",
    );
    for n in &s.namespaces {
        if let Some(q) = n.quota {
            w.sample(
                "maru_namespace_quota_bytes",
                &[("namespace", &n.namespace)],
                q as f64,
            );
        }
    }

    let per_instance: [RowFamily<ClientStats>; 6] = [
        (
            "maru_instance_keys",
            "gauge",
            "Keys in each instance's regions",
            |c| c.keys as f64,
        ),
        (
            "maru_instance_key_bytes",
            "gauge",
            "Bytes referenced by the keys in each instance's regions",
            |c| c.key_bytes as f64,
        ),
        (
            "maru_instance_pins",
            "gauge",
            "Pins on the keys in each instance's regions",
            |c| c.pins as f64,
        ),
        (
            "maru_instance_hits_total",
            "counter",
            "Reads answered from each instance's keys",
            |c| c.hits as f64,
        ),
        (
            "maru_instance_evictions_total",
            "counter",
            "Keys of each instance evicted",
            |c| c.evictions as f64,
        ),
        (
            "maru_instance_evicted_bytes_total",
            "counter",
            "Bytes of each instance's evicted keys",
            |c| c.evicted_bytes as f64,
        ),
    ];
    w.per_rows(
        &s.clients,
        |c| [("instance", &c.instance_id)],
        &per_instance,
    );
}
