//! The HTTP endpoint a Prometheus server scrapes: `GET /metrics`, one thread.
//!
//! Requests are parsed by `httparse`; the socket handling around it stays here because the
//! endpoint answers one request per connection and then closes it, which the small blocking
//! servers do not offer (`tiny_http` keeps HTTP/1.1 connections open until the client asks
//! otherwise, with no idle timeout, so every idle scraper would hold a thread), and `hyper`
//! would bring an async runtime into daemons that are blocking by design (ARCHITECTURE §6).
//! Metrics are scraped every few seconds, so a blocking accept loop is all it takes.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::exposition::CONTENT_TYPE;

/// How long a scraper may take to send its request, or to take the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Larger requests are refused: a scrape is one line and a few headers.
const MAX_REQUEST: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;

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

/// Serves `render()` (a text exposition, see [`crate::PromWriter`]) on `GET /metrics`; any
/// other path gets 404, a malformed request 400. Each connection gets one answer and is closed.
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
                    if let Err(e) = answer(&mut s, &render) {
                        tracing::debug!("metrics request: {e}");
                    }
                }
            }
        })?;
    Ok(MetricsServer {
        addr,
        stop,
        thread: Some(thread),
    })
}

/// What a complete request asks for.
enum Ask {
    Metrics,
    Other,
    Malformed,
}

fn read_request(s: &mut TcpStream) -> io::Result<Option<Ask>> {
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(None);
        }
        req.extend_from_slice(&buf[..n]);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(&req) {
            Ok(httparse::Status::Complete(_)) => {
                let path = parsed.path.unwrap_or("");
                let path = path.split_once('?').map_or(path, |(p, _)| p);
                let ask = if parsed.method == Some("GET") && path == "/metrics" {
                    Ask::Metrics
                } else {
                    Ask::Other
                };
                return Ok(Some(ask));
            }
            Ok(httparse::Status::Partial) if req.len() < MAX_REQUEST => continue,
            Ok(httparse::Status::Partial) | Err(_) => return Ok(Some(Ask::Malformed)),
        }
    }
}

fn answer(s: &mut TcpStream, render: &dyn Fn() -> String) -> io::Result<()> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let Some(ask) = read_request(s)? else {
        return Ok(());
    };
    let (status, content_type, body) = match ask {
        Ask::Metrics => ("200 OK", CONTENT_TYPE, render()),
        Ask::Other => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found; metrics are at /metrics\n".to_owned(),
        ),
        Ask::Malformed => (
            "400 Bad Request",
            "text/plain; charset=utf-8",
            "malformed HTTP request\n".to_owned(),
        ),
    };
    write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    s.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PromWriter;

    fn get(server: &MetricsServer, request: &[u8]) -> String {
        let mut s = TcpStream::connect(server.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request).unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    }

    fn keys_endpoint() -> MetricsServer {
        serve_metrics("127.0.0.1:0".parse().unwrap(), || {
            let mut w = PromWriter::new();
            w.family("maru_keys", "gauge", "Registered keys")
                .sample("maru_keys", &[], 3.0);
            w.finish()
        })
        .unwrap()
    }

    #[test]
    fn exposition_is_served_over_http_and_the_connection_closed() {
        let server = keys_endpoint();
        let body = get(&server, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(body.starts_with("HTTP/1.1 200 OK\r\n"), "{body}");
        assert!(
            body.contains("Content-Type: text/plain; version=0.0.4"),
            "{body}"
        );
        assert!(body.contains("\nmaru_keys 3\n"), "{body}");
        let with_query = get(&server, b"GET /metrics?x=1 HTTP/1.1\r\n\r\n");
        assert!(
            with_query.starts_with("HTTP/1.1 200 OK\r\n"),
            "{with_query}"
        );
    }

    #[test]
    fn other_paths_and_garbage_get_errors() {
        let server = keys_endpoint();
        let other = get(&server, b"GET / HTTP/1.1\r\n\r\n");
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
        let post = get(&server, b"POST /metrics HTTP/1.1\r\n\r\n");
        assert!(post.starts_with("HTTP/1.1 404"), "{post}");
        let garbage = get(&server, b"\x00\x01 not http\r\n\r\n");
        assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
        // The endpoint still answers afterwards.
        let again = get(&server, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(again.starts_with("HTTP/1.1 200 OK\r\n"), "{again}");
    }
}
