//! The resource manager's reply to an allocation lost on the way back (it crashed right
//! after logging the allocation, or the connection broke): the metadata server must not
//! leave a region allocated at the resource manager that it does not know about.
//!
//! A crash cannot be timed to fall between the log append and the reply, so a small TCP
//! proxy between the real `maru-server` and the real `maru-resource-manager` forwards
//! everything, and, when armed, lets one `rm_alloc` through, swallows its reply and cuts both
//! connections — exactly what the server sees when the resource manager dies at that moment.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use maru_faults::{free_port, small_handler, temp_dir, wait_until, MIB};
use maru_proto::{msg_type, HEADER_LEN};
use maru_testkit::binary_cluster::{admin_conn, rm_admin, server_regions};
use maru_testkit::{RmSpec, ServerSpec};

/// Reads one whole frame (header and payload).
fn frame(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut f = vec![0u8; HEADER_LEN];
    s.read_exact(&mut f).ok()?;
    let len = u32::from_le_bytes([f[20], f[21], f[22], f[23]]) as usize;
    f.resize(HEADER_LEN + len, 0);
    s.read_exact(&mut f[HEADER_LEN..]).ok()?;
    Some(f)
}

/// Forwards frames between the server and the resource manager; see the module docs.
fn proxy(upstream: String, armed: Arc<AtomicBool>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for down in l.incoming().map_while(Result::ok) {
            let Ok(up) = TcpStream::connect(&upstream) else {
                continue;
            };
            let swallow = Arc::new(AtomicBool::new(false));
            let (mut d_in, mut u_out) = (down.try_clone().unwrap(), up.try_clone().unwrap());
            let (armed, s1) = (armed.clone(), swallow.clone());
            std::thread::spawn(move || {
                while let Some(f) = frame(&mut d_in) {
                    let ty = u16::from_le_bytes([f[6], f[7]]);
                    if ty == msg_type::RM_ALLOC && armed.swap(false, Ordering::SeqCst) {
                        s1.store(true, Ordering::SeqCst);
                    }
                    if u_out.write_all(&f).is_err() {
                        break;
                    }
                }
                let _ = u_out.shutdown(Shutdown::Both);
            });
            let (mut u_in, mut d_out) = (up, down);
            std::thread::spawn(move || {
                while let Some(f) = frame(&mut u_in) {
                    if swallow.load(Ordering::SeqCst) {
                        // The allocation happened; its answer never arrives.
                        let _ = d_out.shutdown(Shutdown::Both);
                        let _ = u_in.shutdown(Shutdown::Both);
                        return;
                    }
                    if d_out.write_all(&f).is_err() {
                        break;
                    }
                }
                let _ = d_out.shutdown(Shutdown::Both);
            });
        }
    });
    port
}

#[test]
fn a_lost_alloc_reply_leaves_no_region_behind() {
    let dir = temp_dir();
    let rm_spec = RmSpec {
        port: free_port(),
        ..RmSpec::new(
            dir.path(),
            vec![maru_testkit::shm_pool_arg(dir.path(), "p0", 64 * MIB)],
        )
    };
    let _rm = rm_spec.spawn(dir.path()).unwrap();
    let armed = Arc::new(AtomicBool::new(false));
    let via = proxy(format!("127.0.0.1:{}", rm_spec.port), armed.clone());
    let server = ServerSpec {
        unix: Some(dir.path().join("s.sock")),
        ..ServerSpec::new(format!("127.0.0.1:{via}"))
    }
    .spawn(dir.path(), "server")
    .unwrap();
    let connect = || {
        let h = small_handler(&format!("unix://{}", dir.path().join("s.sock").display()));
        let r = h.connect();
        (h, r)
    };
    let (a, r) = connect();
    r.unwrap();
    armed.store(true, Ordering::SeqCst);
    let (b, r) = connect();
    println!("connect whose region's allocation reply was lost: {r:?}");

    let rm_url = maru_proto::ServerUrl::Tcp(format!("127.0.0.1:{}", rm_spec.port));
    let server_ids = || -> Vec<u64> {
        server_regions(&mut admin_conn(&server.url()))
            .iter()
            .map(|r| r.handle.region_id)
            .collect()
    };
    let (mut rm_ids, mut known) = (Vec::new(), Vec::new());
    let agree = wait_until(Duration::from_secs(5), || {
        rm_ids = rm_admin(&rm_url)
            .list()
            .unwrap()
            .iter()
            .map(|a| a.handle.region_id)
            .collect();
        known = server_ids();
        rm_ids == known
    });
    a.close();
    b.close();
    assert!(
        agree,
        "the resource manager holds regions {rm_ids:?}, the server knows {known:?}"
    );
}
