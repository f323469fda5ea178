//! The `maru-resource-manager` binary: flags, ready file, metrics endpoint, signals and the
//! messages a person sees when something is missing.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use maru_proto::{ErrorCode, Role};
use maru_resource_manager::RmClient;

#[test]
fn help_lists_the_flags() {
    maru_testkit::process::assert_help_lists(
        Path::new(env!("CARGO_BIN_EXE_maru-resource-manager")),
        &[
            "--host",
            "--port",
            "--state-dir",
            "--log-level",
            "--grace-period",
            "--server-grace-secs",
            "--max-clients",
            "--pool",
            "--ready-file",
            "--metrics-port",
        ],
    );
}

#[test]
fn a_negative_server_grace_is_refused() {
    let d = temp_dir();
    let out = rm_command(d.path(), &pool_args(d.path()))
        .arg("--server-grace-secs=-1")
        .output()
        .expect("the binary runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--server-grace-secs"), "{err}");
}

#[test]
fn invalid_pool_spec_is_a_usage_error() {
    let d = temp_dir();
    let (code, err) = failed_start(d.path(), &["shm:/dev/shm/x".into()]);
    assert_eq!(code, Some(2));
    assert!(err.contains("shm:PATH:SIZE"), "{err}");
}

#[test]
fn a_start_up_error_is_printed_once_with_its_cause_once() {
    let d = temp_dir();
    // The state directory's path is taken by a file.
    std::fs::write(state_dir(d.path()), b"not a directory").unwrap();
    let (code, err) = failed_start(d.path(), &pool_args(d.path()));
    assert_eq!(code, Some(1));
    assert_eq!(err.matches("state directory").count(), 1, "{err}");
    assert_eq!(err.matches("(os error").count(), 1, "{err}");
}

#[test]
fn without_pools_on_a_machine_without_dax_it_says_how_to_add_one() {
    if !maru_shm::discover().is_empty() {
        eprintln!("this machine has DAX pools; the message for none cannot be shown here");
        return;
    }
    let d = temp_dir();
    let (code, err) = failed_start(d.path(), &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--pool shm:"), "{err}");
}

#[test]
fn ready_file_and_metrics_endpoint() {
    let d = temp_dir();
    let mut rm = spawn_rm(d.path(), &pool_args(d.path()), &["--metrics-port", "0"]);
    assert_eq!(rm.ready["pid"].as_u64(), Some(rm.pid() as u64));
    let unix = rm.ready["unix"].as_str().expect("unix socket path");
    assert!(unix.ends_with("rm.sock"), "{unix}");
    let metrics = rm.ready["metrics"]
        .as_str()
        .expect("metrics address")
        .to_owned();
    let mut c = connect(&rm.url());
    c.alloc(3 * MIB, None).unwrap();
    let text = maru_testkit::wire::http_get(&metrics, "/metrics");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let pool = d.path().join("pools/p0").display().to_string();
    for needle in [
        format!(
            "maru_pool_bytes_total{{pool=\"{pool}\",kind=\"shm\"}} {}",
            64 * MIB
        ),
        format!(
            "maru_pool_bytes_free{{pool=\"{pool}\",kind=\"shm\"}} {}",
            60 * MIB
        ),
        format!("maru_pool_regions{{pool=\"{pool}\"}} 1"),
        "maru_rm_allocations 1".to_owned(),
        "maru_rm_reclaimed_regions_total 0".to_owned(),
        "maru_rm_ops_total{op=\"rm_alloc\"} 1".to_owned(),
        "maru_rm_op_seconds_count{op=\"rm_alloc\"} 1".to_owned(),
        "# TYPE maru_rm_op_seconds histogram".to_owned(),
    ] {
        assert!(text.contains(&needle), "{needle} missing from:\n{text}");
    }
    drop(c);
    rm.kill();
}

#[test]
fn flags_reach_the_daemon_and_sighup_does_not_stop_it() {
    let d = temp_dir();
    let mut rm = spawn_rm(
        d.path(),
        &pool_args(d.path()),
        &[
            "--max-clients",
            "1",
            "--grace-period",
            "0.3",
            "--host",
            "127.0.0.1",
        ],
    );
    let mut remote =
        RmClient::connect_as(&rm.url(), Role::Server, "remote-host", 77, 1, TIMEOUT).unwrap();
    let e = RmClient::connect(&rm.url(), Role::Server, TIMEOUT)
        .err()
        .expect("--max-clients 1 ignored");
    assert_eq!(e.code(), Some(ErrorCode::TooManyClients));
    remote.alloc(MIB, None).unwrap();
    drop(remote);
    let gone = Instant::now();
    // SAFETY: kill(2) on the child we spawned and still own.
    assert_eq!(unsafe { libc::kill(rm.pid() as i32, libc::SIGHUP) }, 0);
    let mut list = Vec::new();
    assert!(
        wait_until(Duration::from_secs(5), || {
            match RmClient::connect(&rm.url(), Role::Admin, TIMEOUT).and_then(|mut c| c.list()) {
                Ok(l) => {
                    list = l;
                    list.is_empty()
                }
                Err(_) => false,
            }
        }),
        "remote region not reclaimed with --grace-period 0.3: {list:?}"
    );
    assert!(gone.elapsed() >= Duration::from_millis(300));
    assert!(
        rm.stderr_text().contains("reclaimed region"),
        "no log line: {}",
        rm.stderr_text()
    );
    assert!(rm.terminate().success(), "SIGTERM is a clean stop");
}
