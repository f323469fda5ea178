//! Support for the cross-process tests: child processes of the test binary itself, a page pool
//! with self-checking contents, and a small deterministic random source.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use maru_index::{copy_atomic, Location, PageSource};
use maru_shm::{MapMode, Mapping};

pub const PAGE: usize = 4096;
pub const ROLE: &str = "MARU_INDEX_TEST_ROLE";

/// A command that runs the ignored test `name` of this test binary as a child process in
/// `role`; `vars` reach it as environment variables.
pub fn child(name: &str, role: &str, vars: &[(&str, String)]) -> Command {
    let mut c = Command::new(std::env::current_exe().expect("test binary"));
    c.args([
        "--exact",
        name,
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(ROLE, role)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    for (k, v) in vars {
        c.env(k, v);
    }
    c
}

/// A fresh index file `i.index` in a new temp dir (kept while the dir lives) and its writer.
pub fn new_index(
    capacity: u64,
    key_area_bytes: u64,
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    maru_index::IndexWriter,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("i.index");
    let w = maru_index::IndexWriter::create(
        &path,
        maru_index::CreateOptions {
            capacity,
            key_area_bytes,
        },
    )
    .unwrap();
    (dir, path, w)
}

pub fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"))
}

/// xorshift64*: deterministic per seed, good enough to pick keys and operations.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Test key `id`: long keys (in the key-bytes area) for most ids, short ones for some.
pub fn key(id: u64) -> Vec<u8> {
    if id.is_multiple_of(4) {
        format!("s{id}").into_bytes()
    } else {
        format!(
            "model@rank0@chunk-hash-{id:016x}-{:08x}",
            id.wrapping_mul(2654435761) as u32
        )
        .into_bytes()
    }
}

pub fn create_pool(path: &Path, pages: usize) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len((pages * PAGE) as u64).unwrap();
}

/// Word `i` of the contents of a page that holds key `id` stamped `stamp`.
fn content_word(id: u64, stamp: u64, i: usize) -> u64 {
    match i {
        0 => id,
        1 => stamp,
        _ => (id ^ stamp.rotate_left(17)).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64,
    }
}

pub fn page_contents(id: u64, stamp: u64) -> Vec<u8> {
    (0..PAGE / 8)
        .flat_map(|i| content_word(id, stamp, i).to_le_bytes())
        .collect()
}

/// Whether `page` is one whole page of key `id` (under any stamp): not torn, not another key's.
pub fn page_is_of(page: &[u8], id: u64) -> bool {
    let word = |i: usize| u64::from_le_bytes(page[i * 8..i * 8 + 8].try_into().unwrap());
    let stamp = word(1);
    word(0) == id && (0..PAGE / 8).all(|i| word(i) == content_word(id, stamp, i))
}

/// The pool as a page source: region 0, the page at the location's offset.
pub struct Pool(pub Mapping);

impl Pool {
    pub fn open(path: &Path, mode: MapMode) -> Pool {
        let len = std::fs::metadata(path).unwrap().len();
        Pool(Mapping::map(path, 0, len, mode, false).unwrap())
    }
    pub fn write_page(&self, page: u64, bytes: &[u8]) {
        self.0.write_at(page as usize * PAGE, bytes).unwrap();
    }
}

impl PageSource for Pool {
    fn copy_out(&self, at: Location, dst: &mut [u8]) -> std::io::Result<()> {
        let end = at.offset as usize + dst.len();
        if end > self.0.len() {
            return Err(std::io::Error::other("outside the pool"));
        }
        // SAFETY: the range was checked against the live mapping, which outlives the call.
        unsafe { copy_atomic(self.0.as_ptr().add(at.offset as usize), dst) };
        Ok(())
    }
}

pub fn page_location(page: u64) -> Location {
    Location {
        region: 0,
        offset: page * PAGE as u64,
        len: PAGE as u32,
    }
}

/// Waits for `child` to exit, at most `limit`.
pub fn wait_exit(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("child {} did not exit within {limit:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
