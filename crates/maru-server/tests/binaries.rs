//! The real binaries as separate processes: `maru-resource-manager` and `maru-server`, each
//! started with `--ready-file`, on a shm pool in a temp dir.
//!
//! `maru-resource-manager` is looked up next to `maru-server` (same target directory). Cargo
//! builds only this package's binaries for its tests, so when the other one has not been
//! built (e.g. `cargo test -p maru-server` on a clean tree) these tests say so and skip;
//! `cargo build --workspace --bins` (the README's test command does it) makes them run.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use maru_proto::*;
use maru_testkit::binary_cluster::rm_admin;
use maru_testkit::process::{assert_help_lists, built_binary};
use maru_testkit::{shm_pool_arg, Daemon, RmSpec, ServerSpec};

/// Whether `maru-resource-manager` has been built next to `maru-server`; says so when not.
fn rm_built() -> bool {
    let built = built_binary("maru-resource-manager").is_some();
    if !built {
        println!("SKIPPED: maru-resource-manager is not built; run `cargo build --workspace --bins` first");
    }
    built
}

fn start_rm(dir: &Path) -> Daemon {
    RmSpec::new(dir, vec![shm_pool_arg(dir, "p0", 64 * MIB)])
        .spawn(dir)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn start_server(dir: &Path, rm: &Daemon, name: &str) -> Daemon {
    ServerSpec {
        unix: Some(dir.join(format!("{name}.sock"))),
        extra: vec![
            "--metrics-port".into(),
            "0".into(),
            "--pool".into(),
            pool_path(dir, "p0"),
        ],
        ..ServerSpec::new(rm.tcp())
    }
    .spawn(dir, name)
    .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn real_server_and_resource_manager_work_together() {
    if !rm_built() {
        return;
    }
    let dir = temp_dir();
    let mut rm = start_rm(dir.path());
    let mut server = start_server(dir.path(), &rm, "server");
    let unix = PathBuf::from(server.ready["unix"].as_str().expect("unix path"));
    assert_eq!(server.ready["pid"].as_u64(), Some(server.pid() as u64));

    // A writer on the Unix socket, a reader over TCP.
    let mut writer = Client::connect(&ServerUrl::Unix(unix.clone()), "writer");
    let mut reader = Client::connect(&server.url(), "reader");
    let region = writer.region(2 * MIB);
    assert!(region.access.path.ends_with("p0"));
    assert!(writer.register(b"k", region.handle.region_id, 4096, 10));
    // An admin's lookup takes no hold on the page (a client's would keep it until released).
    let mut admin = Client::connect_role(&server.url(), Role::Admin, "admin", None).unwrap();
    let loc = admin.lookup(b"k").expect("shared key");
    assert!(reader.lookup(b"missing").is_none());
    assert_eq!(
        (loc.region.clone(), loc.offset, loc.len),
        (region.clone(), 4096, 10)
    );

    // The server, not the client, owns the region at the resource manager.
    let mut rmc = rm_admin(&rm.url());
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
    let body = wire::http_get(&metrics, "/metrics");
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
    if !rm_built() {
        return;
    }
    let dir = temp_dir();
    let rm = start_rm(dir.path());
    let mut server = start_server(dir.path(), &rm, "doomed");
    let mut c = Client::connect(&server.url(), "c");
    let r = c.region(2 * MIB).handle.region_id;
    assert!(c.register(b"k", r, 0, 1));
    let mut rmc = rm_admin(&rm.url());
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
    assert_help_lists(
        Path::new(bin),
        &[
            "--host",
            "--port",
            "--unix",
            "--rm-address",
            "--pool",
            "--log-level",
            "--max-clients",
            "--ready-file",
            "--metrics-port",
        ],
    );
}

/// A key index that does not validate is refused, with the check it failed and exit code 3,
/// and left byte for byte as it was; a file that is no index at all likewise.
#[test]
fn a_corrupt_key_index_is_refused_with_a_clear_message_and_left_as_it_is() {
    let dir = maru_testkit::temp_dir();
    let path = dir.path().join("keys.index");
    {
        let mut w = maru_index::IndexWriter::create(
            &path,
            maru_index::CreateOptions {
                capacity: 1000,
                key_area_bytes: 64 << 10,
            },
        )
        .unwrap();
        let at = maru_index::Location {
            region: 1,
            offset: 0,
            len: 10,
        };
        w.insert_if_absent(0, b"k", at).unwrap();
    }
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[20] ^= 0xff; // inside the checksummed geometry
    std::fs::write(&path, &bytes).unwrap();
    let not_an_index = dir.path().join("other.index");
    std::fs::write(&not_an_index, vec![7u8; 8192]).unwrap();

    let bin = env!("CARGO_BIN_EXE_maru-server");
    for (file, says) in [(&path, "checksum"), (&not_an_index, "not a Maru key index")] {
        let before = std::fs::read(file).unwrap();
        let out = Command::new(bin)
            .args(["--port", "0", "--rm-address", "127.0.0.1:9", "--index"])
            .arg(file)
            .env_remove("MARU_LOG")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{stderr}");
        assert!(stderr.contains("refusing to start"), "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
        assert!(stderr.contains(&file.display().to_string()), "{stderr}");
        assert_eq!(std::fs::read(file).unwrap(), before, "never reset");
    }
}
