//! Test harness for Maru's fault, load, bad-input and security tests (`tests/`).
//!
//! Everything here is a real part: the daemons are the real `maru-resource-manager` and
//! `maru-server` binaries ([`daemon`]), client processes are this test binary re-executed in a
//! "child role" that drives a real `MaruHandler` ([`child`]), crashes are `SIGKILL`, pools
//! are shm files under `/dev/shm`. Payloads check themselves ([`payload`]), so a test can
//! tell intact data from zeros or another key's bytes after any fault.

pub mod child;
pub mod daemon;
pub mod lat;
pub mod load;
pub mod ns;
pub mod payload;

use std::path::{Path, PathBuf};

pub use maru_testkit::{temp_dir, wait_until};

pub const MIB: u64 = 1 << 20;
pub const KIB: u64 = 1 << 10;

/// Whether the long variants were asked for (`MARU_LONG_TESTS=1`).
pub fn long_tests() -> bool {
    std::env::var("MARU_LONG_TESTS").is_ok_and(|v| v == "1")
}

/// A TCP port that was free a moment ago. Daemons that must come back on the same address
/// after a crash (the metadata server keeps the resource manager's address; clients keep the
/// server's) cannot use port 0.
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

/// A workspace binary next to the test executable. Cargo does not build other packages'
/// binaries for this crate's tests, so say how to get them.
pub fn binary(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --release --bins` (or `cargo build --bins` for a \
         debug test run) before these tests; scripts/test.sh does it",
        p.display()
    );
    p
}

/// Makes `cmd`'s process die with the thread that spawns it (`PR_SET_PDEATHSIG`), so a
/// test runner killed outright leaves no daemon, client or namespace holder behind (a normal
/// failure kills them in `Drop`).
pub fn die_with_parent(cmd: &mut std::process::Command) {
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

/// Mode bits of a path (`st_mode & 0o7777`).
pub fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}
