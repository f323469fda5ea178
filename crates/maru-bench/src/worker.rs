//! Child processes of a run (`--worker SPEC`, hidden): clients that must be other processes —
//! concurrent readers, and the instance whose 1 GiB region another process maps lazily — and
//! the daemons of `--daemons process`. They are this executable again ([`Launcher`]) and talk
//! to the parent over stdin/stdout, one line at a time.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::daemons::{track_child, untrack_child, InProcess};
use crate::plan::KIB;
use crate::rows::handler;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Spec {
    /// Connect, say `ready`, wait for a line, retrieve `keys` round-robin `iters` times, print
    /// the latencies, exit.
    Loop {
        url: String,
        keys: Vec<String>,
        iters: usize,
    },
    /// Say `ready`, wait for a line, read `iters` blocks of 4 KiB of this process's own
    /// memory (a byte of every cache line, at pseudo-random places in 4 MiB), print the
    /// latencies as `Loop` does: what many processes sharing a CPU cost without Maru.
    Floor { iters: usize },
    /// Connect with an owned region of `region` bytes, store `keys` (one page each), say
    /// `ready`, keep everything until stdin closes.
    Hold {
        url: String,
        region: u64,
        chunk: u64,
        keys: Vec<String>,
    },
    /// Run a resource manager and a metadata server on a `pool_bytes` pool in `dir` (the
    /// parent's scratch directory, which the parent removes), print their [`Serving`]
    /// addresses, serve until stdin closes.
    Serve { dir: PathBuf, pool_bytes: u64 },
}

impl Spec {
    /// The calls a measuring worker makes.
    pub fn iters(&self) -> usize {
        match self {
            Spec::Loop { iters, .. } | Spec::Floor { iters } => *iters,
            Spec::Hold { .. } | Spec::Serve { .. } => 0,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LoopResult {
    pub ns: Vec<u64>,
    /// When the loop began and ended, in ns of the system's clock (the same for every
    /// process), so the parent spans its clients' own work, not their start-up.
    pub began: u64,
    pub ended: u64,
}

/// Now, in ns of the system's clock.
pub fn clock_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// What a [`Spec::Serve`] worker serves.
#[derive(Debug, Serialize, Deserialize)]
pub struct Serving {
    pub tcp: String,
    pub unix: String,
    pub pid: u32,
}

/// Runs a worker in this process (the child side).
pub fn run(spec: &str) -> anyhow::Result<()> {
    let spec: Spec = serde_json::from_str(spec).context("bad worker spec")?;
    let mut out = std::io::stdout().lock();
    match spec {
        Spec::Loop { url, keys, iters } => {
            let h = handler(&url, 4 * KIB, 2 << 20, true)?;
            // One pass before the loop maps the region and faults in the index's pages, so
            // the loop measures the steady state, as the threads' rows do.
            warm(&h, keys.iter().map(|k| k.as_bytes()))?;
            let mut failed = None;
            measured_loop(&mut out, iters, |i| {
                let key = &keys[i % keys.len()];
                match h.retrieve(key.as_bytes()) {
                    Ok(Some(_)) => {}
                    Ok(None) => drop(failed.get_or_insert(format!("key {key} not found"))),
                    Err(e) => drop(failed.get_or_insert(format!("retrieve of {key}: {e}"))),
                }
            })?;
            if let Some(why) = failed {
                bail!("worker: {why}");
            }
            // Closing waits for the parent (its stdin closing), so no client's goodbye runs
            // while others are still measuring on the same CPUs.
            let _ = std::io::stdin().lock().read_line(&mut String::new());
            h.close();
        }
        Spec::Floor { iters } => {
            const BLOCKS: usize = 1024;
            let memory: Vec<u8> = (0..BLOCKS * 4096).map(|i| i as u8).collect();
            let mut sum = 0u64;
            let mut at = 0usize;
            measured_loop(&mut out, iters, |_| {
                at = (at * 13 + 7) % BLOCKS;
                let block = &memory[at * 4096..(at + 1) * 4096];
                sum = block.iter().step_by(64).fold(sum, |s, &b| s + u64::from(b));
            })?;
            std::hint::black_box(sum);
            let _ = std::io::stdin().lock().read_line(&mut String::new());
        }
        Spec::Hold {
            url,
            region,
            chunk,
            keys,
        } => {
            let h = handler(&url, chunk, region, false)?;
            let data = vec![0x17u8; chunk as usize];
            for k in &keys {
                let page = h.alloc(chunk)?;
                page.write_at(0, &data)?;
                h.store_handle(k.as_bytes(), &page)?;
            }
            writeln!(out, "ready")?;
            out.flush()?;
            wait_for_parent()?;
            // Deferred freeing keeps a region while keys point into it: delete them, or the
            // 1 GiB region would outlive this process.
            let ks: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
            h.batch_delete(&ks)?;
            h.close();
        }
        Spec::Serve { dir, pool_bytes } => {
            let daemons = InProcess::start(&dir, pool_bytes)?;
            let serving = Serving {
                tcp: daemons.tcp_url.clone(),
                unix: daemons.unix_url.clone(),
                pid: std::process::id(),
            };
            serde_json::to_writer(&mut out, &serving)?;
            writeln!(out)?;
            out.flush()?;
            wait_for_parent()?;
            drop(daemons);
        }
    }
    Ok(())
}

/// Says `ready`, waits for a line, times `iters` calls of `call`, says `done`, and writes
/// the samples ([`LoopResult`]) when the parent asks with another line: after every client
/// has ended, so that writing them (and the parent's reading) takes no CPU from clients still
/// measuring.
fn measured_loop(
    out: &mut impl Write,
    iters: usize,
    mut call: impl FnMut(usize),
) -> anyhow::Result<()> {
    writeln!(out, "ready")?;
    out.flush()?;
    std::io::stdin().lock().read_line(&mut String::new())?;
    let mut ns = Vec::with_capacity(iters);
    let began = clock_ns();
    for i in 0..iters {
        let t = Instant::now();
        call(i);
        ns.push(t.elapsed().as_nanos() as u64);
    }
    let ended = clock_ns();
    writeln!(out, "done")?;
    out.flush()?;
    std::io::stdin().lock().read_line(&mut String::new())?;
    serde_json::to_writer(&mut *out, &LoopResult { ns, began, ended })?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

/// Retrieves each key once (and drops the views): what a client's loop measures afterwards is
/// its steady state, without mapping regions or first touches of the index.
pub fn warm<'k>(
    h: &maru_client::MaruHandler,
    keys: impl IntoIterator<Item = &'k [u8]>,
) -> anyhow::Result<()> {
    for key in keys {
        if h.retrieve(key)?.is_none() {
            bail!("warm-up: key {} not found", String::from_utf8_lossy(key));
        }
    }
    Ok(())
}

/// Returns when the parent closes this worker's stdin (or dies).
fn wait_for_parent() -> std::io::Result<()> {
    let stdin = std::io::stdin();
    let mut line = String::new();
    while stdin.lock().read_line(&mut line)? > 0 {
        line.clear();
    }
    Ok(())
}

/// How worker processes are started: this executable, with the arguments that select the
/// benchmark on its command line (`bench` under `maru`, none under `maru-bench`).
#[derive(Debug, Clone)]
pub struct Launcher {
    exe: PathBuf,
    subcommand: Vec<String>,
}

impl Launcher {
    pub fn this_executable(subcommand: &[&str]) -> anyhow::Result<Launcher> {
        Ok(Launcher {
            exe: std::env::current_exe().context("cannot find this executable")?,
            subcommand: subcommand.iter().map(|s| s.to_string()).collect(),
        })
    }
}

/// How long a worker may take to exit once its stdin is closed.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// The parent's side of one worker.
pub struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Worker {
    /// Starts a worker running `spec`; it inherits the calling thread's CPU placement.
    pub fn spawn(launcher: &Launcher, spec: &Spec) -> anyhow::Result<Worker> {
        let mut child = Command::new(&launcher.exe)
            .args(&launcher.subcommand)
            .arg("--worker")
            .arg(serde_json::to_string(spec)?)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start a worker process")?;
        track_child(child.id());
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().context("worker stdout")?);
        Ok(Worker {
            child,
            stdin,
            stdout,
        })
    }

    /// The next line the worker prints (without the newline).
    pub fn line(&mut self) -> anyhow::Result<String> {
        let mut s = String::new();
        if self.stdout.read_line(&mut s)? == 0 {
            bail!("worker exited early");
        }
        Ok(s.trim_end().to_owned())
    }

    pub fn expect_ready(&mut self) -> anyhow::Result<()> {
        self.expect("ready")
    }

    /// Reads a line that must be `word`.
    pub fn expect(&mut self, word: &str) -> anyhow::Result<()> {
        let l = self.line()?;
        if l != word {
            bail!("worker said {l:?} instead of {word}");
        }
        Ok(())
    }

    pub fn send(&mut self, line: &str) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().context("worker stdin closed")?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        Ok(())
    }

    /// Closes the worker's stdin and waits for it to exit; a worker still running after
    /// [`EXIT_TIMEOUT`] is killed.
    pub fn finish(mut self) -> anyhow::Result<()> {
        drop(self.stdin.take());
        let deadline = Instant::now() + EXIT_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                untrack_child(self.child.id());
                bail!("worker did not exit within {EXIT_TIMEOUT:?} of its stdin closing");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        untrack_child(self.child.id());
        if !status.success() {
            bail!("worker failed: {status}");
        }
        Ok(())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.stdin.is_some() {
            drop(self.stdin.take());
            let _ = self.child.kill();
            let _ = self.child.wait();
            untrack_child(self.child.id());
        }
    }
}
