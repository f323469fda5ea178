//! The `redis-server` the Redis rows run against: started on a free loopback port and a Unix
//! socket in the run's scratch directory, persistence off, killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::conn::RedisConn;
use crate::daemons::{track_child, untrack_child};
use crate::floor::Transport;

/// Whether `redis-server` is on PATH.
pub fn available() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A running redis-server, killed on drop.
pub struct Redis {
    child: Child,
    pub port: u16,
    pub sock: PathBuf,
}

impl Redis {
    pub fn start(dir: &Path) -> anyhow::Result<Redis> {
        // Ask the OS for a free port, then hand it to Redis (a tiny race, retried below).
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let sock = dir.join("redis.sock");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--unixsocket")
            .arg(&sock)
            .args(["--unixsocketperm", "700", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir)
            .args(["--loglevel", "warning", "--logfile", ""])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start redis-server")?;
        track_child(child.id());
        let mut r = Redis { child, port, sock };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = r.connect(Transport::Tcp) {
                if c.call(&[b"PING"], &mut Vec::new()).is_ok() {
                    return Ok(r);
                }
            }
            if let Ok(Some(status)) = r.child.try_wait() {
                bail!("redis-server exited at start ({status}); port {port} taken?");
            }
            if Instant::now() > deadline {
                bail!("redis-server did not answer PING within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn connect(&self, t: Transport) -> std::io::Result<RedisConn> {
        match t {
            Transport::Tcp => RedisConn::tcp(("127.0.0.1", self.port)),
            Transport::Unix => RedisConn::unix(&self.sock),
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        untrack_child(self.child.id());
    }
}
