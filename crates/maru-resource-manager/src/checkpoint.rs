//! Checkpoints: the whole allocation table at one WAL sequence number.
//!
//! Layout (little-endian): magic `MRCK` (4), version (4), body length (8), CRC-32 of the
//! body (4), body: last applied sequence (8), next region id (8), allocation count (8), then
//! each allocation as in the WAL; from version 2 on, then the count of server bindings (8)
//! and each binding (owner as in the WAL, then the server id). Version 1 (no bindings) is
//! still read. [`decode_checkpoint`] is a pure function of bytes.
//!
//! Written to `checkpoint.tmp`, fsynced, renamed over `checkpoint`, directory fsynced: a
//! crash leaves either the old or the new checkpoint, never a mix.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use maru_proto::{Reader, Writer};

use crate::wal::{
    get_allocation, get_owner, put_allocation, put_owner, Allocation, Owner, ServerId,
    SERVER_ID_LEN,
};

/// `b"MRCK"` as a little-endian u32.
pub const CHECKPOINT_MAGIC: u32 = u32::from_le_bytes(*b"MRCK");
pub const CHECKPOINT_VERSION: u32 = 2;
/// The oldest version this build reads.
const OLDEST_VERSION: u32 = 1;
const HEADER_LEN: usize = 20;
/// Smallest encoded allocation: id, two empty strings, offset, len, pid, start time.
const MIN_ALLOCATION_LEN: usize = 8 + 4 + 8 + 8 + 4 + 4 + 8;
/// Smallest encoded binding: an empty host, pid, start time, server id.
const MIN_BINDING_LEN: usize = 4 + 4 + 8 + SERVER_ID_LEN;

/// The allocation table at sequence number `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Checkpoint {
    /// Last WAL record included; replay starts after it.
    pub seq: u64,
    /// Region ids below this were handed out at some point and are never reused.
    pub next_region_id: u64,
    pub allocations: Vec<Allocation>,
    /// Owners that are metadata servers with a durable identity (`WalOp::Bind`).
    pub bindings: Vec<(Owner, ServerId)>,
}

/// Why a checkpoint is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    #[error("too short ({0} bytes)")]
    Truncated(usize),
    #[error("bad magic {0:#010x}: not a Maru checkpoint")]
    BadMagic(u32),
    #[error(
        "version {0} is not supported (this build reads {OLDEST_VERSION} to {CHECKPOINT_VERSION})"
    )]
    Version(u32),
    #[error("body length {declared} does not match the {actual} bytes present")]
    Length { declared: u64, actual: usize },
    #[error("checksum mismatch")]
    Checksum,
    #[error("malformed body: {0}")]
    Body(String),
}

/// Encodes a checkpoint.
pub fn encode_checkpoint(c: &Checkpoint) -> Result<Vec<u8>, maru_proto::EncodeError> {
    let mut body = Vec::with_capacity(24 + c.allocations.len() * 64);
    {
        let mut w = Writer::new(&mut body);
        w.u64(c.seq);
        w.u64(c.next_region_id);
        w.u64(c.allocations.len() as u64);
        for a in &c.allocations {
            put_allocation(&mut w, a)?;
        }
        w.u64(c.bindings.len() as u64);
        for (owner, id) in &c.bindings {
            put_owner(&mut w, owner)?;
            w.raw(id);
        }
    }
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&CHECKPOINT_MAGIC.to_le_bytes());
    out.extend_from_slice(&CHECKPOINT_VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes a checkpoint; any damage is an error (never a partial table).
pub fn decode_checkpoint(bytes: &[u8]) -> Result<Checkpoint, CheckpointError> {
    if bytes.len() < HEADER_LEN {
        return Err(CheckpointError::Truncated(bytes.len()));
    }
    let u32_at =
        |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    let magic = u32_at(0);
    if magic != CHECKPOINT_MAGIC {
        return Err(CheckpointError::BadMagic(magic));
    }
    let version = u32_at(4);
    if !(OLDEST_VERSION..=CHECKPOINT_VERSION).contains(&version) {
        return Err(CheckpointError::Version(version));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[8..16]);
    let declared = u64::from_le_bytes(len);
    let body = &bytes[HEADER_LEN..];
    if declared != body.len() as u64 {
        return Err(CheckpointError::Length {
            declared,
            actual: body.len(),
        });
    }
    if crc32fast::hash(body) != u32_at(16) {
        return Err(CheckpointError::Checksum);
    }
    let body_err = |e: maru_proto::DecodeError| CheckpointError::Body(e.to_string());
    let mut r = Reader::new(body);
    let seq = r.u64().map_err(body_err)?;
    let next_region_id = r.u64().map_err(body_err)?;
    let count = r.u64().map_err(body_err)?;
    // A lying count must not make us reserve memory: each entry takes bytes.
    if count > (r.remaining() / MIN_ALLOCATION_LEN) as u64 {
        return Err(CheckpointError::Body(format!(
            "{count} allocations cannot fit in {} bytes",
            r.remaining()
        )));
    }
    let mut allocations = Vec::with_capacity(count as usize);
    for _ in 0..count {
        allocations.push(get_allocation(&mut r).map_err(body_err)?);
    }
    let mut bindings = Vec::new();
    if version >= 2 {
        let count = r.u64().map_err(body_err)?;
        if count > (r.remaining() / MIN_BINDING_LEN) as u64 {
            return Err(CheckpointError::Body(format!(
                "{count} server bindings cannot fit in {} bytes",
                r.remaining()
            )));
        }
        for _ in 0..count {
            let owner = get_owner(&mut r).map_err(body_err)?;
            bindings.push((owner, r.fixed().map_err(body_err)?));
        }
    }
    r.finish().map_err(body_err)?;
    Ok(Checkpoint {
        seq,
        next_region_id,
        allocations,
        bindings,
    })
}

/// Writes `bytes` durably to `path` through `tmp`: write, fsync, rename, fsync the directory.
pub(crate) fn write_atomically(path: &Path, tmp: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(tmp, path)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Makes a rename or creation in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        Checkpoint {
            seq: 77,
            next_region_id: 12,
            allocations: (1..4)
                .map(|i| Allocation {
                    region_id: i,
                    pool: format!("/dev/shm/p{i}"),
                    offset: i << 21,
                    len: 2 << 20,
                    owner: Owner {
                        host: "node-a".into(),
                        pid: 100 + i as u32,
                        start_time: 5,
                    },
                })
                .collect(),
            bindings: vec![(
                Owner {
                    host: "node-a".into(),
                    pid: 101,
                    start_time: 5,
                },
                [7; SERVER_ID_LEN],
            )],
        }
    }

    #[test]
    fn a_version_1_checkpoint_is_read_with_no_bindings() {
        let mut c = sample();
        c.bindings.clear();
        let mut bytes = encode_checkpoint(&c).unwrap();
        // Version 1 is version 2 without the binding count at the end.
        bytes.truncate(bytes.len() - 8);
        bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
        let body_len = (bytes.len() - HEADER_LEN) as u64;
        bytes[8..16].copy_from_slice(&body_len.to_le_bytes());
        let crc = crc32fast::hash(&bytes[HEADER_LEN..]);
        bytes[16..20].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode_checkpoint(&bytes).unwrap(), c);
    }

    #[test]
    fn checkpoint_round_trips() {
        let c = sample();
        assert_eq!(
            decode_checkpoint(&encode_checkpoint(&c).unwrap()).unwrap(),
            c
        );
        let empty = Checkpoint::default();
        assert_eq!(
            decode_checkpoint(&encode_checkpoint(&empty).unwrap()).unwrap(),
            empty
        );
    }

    #[test]
    fn any_damage_is_refused() {
        let bytes = encode_checkpoint(&sample()).unwrap();
        for cut in 0..bytes.len() {
            assert!(
                decode_checkpoint(&bytes[..cut]).is_err(),
                "accepted a cut at {cut}"
            );
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            assert!(
                decode_checkpoint(&b).is_err(),
                "accepted a flipped bit at byte {i}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode_checkpoint(&longer).is_err());
    }

    #[test]
    fn lying_count_with_a_valid_checksum_is_refused() {
        let mut body = Vec::new();
        body.extend_from_slice(&1u64.to_le_bytes());
        body.extend_from_slice(&1u64.to_le_bytes());
        body.extend_from_slice(&u64::MAX.to_le_bytes());
        let mut b = Vec::new();
        b.extend_from_slice(&CHECKPOINT_MAGIC.to_le_bytes());
        b.extend_from_slice(&CHECKPOINT_VERSION.to_le_bytes());
        b.extend_from_slice(&(body.len() as u64).to_le_bytes());
        b.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        b.extend_from_slice(&body);
        assert!(matches!(
            decode_checkpoint(&b),
            Err(CheckpointError::Body(_))
        ));
    }
}
