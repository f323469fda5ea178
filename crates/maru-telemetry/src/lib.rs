//! What every daemon needs around its work: lock-free latency histograms, per-operation
//! counters, `tracing` set-up (`--log-level` and `MARU_LOG`), a minimal Prometheus endpoint,
//! and the process plumbing of the binaries (ready files, stop signals).

mod histogram;
mod logging;
mod metrics;
pub mod process;

pub use histogram::{Histogram, OpTable};
pub use logging::init_logging;
pub use metrics::{serve_metrics, MetricsServer, PromWriter};
