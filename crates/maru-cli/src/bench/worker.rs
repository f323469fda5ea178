//! Child processes of a benchmark (`maru bench --worker SPEC`, hidden): clients that must be
//! other processes — concurrent readers, and the instance whose 1 GiB region another process
//! maps lazily. They talk to the parent over stdin/stdout, one line at a time.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use super::daemons::{track_child, untrack_child};
use super::rows::handler;
use super::KIB;

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
    /// Connect with an owned region of `region` bytes, store `keys` (one page each), say
    /// `ready`, keep everything until stdin closes.
    Hold {
        url: String,
        region: u64,
        chunk: u64,
        keys: Vec<String>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LoopResult {
    pub ns: Vec<u64>,
}

/// Runs a worker in this process (the child side).
pub fn run(spec: &str) -> anyhow::Result<()> {
    let spec: Spec = serde_json::from_str(spec).context("bad worker spec")?;
    let stdin = std::io::stdin();
    let mut line = String::new();
    let mut out = std::io::stdout().lock();
    match spec {
        Spec::Loop { url, keys, iters } => {
            let h = handler(&url, 4 * KIB, 2 << 20, true)?;
            writeln!(out, "ready")?;
            out.flush()?;
            stdin.lock().read_line(&mut line)?;
            let mut ns = Vec::with_capacity(iters);
            for i in 0..iters {
                let key = keys[i % keys.len()].as_bytes();
                let t = Instant::now();
                if h.retrieve(key)?.is_none() {
                    bail!("worker: key {} not found", keys[i % keys.len()]);
                }
                ns.push(t.elapsed().as_nanos() as u64);
            }
            h.close();
            serde_json::to_writer(&mut out, &LoopResult { ns })?;
            writeln!(out)?;
            out.flush()?;
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
            // Hold until the parent closes our stdin (or dies).
            while stdin.lock().read_line(&mut line)? > 0 {
                line.clear();
            }
            // Deferred freeing keeps a region while keys point into it: delete them, or the
            // 1 GiB region would outlive this process.
            let ks: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
            h.batch_delete(&ks)?;
            h.close();
        }
    }
    Ok(())
}

/// The parent's side of one worker.
pub struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Worker {
    /// Starts `maru bench --worker SPEC` (this same executable).
    pub fn spawn(spec: &Spec) -> anyhow::Result<Worker> {
        let exe = std::env::current_exe().context("cannot find the maru executable")?;
        let mut child = Command::new(exe)
            .arg("bench")
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
        let l = self.line()?;
        if l != "ready" {
            bail!("worker said {l:?} instead of ready");
        }
        Ok(())
    }

    pub fn send(&mut self, line: &str) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().context("worker stdin closed")?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        Ok(())
    }

    /// Closes the worker's stdin and waits for it to exit.
    pub fn finish(mut self) -> anyhow::Result<()> {
        drop(self.stdin.take());
        let status = self.child.wait()?;
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
