//! The Prometheus exposition of a server's state.

use maru_proto::request_name;
use maru_telemetry::PromWriter;

use crate::state::{ServerState, OP_NAMES};

/// Renders every metric. Pool gauges come from the resource manager and are left out (with
/// `maru_rm_up 0`) when it cannot be reached.
pub(crate) fn render(state: &ServerState) -> String {
    let s = state.stats();
    let mut w = PromWriter::new();
    w.family("maru_keys", "gauge", "Registered keys")
        .sample("maru_keys", &[], s.keys as f64);
    w.family(
        "maru_key_bytes",
        "gauge",
        "Bytes referenced by registered keys",
    )
    .sample("maru_key_bytes", &[], s.bytes as f64);
    w.family("maru_pinned_keys", "gauge", "Keys with at least one pin")
        .sample("maru_pinned_keys", &[], s.pinned_keys as f64);
    w.family("maru_regions", "gauge", "Live regions")
        .sample("maru_regions", &[], s.regions as f64);
    w.family("maru_region_bytes", "gauge", "Bytes in live regions")
        .sample("maru_region_bytes", &[], s.region_bytes as f64);
    w.family("maru_clients", "gauge", "Connected client instances")
        .sample("maru_clients", &[], state.session_count() as f64);
    w.family("maru_connections", "gauge", "Open connections (all roles)")
        .sample(
            "maru_connections",
            &[],
            state.connections.load(std::sync::atomic::Ordering::Relaxed) as f64,
        );
    w.family(
        "maru_ops_total",
        "counter",
        "Requests answered, by operation",
    );
    for t in OP_NAMES {
        let op = request_name(*t);
        let count = state.ops.get(op).map_or(0, |h| h.count());
        w.sample("maru_ops_total", &[("op", op)], count as f64);
    }
    w.family(
        "maru_op_errors_total",
        "counter",
        "Requests answered with an error, by operation",
    );
    for (op, o) in &s.ops {
        w.sample("maru_op_errors_total", &[("op", op)], o.errors as f64);
    }
    w.family(
        "maru_op_seconds",
        "histogram",
        "Time to answer a request, by operation",
    );
    for t in OP_NAMES {
        let op = request_name(*t);
        if let Some(h) = state.ops.get(op) {
            if h.count() > 0 {
                w.histogram("maru_op_seconds", &[("op", op)], h);
            }
        }
    }
    w.family(
        "maru_rm_up",
        "gauge",
        "Whether the resource manager answered",
    )
    .sample("maru_rm_up", &[], s.rm_error.is_none() as u8 as f64);
    if s.rm_error.is_none() {
        w.family("maru_pool_total_bytes", "gauge", "Size of each pool");
        for p in &s.pools {
            w.sample(
                "maru_pool_total_bytes",
                &[("pool", &p.path)],
                p.total_bytes as f64,
            );
        }
        w.family("maru_pool_free_bytes", "gauge", "Free bytes in each pool");
        for p in &s.pools {
            w.sample(
                "maru_pool_free_bytes",
                &[("pool", &p.path)],
                p.free_bytes as f64,
            );
        }
        w.family(
            "maru_pool_regions",
            "gauge",
            "Regions carved from each pool",
        );
        for p in &s.pools {
            w.sample("maru_pool_regions", &[("pool", &p.path)], p.regions as f64);
        }
    }
    w.finish()
}
