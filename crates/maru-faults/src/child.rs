//! Client processes: the test binary re-executed in a "child role", driving a real
//! `MaruHandler` by commands read from stdin, one per line, answering each with a line
//! `@@ ok ...` or `@@ err ...` on stdout (long commands also send progress lines `@@ ...`).
//! The parent ([`ChildProc`]) therefore knows exactly what was acknowledged when it kills
//! the child.
//!
//! Every test file that spawns children has
//!
//! ```ignore
//! #[test]
//! fn child_role() {
//!     maru_faults::child::run_if_child();
//! }
//! ```
//!
//! which does nothing in a normal run and becomes the child's main loop when the
//! [`CHILD_ENV`] variable is set.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use maru_client::{AllocHandle, ErrorKind, MaruConfig, MaruHandler, View};

use crate::key_refs;
use crate::load::{self, LoadCfg, Worker};
use crate::payload::{batch_items, check, len_for, payload, values_for, Check};

/// Set (to anything) in a child's environment.
pub const CHILD_ENV: &str = "MARU_FAULTS_CHILD";
/// Marks the child's protocol lines among libtest's own output.
const MARK: &str = "@@ ";

/// The parent's side of a child process.
pub struct ChildProc {
    pub name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl ChildProc {
    /// Starts this test binary as a child running the `child_role` test.
    pub fn spawn(name: &str) -> ChildProc {
        Self::spawn_with(name, maru_testkit::rerun_test("child_role"))
    }

    /// Starts it through a launcher: `launcher` (e.g. `ip netns exec NS`, which execs what
    /// follows) with the `child_role` test binary and its arguments appended.
    pub fn spawn_via(name: &str, mut launcher: std::process::Command) -> ChildProc {
        let test = maru_testkit::rerun_test("child_role");
        launcher.arg(test.get_program()).args(test.get_args());
        Self::spawn_with(name, launcher)
    }

    /// Starts a child (as [`ChildProc::spawn`]) whose handler is connected to `url`.
    pub fn spawn_connected(
        name: &str,
        url: &str,
        pool_size: u64,
        chunk: u64,
        timeout_ms: u64,
        timeout: Duration,
    ) -> ChildProc {
        let mut p = Self::spawn(name);
        p.connect(url, pool_size, chunk, timeout_ms, timeout);
        p
    }

    /// Connects the child's handler to `url` with that pool size, chunk size and
    /// `timeout_ms`; panics when the child answers with an error.
    pub fn connect(
        &mut self,
        url: &str,
        pool_size: u64,
        chunk: u64,
        timeout_ms: u64,
        timeout: Duration,
    ) {
        self.ok(
            &format!("connect {url} {pool_size} {chunk} {timeout_ms}"),
            timeout,
        );
    }

    fn spawn_with(name: &str, mut cmd: std::process::Command) -> ChildProc {
        maru_testkit::process::die_with_parent(&mut cmd);
        let mut child = cmd
            .env(CHILD_ENV, name)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child process");
        let stdout = child.stdout.take().expect("child stdout");
        let stdin = child.stdin.take();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // libtest may print "test child_role ... " before our first line.
                if let Some(at) = line.find(MARK) {
                    if tx.send(line[at + MARK.len()..].to_owned()).is_err() {
                        break;
                    }
                }
            }
        });
        ChildProc {
            name: name.to_owned(),
            child,
            stdin,
            lines,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn send(&mut self, cmd: &str) {
        let stdin = self.stdin.as_mut().expect("child stdin open");
        writeln!(stdin, "{cmd}")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("{}: cannot send {cmd:?}: {e}", self.name));
    }

    /// The next protocol line, or `None` after `timeout` or when the child's output ended.
    pub fn line(&mut self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Sends `cmd` and returns its final answer (`ok ...` or `err ...`), skipping progress
    /// lines. Panics when no answer comes within `timeout` (a hang is a failure).
    pub fn call(&mut self, cmd: &str, timeout: Duration) -> String {
        self.send(cmd);
        self.answer(cmd, timeout)
    }

    /// The final answer to a command sent earlier with [`ChildProc::send`].
    pub fn answer(&mut self, cmd: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.line(left) {
                Some(l) if l.starts_with("ok") || l.starts_with("err") => return l,
                Some(_) => continue,
                None => panic!(
                    "{}: no answer to {cmd:?} within {timeout:?} (child {})",
                    self.name,
                    match self.child.try_wait() {
                        Ok(Some(s)) => format!("exited: {s}"),
                        _ => "still running".into(),
                    }
                ),
            }
        }
    }

    /// Like [`ChildProc::call`] but the answer must be `ok`; returns what follows it.
    pub fn ok(&mut self, cmd: &str, timeout: Duration) -> String {
        let a = self.call(cmd, timeout);
        match a.strip_prefix("ok") {
            Some(rest) => rest.trim().to_owned(),
            None => panic!("{}: {cmd:?} answered {a:?}", self.name),
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits (bounded) for the child to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut st = None;
        crate::wait_until(timeout, || {
            st = self.child.try_wait().ok().flatten();
            st.is_some()
        });
        st
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if self.wait_exit(Duration::from_millis(200)).is_none() {
            self.kill();
        }
    }
}

/// `key=value` fields of an answer.
pub fn field<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
    answer
        .split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
}

/// A numeric field of an answer (panics when absent: the protocol is ours).
pub fn num(answer: &str, name: &str) -> u64 {
    field(answer, name)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric field {name} in {answer:?}"))
}

/// The comma-separated `ids` field of an answer (region ids), empty when absent.
pub fn ids(answer: &str) -> BTreeSet<u64> {
    field(answer, "ids")
        .unwrap_or("")
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect()
}

/// How many values a check found intact, zeroed and corrupt.
#[derive(Default)]
struct Tally {
    intact: u64,
    zeros: u64,
    corrupt: u64,
}

impl Tally {
    fn add(&mut self, c: Check) {
        match c {
            Check::Intact => self.intact += 1,
            Check::Zeros => self.zeros += 1,
            Check::Corrupt => self.corrupt += 1,
        }
    }
}

/// A call's failure as the answer line reports it: its kind and message.
type Failure = (ErrorKind, String);

/// Stores `key`'s self-checking value (its length chosen by [`len_for`]).
fn store_value(h: &MaruHandler, key: &[u8], chunk: usize) -> Result<(), Failure> {
    h.store_bytes(key, b"", &payload(key, len_for(key, chunk)))
        .map(drop)
        .map_err(|e| (e.kind(), e.to_string()))
}

fn retrieve(h: &MaruHandler, key: &[u8]) -> Result<Option<View>, Failure> {
    h.retrieve(key).map_err(|e| (e.kind(), e.to_string()))
}

fn key(prefix: &str, i: u64) -> Vec<u8> {
    format!("{prefix}-{i}").into_bytes()
}

/// Where views lie, as `region:offset` joined by commas (see [`pages_of`]).
fn pages<'v>(views: impl Iterator<Item = &'v View>) -> String {
    let at: Vec<String> = views
        .map(|v| format!("{}:{}", v.region_id(), v.offset()))
        .collect();
    at.join(",")
}

/// The pages an answer's `pages` field names, as (region id, offset).
pub fn pages_of(answer: &str) -> BTreeSet<(u64, u64)> {
    field(answer, "pages")
        .unwrap_or_default()
        .split(',')
        .filter(|p| !p.is_empty())
        .filter_map(|p| {
            let (r, o) = p.split_once(':')?;
            Some((r.parse().ok()?, o.parse().ok()?))
        })
        .collect()
}

/// The `n` keys of `prefix` from `from` on.
fn keys_in(prefix: &str, from: u64, n: u64) -> Vec<Vec<u8>> {
    (from..from + n).map(|i| key(prefix, i)).collect()
}

/// The child's state between commands.
#[derive(Default)]
struct ChildState {
    h: Option<MaruHandler>,
    chunk: usize,
    /// Pages allocated and written but not stored (kept so nothing frees them), with the key
    /// whose value they hold.
    pending: Vec<(Vec<u8>, AllocHandle)>,
    held: Vec<(Vec<u8>, View)>,
    workers: Vec<Worker>,
}

fn kind_name(k: ErrorKind) -> String {
    match k {
        ErrorKind::Remote(c) => format!("Remote({c:?})"),
        other => format!("{other:?}"),
    }
}

fn err_line(kind: ErrorKind, msg: impl std::fmt::Display, extra: &str) -> String {
    format!(
        "err kind={} {extra} msg={}",
        kind_name(kind),
        msg.to_string().replace('\n', " ")
    )
}

/// `op`, a batch call of `h` (named `what` in an error line), over `keys`.
fn batch<T>(
    h: &MaruHandler,
    keys: &[Vec<u8>],
    what: &str,
    op: impl FnOnce(&MaruHandler, &[&[u8]]) -> maru_client::Result<T>,
) -> Result<T, String> {
    op(h, &key_refs(keys)).map_err(|e| err_line(e.kind(), &e, what))
}

fn not_connected() -> String {
    "err not connected".to_owned()
}

fn out(line: &str) {
    let mut so = std::io::stdout().lock();
    let _ = writeln!(so, "{MARK}{line}");
    let _ = so.flush();
}

impl ChildState {
    fn exec(&mut self, line: &str) -> Result<String, String> {
        let w: Vec<&str> = line.split_whitespace().collect();
        let n = |i: usize| -> Result<u64, String> {
            w.get(i)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("err bad argument {i} in {line:?}"))
        };
        let s = |i: usize| -> Result<&str, String> {
            w.get(i)
                .copied()
                .ok_or_else(|| format!("err missing argument {i} in {line:?}"))
        };
        match w.first().copied().unwrap_or("") {
            // connect URL POOL_SIZE CHUNK TIMEOUT_MS
            "connect" => {
                self.chunk = n(3)? as usize;
                let h = MaruHandler::new(MaruConfig {
                    server_url: s(1)?.to_owned(),
                    pool_size: n(2)?,
                    chunk_size_bytes: n(3)?,
                    timeout_ms: n(4)?,
                    ..MaruConfig::default()
                })
                .map_err(|e| format!("err config: {e}"))?;
                h.connect()
                    .map_err(|e| err_line(e.kind(), &e, "op=connect"))?;
                self.h = Some(h);
                Ok("ok".into())
            }
            // store PREFIX FROM N: store_bytes of self-checking values
            "store" => {
                let h = self.h.as_ref().ok_or_else(not_connected)?;
                let (mut stored, mut dedup) = (0, 0);
                for i in n(2)?..n(2)? + n(3)? {
                    let k = key(s(1)?, i);
                    match h.store_bytes(&k, b"", &payload(&k, len_for(&k, self.chunk))) {
                        // (`Sent` only comes with write-behind, which this child never enables.)
                        Ok(maru_client::StoreOutcome::Stored | maru_client::StoreOutcome::Sent) => {
                            stored += 1
                        }
                        Ok(maru_client::StoreOutcome::Deduplicated) => dedup += 1,
                        Err(e) => return Err(err_line(e.kind(), &e, &format!("at={i}"))),
                    }
                }
                Ok(format!("ok stored={stored} dedup={dedup}"))
            }
            // alloc_write KEY: a page written with KEY's value, never stored
            "alloc_write" => {
                let h = self.h.as_ref().ok_or_else(not_connected)?;
                let k = s(1)?.as_bytes().to_vec();
                let v = payload(&k, len_for(&k, self.chunk));
                let a = h
                    .alloc(v.len() as u64)
                    .map_err(|e| err_line(e.kind(), &e, "op=alloc"))?;
                a.write_at(0, &v).map_err(|e| format!("err write: {e}"))?;
                let line = format!("ok region={} page={}", a.region_id(), a.page_index());
                self.pending.push((k, a));
                Ok(line)
            }
            // write_pending BYTE: overwrite every pending page with BYTE (a writer that does
            // not know its session is gone)
            "write_pending" => {
                let b = n(1)? as u8;
                for (_, a) in &self.pending {
                    let fill = vec![b; a.size() as usize];
                    a.write_at(0, &fill)
                        .map_err(|e| format!("err write: {e}"))?;
                }
                Ok(format!("ok pages={}", self.pending.len()))
            }
            // store_pending: stores every pending page under the key it was written for; how
            // many were stored, and whether each still held its own bytes just before
            "store_pending" => {
                let h = self.h.as_ref().ok_or_else(not_connected)?;
                let (mut stored, mut t) = (0, Tally::default());
                for (k, a) in std::mem::take(&mut self.pending) {
                    t.add(check(&k, &a.view().to_vec()));
                    h.store_handle(&k, &a)
                        .map_err(|e| err_line(e.kind(), &e, "op=store_handle"))?;
                    stored += 1;
                }
                Ok(format!(
                    "ok stored={stored} intact={} zeros={} corrupt={}",
                    t.intact, t.zeros, t.corrupt
                ))
            }
            // batch_loop PREFIX BATCH: batch_store of BATCH keys, again and again, until an
            // error; "batch I" before each call, "done I" after
            "batch_loop" => {
                let h = self.h.as_ref().ok_or_else(not_connected)?;
                let (prefix, batch) = (s(1)?, n(2)?);
                for b in 0.. {
                    out(&format!("batch {b}"));
                    let keys: Vec<Vec<u8>> = (b * batch..(b + 1) * batch)
                        .map(|i| key(prefix, i))
                        .collect();
                    let values = values_for(&keys, self.chunk);
                    if let Err(e) = h.batch_store(&batch_items(&keys, &values)) {
                        return Err(err_line(e.kind(), &e, &format!("batch={b}")));
                    }
                    out(&format!("done {b}"));
                }
                Ok("ok".into())
            }
            // hold PREFIX FROM N: retrieve and keep the views
            "hold" => {
                let h = self.h.as_ref().ok_or_else(not_connected)?;
                let (mut held, mut missing, mut bad) = (0, 0, 0);
                for i in n(2)?..n(2)? + n(3)? {
                    let k = key(s(1)?, i);
                    match h.retrieve(&k) {
                        Ok(Some(v)) => {
                            if check(&k, &v.to_vec()) != Check::Intact {
                                bad += 1;
                            }
                            held += 1;
                            self.held.push((k, v));
                        }
                        Ok(None) => missing += 1,
                        Err(e) => return Err(err_line(e.kind(), &e, &format!("at={i}"))),
                    }
                }
                let at = self.held.iter().map(|(_, v)| v);
                Ok(format!(
                    "ok held={held} missing={missing} corrupt={bad} pages={}",
                    pages(at)
                ))
            }
            // release: drops the held views (their holds' releases go with the next request,
            // or from the watcher within 50 ms)
            "release" => {
                let n = self.held.len();
                self.held.clear();
                Ok(format!("ok released={n}"))
            }
            // touch: one round trip (renew_pins), which resumes a session whose server
            // restarted; how many held views still hold their page
            "touch" => {
                let h = self.h.as_ref().ok_or_else(not_connected)?;
                h.renew_pins()
                    .map_err(|e| err_line(e.kind(), &e, "op=renew_pins"))?;
                let live = self.held.iter().filter(|(_, v)| v.holds_page()).count();
                Ok(format!("ok live={live}"))
            }
            // where PREFIX FROM N: the pages the keys found lie at (views dropped at once)
            "where" => {
                let h = self.h.as_ref().ok_or_else(not_connected)?;
                let keys = keys_in(s(1)?, n(2)?, n(3)?);
                let views = batch(h, &keys, "op=batch_retrieve", MaruHandler::batch_retrieve)?;
                let found: Vec<View> = views.into_iter().flatten().collect();
                let line = format!("ok found={} pages={}", found.len(), pages(found.iter()));
                drop(found);
                // Carries the releases of those views, so they hold nothing afterwards.
                h.renew_pins()
                    .map_err(|e| err_line(e.kind(), &e, "op=renew_pins"))?;
                Ok(line)
            }
            // check_held: what the held views show now
            "check_held" => {
                let mut t = Tally::default();
                for (k, v) in &self.held {
                    t.add(check(k, &v.to_vec()));
                }
                Ok(format!(
                    "ok intact={} zeros={} corrupt={}",
                    t.intact, t.zeros, t.corrupt
                ))
            }
            // verify PREFIX FROM N: batch_retrieve and check every value
            "verify" => {
                let h = self.h.as_ref().ok_or_else(not_connected)?;
                let keys = keys_in(s(1)?, n(2)?, n(3)?);
                let views = batch(h, &keys, "op=batch_retrieve", MaruHandler::batch_retrieve)?;
                let (mut found, mut missing, mut t) = (0, 0, Tally::default());
                for (k, v) in keys.iter().zip(views) {
                    let Some(v) = v else {
                        missing += 1;
                        continue;
                    };
                    found += 1;
                    t.add(match check(k, &v.to_vec()) {
                        // The right bytes at the wrong length are not the value stored.
                        Check::Intact if v.len() != len_for(k, self.chunk) => Check::Corrupt,
                        c => c,
                    });
                }
                Ok(format!(
                    "ok found={found} missing={missing} zeros={} corrupt={}",
                    t.zeros, t.corrupt
                ))
            }
            // pin PREFIX FROM N (batch_pin): how many were found and pinned
            "pin" => {
                let h = self.h.as_ref().ok_or_else(not_connected)?;
                let keys = keys_in(s(1)?, n(2)?, n(3)?);
                let found = batch(h, &keys, "op=batch_pin", MaruHandler::batch_pin)?;
                Ok(format!(
                    "ok pinned={}",
                    found.iter().filter(|f| **f).count()
                ))
            }
            // unpin PREFIX FROM N (batch_unpin): how many this handler had pinned
            "unpin" => {
                let h = self.h.as_ref().ok_or_else(not_connected)?;
                let keys = keys_in(s(1)?, n(2)?, n(3)?);
                let had = batch(h, &keys, "op=batch_unpin", MaruHandler::batch_unpin)?;
                Ok(format!(
                    "ok unpinned={}",
                    had.iter().filter(|f| **f).count()
                ))
            }
            // delete PREFIX FROM N (batch_delete)
            "delete" => {
                let h = self.h.as_ref().ok_or_else(not_connected)?;
                let keys = keys_in(s(1)?, n(2)?, n(3)?);
                let st = batch(h, &keys, "op=batch_delete", MaruHandler::batch_delete)?;
                let count = |want| st.iter().filter(|s| **s == want).count();
                Ok(format!(
                    "ok deleted={} notfound={} pinned={}",
                    count(maru_client::DeleteStatus::Deleted),
                    count(maru_client::DeleteStatus::NotFound),
                    count(maru_client::DeleteStatus::Pinned)
                ))
            }
            // regions: ids of the regions this handler owns
            "regions" => {
                let ids: Vec<String> = self
                    .h
                    .as_ref()
                    .ok_or_else(not_connected)?
                    .owned_regions()
                    .iter()
                    .map(|r| r.region_id.to_string())
                    .collect();
                Ok(format!("ok ids={}", ids.join(",")))
            }
            // once PREFIX I: one store and one retrieve, timed
            "once" => {
                let h = self.h.as_ref().ok_or_else(not_connected)?;
                let k = key(s(1)?, n(2)?);
                let t = Instant::now();
                let r = store_value(h, &k, self.chunk).and_then(|()| retrieve(h, &k));
                let ms = t.elapsed().as_millis();
                match r {
                    Ok(Some(v)) if check(&k, &v.to_vec()) == Check::Intact => {
                        Ok(format!("ok elapsed_ms={ms}"))
                    }
                    Ok(other) => Ok(format!("err kind=Check elapsed_ms={ms} msg={other:?}")),
                    Err((kind, e)) => Err(err_line(kind, e, &format!("elapsed_ms={ms}"))),
                }
            }
            // until_error PREFIX SECS: store + retrieve in a loop; the first error, with how
            // long the failing call took
            "until_error" => {
                let h = self.h.as_ref().ok_or_else(not_connected)?;
                let deadline = Instant::now() + Duration::from_secs(n(2)?);
                let mut i = 0u64;
                out("looping");
                while Instant::now() < deadline {
                    let k = key(s(1)?, i);
                    i += 1;
                    let t = Instant::now();
                    let r = store_value(h, &k, self.chunk).and_then(|()| retrieve(h, &k).map(drop));
                    if let Err((kind, e)) = r {
                        let ms = t.elapsed().as_millis();
                        return Err(err_line(kind, e, &format!("elapsed_ms={ms} ops={i}")));
                    }
                }
                Ok(format!("ok noerror ops={i}"))
            }
            // steady PREFIX SECS: store, read back and delete one key at a time (pages are
            // reused, so no new region is ever needed); the first error ends it
            "steady" => {
                let h = self.h.as_ref().ok_or_else(not_connected)?;
                let deadline = Instant::now()
                    + Duration::from_secs_f64(s(2)?.parse().map_err(|_| "err bad seconds")?);
                let mut i = 0u64;
                let mut worst = Duration::ZERO;
                while Instant::now() < deadline {
                    let k = key(s(1)?, i);
                    i += 1;
                    let t = Instant::now();
                    let r = store_value(h, &k, self.chunk)
                        .and_then(|()| retrieve(h, &k))
                        .and_then(|v| match v.map(|v| check(&k, &v.to_vec())) {
                            Some(Check::Intact) => Ok(()),
                            other => Err((ErrorKind::Protocol, format!("read back {other:?}"))),
                        })
                        .and_then(|()| {
                            h.delete(&k)
                                .map(drop)
                                .map_err(|e| (e.kind(), e.to_string()))
                        });
                    worst = worst.max(t.elapsed());
                    if let Err((kind, e)) = r {
                        return Err(err_line(kind, e, &format!("ops={i}")));
                    }
                }
                Ok(format!("ok ops={i} worst_us={}", worst.as_micros()))
            }
            "close" => {
                self.held.clear();
                self.pending.clear();
                if let Some(h) = self.h.take() {
                    h.close();
                }
                Ok("ok".into())
            }
            // load_start FIRST_ID THREADS CFG...
            "load_start" => {
                let cfg = LoadCfg::decode(&w[3..]).ok_or("err bad load config")?;
                let first = n(1)? as usize;
                self.workers = load::start_workers(&cfg, first..first + n(2)? as usize)
                    .map_err(|e| format!("err {e}"))?;
                Ok("ok".into())
            }
            // load_run SECS
            "load_run" => {
                let secs: f64 = s(1)?.parse().map_err(|_| "err bad seconds")?;
                let r = load::run_workers(&mut self.workers, secs);
                Ok(format!("ok {}", r.encode()))
            }
            "load_finish" => {
                let errors = load::finish_workers(std::mem::take(&mut self.workers));
                match errors.first() {
                    None => Ok("ok".into()),
                    Some(e) => Err(format!("err n={} msg={e}", errors.len())),
                }
            }
            "exit" => std::process::exit(0),
            other => Err(format!("err unknown command {other:?}")),
        }
    }
}

/// The child's main loop when [`CHILD_ENV`] is set; returns at once otherwise.
pub fn run_if_child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let mut st = ChildState::default();
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let answer = st.exec(&line).unwrap_or_else(|e| e);
        out(&answer);
    }
    // The parent closed our stdin: leave without running the remaining tests' teardown.
    std::process::exit(0);
}
