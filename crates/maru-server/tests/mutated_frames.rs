//! Stable-toolchain companion of the `cargo fuzz` target (fuzz/): valid frames of every
//! message type, mutated at random (bit flips, truncation, length lies, splices), go to the
//! pure decoder, to `FrameBuf`, and to a live server connection. Nothing may panic, every
//! connection must end or answer, and the server must serve a normal client afterwards.
//!
//! `cargo test -p maru-server --test mutated_frames -- --ignored write_seed_corpus` writes
//! the fuzz target's seed corpus from the same samples.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use maru_proto::*;
use maru_transport::FrameBuf;

/// A small deterministic generator (xorshift64*): reproducible failures without a crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, frame: &[u8], samples: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut f = frame.to_vec();
    for _ in 0..1 + rng.below(3) {
        match rng.below(7) {
            // Flip a few bits.
            0 => {
                for _ in 0..1 + rng.below(4) {
                    let i = rng.below(f.len());
                    if let Some(b) = f.get_mut(i) {
                        *b ^= 1 << rng.below(8);
                    }
                }
            }
            // Truncate.
            1 => f.truncate(rng.below(f.len() + 1)),
            // Lie about the payload length (often keeping the header otherwise valid).
            2 if f.len() >= HEADER_LEN => {
                let lie = match rng.below(4) {
                    0 => 0,
                    1 => (f.len() - HEADER_LEN) as u32 + 1 + rng.below(16) as u32,
                    2 => MAX_FRAME + 1,
                    _ => rng.next() as u32,
                };
                f[20..24].copy_from_slice(&lie.to_le_bytes());
            }
            // Lie in a length or count field inside the payload.
            3 if f.len() > HEADER_LEN + 4 => {
                let i = HEADER_LEN + rng.below(f.len() - HEADER_LEN - 3);
                let v = [
                    0u32,
                    1,
                    0xffff_ffff,
                    MAX_BATCH as u32 + 1,
                    MAX_KEY_LEN as u32 + 1,
                ][rng.below(5)];
                f[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
            // Random bytes appended.
            4 => {
                for _ in 0..rng.below(32) {
                    f.push(rng.next() as u8);
                }
            }
            // Splice in another message's payload under this header.
            5 => {
                let other = &samples[rng.below(samples.len())].1;
                f.truncate(HEADER_LEN.min(f.len()));
                f.extend_from_slice(other.get(HEADER_LEN..).unwrap_or(&[]));
            }
            // Change the message type to another known or unknown one.
            _ if f.len() >= 8 => {
                let other = &samples[rng.below(samples.len())].1;
                let t = if rng.below(4) == 0 {
                    rng.next() as u16
                } else {
                    u16::from_le_bytes([other[6], other[7]])
                };
                f[6..8].copy_from_slice(&t.to_le_bytes());
            }
            _ => {}
        }
    }
    f
}

fn request_samples(samples: &[(String, Vec<u8>)]) -> Vec<(String, Vec<u8>)> {
    samples
        .iter()
        .filter(|(n, _)| n.starts_with("req-") && !n.starts_with("req-hello"))
        .cloned()
        .collect()
}

#[test]
fn mutated_frames_never_panic_the_decoder() {
    let samples = sample_frames();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut decoded = 0;
    for _ in 0..20_000 {
        let (_, frame) = &samples[rng.below(samples.len())];
        let m = mutate(&mut rng, frame, &samples);
        decoded += decode_frame(&m).is_ok() as usize;
        // The same bytes through the streaming reader: every frame it returns must be the
        // one the pure decoder sees.
        let mut fb = FrameBuf::new();
        let mut cursor = std::io::Cursor::new(&m[..]);
        if let Ok((h, p)) = fb.read_frame(&mut cursor) {
            let total = HEADER_LEN + p.len();
            assert_eq!(Header::decode(&m).ok(), Some(h));
            let _ = decode_frame(&m[..total]);
        }
    }
    // Some mutations are harmless (e.g. a flipped bit in a key): the decoder was exercised
    // on both sides of the line.
    assert!(decoded > 100 && decoded < 20_000, "{decoded} decoded");
}

static PANICS: AtomicUsize = AtomicUsize::new(0);

#[test]
fn mutated_frames_never_take_the_server_down() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        default_hook(info);
    }));

    let c = InProcessCluster::start();
    let mut owner = c.client("owner");
    let region = owner.region(2 * MIB).handle.region_id;
    assert!(owner.register(b"chunk-a", region, 0, 10));
    // Pinned (and renewed every round): the keys mutated sessions leave behind fill the pool,
    // and the evictor may take any unpinned key.
    assert!(owner.bool(&Request::Pin { key: b"chunk-a" }));
    let ServerUrl::Tcp(addr) = c.url() else {
        unreachable!()
    };
    let samples = sample_frames();
    let requests = request_samples(&samples);
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let started = Instant::now();
    let mut answered = 0;
    for round in 0..1000 {
        let mut stream = TcpStream::connect(&addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // Most rounds say hello first, so the handshaken paths are exercised too.
        let mut bytes = Vec::new();
        if round % 4 != 0 {
            encode_request(
                &mut bytes,
                1,
                &Request::Hello(Hello {
                    role: Role::Client,
                    instance_id: &format!("fuzz-{round}"),
                    host: "h",
                    pid: 1,
                    start_time: 0,
                    session_token: None,
                    namespace: "",
                }),
            )
            .unwrap();
        }
        for _ in 0..1 + rng.below(4) {
            let (_, frame) = &requests[rng.below(requests.len())];
            bytes.extend(mutate(&mut rng, frame, &samples));
        }
        stream.write_all(&bytes).unwrap();
        // End of input: a frame whose length lied is cut short, so the server sees EOF and
        // must close rather than wait.
        stream.shutdown(Shutdown::Write).unwrap();
        let mut replies = Vec::new();
        stream
            .read_to_end(&mut replies)
            .unwrap_or_else(|e| panic!("round {round}: server did not finish: {e}"));
        // Whatever came back is a sequence of well-formed response frames.
        let mut rest = &replies[..];
        while !rest.is_empty() {
            let h = Header::decode(rest).expect("reply header");
            let total = HEADER_LEN + h.payload_len as usize;
            let frame = decode_frame(&rest[..total]).expect("reply decodes");
            assert!(matches!(frame.body, Body::Response(_)));
            rest = &rest[total..];
            answered += 1;
        }
        owner.call(&Request::RenewPins).unwrap();
        // The owner is unaffected, every round.
        assert_eq!(
            owner.lookup(b"chunk-a").map(|l| l.region.handle.region_id),
            Some(region)
        );
    }
    assert!(answered > 1000, "only {answered} replies");
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a server thread panicked");
    let mut n = c.client("normal");
    let r = n.region(2 * MIB).handle.region_id;
    assert!(n.register(b"after-fuzz", r, 0, 1));
    assert!(n.bool(&Request::Exists { key: b"after-fuzz" }));
    assert!(started.elapsed() < Duration::from_secs(30));
}

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/decode_frame")
}

/// Regenerates the fuzz target's seed corpus.
#[test]
#[ignore = "writes fuzz/corpus/decode_frame; run by hand after protocol changes"]
fn write_seed_corpus() {
    let dir = corpus_dir();
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in sample_frames() {
        std::fs::write(dir.join(format!("{name}.bin")), bytes).unwrap();
    }
}

/// The committed seed corpus is still made of valid frames (a protocol change that breaks
/// them should regenerate them).
#[test]
fn committed_seed_corpus_decodes() {
    let Ok(entries) = std::fs::read_dir(corpus_dir()) else {
        panic!("no seed corpus at {}", corpus_dir().display());
    };
    let mut n = 0;
    for e in entries {
        let path = e.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("req-") || name.starts_with("resp-") {
            let bytes = std::fs::read(&path).unwrap();
            decode_frame(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
            n += 1;
        }
    }
    assert!(n >= sample_frames().len(), "{n} seed files");
}
