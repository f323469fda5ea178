//! End-to-end tests against an in-process resource manager and metadata server on
//! 127.0.0.1:0, with a shm pool in a temp dir under /dev/shm.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use maru_client::{
    AllocError, AllocHandle, ConnectError, DeleteStatus, ErrorKind, MaruConfig, MaruHandler,
    OpError, StateError, StoreItem, StoreOutcome, WaitHook, MIB,
};
use maru_proto::{encode_response, HelloOk, Response};

struct Cluster {
    dir: tempfile::TempDir,
    rm: Option<maru_resource_manager::RmHandle>,
    server: Option<maru_server::ServerHandle>,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = maru_testkit::temp_dir();
        let pool = format!("shm:{}/pool:256M", dir.path().display())
            .parse()
            .unwrap();
        let mut cfg = maru_resource_manager::RmConfig::new(dir.path().join("state"), vec![pool]);
        cfg.listen = "127.0.0.1:0".parse().unwrap();
        let rm = maru_resource_manager::start(cfg).unwrap();
        let server = maru_server::start(maru_server::ServerConfig {
            tcp: Some("127.0.0.1:0".parse().unwrap()),
            unix: Some(dir.path().join("server.sock")),
            rm_url: rm.url(),
            ..Default::default()
        })
        .unwrap();
        Cluster {
            dir,
            rm: Some(rm),
            server: Some(server),
        }
    }

    fn server(&self) -> &maru_server::ServerHandle {
        self.server.as_ref().unwrap()
    }

    fn config(&self) -> MaruConfig {
        MaruConfig {
            server_url: self.server().url().to_string(),
            pool_size: 4 * MIB,
            chunk_size_bytes: 64 * 1024,
            timeout_ms: 3000,
            ..MaruConfig::default()
        }
    }

    fn handler(&self, cfg: MaruConfig) -> MaruHandler {
        let h = MaruHandler::new(cfg).unwrap();
        h.connect().unwrap();
        h
    }

    fn rm_allocations(&self) -> u64 {
        self.rm.as_ref().unwrap().stats().allocations
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
        if let Some(rm) = self.rm.take() {
            rm.shutdown();
        }
        let _ = &self.dir;
    }
}

fn wait_until(what: &str, timeout: Duration, cond: impl FnMut() -> bool) {
    assert!(
        maru_testkit::wait_until(timeout, cond),
        "timed out waiting for {what}"
    );
}

#[test]
fn store_retrieve_exists_delete_round_trip() {
    let c = Cluster::start();
    let h = c.handler(c.config());
    assert!(h.is_connected());

    // Zero-copy store.
    let handle = h.alloc(11).unwrap();
    handle.write_at(0, b"hello world").unwrap();
    assert_eq!(
        h.store_handle(b"k1", &handle).unwrap(),
        StoreOutcome::Stored
    );
    let v = h.retrieve(b"k1").unwrap().unwrap();
    assert_eq!(v.to_vec(), b"hello world");
    assert!(v.is_writable(), "own pages are mapped read-write");
    assert_eq!(v.region_id(), handle.region_id());
    assert_eq!(v.page_index(), handle.page_index());

    // Copy-in store with a prefix.
    assert_eq!(
        h.store_bytes(b"k2", b"hdr:", b"payload").unwrap(),
        StoreOutcome::Stored
    );
    assert_eq!(h.retrieve(b"k2").unwrap().unwrap().to_vec(), b"hdr:payload");

    // Dedup: the second store of a key frees its page and keeps the first value.
    let before = h.owned_regions()[0].allocated_pages;
    assert_eq!(
        h.store_bytes(b"k2", b"", b"other").unwrap(),
        StoreOutcome::Deduplicated
    );
    assert_eq!(h.owned_regions()[0].allocated_pages, before);
    assert_eq!(h.retrieve(b"k2").unwrap().unwrap().to_vec(), b"hdr:payload");

    assert!(h.exists(b"k1").unwrap());
    assert!(!h.exists(b"nope").unwrap());
    assert!(h.retrieve(b"nope").unwrap().is_none());

    // Delete frees our page.
    assert_eq!(h.delete(b"k1").unwrap(), DeleteStatus::Deleted);
    assert_eq!(h.owned_regions()[0].allocated_pages, before - 1);
    assert!(!h.exists(b"k1").unwrap());
    assert_eq!(h.delete(b"k1").unwrap(), DeleteStatus::NotFound);

    // Pins.
    assert!(h.pin(b"k2").unwrap());
    assert!(!h.pin(b"missing").unwrap());
    assert_eq!(h.delete(b"k2").unwrap(), DeleteStatus::Pinned);
    assert!(h.exists(b"k2").unwrap());
    assert!(h.unpin(b"k2").unwrap());
    assert!(!h.unpin(b"k2").unwrap());
    assert_eq!(h.delete(b"k2").unwrap(), DeleteStatus::Deleted);

    assert!(h.healthcheck());
    let stats = h.stats().unwrap();
    assert_eq!(stats.regions.len(), 1);
    assert_eq!(stats.regions[0].allocated_pages, 0);
    assert!(stats.server.regions >= 1);
    h.close();
    assert!(!h.healthcheck());
}

#[test]
fn argument_errors_are_typed() {
    let c = Cluster::start();
    let h = c.handler(c.config());
    let e = h.alloc(64 * 1024 + 1).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    let e = h.store_bytes(b"k", &[0; 10], &[0; 64 * 1024]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    let e = h.exists(&[b'x'; 2000]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    let e = h.exists(b"").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");

    // A page must be allocated and not yet stored.
    let a = h.alloc(10).unwrap();
    h.store_handle(b"a", &a).unwrap();
    let e = h.store_handle(b"b", &a).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    let bogus = maru_client::PageId {
        region_id: 999_999,
        page_index: 0,
    };
    assert_eq!(
        h.free(bogus).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        h.store_page(b"c", bogus, 1).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );

    // Not connected, then closed.
    let idle = MaruHandler::new(c.config()).unwrap();
    assert_eq!(idle.exists(b"a").unwrap_err().kind(), ErrorKind::State);
    h.close();
    assert_eq!(h.exists(b"a").unwrap_err().kind(), ErrorKind::State);
    assert_eq!(h.alloc(1).unwrap_err().kind(), ErrorKind::State);
    assert_eq!(h.connect().unwrap_err().kind(), ErrorKind::State);
}

#[test]
fn exhaustion_and_auto_expand() {
    let c = Cluster::start();
    let chunk = 64 * 1024;
    let fixed = c.handler(MaruConfig {
        pool_size: 4 * chunk,
        chunk_size_bytes: chunk,
        auto_expand: false,
        ..c.config()
    });
    // The resource manager rounds regions up to its alignment: use the real page count.
    let count = fixed.owned_regions()[0].page_count;
    assert!(count >= 4);
    let pages: Vec<_> = (0..count).map(|_| fixed.alloc(chunk).unwrap()).collect();
    let e = fixed.alloc(1).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Exhausted, "{e}");
    fixed.free(pages[2].page()).unwrap();
    assert_eq!(
        fixed.free(pages[2].page()).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(fixed.alloc(1).unwrap().page(), pages[2].page());

    let growing = c.handler(MaruConfig {
        pool_size: 2 * chunk,
        chunk_size_bytes: chunk,
        expand_size: Some(3 * chunk),
        ..c.config()
    });
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    growing.set_on_region_added(Some(Arc::new(move |id, pages| {
        s2.lock().unwrap().push((id, pages))
    })));
    assert_eq!(seen.lock().unwrap().len(), 1, "existing region replayed");
    let first = growing.owned_regions()[0].page_count;
    let handles: Vec<_> = (0..=first).map(|_| growing.alloc(chunk).unwrap()).collect();
    let regions = growing.owned_regions();
    assert_eq!(regions.len(), 2);
    assert!(regions[1].page_count >= 3);
    assert_eq!(regions[1].allocated_pages, 1);
    assert_eq!(seen.lock().unwrap().len(), 2, "expansion reported");
    assert_eq!(seen.lock().unwrap()[1].0, regions[1].region_id);
    assert_ne!(handles[0].region_id(), handles[first as usize].region_id());
    // A page freed in the first region is found by the scan.
    growing.free(handles[0].page()).unwrap();
    while regions.len() == growing.owned_regions().len() {
        let h = growing.alloc(1).unwrap();
        if h.region_id() == handles[0].region_id() {
            break;
        }
    }
    assert_eq!(
        growing.owned_regions().len(),
        2,
        "no expansion while a page is free"
    );
}

#[test]
fn other_instances_read_only_and_deferred_freeing() {
    let c = Cluster::start();
    let a = c.handler(MaruConfig {
        eager_map: false,
        ..c.config()
    });
    let b = c.handler(MaruConfig {
        eager_map: false,
        ..c.config()
    });
    let regions_before = c.rm_allocations();
    assert_eq!(regions_before, 2);
    for i in 0..8u8 {
        a.store_bytes(format!("key-{i}").as_bytes(), &[], &[i; 1000])
            .unwrap();
    }
    let views: Vec<_> = (0..8u8)
        .map(|i| b.retrieve(format!("key-{i}").as_bytes()).unwrap().unwrap())
        .collect();
    for (i, v) in views.iter().enumerate() {
        assert_eq!(v.to_vec(), vec![i as u8; 1000]);
        assert!(!v.is_writable(), "another instance's region is read-only");
        assert!(v.write_at(0, b"x").is_err());
    }
    // B may not delete-by-freeing A's pages, but it may delete A's keys.
    a.close();
    for (i, v) in views.iter().enumerate() {
        assert_eq!(v.to_vec(), vec![i as u8; 1000], "deferred freeing");
    }
    assert_eq!(
        b.retrieve(b"key-3").unwrap().unwrap().to_vec(),
        vec![3; 1000]
    );
    assert_eq!(
        c.rm_allocations(),
        2,
        "A's region lives while keys reference it"
    );
    let keys: Vec<Vec<u8>> = (0..8).map(|i| format!("key-{i}").into_bytes()).collect();
    let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
    assert!(b
        .batch_delete(&refs)
        .unwrap()
        .iter()
        .all(|s| *s == DeleteStatus::Deleted));
    wait_until("A's region to be freed", Duration::from_secs(10), || {
        c.rm_allocations() == 1
    });
    drop(views);
}

#[test]
fn eager_map_maps_existing_regions_at_connect() {
    let c = Cluster::start();
    let a = c.handler(c.config());
    a.store_bytes(b"x", b"", b"eager").unwrap();
    let rid = a.owned_regions()[0].region_id;
    let b = c.handler(c.config());
    assert!(
        b.buffer(rid, 0, 16).is_some(),
        "A's region mapped at connect"
    );
    assert_eq!(b.region_page_count(rid), Some(4 * MIB / (64 * 1024)));
    let lazy = c.handler(MaruConfig {
        eager_map: false,
        ..c.config()
    });
    assert!(lazy.buffer(rid, 0, 16).is_none());
    lazy.retrieve(b"x").unwrap().unwrap();
    assert!(
        lazy.buffer(rid, 0, 16).is_some(),
        "mapped at first retrieve"
    );
    assert!(lazy.buffer(rid, 4 * MIB, 1).is_none(), "out of range");
}

#[test]
fn batches_cross_the_protocol_batch_limit() {
    let c = Cluster::start();
    let h = c.handler(MaruConfig {
        pool_size: 8 * MIB,
        chunk_size_bytes: 4096,
        ..c.config()
    });
    let n = maru_proto::MAX_BATCH + 10;
    let keys: Vec<Vec<u8>> = (0..n).map(|i| format!("b-{i}").into_bytes()).collect();
    let datas: Vec<Vec<u8>> = (0..n).map(|i| (i as u32).to_le_bytes().to_vec()).collect();
    let handle = h.alloc(3).unwrap();
    handle.write_at(0, b"zc!").unwrap();
    let mut items: Vec<(&[u8], StoreItem)> = keys
        .iter()
        .zip(&datas)
        .map(|(k, d)| {
            (
                k.as_slice(),
                StoreItem::Bytes {
                    prefix: b"p",
                    data: d,
                },
            )
        })
        .collect();
    items.push((
        b"zero-copy",
        StoreItem::Page {
            page: handle.page(),
            len: 3,
        },
    ));
    let out = h.batch_store(&items).unwrap();
    assert!(out.iter().all(|o| *o == StoreOutcome::Stored));
    let mut refs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
    refs.push(b"zero-copy");
    refs.push(b"absent");
    let views = h.batch_retrieve(&refs).unwrap();
    assert_eq!(views.len(), n + 2);
    for (i, v) in views[..n].iter().enumerate() {
        let mut want = b"p".to_vec();
        want.extend((i as u32).to_le_bytes());
        assert_eq!(v.as_ref().unwrap().to_vec(), want);
    }
    assert_eq!(views[n].as_ref().unwrap().to_vec(), b"zc!");
    assert!(views[n + 1].is_none());
    let exists = h.batch_exists(&refs).unwrap();
    assert!(exists[..=n].iter().all(|e| *e) && !exists[n + 1]);
    assert!(h.batch_pin(&refs[..5]).unwrap().iter().all(|p| *p));
    assert!(h.batch_unpin(&refs[..5]).unwrap().iter().all(|p| *p));
    // Dedup in a batch: every entry reports deduplicated and no page stays taken.
    let taken = h
        .owned_regions()
        .iter()
        .map(|r| r.allocated_pages)
        .sum::<u64>();
    let again = h.batch_store(&items[..100]).unwrap();
    assert!(again.iter().all(|o| *o == StoreOutcome::Deduplicated));
    assert_eq!(
        h.owned_regions()
            .iter()
            .map(|r| r.allocated_pages)
            .sum::<u64>(),
        taken
    );
}

#[test]
fn free_of_a_stored_page_takes_the_key_away() {
    let c = Cluster::start();
    let h = c.handler(c.config());
    let a = h.alloc(4).unwrap();
    a.write_at(0, b"evic").unwrap();
    h.store_handle(b"evict-me", &a).unwrap();
    h.pin(b"evict-me").unwrap();
    assert_eq!(
        h.free(a.page()).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    h.unpin(b"evict-me").unwrap();
    h.free(a.page()).unwrap();
    assert!(!h.exists(b"evict-me").unwrap());
}

#[test]
fn views_outlive_close() {
    let c = Cluster::start();
    let h = c.handler(c.config());
    h.store_bytes(b"v", b"", &[7; 4096]).unwrap();
    let v = h.retrieve(b"v").unwrap().unwrap();
    let a = h.alloc(16).unwrap();
    h.close();
    h.close();
    assert!(
        v.to_vec() == vec![7; 4096],
        "view lost its bytes after close"
    );
    a.write_at(0, b"still mapped").unwrap();
    assert!(std::sync::Arc::strong_count(v.mapping()) >= 1);
    // The region may now be freed and carved for another owner: a write through a handle
    // kept past close() must not reach the pool.
    let m = a.view().mapping();
    let page = m.file_offset() as usize + a.view().offset();
    let aligned = page - page % 4096;
    let pool = maru_shm::Mapping::map(
        m.path(),
        aligned as u64,
        4096,
        maru_shm::MapMode::ReadOnly,
        false,
    )
    .unwrap();
    let mut seen = [0u8; 12];
    pool.read_at(page - aligned, &mut seen).unwrap();
    assert_ne!(
        &seen, b"still mapped",
        "a write after close() reached shared memory"
    );
}

#[test]
fn unix_socket_url() {
    let c = Cluster::start();
    let path = c.server().unix_path().unwrap().to_owned();
    let h = c.handler(MaruConfig {
        server_url: format!("unix://{}", path.display()),
        ..c.config()
    });
    h.store_bytes(b"u", b"", b"over uds").unwrap();
    assert_eq!(h.retrieve(b"u").unwrap().unwrap().to_vec(), b"over uds");
}

#[test]
fn concurrent_readers_use_their_own_connections() {
    let c = Cluster::start();
    let h = Arc::new(c.handler(c.config()));
    for i in 0..32u32 {
        h.store_bytes(format!("c-{i}").as_bytes(), b"", &i.to_le_bytes())
            .unwrap();
    }
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let h = h.clone();
            std::thread::spawn(move || {
                for round in 0..200u32 {
                    let i = (round * 7 + t) % 32;
                    let v = h.retrieve(format!("c-{i}").as_bytes()).unwrap().unwrap();
                    assert_eq!(v.to_vec(), i.to_le_bytes());
                    assert!(h.exists(format!("c-{i}").as_bytes()).unwrap());
                }
            })
        })
        .collect();
    // Writers interleave with the readers.
    for i in 32..64u32 {
        h.store_bytes(format!("c-{i}").as_bytes(), b"", &i.to_le_bytes())
            .unwrap();
    }
    for t in threads {
        t.join().unwrap();
    }
    let clients = &h.stats().unwrap().server.clients;
    let me = clients
        .iter()
        .find(|cl| cl.instance_id == h.instance_id())
        .unwrap();
    // One of them is the session's watcher.
    assert!(me.connections > 2, "readers ran on several connections");
}

/// A fake server that answers the handshake and then never replies.
fn stalled_server() -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("tcp://{}", listener.local_addr().unwrap());
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let (h, _) = maru_transport::read_frame(&mut s).unwrap();
        let mut out = Vec::new();
        encode_response(
            &mut out,
            h.request_id,
            &Response::HelloOk(HelloOk {
                server: "stall".into(),
                hostname: "stall".into(),
                session_token: [1; 16],
            }),
        )
        .unwrap();
        s.write_all(&out).unwrap();
        // Swallow whatever comes next, never answer; end when the client hangs up.
        let mut sink = [0u8; 1024];
        while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
    });
    (url, t)
}

#[test]
fn a_stalled_server_times_out_through_the_hook() {
    struct Counting(AtomicUsize);
    impl WaitHook for Counting {
        fn block(&self, f: &mut (dyn FnMut() + Send)) {
            self.0.fetch_add(1, Ordering::SeqCst);
            f()
        }
    }
    let (url, t) = stalled_server();
    let h = MaruHandler::new(MaruConfig {
        server_url: url,
        timeout_ms: 300,
        ..MaruConfig::default()
    })
    .unwrap();
    let hook = Counting(AtomicUsize::new(0));
    let started = Instant::now();
    let e = h.with_hook(&hook).connect().unwrap_err();
    let took = started.elapsed();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(
        hook.0.load(Ordering::SeqCst) >= 1,
        "slow wait went through the hook"
    );
    assert!(!h.is_connected());
    assert!(e.to_string().contains("request_region"), "{e}");
    drop(h);
    t.join().unwrap();
}

#[test]
fn a_dead_server_fails_fast() {
    let mut c = Cluster::start();
    let h = c.handler(c.config());
    h.store_bytes(b"d", b"", b"x").unwrap();
    c.server.take().unwrap().shutdown();
    let started = Instant::now();
    let e = h.exists(b"d").unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::Transport | ErrorKind::Remote(_)),
        "{e}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(!h.healthcheck());
}

/// The 2 MiB region a fake server grants: a file `<name>-region` in `dir`.
fn fake_region(dir: &std::path::Path, name: &str) -> maru_proto::RegionInfo {
    use maru_proto::{Access, Handle, RegionInfo};
    let path = dir.join(format!("{name}-region"));
    std::fs::File::create(&path)
        .unwrap()
        .set_len(2 * MIB)
        .unwrap();
    let path = path.display().to_string();
    RegionInfo {
        handle: Handle {
            region_id: 1,
            pool: path.clone(),
            offset: 0,
            len: 2 * MIB,
            owner: format!("{name}:1"),
            token: [0; 32],
        },
        access: Access {
            path,
            offset: 0,
            len: 2 * MIB,
            page_size: 4096,
        },
    }
}

/// A fake server on 127.0.0.1:0 (its region a file in `dir`). Each connection answers the
/// handshake and the region request itself and every other request with what the
/// connection's `answer` (made by `per_conn` at accept) returns — `None` closes the
/// connection — and calls `sent` with each reply's message type once it is written.
fn fake_server<A>(
    dir: &std::path::Path,
    tag: &'static str,
    per_conn: impl Fn() -> A + Send + 'static,
    sent: impl Fn(u16) + Send + Sync + 'static,
) -> String
where
    A: FnMut(u16) -> Option<Response> + Send + 'static,
{
    use maru_proto::msg_type;
    let region = fake_region(dir, tag);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("tcp://{}", listener.local_addr().unwrap());
    let sent = Arc::new(sent);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let (region, sent, mut answer) = (region.clone(), sent.clone(), per_conn());
            std::thread::spawn(move || {
                while let Ok((h, _)) = maru_transport::read_frame(&mut s) {
                    let resp = match h.msg_type {
                        msg_type::HELLO => Response::HelloOk(HelloOk {
                            server: tag.into(),
                            hostname: tag.into(),
                            session_token: [2; 16],
                        }),
                        msg_type::REQUEST_REGION => Response::Region(region.clone()),
                        t => match answer(t) {
                            Some(r) => r,
                            None => return,
                        },
                    };
                    let mut out = Vec::new();
                    encode_response(&mut out, h.request_id, &resp).unwrap();
                    if s.write_all(&out).is_err() {
                        return;
                    }
                    sent(h.msg_type);
                }
            });
        }
    });
    url
}

/// A fake server whose first `exists` is answered only after `delay`, every later one at
/// once; it counts its connections and says when the late reply has been sent.
fn late_server(
    dir: &std::path::Path,
    delay: Duration,
) -> (String, Arc<AtomicUsize>, Arc<AtomicBool>) {
    use maru_proto::msg_type;
    let conns = Arc::new(AtomicUsize::new(0));
    let late_sent = Arc::new(AtomicBool::new(false));
    let (counter, sent) = (conns.clone(), late_sent.clone());
    let url = fake_server(
        dir,
        "late",
        move || {
            counter.fetch_add(1, Ordering::SeqCst);
            let mut first_exists = true;
            move |t| {
                Some(match t {
                    msg_type::EXISTS if first_exists => {
                        first_exists = false;
                        std::thread::sleep(delay);
                        Response::Bool(true)
                    }
                    msg_type::EXISTS => Response::Bool(false),
                    _ => Response::Ok,
                })
            }
        },
        move |t| {
            if t == msg_type::EXISTS {
                sent.store(true, Ordering::SeqCst);
            }
        },
    );
    (url, conns, late_sent)
}

#[test]
fn a_timed_out_connection_is_kept_and_its_late_reply_skipped() {
    let dir = maru_testkit::temp_dir();
    let (url, conns, late_sent) = late_server(dir.path(), Duration::from_millis(300));
    let h = MaruHandler::new(MaruConfig {
        server_url: url,
        pool_size: 2 * MIB,
        chunk_size_bytes: 64 * 1024,
        timeout_ms: 100,
        eager_map: false,
        ..MaruConfig::default()
    })
    .unwrap();
    h.connect().unwrap();
    let e = h.exists(b"k").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    // Once the late `true` is on the wire, the next call must skip it and return its own
    // `false`.
    wait_until("the late reply", Duration::from_secs(5), || {
        late_sent.load(Ordering::SeqCst)
    });
    assert!(
        !h.exists(b"k").unwrap(),
        "the stale reply was taken for this call's"
    );
    assert_eq!(
        conns.load(Ordering::SeqCst),
        2,
        "the timed-out connection was kept (plus the watcher's): the server ends a session \
         with its last connection"
    );
    h.close();
}

/// A fresh read-only mapping of the pool file under `a`'s page: what everyone else sees.
fn pool_view_of(a: &AllocHandle) -> (maru_shm::Mapping, usize) {
    let m = a.view().mapping();
    let page = m.file_offset() as usize + a.view().offset();
    let aligned = page - page % 4096;
    let pool = maru_shm::Mapping::map(
        m.path(),
        aligned as u64,
        4096,
        maru_shm::MapMode::ReadOnly,
        false,
    )
    .unwrap();
    (pool, page - aligned)
}

/// Writes `stamp` through `a` and tells whether the pool saw it.
fn write_reaches_pool(a: &AllocHandle, pool: &(maru_shm::Mapping, usize), stamp: &[u8]) -> bool {
    a.write_at(0, stamp).unwrap();
    let mut seen = vec![0u8; stamp.len()];
    pool.0.read_at(pool.1, &mut seen).unwrap();
    seen == stamp
}

#[test]
fn a_lost_server_detaches_owned_pages_and_the_next_call_says_so() {
    let mut c = Cluster::start();
    let h = c.handler(c.config());
    h.store_bytes(b"kept", b"", &[9; 4096]).unwrap();
    let kept = h.retrieve(b"kept").unwrap().unwrap();
    let a = h.alloc(64).unwrap();
    let pool = pool_view_of(&a);
    assert!(
        write_reaches_pool(&a, &pool, b"live session write"),
        "an owned page is shared while the server lives"
    );

    c.server.take().unwrap().shutdown();
    // No call of ours: the watcher notices on its own, within a bounded wait.
    wait_until(
        "the server's loss to be noticed",
        Duration::from_secs(10),
        || !h.is_connected(),
    );
    // The server gave our regions back; the resource manager may hand them to anyone now.
    wait_until("the regions to go back", Duration::from_secs(10), || {
        c.rm_allocations() == 0
    });
    for i in 0..3 {
        let stamp = format!("stale write {i}");
        assert!(
            !write_reaches_pool(&a, &pool, stamp.as_bytes()),
            "a write through a page allocated before the server's loss reached the pool"
        );
        // Reads through old views still work: the handle shows its own (private) bytes.
        assert_eq!(&a.view().to_vec()[..stamp.len()], stamp.as_bytes());
    }
    let old = kept.to_vec();
    assert!(
        old == vec![9; 4096] || old == vec![0; 4096],
        "a view of a stored key reads the value or, once its region was freed, zeros"
    );

    // The next operation says what happened, with a typed error.
    let e = h.exists(b"kept").unwrap_err();
    assert!(matches!(e, OpError::State(StateError::ServerLost)), "{e}");
    assert_eq!(e.kind(), ErrorKind::Transport);
    assert!(
        e.to_string()
            .contains("metadata server connection was lost")
            && e.to_string().contains("close()"),
        "{e}"
    );
    assert!(matches!(
        h.alloc(16).unwrap_err(),
        AllocError::State(StateError::ServerLost)
    ));
    assert!(matches!(
        h.store_bytes(b"x", b"", b"y").unwrap_err().kind(),
        ErrorKind::Transport
    ));
    assert!(matches!(
        h.connect().unwrap_err(),
        ConnectError::State(StateError::ServerLost)
    ));
    assert!(!h.healthcheck());
    h.close();
    assert_eq!(h.exists(b"kept").unwrap_err().kind(), ErrorKind::State);
}

#[test]
fn close_is_not_reported_as_server_loss() {
    let c = Cluster::start();
    let h = c.handler(c.config());
    let other = c.handler(c.config());
    h.store_bytes(b"mine", b"", b"v").unwrap();
    let me = |stats: maru_client::HandlerStats| {
        stats
            .server
            .clients
            .into_iter()
            .find(|cl| cl.instance_id == h.instance_id())
    };
    let before = me(other.stats().unwrap()).unwrap();
    assert!(
        before.connected && before.connections >= 2,
        "a pooled connection and the watcher's: {before:?}"
    );
    h.close();
    let e = h.exists(b"mine").unwrap_err();
    assert!(matches!(e, OpError::State(StateError::Closed)), "{e}");
    assert_eq!(e.kind(), ErrorKind::State);
    // The session ended by goodbye, not by a lost connection: its regions went back (the
    // key keeps its own), and nobody else noticed anything.
    assert!(other.is_connected());
    assert_eq!(other.retrieve(b"mine").unwrap().unwrap().to_vec(), b"v");
    // Its session is over at the server (its region stays for the key, owner gone).
    let after = me(other.stats().unwrap()).unwrap();
    assert!(
        !after.connected && after.connections == 0,
        "the closed handler's session (or its watcher) is still at the server: {after:?}"
    );
    other.close();
}

/// A fake server that closes the connection on `exists` (a server going away under a pooled
/// connection). The region is a file in `dir`.
fn closing_server(dir: &std::path::Path) -> String {
    use maru_proto::msg_type;
    fake_server(
        dir,
        "closing",
        || |t| (t != msg_type::EXISTS).then_some(Response::Ok),
        |_| {},
    )
}

#[test]
fn a_call_that_finds_the_connection_closed_detaches_at_once() {
    let dir = maru_testkit::temp_dir();
    let h = MaruHandler::new(MaruConfig {
        server_url: closing_server(dir.path()),
        pool_size: 2 * MIB,
        chunk_size_bytes: 64 * 1024,
        eager_map: false,
        ..MaruConfig::default()
    })
    .unwrap();
    h.connect().unwrap();
    let a = h.alloc(64).unwrap();
    let pool = pool_view_of(&a);
    assert!(write_reaches_pool(&a, &pool, b"before"));
    // The watcher's own connection stays open here: the call itself must notice.
    let e = h.exists(b"k").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Transport, "{e}");
    assert!(!h.is_connected());
    assert!(!write_reaches_pool(&a, &pool, b"after!"));
    assert!(matches!(
        h.exists(b"k").unwrap_err(),
        OpError::State(StateError::ServerLost)
    ));
    h.close();
}

fn write_behind(c: &Cluster) -> MaruConfig {
    MaruConfig {
        write_behind: true,
        ..c.config()
    }
}

#[test]
fn write_behind_stores_are_seen_by_their_handler_at_once_and_by_others_after_flush() {
    let c = Cluster::start();
    let h = c.handler(write_behind(&c));
    let other = c.handler(c.config());
    // More than the 64 in flight, through both store forms.
    for i in 0..200u32 {
        let key = format!("wb-{i}");
        let outcome = if i % 2 == 0 {
            h.store_bytes(key.as_bytes(), b"", &i.to_le_bytes())
                .unwrap()
        } else {
            let a = h.alloc(4).unwrap();
            a.write_at(0, &i.to_le_bytes()).unwrap();
            h.store_handle(key.as_bytes(), &a).unwrap()
        };
        assert_eq!(outcome, StoreOutcome::Sent);
        if i % 50 == 0 {
            // The handler's own reads wait for its registrations.
            assert!(h.exists(key.as_bytes()).unwrap());
            let v = h.retrieve(key.as_bytes()).unwrap().unwrap();
            assert_eq!(v.to_vec(), i.to_le_bytes());
        }
    }
    h.flush().unwrap();
    for i in 0..200u32 {
        let v = other.retrieve(format!("wb-{i}").as_bytes()).unwrap();
        assert_eq!(v.expect("visible after flush").to_vec(), i.to_le_bytes());
    }
    let allocated =
        |h: &MaruHandler| -> u64 { h.owned_regions().iter().map(|r| r.allocated_pages).sum() };
    assert_eq!(allocated(&h), 200);
    // Deleting keys stored behind works like any other delete.
    assert_eq!(h.delete(b"wb-0").unwrap(), DeleteStatus::Deleted);
    assert_eq!(allocated(&h), 199);
}

#[test]
fn write_behind_dedup_frees_the_page_and_keeps_the_first_value() {
    let c = Cluster::start();
    let h = c.handler(write_behind(&c));
    assert_eq!(
        h.store_bytes(b"dup", b"", b"first").unwrap(),
        StoreOutcome::Sent
    );
    assert_eq!(
        h.store_bytes(b"dup", b"", b"second").unwrap(),
        StoreOutcome::Sent
    );
    h.flush().unwrap();
    assert_eq!(h.owned_regions()[0].allocated_pages, 1);
    assert_eq!(h.retrieve(b"dup").unwrap().unwrap().to_vec(), b"first");
}

#[test]
fn write_behind_refuses_a_page_that_is_already_on_its_way() {
    let c = Cluster::start();
    let h = c.handler(write_behind(&c));
    let a = h.alloc(4).unwrap();
    assert_eq!(h.store_handle(b"a", &a).unwrap(), StoreOutcome::Sent);
    let again = h.store_handle(b"b", &a).unwrap_err();
    assert_eq!(again.kind(), ErrorKind::InvalidArgument, "{again}");
    h.flush().unwrap();
    assert!(!h.exists(b"b").unwrap());
    // Free takes the key away with the page, as for a synchronous store.
    h.free(a.page()).unwrap();
    assert!(!h.exists(b"a").unwrap());
}

#[test]
fn write_behind_failures_are_reported_never_lost() {
    let mut c = Cluster::start();
    let h = c.handler(write_behind(&c));
    assert_eq!(h.store_bytes(b"ok", b"", b"x").unwrap(), StoreOutcome::Sent);
    h.flush().unwrap();
    // With the server gone, a store either fails at once or its failure comes from flush.
    c.server.take().unwrap().shutdown();
    let stored = h.store_bytes(b"after", b"", b"y");
    let flushed = h.flush();
    assert!(
        stored.is_err() || flushed.is_err(),
        "a store the server never saw reported success: {stored:?} / {flushed:?}"
    );
    if let Err(e) = &flushed {
        assert!(
            matches!(e.kind(), ErrorKind::Transport | ErrorKind::State),
            "{e}"
        );
    }
    h.close();
}
