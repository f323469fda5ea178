//! The real binaries as separate processes: `maru-resource-manager` and `maru-server`, each
//! started with `--ready-file`, on a shm pool in a temp dir.
//!
//! `maru-resource-manager` is looked up next to `maru-server` (same target directory). Cargo
//! builds only this package's binaries for its tests, so when the other one has not been
//! built (e.g. `cargo test -p maru-server` on a clean tree) these tests say so and skip;
//! `cargo build --workspace --bins` (the README's test command does it) makes them run.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use common::*;
use maru_proto::*;
use maru_resource_manager::RmClient;

fn rm_binary() -> Option<PathBuf> {
    let server = Path::new(env!("CARGO_BIN_EXE_maru-server"));
    let rm = server.with_file_name("maru-resource-manager");
    if rm.exists() {
        Some(rm)
    } else {
        println!(
            "SKIPPED: {} is not built; run `cargo build --workspace --bins` first",
            rm.display()
        );
        None
    }
}

struct Proc {
    child: Child,
    ready: serde_json::Value,
    stderr: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, dir: &Path, name: &str) -> Proc {
        cmd.stdout(Stdio::null());
        let s = maru_testkit::spawn_ready(cmd, dir, name, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{e}"));
        Proc {
            child: s.child,
            ready: s.ready,
            stderr: s.stderr,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn tcp_url(&self) -> ServerUrl {
        ServerUrl::Tcp(self.ready["tcp"].as_str().expect("tcp address").to_owned())
    }

    /// SIGTERM, then wait (bounded) for the exit status.
    fn terminate(mut self) -> ExitStatus {
        // SAFETY: kill(2) on a child we spawned and have not waited for yet.
        let rc = unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0);
        let mut status = None;
        let stopped = wait_until(Duration::from_secs(10), || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        if !stopped {
            let _ = self.child.kill();
            panic!("process did not stop on SIGTERM");
        }
        status.unwrap()
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn start_rm(rm_bin: &Path, dir: &Path) -> Proc {
    let mut cmd = Command::new(rm_bin);
    cmd.args(["--port", "0", "--log-level", "warn"])
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--pool")
        .arg(format!("shm:{}:64M", pool_path(dir, "p0")));
    Proc::spawn(cmd, dir, "rm")
}

fn start_server(dir: &Path, rm: &Proc, name: &str) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_maru-server"));
    cmd.args(["--port", "0", "--metrics-port", "0", "--log-level", "warn"])
        .arg("--rm-address")
        .arg(rm.ready["tcp"].as_str().unwrap())
        .arg("--unix")
        .arg(dir.join(format!("{name}.sock")))
        .arg("--pool")
        .arg(pool_path(dir, "p0"));
    Proc::spawn(cmd, dir, name)
}

fn rm_client(rm: &Proc) -> RmClient {
    RmClient::connect(&rm.tcp_url(), Role::Admin, TIMEOUT).unwrap()
}

#[test]
fn real_server_and_resource_manager_work_together() {
    let Some(rm_bin) = rm_binary() else {
        return;
    };
    let dir = temp_dir();
    let rm = start_rm(&rm_bin, dir.path());
    let server = start_server(dir.path(), &rm, "server");
    let unix = PathBuf::from(server.ready["unix"].as_str().expect("unix path"));
    assert_eq!(server.ready["pid"].as_u64(), Some(server.pid() as u64));

    // A writer on the Unix socket, a reader over TCP.
    let mut writer = Client::connect(&ServerUrl::Unix(unix.clone()), "writer");
    let mut reader = Client::connect(&server.tcp_url(), "reader");
    let region = writer.region(2 * MIB);
    assert!(region.access.path.ends_with("p0"));
    assert!(writer.register(b"k", region.handle.region_id, 4096, 10));
    let loc = reader.lookup(b"k").expect("shared key");
    assert_eq!(
        (loc.region.clone(), loc.offset, loc.len),
        (region.clone(), 4096, 10)
    );

    // The server, not the client, owns the region at the resource manager.
    let mut rmc = rm_client(&rm);
    let listed = rmc.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].owner_pid, server.pid());

    // Deferred freeing, checked through the resource manager's stats.
    writer.goodbye();
    assert_eq!(
        rmc.stats().unwrap().allocations,
        1,
        "a key still references it"
    );
    assert_eq!(reader.delete(b"k"), DeleteStatus::Deleted);
    assert_eq!(rmc.stats().unwrap().allocations, 0);

    // Metrics over HTTP.
    let metrics = server.ready["metrics"]
        .as_str()
        .expect("metrics address")
        .to_owned();
    let body = http_get(&metrics);
    assert!(body.contains("maru_rm_up 1"), "{body}");

    // SIGTERM: clean exit, regions back, socket file gone.
    let _kept = reader.region(2 * MIB);
    assert_eq!(rmc.stats().unwrap().allocations, 1);
    drop(reader);
    let stderr = server.stderr.clone();
    let status = server.terminate();
    assert!(
        status.success(),
        "{status}: {}",
        std::fs::read_to_string(stderr).unwrap_or_default()
    );
    assert!(!unix.exists(), "unix socket left behind");
    assert_eq!(rmc.stats().unwrap().allocations, 0);
    drop(rmc);
    assert!(rm.terminate().success());
}

#[test]
fn a_killed_server_regions_are_reclaimed_by_the_resource_manager() {
    let Some(rm_bin) = rm_binary() else {
        return;
    };
    let dir = temp_dir();
    let rm = start_rm(&rm_bin, dir.path());
    let server = start_server(dir.path(), &rm, "doomed");
    let mut c = Client::connect(&server.tcp_url(), "c");
    let r = c.region(2 * MIB).handle.region_id;
    assert!(c.register(b"k", r, 0, 1));
    let mut rmc = rm_client(&rm);
    assert_eq!(rmc.stats().unwrap().allocations, 1);
    server.kill();
    assert!(
        wait_until(Duration::from_secs(15), || rmc
            .stats()
            .map(|s| s.allocations == 0)
            .unwrap_or(false)),
        "regions of a dead server were not reclaimed"
    );
}

#[test]
fn bad_flags_are_refused_with_a_clear_exit_code() {
    let bin = env!("CARGO_BIN_EXE_maru-server");
    let out = Command::new(bin).arg("--no-such-flag").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(bin)
        .args(["--port", "0", "--rm-address", "not a url"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--rm-address"));
    let out = Command::new(bin).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--host",
        "--port",
        "--unix",
        "--rm-address",
        "--pool",
        "--log-level",
        "--max-clients",
        "--ready-file",
        "--metrics-port",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
}

fn http_get(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}
