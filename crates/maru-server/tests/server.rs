//! The metadata server in-process, with an in-process resource manager on a shm pool: key
//! sharing, write-once, pins, sessions, deferred freeing, connection loss, limits, metrics,
//! shutdown.

mod common;

use std::time::Duration;

use common::*;
use maru_proto::*;

#[test]
fn two_instances_share_a_key() {
    let c = InProcessCluster::start();
    let mut a = c.client("writer");
    let mut b = c.client("reader");
    let region = a.region(4 * MIB);
    assert_eq!(region.handle.len, 4 * MIB);
    assert_eq!(region.access.len, 4 * MIB);
    assert!(region
        .access
        .path
        .starts_with(c.dir.path().to_str().unwrap()));
    let id = region.handle.region_id;
    assert!(a.register(b"chunk-1", id, 8192, 1000));

    assert!(b.bool(&Request::Exists { key: b"chunk-1" }));
    assert!(!b.bool(&Request::Exists { key: b"chunk-2" }));
    let loc = b.lookup(b"chunk-1").expect("found");
    assert_eq!(
        loc.region, region,
        "the reader gets the handle and how to map it"
    );
    assert_eq!((loc.offset, loc.len), (8192, 1000));
    assert_eq!(b.lookup(b"chunk-2"), None);
    assert_eq!(
        b.call(&Request::GetRegion { region_id: id }).unwrap(),
        Response::Region(region.clone())
    );
    assert_eq!(
        b.call(&Request::ListRegions).unwrap(),
        Response::Regions(vec![region.clone()])
    );
    // The region handed out is a real allocation of the resource manager.
    assert_eq!(c.rm_region_ids(), vec![id]);
}

#[test]
fn keys_are_write_once() {
    let c = InProcessCluster::start();
    let (mut a, ra) = c.owner("a");
    let (mut b, rb) = c.owner("b");
    assert!(a.register(b"k", ra, 0, 10));
    assert!(
        !a.register(b"k", ra, 4096, 20),
        "second registration is a no-op"
    );
    assert!(
        !b.register(b"k", rb, 0, 30),
        "another instance cannot overwrite it"
    );
    let loc = b.lookup(b"k").unwrap();
    assert_eq!(
        (loc.region.handle.region_id, loc.offset, loc.len),
        (ra, 0, 10)
    );
    let allocs = a.allocations();
    let refs: Vec<(u64, u64)> = allocs
        .iter()
        .map(|r| (r.handle.region_id, r.ref_count))
        .collect();
    assert!(
        refs.contains(&(ra, 1)) && refs.contains(&(rb, 0)),
        "{refs:?}"
    );
}

#[test]
fn pins_block_delete() {
    let (_c, mut a, r) = cluster_with_owner("a");
    assert!(a.register(b"k", r, 0, 10));
    assert!(!a.bool(&Request::Pin { key: b"missing" }));
    assert!(a.bool(&Request::Pin { key: b"k" }));
    assert!(a.bool(&Request::Pin { key: b"k" }));
    assert_eq!(a.delete(b"k"), DeleteStatus::Pinned);
    assert!(a.bool(&Request::Unpin { key: b"k" }));
    assert_eq!(a.delete(b"k"), DeleteStatus::Pinned, "still pinned once");
    assert_eq!(a.stats().pinned_keys, 1);
    assert!(a.bool(&Request::Unpin { key: b"k" }));
    assert!(!a.bool(&Request::Unpin { key: b"k" }), "was not pinned");
    assert_eq!(a.delete(b"k"), DeleteStatus::Deleted);
    assert_eq!(a.delete(b"k"), DeleteStatus::NotFound);
    assert!(!a.bool(&Request::Exists { key: b"k" }));
    // Deleted keys can be registered again (write-once holds per registration).
    assert!(a.register(b"k", r, 4096, 5));
}

#[test]
fn goodbye_with_live_keys_defers_freeing_until_the_last_delete() {
    let (c, mut a, kept) = cluster_with_owner("owner");
    let mut b = c.client("other");
    a.region(MIB);
    assert!(a.register(b"k1", kept, 0, 100));
    assert!(a.register(b"k2", kept, 4096, 100));
    assert_eq!(c.rm().stats().allocations, 2);
    a.goodbye();

    // The empty region went back at once; the referenced one is kept, owner gone.
    assert_eq!(c.rm_region_ids(), vec![kept]);
    let allocs = b.allocations();
    assert_eq!(allocs.len(), 1);
    assert_eq!(allocs[0].handle.region_id, kept);
    assert_eq!(allocs[0].instance_id, "owner");
    assert_eq!(allocs[0].ref_count, 2);
    assert!(!allocs[0].owner_connected);
    // Readers still find the keys (a reader's lookup holds the page until its session ends).
    let mut reader = c.client("reader");
    assert_eq!(reader.lookup(b"k1").unwrap().region.handle.region_id, kept);
    reader.goodbye();

    assert_eq!(b.delete(b"k1"), DeleteStatus::Deleted);
    assert_eq!(c.rm().stats().allocations, 1, "one key still references it");
    assert_eq!(b.delete(b"k2"), DeleteStatus::Deleted);
    assert_eq!(
        c.rm().stats().allocations,
        0,
        "last key gone: freed at the RM"
    );
    assert!(c.rm_region_ids().is_empty());
    assert!(b.allocations().is_empty());
    assert_eq!(
        b.fails(&Request::GetRegion { region_id: kept }),
        ErrorCode::UnknownRegion
    );
}

#[test]
fn a_dropped_connection_releases_its_instance_regions() {
    let (c, mut a, kept) = cluster_with_owner("crashy");
    let mut watcher = c.client("watcher");
    let empty = a.region(MIB).handle.region_id;
    assert!(a.register(b"k", kept, 0, 1));
    drop(a); // no goodbye: the connection just closes

    assert!(
        wait_until(TIMEOUT, || c.rm_region_ids() == vec![kept]),
        "the unreferenced region {empty} was not freed: {:?}",
        c.rm_region_ids()
    );
    let allocs = watcher.allocations();
    assert_eq!(allocs.len(), 1);
    assert!(!allocs[0].owner_connected, "marked released");
    assert_eq!(watcher.delete(b"k"), DeleteStatus::Deleted);
    assert!(c.rm_region_ids().is_empty());
}

#[test]
fn returned_regions_are_freed_once_unreferenced() {
    let (c, mut a, r) = cluster_with_owner("a");
    assert!(a.register(b"k", r, 0, 1));
    assert_eq!(
        a.call(&Request::ReturnRegion { region_id: r }).unwrap(),
        Response::Ok
    );
    assert_eq!(c.rm_region_ids(), vec![r], "a key still references it");
    assert_eq!(
        a.fails(&Request::Register(RegisterEntry {
            key: b"k2",
            region_id: r,
            offset: 4096,
            len: 1
        })),
        ErrorCode::NotOwner,
        "no new keys into a returned region"
    );
    assert_eq!(a.delete(b"k"), DeleteStatus::Deleted);
    assert!(c.rm_region_ids().is_empty());
    assert_eq!(
        a.fails(&Request::ReturnRegion { region_id: r }),
        ErrorCode::UnknownRegion
    );
}

#[test]
fn connections_of_one_handler_share_its_session() {
    let c = InProcessCluster::start();
    let (first, region) = c.owner("inst");
    let url = c.url();
    // A wrong token joins nothing.
    let e = Client::connect_role(&url, Role::Client, "inst", Some([9u8; 16])).err();
    assert_eq!(e.and_then(|e| e.code()), Some(ErrorCode::SessionConflict));
    // The same instance id without a token is a session of its own: it owns nothing of the
    // first's.
    let mut other = Client::connect_role(&url, Role::Client, "inst", None).unwrap();
    assert_ne!(other.token, first.token);
    assert_eq!(
        other.fails(&Request::Register(RegisterEntry {
            key: b"theirs",
            region_id: region,
            offset: 0,
            len: 1,
        })),
        ErrorCode::NotOwner
    );
    drop(other);
    let mut second = Client::connect_role(&url, Role::Client, "inst", Some(first.token)).unwrap();
    assert_eq!(second.token, first.token);
    assert!(second.register(b"k", region, 0, 1), "same owner");
    drop(first);
    // Once the server has seen the first connection go, the instance still has the second:
    // its region stays owned.
    let inst_connections = |c: &InProcessCluster| {
        c.stats()
            .clients
            .iter()
            .find(|cl| cl.instance_id == "inst")
            .map(|cl| cl.connections)
    };
    assert!(wait_until(TIMEOUT, || inst_connections(&c) == Some(1)));
    assert!(second.allocations()[0].owner_connected);
    assert!(second.register(b"k2", region, 4096, 1));
    drop(second);
    let mut w = c.client("w");
    assert!(wait_until(TIMEOUT, || !w.allocations()[0].owner_connected));
    // The instance id is free again for a fresh session.
    let fresh = c.client("inst");
    assert_ne!(fresh.token, [0; 16]);
}

#[test]
fn pools_are_tried_in_order_fill_first() {
    let c = InProcessCluster::with(
        |dir, rm| {
            // Regions are carved at 2 MiB alignment: "small" holds exactly two.
            rm.pools = vec![
                shm_pool(dir, "small", 4 * MIB),
                shm_pool(dir, "big", 16 * MIB),
            ];
        },
        |dir, s| s.pools = vec![pool_path(dir, "small"), pool_path(dir, "big")],
    );
    let mut a = c.client("a");
    let pools: Vec<String> = (0..3).map(|_| a.region(2 * MIB).handle.pool).collect();
    let small = pool_path(c.dir.path(), "small");
    let big = pool_path(c.dir.path(), "big");
    assert_eq!(pools, vec![small.clone(), small, big]);
    assert_eq!(
        a.fails(&Request::RequestRegion { size: 64 * MIB }),
        ErrorCode::PoolExhausted,
        "the RM's refusal passes through"
    );
}

#[test]
fn an_unreachable_rm_gives_unavailable_and_keys_keep_working() {
    let (c, mut a, r) = cluster_with_owner("a");
    assert!(a.register(b"k", r, 0, 1));
    let mut cluster = c;
    cluster.rm.take().unwrap().shutdown();
    let code = match a.call(&Request::RequestRegion { size: MIB }) {
        Err(maru_transport::CallError::Remote(e)) => {
            assert!(e.message.contains("unreachable"), "{}", e.message);
            e.code
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(code, ErrorCode::Unavailable);
    assert!(a.lookup(b"k").is_some(), "lookups need no resource manager");
    let stats = a.stats();
    assert!(stats.rm_error.is_some());
    assert!(stats.pools.is_empty());
    assert_eq!(stats.keys, 1);
    assert!(cluster.server().render_metrics().contains("maru_rm_up 0"));
}

#[test]
fn admins_may_only_read() {
    let (c, mut a, r) = cluster_with_owner("a");
    assert!(a.register(b"k", r, 0, 1));
    let mut admin = c.admin();
    assert!(admin.lookup(b"k").is_some());
    assert!(admin.bool(&Request::Exists { key: b"k" }));
    assert_eq!(admin.stats().keys, 1);
    assert_eq!(admin.allocations().len(), 1);
    assert_eq!(admin.call(&Request::Heartbeat).unwrap(), Response::Ok);
    for req in [
        Request::RequestRegion { size: MIB },
        Request::Delete { key: b"k" },
        Request::Pin { key: b"k" },
        Request::ReturnRegion { region_id: r },
        Request::Register(RegisterEntry {
            key: b"x",
            region_id: r,
            offset: 0,
            len: 1,
        }),
    ] {
        assert_eq!(admin.fails(&req), ErrorCode::InvalidArgument, "{req:?}");
    }
    assert!(a.lookup(b"k").is_some());
    assert_eq!(c.stats().pinned_keys, 0);
}

#[test]
fn over_the_client_limit_hello_is_refused() {
    let c = InProcessCluster::with(|_, _| {}, |_, s| s.max_clients = 2);
    let _a = c.client("a");
    let _b = c.client("b");
    let e = Client::connect_role(&c.url(), Role::Client, "c", None).err();
    assert_eq!(e.and_then(|e| e.code()), Some(ErrorCode::TooManyClients));
    drop(_a);
    assert!(
        wait_until(TIMEOUT, || Client::connect_role(
            &c.url(),
            Role::Client,
            "c",
            None
        )
        .is_ok()),
        "a slot frees up when a client leaves"
    );
}

#[test]
fn unix_socket_listener_serves_and_is_removed_at_shutdown() {
    let mut c = InProcessCluster::with(|_, _| {}, |dir, s| s.unix = Some(dir.join("server.sock")));
    let path = c.dir.path().join("server.sock");
    assert_eq!(c.server().unix_path(), Some(path.as_path()));
    let mut tcp = c.client("tcp-side");
    let r = tcp.region(MIB).handle.region_id;
    assert!(tcp.register(b"k", r, 0, 7));
    let mut unix = Client::connect(&ServerUrl::Unix(path.clone()), "unix-side");
    assert_eq!(unix.lookup(b"k").unwrap().len, 7);
    drop((tcp, unix));
    c.server.take().unwrap().shutdown();
    assert!(!path.exists());
}

#[test]
fn shutdown_completes_when_the_unix_socket_file_was_deleted_under_the_server() {
    // Something cleaned the directory (tmpfiles, a test's temp dir) while the server ran: the
    // socket file is gone, so nobody can connect to it any more, yet shutdown must not hang.
    let mut c = InProcessCluster::with(
        |_, _| {},
        |dir, s| {
            s.tcp = None;
            s.unix = Some(dir.join("server.sock"));
        },
    );
    std::fs::remove_file(c.dir.path().join("server.sock")).unwrap();
    let server = c.server.take().unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        server.shutdown();
        let _ = done_tx.send(());
    });
    assert!(
        done_rx.recv_timeout(Duration::from_secs(10)).is_ok(),
        "shutdown hung with its Unix socket file deleted"
    );
}

#[test]
fn shutdown_returns_every_region_to_the_rm() {
    let mut c = InProcessCluster::start();
    let mut a = c.client("a");
    for i in 0..3u64 {
        let r = a.region(MIB).handle.region_id;
        assert!(a.register(format!("k{i}").as_bytes(), r, 0, 1));
    }
    assert_eq!(c.rm().stats().allocations, 3);
    c.server.take().unwrap().shutdown();
    assert_eq!(c.rm().stats().allocations, 0);
    // The client's connection was closed.
    assert!(a.call(&Request::Heartbeat).is_err());
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let c = InProcessCluster::start();
    let mut raw = Raw::connect(&c.url());
    raw.hello("pipe");
    let mut buf = Vec::new();
    for id in 10..110u64 {
        encode_request(&mut buf, id, &Request::Exists { key: b"nope" }).unwrap();
    }
    raw.send(&buf);
    for id in 10..110u64 {
        assert_eq!(raw.recv(), (id, Response::Bool(false)));
    }
    assert_eq!(c.stats().ops["exists"].count, 100);
}

#[test]
fn stats_and_metrics_report_keys_regions_clients_and_ops() {
    let c = InProcessCluster::start();
    let mut a = c.client("a");
    let r = a.region(2 * MIB).handle.region_id;
    assert!(a.register(b"k1", r, 0, 100));
    assert!(a.register(b"k2", r, 4096, 50));
    assert!(a.bool(&Request::Pin { key: b"k2" }));
    let s = a.stats();
    assert_eq!((s.keys, s.bytes, s.pinned_keys), (2, 150, 1));
    assert_eq!((s.regions, s.region_bytes), (1, 2 * MIB));
    assert_eq!(s.clients.len(), 1);
    assert_eq!(s.clients[0].instance_id, "a");
    assert_eq!(s.clients[0].regions, 1);
    assert!(s.clients[0].connected);
    assert_eq!(s.pools.len(), 1);
    assert!(s.rm_error.is_none());
    assert_eq!(s.ops["register"].count, 2);
    assert_eq!(s.ops["request_region"].count, 1);

    let m = c.server().render_metrics();
    for line in [
        "maru_keys 2\n",
        "maru_pinned_keys 1\n",
        "maru_regions 1\n",
        "maru_region_bytes 2097152\n",
        "maru_clients 1\n",
        "maru_ops_total{op=\"register\"} 2\n",
        "maru_op_seconds_count{op=\"register\"} 2\n",
        "maru_rm_up 1\n",
        "maru_pool_total_bytes{pool=",
        "maru_pool_free_bytes{pool=",
        "maru_evict_high_ratio{policy=\"sieve\"} 0.9\n",
        "maru_namespace_keys{namespace=\"\"} 2\n",
        "maru_namespace_pins{namespace=\"\"} 1\n",
        "maru_misses_total{namespace=\"\"} 0\n",
        "maru_instance_keys{instance=\"a\"} 2\n",
        "maru_instance_key_bytes{instance=\"a\"} 150\n",
        "maru_instance_pins{instance=\"a\"} 1\n",
        "maru_instance_evictions_total{instance=\"a\"} 0\n",
    ] {
        assert!(m.contains(line), "missing {line:?} in\n{m}");
    }
}

#[test]
fn metrics_are_served_over_http() {
    let c = InProcessCluster::with(
        |_, _| {},
        |_, s| s.metrics = Some("127.0.0.1:0".parse().unwrap()),
    );
    let addr = c.server().metrics_addr().expect("metrics address");
    let body = wire::http_get(addr, "/metrics");
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    assert!(body.contains("\nmaru_keys 0\n"));
}

#[test]
fn a_restarted_rm_is_reconnected_on_the_next_request() {
    let mut c = InProcessCluster::start();
    let mut a = c.client("a");
    let r1 = a.region(2 * MIB).handle.region_id;
    let addr = c.rm().addr();
    c.rm.take().unwrap().shutdown();
    let mut cfg = maru_testkit::in_process::rm_config(
        c.dir.path(),
        vec![shm_pool(c.dir.path(), "p0", 64 * MIB)],
    );
    cfg.listen = addr;
    c.rm = Some(maru_resource_manager::start(cfg).expect("rm restarts on the same port"));
    // The server's connection to the old process is dead; the first request must not fail
    // because of it.
    let r2 = a.region(2 * MIB).handle.region_id;
    assert_ne!(r1, r2);
    assert_eq!(c.rm_region_ids(), vec![r1, r2], "r1 survived the restart");
    assert!(a.stats().rm_error.is_none());
}

/// Reads until the server closes the connection (true) or `TIMEOUT` passes (false); replies
/// that arrive meanwhile are skipped.
fn closed_by_server(s: &mut std::net::TcpStream) -> bool {
    use std::io::Read;
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn a_connection_without_hello_is_closed_after_the_handshake_timeout_and_its_slot_freed() {
    let bound = Duration::from_millis(300);
    let c = InProcessCluster::with(
        |_, _| {},
        |_, s| {
            s.max_clients = 3;
            s.handshake_timeout = bound;
        },
    );
    assert_eq!(maru_server::HANDSHAKE_TIMEOUT, Duration::from_secs(3));
    assert_eq!(
        maru_server::ServerConfig::default().handshake_timeout,
        maru_server::HANDSHAKE_TIMEOUT
    );
    let mut idle = c.client("idle");
    let r = idle.region(MIB).handle.region_id;
    let addr = c.server().tcp_addr().unwrap();
    // One never sends a byte; another sends requests, but never a hello.
    let mut silent = std::net::TcpStream::connect(addr).unwrap();
    let mut chatty = Raw::connect(&c.url());
    let t0 = std::time::Instant::now();
    let refused = wire::heartbeats_refused_until_closed(&mut chatty.stream, TIMEOUT);
    assert!(refused > 0);
    assert!(closed_by_server(&mut silent), "a silent connection stays");
    // Both slots are free again: two new clients fit next to the idle one.
    let mut more = Vec::new();
    for name in ["b", "c"] {
        let mut got = None;
        assert!(
            wait_until(TIMEOUT, || {
                got = Client::connect_role(&c.url(), Role::Client, name, None).ok();
                got.is_some()
            }),
            "slot never freed"
        );
        more.push(got.unwrap());
    }
    // The handshaken connection sat idle past the bound and is still served.
    assert!(t0.elapsed() >= bound);
    assert_eq!(idle.call(&Request::Heartbeat).unwrap(), Response::Ok);
    assert!(idle.register(b"k", r, 0, 1));
    drop(more);
}

#[test]
fn the_unix_socket_is_for_owner_and_group_only() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    // A fresh socket, and one replacing a stale socket file (a dead server's, made under
    // this process's umask).
    for stale in [false, true] {
        let c = InProcessCluster::with(
            |_, _| {},
            |dir, s| {
                let path = dir.join("server.sock");
                if stale {
                    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
                }
                s.unix = Some(path);
            },
        );
        let path = c.dir.path().join("server.sock");
        assert_eq!(mode(&path), 0o660, "stale file before: {stale}");
        let mut unix = Client::connect(&ServerUrl::Unix(path.clone()), "unix-side");
        assert_eq!(unix.call(&Request::Heartbeat).unwrap(), Response::Ok);
    }
}

/// A region the resource manager holds for this server (this process) that the server does
/// not know — what a lost allocation reply leaves — is freed by the reconcile that follows an
/// allocation failure, and the regions the server knows stay.
#[test]
fn a_region_of_the_server_unknown_to_it_is_freed_after_a_failed_allocation() {
    let c = InProcessCluster::with(
        |_, _| {},
        |dir, s| s.pools = vec![pool_path(dir, "p0"), "/no-such-pool".into()],
    );
    let mut a = c.client("a");
    let known = a.region(2 * MIB).handle.region_id;
    assert!(a.register(b"k", known, 0, 1));
    // The in-process server's owner identity is this process's.
    let mut direct =
        maru_resource_manager::RmClient::connect(&c.rm().url(), Role::Server, TIMEOUT).unwrap();
    let orphan = direct.alloc(2 * MIB, None).unwrap().region_id;
    assert_eq!(c.rm_region_ids(), vec![known, orphan]);
    // Too big for p0, then a pool the resource manager does not have: an allocation that
    // failed otherwise than "no room".
    assert_eq!(
        a.fails(&Request::RequestRegion { size: 256 * MIB }),
        ErrorCode::NoSuchPool
    );
    assert!(
        wait_until(TIMEOUT, || c.rm_region_ids() == vec![known]),
        "resource manager still holds {:?}",
        c.rm_region_ids()
    );
    assert!(a.lookup(b"k").is_some());
    assert_eq!(c.stats().regions, 1);
}
