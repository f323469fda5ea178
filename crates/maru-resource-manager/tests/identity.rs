//! Who a caller is comes from the kernel, not from its Hello: on the Unix socket the pid and
//! uid of `SO_PEERCRED`; on TCP from this host, the process that holds the connection. Every
//! refusal happens at the Hello and changes nothing.

use std::path::Path;
use std::process::Stdio;

use maru_proto::{ErrorCode, Role, ServerUrl};
use maru_resource_manager::{start, RmClient, RmConfig, RmHandle};
use maru_testkit::{shm_pool, temp_dir, MIB, TIMEOUT};

/// Set in a child process that connects to the Unix socket named by its value.
const CHILD_ENV: &str = "MARU_RM_IDENTITY_CHILD";

/// A resource manager with a Unix socket at `dir/rm.sock` (outside the private state
/// directory, so that a test may open it to other users).
fn rm_with_unix(dir: &Path) -> RmHandle {
    let mut cfg = RmConfig::new(dir.join("state"), vec![shm_pool(dir, "p0", 64 * MIB)]);
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.unix = Some(dir.join("rm.sock"));
    start(cfg).unwrap()
}

fn unix_url(dir: &Path) -> ServerUrl {
    ServerUrl::Unix(dir.join("rm.sock"))
}

fn refused_code(r: Result<RmClient, maru_resource_manager::RmClientError>) -> ErrorCode {
    match r {
        Ok(_) => panic!("a forged identity was accepted"),
        Err(e) => e
            .code()
            .unwrap_or_else(|| panic!("not a typed refusal: {e}")),
    }
}

#[test]
fn child_role() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let url = ServerUrl::Unix(path.into());
    let answer = match RmClient::connect(&url, Role::Server, TIMEOUT) {
        Ok(_) => "connected".to_owned(),
        Err(e) => format!("refused {:?}: {e}", e.code()),
    };
    println!("@@ {answer}");
    std::process::exit(0);
}

#[test]
fn on_the_unix_socket_the_kernel_names_the_owner() {
    let d = temp_dir();
    let rm = rm_with_unix(d.path());
    let (host, pid, start) = maru_transport::local_identity();
    let mut me = RmClient::connect(&unix_url(d.path()), Role::Server, TIMEOUT).unwrap();
    let h = me.alloc(MIB, None).unwrap();
    let list = rm.list();
    assert_eq!(list.len(), 1);
    assert_eq!(
        (list[0].owner_host.as_str(), list[0].owner_pid),
        (host.as_str(), pid)
    );
    assert_eq!(list[0].owner_start_time, start);

    // Another pid, another start time, another host: each refused at the Hello.
    let before = rm.list();
    for (what, host, pid, start) in [
        ("pid 1", host.as_str(), 1, 0),
        ("another start time", host.as_str(), pid, start + 1),
        ("another host", "elsewhere", pid, start),
    ] {
        let code = refused_code(RmClient::connect_as(
            &unix_url(d.path()),
            Role::Server,
            host,
            pid,
            start,
            TIMEOUT,
        ));
        assert_eq!(code, ErrorCode::Unauthenticated, "{what}");
    }
    assert_eq!(rm.list(), before, "a refused Hello changed the table");
    me.free(&h).unwrap();
    rm.shutdown();
}

#[test]
fn over_loopback_tcp_a_claimed_local_pid_must_hold_the_connection() {
    let d = temp_dir();
    let rm = rm_with_unix(d.path());
    let mut me = RmClient::connect(&rm.url(), Role::Server, TIMEOUT).unwrap();
    let h = me.alloc(MIB, None).unwrap();
    let before = rm.list();
    let (host, pid, start) = maru_transport::local_identity();
    // Init is alive and local, and holds no socket of ours.
    let code = refused_code(RmClient::connect_as(
        &rm.url(),
        Role::Server,
        &host,
        1,
        0,
        TIMEOUT,
    ));
    assert_eq!(code, ErrorCode::Unauthenticated);
    let code = refused_code(RmClient::connect_as(
        &rm.url(),
        Role::Server,
        &host,
        pid,
        start + 1,
        TIMEOUT,
    ));
    assert_eq!(code, ErrorCode::Unauthenticated);
    assert_eq!(rm.list(), before, "a refused Hello changed the table");
    me.free(&h).unwrap();
    rm.shutdown();
}

#[test]
fn another_uid_is_refused_on_the_unix_socket() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("skipped: needs root to run a process as another uid");
        return;
    }
    let d = temp_dir();
    let rm = rm_with_unix(d.path());
    // Let the other user reach the socket, so that the refusal is the resource manager's,
    // not the file system's.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        d.path().join("rm.sock"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    let before = rm.list();
    let mut cmd = maru_testkit::rerun_test("child_role");
    cmd.env(CHILD_ENV, d.path().join("rm.sock"));
    use std::os::unix::process::CommandExt;
    cmd.uid(65534).gid(65534);
    let out = cmd.stderr(Stdio::inherit()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let answer = text
        .lines()
        .find_map(|l| l.split("@@ ").nth(1))
        .unwrap_or_else(|| panic!("no answer from the child: {text}"));
    assert!(
        answer.starts_with("refused Some(Unauthenticated)") && answer.contains("uid 65534"),
        "{answer}"
    );
    assert_eq!(rm.list(), before);
    rm.shutdown();
}
