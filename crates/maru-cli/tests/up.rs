//! `maru up` as a user runs it: the real binary, real sockets, a real pool file; stopped with
//! SIGTERM.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::Up;

use maru_proto::{Hello, RegisterEntry, Request, Response, Role, ServerUrl};
use maru_transport::{local_identity, BlockingConn};

fn client(url: &str, id: &str) -> BlockingConn {
    let url = ServerUrl::parse(url).unwrap();
    maru_testkit::wire::connect_as(&url, Role::Client, id, None).unwrap()
}

fn tcp_port(url: &str) -> u16 {
    url.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn up_serves_stats_and_metrics_then_stops_cleanly() {
    let dir = maru_testkit::temp_dir();
    let metrics_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let up = Up::start(dir.path(), &["--metrics-port", &metrics_port.to_string()]);
    let (tcp, unix, rm, pool) = (up.url("tcp"), up.url("unix"), up.url("rm"), up.url("pool"));
    assert!(Path::new(&pool).exists());

    // Known activity: one instance takes a region and registers 3 keys (one pinned), another
    // instance over the Unix socket reads one.
    let mut a = client(&tcp, "producer-a");
    let region = match a.call(&Request::RequestRegion { size: 4 << 20 }).unwrap() {
        Response::Region(r) => r,
        other => panic!("unexpected {other:?}"),
    };
    for i in 0..3u64 {
        let key = format!("key-{i}");
        let entry = RegisterEntry {
            key: key.as_bytes(),
            region_id: region.handle.region_id,
            offset: i * 4096,
            len: 100,
        };
        assert_eq!(
            a.call(&Request::Register(entry)).unwrap(),
            Response::Bool(true)
        );
    }
    assert_eq!(
        a.call(&Request::Pin { key: b"key-0" }).unwrap(),
        Response::Bool(true)
    );
    let mut b = client(&unix, "consumer-b");
    assert_eq!(
        b.call(&Request::Exists { key: b"key-1" }).unwrap(),
        Response::Bool(true)
    );

    let out = Command::new(env!("CARGO_BIN_EXE_maru"))
        .args(["stats", "--json", "--server", &tcp])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "maru stats failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["keys"], 3);
    assert_eq!(stats["pinned_keys"], 1);
    let pools = stats["pools"].as_array().unwrap();
    assert_eq!(pools.len(), 1);
    assert_eq!(pools[0]["path"], pool.as_str());
    assert_eq!(pools[0]["kind"], "shm");
    assert_eq!(pools[0]["total_bytes"], 64u64 << 20);
    assert_eq!(
        pools[0]["reserved_bytes"],
        2u64 << 20,
        "the pool header's extent"
    );
    assert_eq!(pools[0]["free_bytes"], (64u64 << 20) - region.handle.len);
    assert_eq!(pools[0]["regions"], 1);
    let clients = stats["clients"].as_array().unwrap();
    let producer = clients
        .iter()
        .find(|c| c["instance_id"] == "producer-a")
        .expect("producer listed");
    assert_eq!(producer["regions"], 1);
    assert_eq!(producer["bytes"], region.handle.len);
    assert_eq!(stats["ops"]["register"]["count"], 3);
    assert!(stats["ops"]["register"]["p50_us"].as_f64().unwrap() > 0.0);
    assert!(stats["ops"]["exists"]["p99_us"].as_f64().unwrap() > 0.0);

    // The human form names the same things.
    let out = Command::new(env!("CARGO_BIN_EXE_maru"))
        .args(["stats", "--server", &unix])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("keys 3 (pinned 1)") && text.contains("producer-a"),
        "{text}"
    );

    // Prometheus metrics over HTTP, parsed.
    let mut s = TcpStream::connect(("127.0.0.1", metrics_port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    let samples: Vec<(String, f64)> = body
        .lines()
        .filter(|l| l.starts_with("maru_"))
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap();
            (
                name.to_owned(),
                value
                    .parse::<f64>()
                    .unwrap_or_else(|_| panic!("bad sample {l:?}")),
            )
        })
        .collect();
    let get = |name: &str| {
        samples
            .iter()
            .find(|(n, _)| n == name || n.starts_with(&format!("{name}{{")))
            .map(|(_, v)| *v)
    };
    assert_eq!(get("maru_keys"), Some(3.0), "{body}");
    // Both daemons' metrics share one page: each family appears once, as strict scrapers
    // require.
    let mut families: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let total = families.len();
    families.sort_unstable();
    families.dedup();
    assert_eq!(
        families.len(),
        total,
        "a metric family appears twice: {body}"
    );
    assert_eq!(get("maru_pinned_keys"), Some(1.0));
    assert_eq!(get("maru_pool_bytes_total"), Some((64u64 << 20) as f64));
    assert!(
        samples
            .iter()
            .any(|(n, v)| n.starts_with("maru_op_seconds_count")
                && n.contains("register")
                && *v == 3.0),
        "{body}"
    );

    drop(a);
    drop(b);
    let out = up.stop();
    assert!(
        out.contains("pool file") && out.contains("removed"),
        "{out}"
    );
    assert!(!Path::new(&pool).exists(), "pool file left behind");
    assert!(
        !Path::new(unix.trim_start_matches("unix://")).exists(),
        "unix socket left behind"
    );
    // Ports are free again.
    TcpListener::bind(("127.0.0.1", tcp_port(&tcp))).expect("server port still taken");
    TcpListener::bind(("127.0.0.1", tcp_port(&rm))).expect("rm port still taken");
    TcpListener::bind(("127.0.0.1", metrics_port)).expect("metrics port still taken");
}

#[test]
fn up_keep_leaves_the_pool_file() {
    let dir = maru_testkit::temp_dir();
    let up = Up::start(dir.path(), &["--keep", "--no-unix"]);
    assert!(up.ready["unix"].is_null());
    let pool = up.url("pool");
    let out = up.stop();
    assert!(out.contains("kept"), "{out}");
    assert!(Path::new(&pool).exists());
}

/// The way `maru up` says to get 2 MiB pages: a hugetlbfs as the pool directory. The pool
/// lives there; the key index, whose namespace table is appended with `write` (which a
/// hugetlbfs refuses), goes to a tmpfs; a client stores and reads through both.
#[test]
fn up_on_a_hugetlbfs_pool_directory_serves_from_the_index() {
    let dir = maru_testkit::temp_dir();
    let mount = match maru_shm::HugePageMount::reserve(dir.path(), 80 << 20) {
        Ok(m) => m,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let up = Up::start_on(mount.path(), dir.path(), &[]);
    assert_eq!(up.ready["huge_pages"], true, "{}", up.ready);
    assert!(up.url("pool").starts_with(&*mount.path().to_string_lossy()));
    let h = maru_client::MaruHandler::new(maru_client::MaruConfig {
        server_url: up.url("unix"),
        pool_size: 4 << 20,
        chunk_size_bytes: 64 << 10,
        ..maru_client::MaruConfig::default()
    })
    .unwrap();
    h.connect().unwrap();
    h.store_bytes(b"huge-key", b"on ", b"2 MiB pages").unwrap();
    let view = h.retrieve(b"huge-key").unwrap().expect("stored");
    assert_eq!(view.to_vec(), b"on 2 MiB pages");
    drop(view);
    h.close();
    let index = up.url("index");
    let index = Path::new(&index);
    assert_ne!(
        maru_shm::fs_page_size(index.parent().unwrap()).unwrap(),
        maru_shm::HUGE_PAGE_SIZE,
        "{}",
        up.ready
    );
    let out = up.stop();
    assert!(
        out.contains(&format!("index       {}", index.display())),
        "{out}"
    );
    assert!(!index.exists(), "the index goes with the run: {out}");
}

#[test]
fn stats_against_no_server_is_a_clear_error() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new(env!("CARGO_BIN_EXE_maru"))
        .args(["stats", "--server", &format!("tcp://127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no Maru server at tcp://127.0.0.1"), "{err}");
}

#[test]
fn up_writes_a_private_cluster_secret_that_tcp_clients_can_prove() {
    use std::os::unix::fs::PermissionsExt;
    let dir = maru_testkit::temp_dir();
    let up = Up::start(dir.path(), &[]);
    let path = up.url("secret_file");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{path}");
    let secret = maru_transport::auth::ClusterSecret::load(Path::new(&path)).unwrap();
    let (host, pid, start_time) = local_identity();
    let hello = Hello::sessionless(Role::Admin, &host, pid, start_time);
    let url = ServerUrl::parse(&up.url("tcp")).unwrap();
    // With the secret the handshake succeeds; on loopback, a client without one is served too.
    BlockingConn::connect_with(&url, &hello, Duration::from_secs(5), Some(&secret)).unwrap();
    BlockingConn::connect(&url, &hello, Duration::from_secs(5)).unwrap();
}
