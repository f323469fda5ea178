//! The mixed workload of the load test, run by threads of the test process and by child
//! processes alike: each worker is one `MaruHandler` (one instance).
//!
//! Every worker stores `stable` keys at the start that stay until the very end; all workers
//! read each other's stable keys (so every cross-instance read must find its key, intact).
//! Besides, each worker churns keys of its own: stores (single and batched), reads them back,
//! deletes them (single and batched). Only a worker's own churn keys are ever deleted while
//! the load runs, so a failed check is a real fault, never a race the test made up.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use maru_client::{MaruConfig, MaruHandler};

use crate::key_refs;
use crate::lat::LatHist;
use crate::payload::{batch_items, check, len_for, payload, values_for, Check};

/// What every worker of one load run shares.
#[derive(Debug, Clone)]
pub struct LoadCfg {
    pub url: String,
    /// Workers in the whole run (threads and processes), ids `0..clients`.
    pub clients: usize,
    pub stable: usize,
    pub chunk: u64,
    pub pool_size: u64,
    pub timeout_ms: u64,
}

impl LoadCfg {
    /// `url clients stable chunk pool_size timeout_ms`, as a child command carries it.
    pub fn encode(&self) -> String {
        format!(
            "{} {} {} {} {} {}",
            self.url, self.clients, self.stable, self.chunk, self.pool_size, self.timeout_ms
        )
    }

    pub fn decode(words: &[&str]) -> Option<LoadCfg> {
        let [url, clients, stable, chunk, pool, timeout] = words else {
            return None;
        };
        Some(LoadCfg {
            url: (*url).to_owned(),
            clients: clients.parse().ok()?,
            stable: stable.parse().ok()?,
            chunk: chunk.parse().ok()?,
            pool_size: pool.parse().ok()?,
            timeout_ms: timeout.parse().ok()?,
        })
    }
}

/// Operations, errors and latencies of one or more workers.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub ops: u64,
    pub errors: Vec<String>,
    pub hists: BTreeMap<String, LatHist>,
}

impl Report {
    pub fn merge(&mut self, other: &Report) {
        self.ops += other.ops;
        self.errors.extend(other.errors.iter().cloned());
        for (op, h) in &other.hists {
            self.hists.entry(op.clone()).or_default().merge(h);
        }
    }

    /// All operations together.
    pub fn overall(&self) -> LatHist {
        let mut all = LatHist::default();
        for h in self.hists.values() {
            all.merge(h);
        }
        all
    }

    /// One line: `ops=N nerr=E h.OP=HIST ... err=FIRST` (the first error last, it has spaces).
    pub fn encode(&self) -> String {
        let mut s = format!("ops={} nerr={}", self.ops, self.errors.len());
        for (op, h) in &self.hists {
            s.push_str(&format!(" h.{op}={}", h.encode()));
        }
        if let Some(e) = self.errors.first() {
            s.push_str(&format!(" err={}", e.replace('\n', " ")));
        }
        s
    }

    pub fn decode(line: &str) -> Option<Report> {
        let mut r = Report::default();
        let (head, first_err) = match line.split_once(" err=") {
            Some((h, e)) => (h, Some(e.to_owned())),
            None => (line, None),
        };
        let mut nerr = 0;
        for w in head.split_whitespace() {
            if let Some(v) = w.strip_prefix("ops=") {
                r.ops = v.parse().ok()?;
            } else if let Some(v) = w.strip_prefix("nerr=") {
                nerr = v.parse().ok()?;
            } else if let Some(v) = w.strip_prefix("h.") {
                let (op, h) = v.split_once('=')?;
                r.hists.insert(op.to_owned(), LatHist::decode(h)?);
            }
        }
        if nerr > 0 {
            let e = first_err.unwrap_or_else(|| "unknown".into());
            r.errors = vec![e; nerr];
        }
        Some(r)
    }
}

fn stable_key(worker: usize, j: usize) -> Vec<u8> {
    format!("s-{worker}-{j}").into_bytes()
}

pub struct Worker {
    id: usize,
    cfg: LoadCfg,
    h: MaruHandler,
    rng: u64,
    live: VecDeque<Vec<u8>>,
    next: u64,
}

/// Most churn keys a worker keeps at once (bounded so it never runs out of pages).
const MAX_LIVE: usize = 48;
const BATCH: usize = 8;

impl Worker {
    /// Connects and stores this worker's stable keys.
    pub fn start(cfg: &LoadCfg, id: usize) -> Result<Worker, String> {
        let h = MaruHandler::new(MaruConfig {
            server_url: cfg.url.clone(),
            pool_size: cfg.pool_size,
            chunk_size_bytes: cfg.chunk,
            timeout_ms: cfg.timeout_ms,
            // Mapping 64 instances' regions at connect is wasted work for a worker that
            // reads a handful of them; lazy mapping is the path under test here.
            eager_map: false,
            ..MaruConfig::default()
        })
        .map_err(|e| format!("worker {id}: config: {e}"))?;
        h.connect()
            .map_err(|e| format!("worker {id}: connect: {e}"))?;
        let chunk = cfg.chunk as usize;
        for j in 0..cfg.stable {
            let k = stable_key(id, j);
            h.store_bytes(&k, b"", &payload(&k, len_for(&k, chunk)))
                .map_err(|e| format!("worker {id}: stable store: {e}"))?;
        }
        Ok(Worker {
            id,
            cfg: cfg.clone(),
            h,
            rng: (id as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            live: VecDeque::new(),
            next: 0,
        })
    }

    fn rand(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn random_stable(&mut self) -> Vec<u8> {
        let w = (self.rand() % self.cfg.clients as u64) as usize;
        let j = (self.rand() % self.cfg.stable as u64) as usize;
        stable_key(w, j)
    }

    /// `BATCH` stable keys drawn at random (a key may come twice).
    fn random_stable_batch(&mut self) -> Vec<Vec<u8>> {
        (0..BATCH).map(|_| self.random_stable()).collect()
    }

    fn fresh_key(&mut self) -> Vec<u8> {
        self.next += 1;
        format!("c-{}-{}", self.id, self.next).into_bytes()
    }

    fn verify(&self, key: &[u8], got: Option<maru_client::View>) -> Result<(), String> {
        let Some(v) = got else {
            return Err(format!("key {} missing", String::from_utf8_lossy(key)));
        };
        let want = len_for(key, self.cfg.chunk as usize);
        if v.len() != want {
            return Err(format!(
                "key {}: {} bytes, expected {want}",
                String::from_utf8_lossy(key),
                v.len()
            ));
        }
        match check(key, &v.to_vec()) {
            Check::Intact => Ok(()),
            other => Err(format!("key {}: {other:?}", String::from_utf8_lossy(key))),
        }
    }

    /// One random operation; its name and whether it worked.
    fn step(&mut self) -> (&'static str, Result<(), String>) {
        let chunk = self.cfg.chunk as usize;
        let mut roll = self.rand() % 100;
        if self.live.len() >= MAX_LIVE && roll < 30 {
            roll = 90; // too many live churn keys: delete instead of storing
        }
        match roll {
            0..20 => {
                let k = self.fresh_key();
                let r = self
                    .h
                    .store_bytes(&k, b"", &payload(&k, len_for(&k, chunk)));
                self.live.push_back(k);
                ("store", r.map(drop).map_err(|e| e.to_string()))
            }
            20..30 => {
                let keys: Vec<Vec<u8>> = (0..BATCH).map(|_| self.fresh_key()).collect();
                let values = values_for(&keys, chunk);
                let r = self.h.batch_store(&batch_items(&keys, &values));
                self.live.extend(keys);
                ("batch_store", r.map(drop).map_err(|e| e.to_string()))
            }
            30..50 => {
                let k = self.random_stable();
                let r = match self.h.retrieve(&k) {
                    Ok(v) => self.verify(&k, v),
                    Err(e) => Err(e.to_string()),
                };
                ("retrieve", r)
            }
            50..60 => {
                let keys = self.random_stable_batch();
                let r = match self.h.batch_retrieve(&key_refs(&keys)) {
                    Ok(views) => keys
                        .iter()
                        .zip(views)
                        .try_for_each(|(k, v)| self.verify(k, v)),
                    Err(e) => Err(e.to_string()),
                };
                ("batch_retrieve", r)
            }
            60..70 => {
                let k = self.random_stable();
                let r = match self.h.exists(&k) {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(format!("stable key {} gone", String::from_utf8_lossy(&k))),
                    Err(e) => Err(e.to_string()),
                };
                ("exists", r)
            }
            70..75 => {
                let keys = self.random_stable_batch();
                let r = match self.h.batch_exists(&key_refs(&keys)) {
                    Ok(v) if v.iter().all(|b| *b) => Ok(()),
                    Ok(v) => Err(format!("batch_exists: stable keys gone: {v:?}")),
                    Err(e) => Err(e.to_string()),
                };
                ("batch_exists", r)
            }
            75..85 => {
                if self.live.is_empty() {
                    return ("noop", Ok(()));
                }
                let i = (self.rand() % self.live.len() as u64) as usize;
                let k = self.live[i].clone();
                let r = match self.h.retrieve(&k) {
                    Ok(v) => self.verify(&k, v),
                    Err(e) => Err(e.to_string()),
                };
                ("retrieve", r)
            }
            85..95 => {
                let Some(k) = self.live.pop_front() else {
                    return ("noop", Ok(()));
                };
                let r = match self.h.delete(&k) {
                    Ok(maru_client::DeleteStatus::Deleted) => Ok(()),
                    Ok(s) => Err(format!("delete {}: {s:?}", String::from_utf8_lossy(&k))),
                    Err(e) => Err(e.to_string()),
                };
                ("delete", r)
            }
            _ => {
                let n = self.live.len().min(BATCH);
                let keys: Vec<Vec<u8>> = self.live.drain(..n).collect();
                let refs = key_refs(&keys);
                let r = match self.h.batch_delete(&refs) {
                    Ok(v) if v.iter().all(|s| *s == maru_client::DeleteStatus::Deleted) => Ok(()),
                    Ok(v) => Err(format!("batch_delete: {v:?}")),
                    Err(e) => Err(e.to_string()),
                };
                ("batch_delete", r)
            }
        }
    }

    /// Runs random operations until `until` (or `max_ops`).
    pub fn run(&mut self, until: Instant, max_ops: u64) -> Report {
        let mut r = Report::default();
        while Instant::now() < until && r.ops < max_ops {
            let t = Instant::now();
            let (op, result) = self.step();
            let took = t.elapsed();
            if op == "noop" {
                continue;
            }
            r.ops += 1;
            r.hists.entry(op.to_owned()).or_default().record(took);
            if let Err(e) = result {
                r.errors.push(format!("worker {} {op}: {e}", self.id));
            }
        }
        r
    }

    /// Checks and deletes every key of this worker, then closes the handler.
    pub fn finish(self) -> Result<(), String> {
        let mut keys: Vec<Vec<u8>> = (0..self.cfg.stable)
            .map(|j| stable_key(self.id, j))
            .collect();
        keys.extend(self.live.iter().cloned());
        let refs = key_refs(&keys);
        let views = self
            .h
            .batch_retrieve(&refs)
            .map_err(|e| format!("worker {}: final read: {e}", self.id))?;
        for (k, v) in keys.iter().zip(views) {
            self.verify(k, v)?;
        }
        let st = self
            .h
            .batch_delete(&refs)
            .map_err(|e| format!("worker {}: final delete: {e}", self.id))?;
        if let Some(s) = st
            .iter()
            .find(|s| **s != maru_client::DeleteStatus::Deleted)
        {
            return Err(format!("worker {}: final delete said {s:?}", self.id));
        }
        self.h.close();
        Ok(())
    }
}

/// Starts `ids` workers in parallel threads.
pub fn start_workers(cfg: &LoadCfg, ids: std::ops::Range<usize>) -> Result<Vec<Worker>, String> {
    std::thread::scope(|s| {
        let hs: Vec<_> = ids
            .map(|id| s.spawn(move || Worker::start(cfg, id)))
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("worker panicked".into())))
            .collect()
    })
}

/// Runs every worker in its own thread for `secs`; the merged report.
pub fn run_workers(workers: &mut [Worker], secs: f64) -> Report {
    let until = Instant::now() + Duration::from_secs_f64(secs);
    std::thread::scope(|s| {
        let hs: Vec<_> = workers
            .iter_mut()
            .map(|w| s.spawn(move || w.run(until, u64::MAX)))
            .collect();
        let mut all = Report::default();
        for h in hs {
            match h.join() {
                Ok(r) => all.merge(&r),
                Err(_) => all.errors.push("a worker thread panicked".into()),
            }
        }
        all
    })
}

/// Finishes every worker (in parallel); the errors.
pub fn finish_workers(workers: Vec<Worker>) -> Vec<String> {
    std::thread::scope(|s| {
        let hs: Vec<_> = workers
            .into_iter()
            .map(|w| s.spawn(move || w.finish()))
            .collect();
        hs.into_iter()
            .filter_map(|h| match h.join() {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(_) => Some("a worker panicked while finishing".into()),
            })
            .collect()
    })
}
