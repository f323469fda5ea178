//! Nobody in where they don't belong, across the real components: handles a client learns
//! from the metadata server cannot be freed, altered or replayed at the resource manager; an
//! instance cannot register into, return or take over another instance's regions or
//! session; limits hold through the client library; state files, the secret and the socket
//! are not open to others. Every refusal is a typed error and changes nothing.
//!
//! Already covered in-process elsewhere (not repeated): maru-resource-manager `tests/tokens.rs` (every
//! altered field, another secret's token, another start time), maru-server
//! `tests/bad_input.rs` (register out of bounds, sessions, limits at the decoder),
//! `tests/server.rs` (admins read only, client limit).

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;

use maru_client::{ErrorKind, MaruConfig, MaruHandler};
use maru_faults::{free_port, mode_of, observable_state, small_handler, temp_dir, wait_until, MIB};
use maru_proto::{
    ErrorCode, RegionInfo, RegisterEntry, Request, Response, Role, ServerUrl, SESSION_TOKEN_LEN,
};
use maru_resource_manager::RmClient;
use maru_testkit::{wire, BinaryCluster, ClusterOpts, Daemon, RmSpec, ServerSpec, TIMEOUT};
use maru_transport::{BlockingConn, CallError};

fn handler(c: &BinaryCluster) -> MaruHandler {
    let h = small_handler(&c.unix_url());
    h.connect().unwrap();
    h
}

fn client_conn(
    url: &ServerUrl,
    instance: &str,
    token: Option<[u8; SESSION_TOKEN_LEN]>,
) -> Result<BlockingConn, CallError> {
    wire::connect_as(url, Role::Client, instance, token)
}

fn code(r: Result<Response, CallError>) -> Option<ErrorCode> {
    match r {
        Err(e) => e.code(),
        Ok(other) => panic!("accepted: {other:?}"),
    }
}

fn region(conn: &mut BlockingConn) -> RegionInfo {
    match conn
        .call(&Request::RequestRegion { size: 2 * MIB })
        .unwrap()
    {
        Response::Region(r) => r,
        other => panic!("{other:?}"),
    }
}

#[test]
fn handles_learned_from_the_server_cannot_be_freed_altered_or_replayed_at_the_rm() {
    let c = BinaryCluster::start(ClusterOpts::default());
    let owner = handler(&c);
    owner.store_bytes(b"victim", b"", b"precious").unwrap();
    // Any client learns the region's genuine handle from a lookup.
    let mut snoop = client_conn(&ServerUrl::Unix(c.sock.clone()), "snoop", None).unwrap();
    let h = match snoop.call(&Request::Lookup { key: b"victim" }).unwrap() {
        Response::Lookup(Some(loc)) => loc.region.handle,
        other => panic!("{other:?}"),
    };
    // Its session ends with the connection, and with it the hold its lookup took.
    drop(snoop);
    let before = observable_state(&c);

    // At the resource manager, as itself: may map (readers do), may not free.
    let mut rm = RmClient::connect(&c.rm_url(), Role::Server, TIMEOUT).unwrap();
    assert!(rm.get_access(&h).is_ok());
    let e = rm.free(&h).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotOwner), "{e}");
    println!("free of the server's region by another process: {e}");
    // Altered or forged: refused for mapping and freeing alike.
    let mut altered = wire::altered_handles(&h);
    let mut a = h.clone();
    a.owner = format!("probe:{}", std::process::id());
    altered.push(("the caller as owner", a));
    for (what, bad) in &altered {
        assert_eq!(
            rm.get_access(bad).unwrap_err().code(),
            Some(ErrorCode::BadToken),
            "{what}"
        );
        assert_eq!(
            rm.free(bad).unwrap_err().code(),
            Some(ErrorCode::BadToken),
            "{what}"
        );
    }
    assert_eq!(
        observable_state(&c),
        before,
        "a refused request changed something"
    );
    assert_eq!(
        owner.retrieve(b"victim").unwrap().unwrap().to_vec(),
        b"precious"
    );

    // The region goes back; replaying its handle later finds nothing to map or free.
    owner.delete(b"victim").unwrap();
    owner.close();
    let ok = wait_until(Duration::from_secs(5), || c.rm_stats().allocations == 0);
    assert!(ok);
    assert_eq!(
        rm.get_access(&h).unwrap_err().code(),
        Some(ErrorCode::UnknownRegion)
    );
    assert_eq!(rm.free(&h).unwrap_err().code(), Some(ErrorCode::DoubleFree));
    // A new region at the same place has a new id, so the old handle never matches it.
    let again = handler(&c);
    again.alloc(1).unwrap(); // its first region comes with its first page
    let fresh = again.owned_regions()[0].handle.clone();
    assert_eq!(fresh.offset, h.offset, "first fit reuses the extent");
    assert_ne!(fresh.region_id, h.region_id);
    assert_eq!(
        rm.get_access(&h).unwrap_err().code(),
        Some(ErrorCode::UnknownRegion)
    );
    let mut spliced = h.clone();
    spliced.region_id = fresh.region_id;
    assert_eq!(
        rm.get_access(&spliced).unwrap_err().code(),
        Some(ErrorCode::BadToken)
    );
    again.close();
}

#[test]
fn an_instance_cannot_use_or_take_over_another_instances_regions() {
    let c = BinaryCluster::start(ClusterOpts::default());
    let url = ServerUrl::Unix(c.sock.clone());
    let mut x = client_conn(&url, "x", None).unwrap();
    let token_x = x.peer().session_token;
    let rx = region(&mut x).handle.region_id;
    assert!(matches!(
        x.call(&Request::Register(RegisterEntry {
            key: b"x-key",
            region_id: rx,
            offset: 0,
            len: 8
        })),
        Ok(Response::Bool(true))
    ));
    let mut y = client_conn(&url, "y", None).unwrap();
    let ry = region(&mut y).handle.region_id;
    let before = observable_state(&c);

    let reg = |key: &'static [u8], region_id| {
        Request::Register(RegisterEntry {
            key,
            region_id,
            offset: 4096,
            len: 8,
        })
    };
    assert_eq!(code(y.call(&reg(b"y-in-x", rx))), Some(ErrorCode::NotOwner));
    assert_eq!(
        code(y.call(&Request::BatchRegister(vec![
            RegisterEntry {
                key: b"ok",
                region_id: ry,
                offset: 0,
                len: 8
            },
            RegisterEntry {
                key: b"bad",
                region_id: rx,
                offset: 0,
                len: 8
            },
        ]))),
        Some(ErrorCode::NotOwner)
    );
    assert_eq!(
        code(y.call(&Request::ReturnRegion { region_id: rx })),
        Some(ErrorCode::NotOwner)
    );
    assert_eq!(
        observable_state(&c),
        before,
        "a refused request changed something"
    );
    assert!(
        matches!(
            y.call(&Request::Exists { key: b"ok" }),
            Ok(Response::Bool(false))
        ),
        "batch half applied"
    );

    // Taking over x's session: with x's instance id but no token it is a session of its
    // own, which owns nothing of x's; with a wrong token it is refused.
    let mut impostor = client_conn(&url, "x", None).unwrap();
    assert_eq!(
        code(impostor.call(&reg(b"impostor-in-x", rx))),
        Some(ErrorCode::NotOwner)
    );
    assert_eq!(
        code(impostor.call(&Request::ReturnRegion { region_id: rx })),
        Some(ErrorCode::NotOwner)
    );
    drop(impostor);
    let mut wrong = token_x;
    wrong[0] ^= 1;
    let e = client_conn(&url, "x", Some(wrong))
        .err()
        .and_then(|e| e.code());
    assert_eq!(e, Some(ErrorCode::SessionConflict));
    // With the right token it is x's own second connection.
    let mut x2 = client_conn(&url, "x", Some(token_x)).unwrap();
    assert!(matches!(
        x2.call(&reg(b"x-second", rx)),
        Ok(Response::Bool(true))
    ));
    // An admin may look but not write.
    let mut admin = maru_testkit::binary_cluster::admin_conn(&ServerUrl::Unix(c.sock.clone()));
    assert!(code(admin.call(&reg(b"admin", rx))).is_some());
    assert!(code(admin.call(&Request::RequestRegion { size: MIB })).is_some());
}

#[test]
fn limits_hold_through_the_client_library() {
    let c = BinaryCluster::start(ClusterOpts::default());
    let h = handler(&c);
    let before = observable_state(&c);
    let long = vec![b'k'; maru_proto::MAX_KEY_LEN + 1];
    let e = h.store_bytes(&long, b"", b"v").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    println!("key over the limit: {e}");
    assert_eq!(
        h.store_bytes(b"", b"", b"v").unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    let e = h
        .store_bytes(b"big", b"", &vec![0; 64 * 1024 + 1])
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    println!("value over the chunk size: {e}");
    assert_eq!(
        h.retrieve(&long).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(observable_state(&c), before);
    // A region larger than the pool: refused with a clear error, nothing allocated.
    let greedy = MaruHandler::new(MaruConfig {
        server_url: c.unix_url(),
        pool_size: 1 << 40,
        chunk_size_bytes: MIB,
        ..MaruConfig::default()
    })
    .unwrap();
    greedy.connect().unwrap(); // connecting takes no region
    let e = greedy.alloc(1).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Exhausted, "{e}");
    assert!(e.to_string().contains("larger than any pool"), "{e}");
    println!("a region larger than the pool: {e}");
    assert_eq!(observable_state(&c), before);
    h.close();
}

/// Starts both daemons with umask 0, so only the modes they set themselves count.
fn start_with_umask_zero(dir: &Path) -> (Daemon, Daemon, std::path::PathBuf) {
    let rm_spec = RmSpec {
        port: free_port(),
        ..RmSpec::new(dir, vec![maru_testkit::shm_pool_arg(dir, "p0", 64 * MIB)])
    };
    let mut cmd = rm_spec.command();
    // SAFETY: umask(2) is async-signal-safe and touches only the child's own mask.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let rm = Daemon::spawn(cmd, dir, "rm").unwrap();
    let sock = dir.join("server.sock");
    let mut cmd = ServerSpec {
        unix: Some(sock.clone()),
        ..ServerSpec::new(format!("127.0.0.1:{}", rm_spec.port))
    }
    .with_index_at(&dir.join("server.index"))
    .command();
    // SAFETY: as above.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let server = Daemon::spawn(cmd, dir, "server").unwrap();
    (rm, server, sock)
}

#[test]
fn state_files_secret_and_pool_are_not_open_to_others_even_with_umask_zero() {
    let dir = temp_dir();
    let (mut rm, _server, _sock) = start_with_umask_zero(dir.path());
    let state = dir.path().join("state");
    let mut rows = vec![("state dir", mode_of(&state))];
    for f in ["secret", "wal", "lock"] {
        rows.push((f, mode_of(&state.join(f))));
    }
    rows.push(("pool file", mode_of(&dir.path().join("pools/p0"))));
    assert!(rm.terminate().success());
    rows.push(("checkpoint", mode_of(&state.join("checkpoint"))));
    // The key index and its namespace table: clients read them, only the server writes.
    for f in ["server.index", "server.index.namespaces"] {
        let mode = mode_of(&dir.path().join(f));
        assert_eq!(mode, 0o644, "{f} ({mode:o})");
        rows.push((f, mode));
    }
    for (what, mode) in &rows {
        println!("{what}: {mode:o}");
        assert_eq!(mode & 0o002, 0, "{what} is world-writable ({mode:o})");
    }
    assert_eq!(rows[0].1, 0o700, "state dir");
    assert_eq!(rows[1].1, 0o600, "secret");
    assert_eq!(rows[2].1 & 0o077, 0, "wal");
    assert_eq!(rows[5].1 & 0o077, 0, "checkpoint");
    assert_eq!(
        rows[4].1 & 0o007,
        0,
        "pool file is for owner and group only"
    );
}

#[test]
fn unix_socket_is_not_world_writable_even_with_umask_zero() {
    let dir = temp_dir();
    let (_rm, _server, sock) = start_with_umask_zero(dir.path());
    let mode = mode_of(&sock);
    assert_eq!(mode & 0o002, 0, "socket mode {mode:o}");
}

/// The pid and start time of the metadata server are public (/proc), and the handles of its
/// regions are handed to every client by lookups. A process of the same host that claims the
/// server's identity in its Hello is refused: over TCP it does not hold the connection, and
/// on the Unix socket the kernel names the real caller. Nothing changes.
#[test]
fn a_process_claiming_the_servers_identity_cannot_free_its_regions() {
    let c = BinaryCluster::start(ClusterOpts::default());
    let owner = handler(&c);
    owner.store_bytes(b"victim", b"", b"precious").unwrap();
    let h = owner.owned_regions()[0].handle.clone();
    let pid = c.server.pid();
    let start = maru_transport::process_start_time(pid).unwrap();
    let host = maru_transport::local_identity().0;
    let before = c.rm_list();
    let unix = maru_proto::ServerUrl::Unix(c.rm_spec.unix_socket());
    for url in [c.rm_url(), unix] {
        match RmClient::connect_as(&url, Role::Server, &host, pid, start, TIMEOUT) {
            Ok(mut impostor) => {
                let r = impostor.free(&h);
                panic!("an impostor on {url} was taken for the metadata server (free: {r:?})");
            }
            Err(e) => assert_eq!(
                e.code(),
                Some(maru_proto::ErrorCode::Unauthenticated),
                "{url}: {e}"
            ),
        }
    }
    assert_eq!(c.rm_list(), before, "a refused Hello changed the table");
    assert!(owner.retrieve(b"victim").unwrap().is_some());
}
