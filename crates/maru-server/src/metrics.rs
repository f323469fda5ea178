//! The Prometheus exposition of a server's state.

use maru_proto::request_name;
use maru_proto::stats::{ClientStats, NamespaceStats, ServerStats};
use maru_telemetry::{gauge, PromWriter};

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
        (
            "maru_pages_parked",
            "gauge",
            "Freed pages kept from reuse until the sessions of before a restart are back",
            s.pages_parked as f64,
        ),
        (
            "maru_pages_lane_kept",
            "gauge",
            "Pages of gone keys kept while a view holds them in a hold lane",
            s.pages_lane_kept as f64,
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
                gauge("maru_pool_total_bytes", "Size of each pool", |p| {
                    p.total_bytes as f64
                }),
                gauge("maru_pool_free_bytes", "Free bytes in each pool", |p| {
                    p.free_bytes as f64
                }),
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

    key_families(
        w,
        &s.namespaces,
        |n| [("namespace", &n.namespace)],
        |f| Some(f.1),
        namespace_counts,
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

    key_families(
        w,
        &s.clients,
        |c| [("instance", &c.instance_id)],
        |f| f.2,
        instance_counts,
    );
}

/// A family exported both per namespace and per instance: its kind, the namespace's family
/// (name, help) and the instance's (`None`: instances are not counted this way).
type KeyFamily = (
    &'static str,
    (&'static str, &'static str),
    Option<(&'static str, &'static str)>,
);

/// What namespaces and instances both count — what their keys hold, how reads went, what was
/// evicted — in the order they are exported; [`namespace_counts`] and [`instance_counts`] give
/// the values in the same order.
#[rustfmt::skip]
const KEY_FAMILIES: [KeyFamily; 7] = [
    ("gauge", ("maru_namespace_keys", "Keys of each namespace"), Some(("maru_instance_keys", "Keys in each instance's regions"))),
    ("gauge", ("maru_namespace_bytes", "Bytes referenced by each namespace's keys"), Some(("maru_instance_key_bytes", "Bytes referenced by the keys in each instance's regions"))),
    ("gauge", ("maru_namespace_pins", "Pins held by each namespace's sessions"), Some(("maru_instance_pins", "Pins on the keys in each instance's regions"))),
    ("counter", ("maru_hits_total", "Reads that found their key, by namespace"), Some(("maru_instance_hits_total", "Reads answered from each instance's keys"))),
    ("counter", ("maru_misses_total", "Reads that found no key, by namespace"), None),
    ("counter", ("maru_evictions_total", "Keys evicted, by namespace"), Some(("maru_instance_evictions_total", "Keys of each instance evicted"))),
    ("counter", ("maru_evicted_bytes_total", "Bytes of evicted keys, by namespace"), Some(("maru_instance_evicted_bytes_total", "Bytes of each instance's evicted keys"))),
];

fn namespace_counts(n: &NamespaceStats) -> [u64; 7] {
    [
        n.keys,
        n.bytes,
        n.pins,
        n.hits,
        n.misses,
        n.evictions,
        n.evicted_bytes,
    ]
}

/// An instance has no misses (a miss finds no key, so no instance); their family is `None`.
fn instance_counts(c: &ClientStats) -> [u64; 7] {
    [
        c.keys,
        c.key_bytes,
        c.pins,
        c.hits,
        0,
        c.evictions,
        c.evicted_bytes,
    ]
}

/// The [`KEY_FAMILIES`] of `rows` (namespaces or instances): `family` picks the row kind's
/// name and help from each, `counts` the row's values.
fn key_families<T>(
    w: &mut PromWriter,
    rows: &[T],
    labels: fn(&T) -> [(&'static str, &str); 1],
    family: fn(&KeyFamily) -> Option<(&'static str, &'static str)>,
    counts: fn(&T) -> [u64; 7],
) {
    for (i, f) in KEY_FAMILIES.iter().enumerate() {
        if let Some((name, help)) = family(f) {
            w.per_row(name, f.0, help, rows, labels, |r| counts(r)[i] as f64);
        }
    }
}
