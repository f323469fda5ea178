//! What every Maru daemon needs around its work, and nothing of the work itself.
//!
//! Owns: lock-free latency histograms and per-operation counters ([`Histogram`],
//! [`OpTable`]), `tracing` set-up (`--log-level` and `MARU_LOG`), the Prometheus exposition
//! of whatever a daemon chooses to export ([`PromWriter`], encoded by `prometheus-client`)
//! and the HTTP endpoint that serves it, and the process plumbing of the binaries (ready
//! files, stop signals).
//!
//! May not touch: keys, regions, pools or sockets of the protocol. It knows no daemon's
//! state: daemons hand it names and numbers (and it fills the `OpStats` report that
//! `maru-proto` defines). It maps no memory (that is `maru-shm`'s) and listens on nothing
//! but the metrics port.

mod endpoint;
mod exposition;
mod histogram;
mod logging;
pub mod process;

pub use endpoint::{serve_metrics, MetricsServer};
pub use exposition::{gauge, PromWriter, RowFamily, CONTENT_TYPE, LATENCY_BOUNDS_S};
pub use histogram::{Histogram, OpTable};
pub use logging::init_logging;
