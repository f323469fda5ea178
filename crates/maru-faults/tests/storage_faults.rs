//! Storage going wrong under a running system: the pool file removed or truncated, the
//! state directory made read-only, the disk of the write-ahead log full.
//!
//! What must hold: the daemons neither crash nor hang, every refusal is a clear error, and
//! what was already durable (the resource manager's allocation table) is exactly what it
//! was. Read-only and disk-full run the resource manager in a private mount namespace (a
//! read-only bind mount; a 256 KiB tmpfs); without root or util-linux they skip, saying so.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};

use maru_faults::child::{num, ChildProc};
use maru_faults::ns::MountNs;
use maru_faults::{free_port, temp_dir, wait_until, KIB, MIB};
use maru_proto::{ErrorCode, Handle, Role, ServerUrl};
use maru_resource_manager::RmClient;
use maru_testkit::{BinaryCluster, ClusterOpts, Daemon, RmSpec, ServerSpec, TIMEOUT};

const T: Duration = Duration::from_secs(30);

#[test]
fn child_role() {
    maru_faults::child::run_if_child();
}

fn connect(name: &str, url: &str) -> ChildProc {
    ChildProc::spawn_connected(name, url, 2 * MIB, 64 * KIB, 3000, T)
}

/// The daemons, a writer that stored `k 0 16` and a holder that holds those keys' views.
fn stored_and_held() -> (BinaryCluster, ChildProc, ChildProc) {
    let c = BinaryCluster::start(ClusterOpts::default());
    let mut writer = connect("writer", &c.unix_url());
    assert_eq!(num(&writer.ok("store k 0 16", T), "stored"), 16);
    let mut holder = connect("holder", &c.unix_url());
    assert_eq!(num(&holder.ok("hold k 0 16", T), "held"), 16);
    (c, writer, holder)
}

/// The resource manager's table as handles (whether owners are connected right now is not
/// state, it is presence).
fn handles(c: &BinaryCluster) -> Vec<Handle> {
    c.rm_list().into_iter().map(|a| a.handle).collect()
}

fn daemons_alive(c: &mut BinaryCluster) {
    assert!(
        c.rm.is_running(),
        "resource manager died: {}",
        c.rm.stderr_text()
    );
    assert!(
        c.server.is_running(),
        "server died: {}",
        c.server.stderr_text()
    );
    let _ = c.rm_stats();
    let _ = c.server_stats();
}

/// SIGTERM (a clean stop: final checkpoint) and start again on the same state.
fn clean_restart_rm(c: &mut BinaryCluster) {
    let st = c.rm.terminate();
    assert!(st.success(), "{st}: {}", c.rm.stderr_text());
    c.restart_rm();
}

#[test]
fn pool_file_removed_under_a_running_system() {
    let (mut c, mut writer, mut holder) = stored_and_held();
    let table = handles(&c);

    std::fs::remove_file(&c.pool).unwrap();

    // Processes that mapped the pool keep the (now nameless) memory: nothing changes for them.
    assert_eq!(num(&holder.ok("check_held", T), "intact"), 16);
    assert_eq!(num(&writer.ok("store k 16 8", T), "stored"), 8);
    assert_eq!(num(&holder.ok("verify k 0 24", T), "found"), 24);
    // A newcomer connects (that takes no region), but its first store gets no region from a
    // pool whose file is gone: the resource manager notices at the allocation and says so,
    // fast; nothing is allocated.
    let mut newcomer = ChildProc::spawn("newcomer");
    let t = Instant::now();
    newcomer.connect(&c.unix_url(), 2 * MIB, 64 * KIB, 3000, T);
    let a = newcomer.call("store n 0 1", T);
    println!(
        "first store after the pool file was removed: {a} ({:?})",
        t.elapsed()
    );
    assert!(
        a.starts_with("err kind=Remote(PoolUnhealthy)") && a.contains("was deleted"),
        "{a}"
    );
    assert_eq!(
        handles(&c),
        table,
        "a region was allocated from the deleted pool"
    );
    daemons_alive(&mut c);

    // The durable table survives a restart untouched; the pool file comes back, empty, as a
    // pool of a new identity (the data lived in the removed file), so a new reader of the old
    // keys, whose grants name the old pool, is refused rather than shown zeros.
    clean_restart_rm(&mut c);
    assert_eq!(handles(&c), table, "allocation table changed");
    let mut late = connect("late-reader", &c.unix_url());
    let got = late.call("verify k 0 16", T);
    println!("a new reader of the old keys after the restart: {got}");
    assert!(got.starts_with("err kind=WrongPool"), "{got}");
    for p in [&mut writer, &mut holder, &mut late] {
        p.ok("close", T);
    }
    daemons_alive(&mut c);
}

#[test]
fn pool_file_truncated_under_a_running_system() {
    let (mut c, mut writer, mut holder) = stored_and_held();

    std::fs::OpenOptions::new()
        .write(true)
        .open(&c.pool)
        .unwrap()
        .set_len(0)
        .unwrap();

    // A process touching memory that no longer has a file page behind it gets SIGBUS: the
    // kernel's answer, which no library can turn into an error without a signal handler.
    holder.send("check_held");
    let status = holder
        .wait_exit(T)
        .expect("holder neither answered nor died");
    println!("a reader touching its views after the truncation: {status}");
    assert_eq!(status.signal(), Some(libc::SIGBUS), "{status}");
    // A newcomer's first store is refused cleanly: the pool file is too short for the pool.
    let mut newcomer = connect("newcomer", &c.unix_url());
    let a = newcomer.call("store n 0 1", T);
    println!("first store after the truncation: {a}");
    assert!(
        a.starts_with("err kind=Remote(PoolUnhealthy)") && a.contains("truncated to 0 bytes"),
        "{a}"
    );
    daemons_alive(&mut c);
    // The dead reader's region went back (no key in it); the writer's stays.
    let ok = wait_until(Duration::from_secs(5), || handles(&c).len() == 1);
    assert!(ok, "{:?}", c.rm_list());
    let table = handles(&c);

    // Restarting the resource manager sizes the pool again; the table is untouched.
    clean_restart_rm(&mut c);
    assert_eq!(handles(&c), table, "allocation table changed");
    let mut late = connect("late", &c.unix_url());
    assert_eq!(num(&late.ok("store n 0 4", T), "stored"), 4);
    assert_eq!(num(&late.ok("verify n 0 4", T), "found"), 4);
    late.ok("close", T);
    writer.kill();
    daemons_alive(&mut c);
}

/// A resource manager inside a mount namespace, with a table model of what it acknowledged.
struct NsRm {
    ns: MountNs,
    spec: RmSpec,
    rm: Daemon,
    dir: tempfile::TempDir,
    /// region id → handle, for every acknowledged allocation not yet freed.
    model: BTreeMap<u64, Handle>,
}

impl NsRm {
    /// `None` (after printing why) when mount namespaces are not available here.
    fn start(prepare: impl FnOnce(&MountNs, &Path)) -> Option<NsRm> {
        let ns = match MountNs::new() {
            Ok(ns) => ns,
            Err(e) => {
                println!("SKIPPED: {e}");
                return None;
            }
        };
        let dir = temp_dir();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        prepare(&ns, &state);
        let spec = RmSpec {
            port: free_port(),
            state_dir: state,
            // Large (sparse, costs nothing): the log's disk must fill before the pool does.
            pools: vec![format!(
                "shm:{}:{}",
                dir.path().join("pool").display(),
                4096 * MIB
            )],
            ..RmSpec::new(dir.path(), Vec::new())
        };
        let rm = Daemon::spawn(ns.command(&spec.command()), dir.path(), "rm").expect("rm starts");
        Some(NsRm {
            ns,
            spec,
            rm,
            dir,
            model: BTreeMap::new(),
        })
    }

    fn url(&self) -> ServerUrl {
        ServerUrl::Tcp(format!("127.0.0.1:{}", self.spec.port))
    }

    fn client(&self) -> RmClient {
        RmClient::connect(&self.url(), Role::Server, TIMEOUT).expect("rm client")
    }

    fn table(&self) -> BTreeMap<u64, Handle> {
        let mut admin = RmClient::connect(&self.url(), Role::Admin, TIMEOUT).unwrap();
        admin
            .list()
            .unwrap()
            .into_iter()
            .map(|a| (a.handle.region_id, a.handle))
            .collect()
    }

    /// SIGKILL and start again on the same state directory.
    fn crash_and_restart(&mut self) -> Result<(), String> {
        self.rm.kill();
        let cmd = self.ns.command(&self.spec.command());
        self.rm = Daemon::spawn(cmd, self.dir.path(), "rm")?;
        Ok(())
    }
}

#[test]
fn wal_disk_full_refuses_changes_cleanly_and_loses_nothing() {
    let Some(mut r) = NsRm::start(|ns, state| {
        ns.mount_tmpfs(state, 256 * KIB).expect("tmpfs");
    }) else {
        return;
    };
    let mut c = r.client();
    for _ in 0..4 {
        let h = c.alloc(2 * MIB, None).unwrap();
        r.model.insert(h.region_id, h);
    }
    // A metadata server on top, to see what a client is told.
    let server = ServerSpec::new(format!("127.0.0.1:{}", r.spec.port))
        .spawn(r.dir.path(), "server")
        .expect("server starts");

    // Fill the file system the log lives on.
    let filler = r.ns.path(&r.spec.state_dir.join("filler"));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0xa5u8; 4096];
        while f.write_all(&block).is_ok() {}
    }
    // Appends may still fit in the log's last page; then every change is refused.
    let mut refusal = None;
    for _ in 0..200 {
        match c.alloc(2 * MIB, None) {
            Ok(h) => {
                r.model.insert(h.region_id, h);
            }
            Err(e) => {
                refusal = Some(e);
                break;
            }
        }
    }
    let e = refusal.expect("a full disk never refused an allocation");
    println!("allocation with the log's disk full: {e}");
    assert_eq!(e.code(), Some(ErrorCode::Storage), "{e}");
    assert!(e.to_string().contains("No space left"), "{e}");
    let victim = r.model.values().next().unwrap().clone();
    let e = c.free(&victim).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Storage), "{e}");
    assert_eq!(r.table(), r.model, "a refused change changed the table");
    let mut client = connect("client", &server.url().to_string());
    let a = client.call("store n 0 1", T);
    println!("a client storing its first key meanwhile: {a}");
    assert!(
        a.contains("Remote(Storage)") && a.contains("No space left"),
        "{a}"
    );
    assert!(r.rm.is_running(), "resource manager died");

    // Room again: changes go through; a crash then loses nothing acknowledged.
    std::fs::remove_file(&filler).unwrap();
    c.free(&victim).unwrap();
    r.model.remove(&victim.region_id);
    let h = c.alloc(2 * MIB, None).unwrap();
    r.model.insert(h.region_id, h);
    drop(c);
    r.crash_and_restart().unwrap();
    assert_eq!(r.table(), r.model, "table after the crash");
    client.connect(&server.url().to_string(), 2 * MIB, 64 * KIB, 3000, T);
    client.ok("close", T);
    println!(
        "disk full: {} acknowledged allocations survived the crash exactly",
        r.model.len()
    );
}

#[test]
fn state_dir_made_read_only_keeps_the_log_refuses_restart_and_loses_nothing() {
    let Some(mut r) = NsRm::start(|_, _| {}) else {
        return;
    };
    let mut c = r.client();
    for _ in 0..3 {
        let h = c.alloc(2 * MIB, None).unwrap();
        r.model.insert(h.region_id, h);
    }
    r.ns.make_read_only(&r.spec.state_dir)
        .expect("read-only bind mount");

    // The open log keeps taking records (a file opened for writing stays writable, as with a
    // remount); checkpoints, which create files, fail with a warning and the log keeps all.
    for _ in 0..520 {
        let h = c.alloc(2 * MIB, None).unwrap();
        c.free(&h).unwrap();
    }
    let h = c.alloc(2 * MIB, None).unwrap();
    r.model.insert(h.region_id, h);
    assert_eq!(r.table(), r.model);
    let ok = wait_until(Duration::from_secs(5), || {
        r.rm.stderr_text().contains("checkpoint failed")
    });
    assert!(ok, "no checkpoint warning: {}", r.rm.stderr_text());
    let warning =
        r.rm.stderr_text()
            .lines()
            .find(|l| l.contains("checkpoint failed"))
            .unwrap_or_default()
            .to_owned();
    println!("checkpoint on a read-only state dir: {warning}");

    // A crash, then a start on the read-only directory: refused, saying why.
    drop(c);
    let e = r
        .crash_and_restart()
        .expect_err("started on a read-only state dir");
    println!("restart on a read-only state dir: {}", e.trim());
    assert!(e.contains("Read-only file system"), "{e}");

    // Writable again: everything acknowledged is there.
    r.ns.unmount(&r.spec.state_dir).unwrap();
    r.crash_and_restart().unwrap();
    assert_eq!(r.table(), r.model, "table after the read-only episode");
}
