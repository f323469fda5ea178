//! Observability shared by the daemons: lock-free latency histograms, per-operation counters,
//! `tracing` set-up (`--log-level` and `MARU_LOG`) and a minimal Prometheus endpoint.

mod histogram;
mod logging;
mod metrics;

pub use histogram::{Histogram, OpTable};
pub use logging::init_logging;
pub use metrics::{serve_metrics, MetricsServer, PromWriter};
