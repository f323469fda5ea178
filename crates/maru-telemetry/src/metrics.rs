//! Prometheus text exposition (format 0.0.4) and a tiny HTTP endpoint serving it. Metrics are
//! scraped every few seconds, so a thread with a blocking accept loop is all it takes.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::Histogram;

/// Upper bounds (seconds) of the latency histogram buckets exported to Prometheus.
pub const LATENCY_BOUNDS_S: &[f64] = &[
    0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.005, 0.025, 0.1,
    1.0,
];

/// Builds a text exposition document.
#[derive(Default)]
pub struct PromWriter {
    out: String,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

impl PromWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// `# HELP` and `# TYPE` lines; call once per metric family before its samples.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) -> &mut Self {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        self
    }

    pub fn sample(&mut self, name: &str, label_pairs: &[(&str, &str)], value: f64) -> &mut Self {
        let _ = writeln!(self.out, "{name}{} {value}", labels(label_pairs));
        self
    }

    /// A histogram family sample set (`_bucket`, `_sum`, `_count`) from a [`Histogram`].
    pub fn histogram(
        &mut self,
        name: &str,
        label_pairs: &[(&str, &str)],
        h: &Histogram,
    ) -> &mut Self {
        for (bound, count) in LATENCY_BOUNDS_S
            .iter()
            .zip(h.cumulative_at(LATENCY_BOUNDS_S))
        {
            let le = format!("{bound}");
            let mut pairs = label_pairs.to_vec();
            pairs.push(("le", &le));
            self.sample(&format!("{name}_bucket"), &pairs, count as f64);
        }
        let mut pairs = label_pairs.to_vec();
        pairs.push(("le", "+Inf"));
        self.sample(&format!("{name}_bucket"), &pairs, h.count() as f64);
        self.sample(&format!("{name}_sum"), label_pairs, h.sum().as_secs_f64());
        self.sample(&format!("{name}_count"), label_pairs, h.count() as f64)
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// A running metrics endpoint. Dropping it stops the thread.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves `render()` as `text/plain; version=0.0.4` on `GET /metrics` (any other path: 404).
pub fn serve_metrics<F>(addr: SocketAddr, render: F) -> io::Result<MetricsServer>
where
    F: Fn() -> String + Send + 'static,
{
    let listener = TcpListener::bind(addr)?;
    let addr = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let thread = std::thread::Builder::new()
        .name("maru-metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(mut s) = conn {
                    let _ = answer(&mut s, &render);
                }
            }
        })?;
    Ok(MetricsServer {
        addr,
        stop,
        thread: Some(thread),
    })
}

fn answer(s: &mut TcpStream, render: &dyn Fn() -> String) -> io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16 * 1024 {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&req);
    let (status, body) = if line.starts_with("GET /metrics ") || line.starts_with("GET /metrics?") {
        ("200 OK", render())
    } else {
        (
            "404 Not Found",
            "not found; metrics are at /metrics\n".to_string(),
        )
    };
    write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_is_served_over_http() {
        let h = Arc::new(Histogram::new());
        h.record(Duration::from_micros(20));
        let h2 = h.clone();
        let server = serve_metrics("127.0.0.1:0".parse().unwrap(), move || {
            let mut w = PromWriter::new();
            w.family("maru_keys", "gauge", "Registered keys")
                .sample("maru_keys", &[], 3.0);
            w.family("maru_op_seconds", "histogram", "Latency")
                .histogram("maru_op_seconds", &[("op", "exists")], &h2);
            w.finish()
        })
        .unwrap();
        let mut s = TcpStream::connect(server.addr()).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        assert!(body.starts_with("HTTP/1.1 200 OK"));
        assert!(body.contains("\nmaru_keys 3\n"));
        assert!(body.contains("maru_op_seconds_bucket{op=\"exists\",le=\"0.000025\"} 1\n"));
        assert!(body.contains("maru_op_seconds_count{op=\"exists\"} 1\n"));
    }
}
