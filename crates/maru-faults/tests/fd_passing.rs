//! Regions as descriptors over the metadata server's Unix socket (SCM_RIGHTS): a client of
//! another uid works with no permission on the pool file, another session's region comes
//! read-only at the kernel level, and TCP clients open the pool's path as before.

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use maru_client::MaruHandler;
use maru_faults::child::{field, ChildProc};
use maru_faults::payload::{check, len_for, payload, Check};
use maru_faults::{key_refs, small_handler, KIB, MIB};
use maru_proto::{
    decode_response, encode_request, ErrorCode, Hello, RegisterEntry, Request, Response, Role,
};
use maru_shm::{MapMode, Mapping, ShmError};
use maru_testkit::{BinaryCluster, ClusterOpts};
use maru_transport::fds::FdReader;
use maru_transport::FrameBuf;

const T: Duration = Duration::from_secs(20);
const CHUNK: u64 = 64 * KIB;
/// The uid and gid of `nobody`: a client that is not the daemons' user.
const NOBODY: u32 = 65534;

#[test]
fn child_role() {
    maru_faults::child::run_if_child();
}

fn cluster() -> BinaryCluster {
    BinaryCluster::start(ClusterOpts {
        pool_bytes: 64 * MIB,
        ..ClusterOpts::default()
    })
}

fn keys(prefix: &str, n: u64) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("{prefix}-{i}").into_bytes())
        .collect()
}

fn value(k: &[u8]) -> Vec<u8> {
    payload(k, len_for(k, CHUNK as usize))
}

fn store_all(h: &MaruHandler, prefix: &str, n: u64) {
    for k in keys(prefix, n) {
        h.store_bytes(&k, b"", &value(&k)).unwrap();
    }
}

/// How many of `prefix`'s `n` values `h` reads intact.
fn intact(h: &MaruHandler, prefix: &str, n: u64) -> usize {
    let ks = keys(prefix, n);
    let views = h.batch_retrieve(&key_refs(&ks)).unwrap();
    ks.iter()
        .zip(views)
        .filter(|(k, v)| {
            v.as_ref()
                .is_some_and(|v| check(k, &v.to_vec()) == Check::Intact)
        })
        .count()
}

/// The permissions (`rw-s`, `r--s`, ...) of the mappings of `pid` that name `file`.
fn mapping_perms(pid: u32, file: &Path) -> Vec<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let name = file.to_string_lossy();
    maps.lines()
        .filter(|l| l.ends_with(&*name))
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
        .collect()
}

/// The permissions of this process's mapping that contains `addr`.
fn perms_at(addr: usize) -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    for l in maps.lines() {
        let mut w = l.split_whitespace();
        let (range, perms) = (w.next().unwrap(), w.next().unwrap());
        let (a, b) = range.split_once('-').unwrap();
        let (a, b) = (
            usize::from_str_radix(a, 16).unwrap(),
            usize::from_str_radix(b, 16).unwrap(),
        );
        if (a..b).contains(&addr) {
            return perms.to_owned();
        }
    }
    panic!("no mapping contains {addr:#x}");
}

/// Gives the pool file to the daemons' user alone and lets group `gid` reach the server's
/// Unix socket (as an operator gives clients the socket, not the pool).
fn private_pool_shared_socket(c: &BinaryCluster, gid: u32) {
    std::fs::set_permissions(&c.pool, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&c.sock, None, Some(gid)).unwrap();
    std::fs::set_permissions(c.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
}

/// A client process running as `nobody` (real and effective ids, no supplementary groups),
/// with `env` set.
fn nobody_child(name: &str, env: &[(&str, &str)]) -> ChildProc {
    let mut launcher = Command::new("setpriv");
    launcher.args([
        format!("--reuid={NOBODY}"),
        format!("--regid={NOBODY}"),
        "--clear-groups".into(),
    ]);
    for (k, v) in env {
        launcher.env(k, v);
    }
    ChildProc::spawn_via(name, launcher)
}

fn can_run_as_nobody() -> Result<(), &'static str> {
    if maru_transport::effective_uid() != 0 {
        return Err("needs root to run a client as uid 65534");
    }
    let ok = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return Err("setpriv cannot switch to uid 65534 here");
    }
    Ok(())
}

/// (a) The pool file is 0600 root's; a client running as nobody stores and reads chunks
/// shared with a root client, in place: both map the pool file itself, from descriptors.
#[test]
fn a_client_of_another_uid_shares_chunks_with_no_permission_on_the_pool_file() {
    if let Err(why) = can_run_as_nobody() {
        eprintln!("skipped: {why}");
        return;
    }
    let c = cluster();
    private_pool_shared_socket(&c, NOBODY);
    let url = c.unix_url();
    // The nobody user cannot open the pool file itself.
    let opened = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "head",
            "-c1",
        ])
        .arg(&c.pool)
        .output()
        .unwrap();
    assert!(!opened.status.success(), "nobody opened the 0600 pool file");

    let root = small_handler(&url);
    root.connect().unwrap();
    store_all(&root, "root", 8);

    let mut nb = nobody_child("nobody", &[]);
    nb.connect(&url, 2 * MIB, CHUNK, 5000, T);
    let stored = nb.ok("store nb 0 8", T);
    assert_eq!(field(&stored, "stored"), Some("8"), "{stored}");
    let seen = nb.ok("verify root 0 8", T);
    assert_eq!(
        seen, "found=8 missing=0 zeros=0 corrupt=0",
        "nobody's reads of root's keys"
    );
    assert_eq!(intact(&root, "nb", 8), 8, "root's reads of nobody's keys");

    // Zero copy: the child maps the pool file itself — its own region writable, root's
    // region read-only — though it could never open the file.
    let perms = mapping_perms(nb.pid(), &c.pool);
    assert!(perms.iter().any(|p| p == "rw-s"), "own region: {perms:?}");
    assert!(
        perms.iter().any(|p| p == "r--s"),
        "root's region: {perms:?}"
    );

    // Mapping by path, as before, is what the file's mode refuses.
    let mut by_path = nobody_child("nobody-by-path", &[("MARU_REGION_FDS", "never")]);
    by_path.connect(&url, 2 * MIB, CHUNK, 5000, T);
    let refused = by_path.call("store np 0 1", T);
    assert!(refused.starts_with("err kind=Map"), "{refused}");
    assert!(refused.contains("Permission denied"), "{refused}");
}

/// One session of the raw protocol on the Unix socket, keeping the descriptors that come
/// with replies.
struct RawSession {
    sock: UnixStream,
    rx: FrameBuf,
    fds: VecDeque<OwnedFd>,
    next: u64,
}

impl RawSession {
    fn open(path: &Path) -> RawSession {
        let sock = UnixStream::connect(path).unwrap();
        sock.set_read_timeout(Some(T)).unwrap();
        let mut s = RawSession {
            sock,
            rx: FrameBuf::new(),
            fds: VecDeque::new(),
            next: 1,
        };
        let (host, pid, start_time) = maru_transport::local_identity();
        let hello = Request::Hello(Hello {
            role: Role::Client,
            instance_id: "raw",
            host: &host,
            pid,
            start_time,
            session_token: None,
            namespace: "",
        });
        assert!(matches!(s.call(&hello), Response::HelloOk(_)));
        s
    }

    fn call(&mut self, req: &Request) -> Response {
        let id = self.next;
        self.next += 1;
        let mut out = Vec::new();
        encode_request(&mut out, id, req).unwrap();
        self.sock.write_all(&out).unwrap();
        let mut r = FdReader {
            sock: &self.sock,
            fds: &mut self.fds,
        };
        let (header, payload) = self.rx.read_frame(&mut r).unwrap();
        assert_eq!(header.request_id, id);
        decode_response(&header, payload).unwrap()
    }

    /// A descriptor of `region`'s file: the reply and the descriptor, or the refusal.
    fn descriptor(
        &mut self,
        region: u64,
        writable: bool,
    ) -> Result<(OwnedFd, u64, u64), ErrorCode> {
        match self.call(&Request::Descriptor {
            region_id: region,
            writable,
        }) {
            Response::Descriptor {
                offset,
                len,
                writable: w,
            } => {
                assert_eq!(w, writable);
                let fd = self
                    .fds
                    .pop_front()
                    .expect("the descriptor came with its reply");
                Ok((fd, offset, len))
            }
            Response::Error(e) => {
                assert!(self.fds.is_empty(), "a refusal carried a descriptor");
                Err(e.code)
            }
            other => panic!("unexpected reply {other:?}"),
        }
    }
}

/// (b) Another session's region is passed read-only, and the kernel holds the client to it:
/// a writable mapping of that descriptor is `EACCES`; only the owner gets a read-write
/// descriptor, and writes through it reach every reader.
#[test]
fn another_sessions_region_is_read_only_at_the_kernel_level() {
    let c = cluster();
    let url = c.unix_url();
    let owner = small_handler(&url);
    owner.connect().unwrap();
    store_all(&owner, "own", 2);
    let theirs = owner.owned_regions()[0].region_id;

    let mut raw = RawSession::open(&c.sock);
    // Read-only: maps for reading and shows the owner's bytes; a writable map is EACCES.
    let (ro, offset, len) = raw.descriptor(theirs, false).unwrap();
    let loc = owner.retrieve(b"own-0").unwrap().unwrap();
    let writable = Mapping::map_fd(
        ro.try_clone().unwrap(),
        &c.pool,
        offset,
        len,
        MapMode::ReadWrite,
        false,
    );
    match writable {
        Err(ShmError::Map { source, .. }) => assert_eq!(
            source.kind(),
            std::io::ErrorKind::PermissionDenied,
            "{source}"
        ),
        other => panic!("a read-only descriptor mapped writable: {other:?}"),
    }
    let r = Mapping::map_fd(ro, &c.pool, offset, len, MapMode::ReadOnly, false).unwrap();
    let page_offset = loc.page_index() as usize * CHUNK as usize;
    let mut got = vec![0u8; loc.len()];
    r.read_at(page_offset, &mut got).unwrap();
    assert_eq!(
        got,
        value(b"own-0"),
        "the read-only mapping shows the owner's bytes"
    );
    // Read-write is the owner's alone.
    assert_eq!(
        raw.descriptor(theirs, true).unwrap_err(),
        ErrorCode::NotOwner
    );
    assert_eq!(
        raw.descriptor(u64::MAX, false).unwrap_err(),
        ErrorCode::UnknownRegion
    );

    // The raw session's own region: writable through its descriptor, seen by the owner.
    let mine = match raw.call(&Request::RequestRegion { size: 2 * MIB }) {
        Response::Region(info) => info,
        other => panic!("no region: {other:?}"),
    };
    let id = mine.handle.region_id;
    let (rw, offset, len) = raw.descriptor(id, true).unwrap();
    let w = Mapping::map_fd(rw, &c.pool, offset, len, MapMode::ReadWrite, true).unwrap();
    let v = value(b"raw-0");
    w.write_at(0, &v).unwrap();
    let reg = Request::Register(RegisterEntry {
        key: b"raw-0",
        region_id: id,
        offset: 0,
        len: v.len() as u64,
    });
    assert_eq!(raw.call(&reg), Response::Bool(true));
    assert_eq!(
        intact(&owner, "raw", 1),
        1,
        "the owner reads what went through the descriptor"
    );

    // A handler reading another session's region maps it from a read-only descriptor.
    let reader = small_handler(&url);
    reader.connect().unwrap();
    let view = reader.retrieve(b"own-1").unwrap().unwrap();
    assert_eq!(check(b"own-1", &view.to_vec()), Check::Intact);
    assert_eq!(perms_at(view.as_ptr() as usize), "r--s");
    store_all(&reader, "reader", 1);
    let own = reader.retrieve(b"reader-0").unwrap().unwrap();
    assert_eq!(perms_at(own.as_ptr() as usize), "rw-s");
}

/// (c) Over TCP nothing changes: a descriptor request is refused, clients open the pool's
/// path themselves — so a client of another uid cannot map a private pool file over TCP.
#[test]
fn a_client_over_tcp_opens_the_pools_path_as_before() {
    let c = cluster();
    let tcp = c.server_url();
    let h = small_handler(&tcp);
    h.connect().unwrap();
    store_all(&h, "tcp", 4);
    assert_eq!(intact(&h, "tcp", 4), 4);
    let unix = small_handler(&c.unix_url());
    unix.connect().unwrap();
    assert_eq!(
        intact(&unix, "tcp", 4),
        4,
        "a Unix client reads what a TCP client stored"
    );

    let id = h.owned_regions()[0].region_id;
    let e = maru_transport::BlockingConn::connect_admin(&c.server.url(), T)
        .unwrap()
        .call(&Request::Descriptor {
            region_id: id,
            writable: false,
        })
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidArgument), "{e}");
    assert!(e.to_string().contains("only over the Unix socket"), "{e}");

    if let Err(why) = can_run_as_nobody() {
        eprintln!("skipped the other-uid half: {why}");
        return;
    }
    private_pool_shared_socket(&c, NOBODY);
    let mut nb = nobody_child("nobody-tcp", &[]);
    nb.connect(&tcp, 2 * MIB, CHUNK, 5000, T);
    let refused = nb.call("verify tcp 0 4", T);
    assert!(refused.starts_with("err kind=Map"), "{refused}");
    let mut always = nobody_child("nobody-tcp-always", &[("MARU_REGION_FDS", "always")]);
    always.connect(&tcp, 2 * MIB, CHUNK, 5000, T);
    let refused = always.call("verify tcp 0 4", T);
    assert!(refused.starts_with("err kind=InvalidArgument"), "{refused}");
    assert!(refused.contains("unix://"), "{refused}");
}
