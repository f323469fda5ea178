use tracing_subscriber::EnvFilter;

/// Sets up `tracing` output on stderr. `MARU_LOG` (an env-filter directive such as
/// `maru_server=debug`) wins over `level` (the `--log-level` flag). Safe to call twice: the
/// second call is a no-op, which lets embedded mode and tests share one process.
pub fn init_logging(level: &str) {
    let filter = std::env::var("MARU_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| EnvFilter::try_new(level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
