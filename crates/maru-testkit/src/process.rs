//! Child processes of a test: daemon binaries started through their ready file and stopped
//! with a signal, the workspace's binaries found next to the test executable, and the test
//! binary itself re-executed in a child role.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::wait_until;

/// A daemon binary that has written its `--ready-file`.
pub struct Started {
    pub child: Child,
    /// The ready file's JSON (bound addresses, pid, ...).
    pub ready: serde_json::Value,
    /// Where the daemon's stderr goes.
    pub stderr: PathBuf,
}

/// Spawns `cmd` with `--ready-file dir/<name>.ready`, stdin closed, stderr to a fresh
/// `dir/<name>.<n>.stderr` and `MARU_LOG` unset (stdout is the caller's choice), and waits up
/// to `within` for the file to parse. `Err` carries the daemon's stderr when it exits first
/// or never becomes ready (it is killed then).
pub fn spawn_ready(
    mut cmd: Command,
    dir: &Path,
    name: &str,
    within: Duration,
) -> Result<Started, String> {
    let ready_path = dir.join(format!("{name}.ready"));
    let _ = std::fs::remove_file(&ready_path);
    let n = std::fs::read_dir(dir).map(|r| r.count()).unwrap_or(0);
    let stderr = dir.join(format!("{name}.{n}.stderr"));
    let mut child = cmd
        .arg("--ready-file")
        .arg(&ready_path)
        .env_remove("MARU_LOG")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&stderr).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("spawn {name}: {e}"))?;
    let mut ready = None;
    let mut exited = None;
    let ok = wait_until(within, || {
        if let Ok(Some(status)) = child.try_wait() {
            exited = Some(status);
            return true;
        }
        ready = std::fs::read_to_string(&ready_path)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
        ready.is_some()
    });
    let text = || std::fs::read_to_string(&stderr).unwrap_or_default();
    if let Some(status) = exited {
        return Err(format!("{name} exited with {status}: {}", text()));
    }
    match ready {
        Some(ready) if ok => Ok(Started {
            child,
            ready,
            stderr,
        }),
        _ => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!("{name} not ready within {within:?}: {}", text()))
        }
    }
}

/// SIGTERM, then waits up to `within` for the exit. A child that is still running then is
/// SIGKILLed and reaped, and `Err` says so: a daemon that ignores SIGTERM is a failure, and
/// it must not outlive the test. A child that has already exited returns its status.
pub fn terminate(child: &mut Child, within: Duration) -> Result<ExitStatus, String> {
    if let Ok(Some(status)) = child.try_wait() {
        return Ok(status);
    }
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our child, not reaped
    // yet (try_wait above saw it running), so it cannot name another process.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    if rc != 0 {
        return Err(format!(
            "SIGTERM to {pid}: {}",
            std::io::Error::last_os_error()
        ));
    }
    let mut status = None;
    wait_until(within, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    status.ok_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        format!("process {pid} did not stop within {within:?} of SIGTERM (killed)")
    })
}

/// Makes `cmd`'s process die with the thread that spawns it (`PR_SET_PDEATHSIG`), so a test
/// runner killed outright leaves no daemon, client or namespace holder behind (a normal
/// failure kills them in `Drop`).
pub fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl(2) is async-signal-safe and only sets a flag of the child itself.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// This test binary again, running only the test `name` (single-threaded, output shown):
/// a child process whose role that test plays when the caller's environment variable is
/// set, and which does nothing in a normal run.
pub fn rerun_test(name: &str) -> Command {
    let exe = std::env::current_exe().expect("current exe");
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", name, "--nocapture", "--test-threads=1"]);
    cmd
}

/// A TCP port on 127.0.0.1 that was free a moment ago. Daemons that must come back on the
/// same address after a crash (the metadata server keeps the resource manager's address;
/// clients keep the server's) cannot use port 0.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Directory of the binaries built with the test executable: `target/<profile>/`, the parent
/// of the `deps/` directory the test executable runs from.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let deps = exe.parent().expect("exe dir");
    let dir = if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().expect("profile dir")
    } else {
        deps
    };
    dir.to_owned()
}

/// A workspace binary next to the test executable, if it has been built. Cargo builds only
/// the tested package's binaries for its tests.
pub fn built_binary(name: &str) -> Option<PathBuf> {
    let p = bin_dir().join(name);
    p.exists().then_some(p)
}

/// A workspace binary next to the test executable; panics saying how to build it.
pub fn binary(name: &str) -> PathBuf {
    built_binary(name).unwrap_or_else(|| {
        panic!(
            "{} is missing: run `cargo build --release --bins` (or `cargo build --bins` for a \
             debug test run) before these tests; scripts/test.sh does it",
            bin_dir().join(name).display()
        )
    })
}

/// `bin --help` succeeds and names every one of `flags`.
pub fn assert_help_lists(bin: &Path, flags: &[&str]) {
    let out = Command::new(bin)
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("{} --help: {e}", bin.display()));
    assert!(
        out.status.success(),
        "{} --help: {}",
        bin.display(),
        out.status
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in flags {
        assert!(text.contains(flag), "{flag} missing from --help:\n{text}");
    }
}

/// Runs `cmd` (named `what` in failures), which must succeed and print one JSON document on
/// stdout: that document. A failure shows the command's stderr.
pub fn json_output(mut cmd: Command, what: &str) -> serde_json::Value {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what} failed: {}\n{stderr}",
        out.status
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("stdout of {what} is not one JSON document ({e}); stderr:\n{stderr}")
    })
}
