//! The write-ahead log: every state change is a record appended and made durable
//! (`fdatasync`) before it is applied or acknowledged.
//!
//! Record layout (little-endian):
//!
//! | size | field |
//! |---|---|
//! | 4 | magic `MRWL` |
//! | 8 | sequence number (consecutive) |
//! | 4 | body length |
//! | 4 | CRC-32 of sequence, length and body |
//! | n | body: tag byte, then the fields of the [`WalOp`] |
//!
//! [`decode_wal`] is a pure function of bytes (fuzzable): it returns the valid prefix and
//! says why it stopped. A bad record at the very end is a torn tail (a crash mid-append) and
//! is cut; a bad record followed by a valid one is corruption and refuses start-up, since
//! cutting there would silently drop acknowledged operations.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use maru_proto::{Reader, Writer};

/// `b"MRWL"` as a little-endian u32.
pub const WAL_MAGIC: u32 = u32::from_le_bytes(*b"MRWL");
/// Bytes before a record's body.
pub const RECORD_HEADER_LEN: usize = 20;
/// Largest body a decoder accepts (a record holds two short strings and a few integers).
pub const MAX_RECORD_BODY: u32 = 64 * 1024;

const TAG_ALLOC: u8 = 1;
const TAG_FREE: u8 = 2;
const TAG_RECLAIM: u8 = 3;
const TAG_BIND: u8 = 4;
const TAG_ADOPT: u8 = 5;

/// Length of a metadata server's durable identity (its `Role::Server` Hello's token).
pub const SERVER_ID_LEN: usize = maru_proto::SESSION_TOKEN_LEN;

/// A metadata server's durable identity: the same across its restarts, so that a restarted
/// server may adopt the regions its dead predecessor owned (see `reaper`).
pub type ServerId = [u8; SERVER_ID_LEN];

/// The process that owns a region.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner {
    pub host: String,
    pub pid: u32,
    /// Clock ticks since boot at which the process started (0: unknown).
    pub start_time: u64,
}

impl Owner {
    /// `host:pid`, the owner string of a handle.
    pub fn key(&self) -> String {
        format!("{}:{}", self.host, self.pid)
    }
}

/// One region handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub region_id: u64,
    /// Path of the pool it was carved from.
    pub pool: String,
    pub offset: u64,
    pub len: u64,
    pub owner: Owner,
}

/// A state change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalOp {
    Alloc(Allocation),
    /// Freed by its owner.
    Free {
        region_id: u64,
    },
    /// Taken back from a dead owner.
    Reclaim {
        region_id: u64,
    },
    /// `owner` is the metadata server with durable identity `server_id`: when it dies, its
    /// regions wait out the server grace for a successor.
    Bind {
        owner: Owner,
        server_id: ServerId,
    },
    /// Every region of `from` (a dead server) now belongs to `to` (its successor, which
    /// presented the same identity), and so does the identity.
    Adopt {
        from: Owner,
        to: Owner,
    },
}

/// A decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalRecord {
    pub seq: u64,
    pub op: WalOp,
}

/// Why decoding stopped before the end of the bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    /// Where the first bad record starts (everything before is valid).
    pub offset: usize,
    pub reason: String,
}

/// The valid prefix of a log.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WalScan {
    pub records: Vec<WalRecord>,
    /// Length of the valid prefix in bytes.
    pub valid_len: usize,
    /// Set when bytes after `valid_len` had to be ignored.
    pub torn: Option<TornTail>,
}

/// Why a log cannot be used at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalError {
    #[error(
        "write-ahead log is corrupt at byte {offset} ({reason}) but valid records follow at \
         byte {next_valid}: refusing to drop acknowledged operations"
    )]
    CorruptMiddle {
        offset: usize,
        reason: String,
        next_valid: usize,
    },
}

pub(crate) fn put_allocation(
    w: &mut Writer,
    a: &Allocation,
) -> Result<(), maru_proto::EncodeError> {
    w.u64(a.region_id);
    w.str(&a.pool)?;
    w.u64(a.offset);
    w.u64(a.len);
    put_owner(w, &a.owner)
}

pub(crate) fn put_owner(w: &mut Writer, o: &Owner) -> Result<(), maru_proto::EncodeError> {
    w.str(&o.host)?;
    w.u32(o.pid);
    w.u64(o.start_time);
    Ok(())
}

pub(crate) fn get_owner(r: &mut Reader) -> Result<Owner, maru_proto::DecodeError> {
    Ok(Owner {
        host: r.str()?.to_owned(),
        pid: r.u32()?,
        start_time: r.u64()?,
    })
}

pub(crate) fn get_allocation(r: &mut Reader) -> Result<Allocation, maru_proto::DecodeError> {
    Ok(Allocation {
        region_id: r.u64()?,
        pool: r.str()?.to_owned(),
        offset: r.u64()?,
        len: r.u64()?,
        owner: get_owner(r)?,
    })
}

/// Encodes one record. Fails only for strings over the protocol's string limit, which the
/// resource manager never accepts in the first place.
pub fn encode_record(seq: u64, op: &WalOp) -> Result<Vec<u8>, maru_proto::EncodeError> {
    let mut body = Vec::with_capacity(64);
    {
        let mut w = Writer::new(&mut body);
        match op {
            WalOp::Alloc(a) => {
                w.u8(TAG_ALLOC);
                put_allocation(&mut w, a)?;
            }
            WalOp::Free { region_id } => {
                w.u8(TAG_FREE);
                w.u64(*region_id);
            }
            WalOp::Reclaim { region_id } => {
                w.u8(TAG_RECLAIM);
                w.u64(*region_id);
            }
            WalOp::Bind { owner, server_id } => {
                w.u8(TAG_BIND);
                put_owner(&mut w, owner)?;
                w.raw(server_id);
            }
            WalOp::Adopt { from, to } => {
                w.u8(TAG_ADOPT);
                put_owner(&mut w, from)?;
                put_owner(&mut w, to)?;
            }
        }
    }
    let len = body.len() as u32;
    let mut out = Vec::with_capacity(RECORD_HEADER_LEN + body.len());
    out.extend_from_slice(&WAL_MAGIC.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&record_crc(seq, len, &body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

fn record_crc(seq: u64, len: u32, body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(&len.to_le_bytes());
    h.update(body);
    h.finalize()
}

fn decode_body(body: &[u8]) -> Result<WalOp, String> {
    let mut r = Reader::new(body);
    let op = match r.u8().map_err(|e| e.to_string())? {
        TAG_ALLOC => WalOp::Alloc(get_allocation(&mut r).map_err(|e| e.to_string())?),
        TAG_FREE => WalOp::Free {
            region_id: r.u64().map_err(|e| e.to_string())?,
        },
        TAG_RECLAIM => WalOp::Reclaim {
            region_id: r.u64().map_err(|e| e.to_string())?,
        },
        TAG_BIND => WalOp::Bind {
            owner: get_owner(&mut r).map_err(|e| e.to_string())?,
            server_id: r.fixed().map_err(|e| e.to_string())?,
        },
        TAG_ADOPT => WalOp::Adopt {
            from: get_owner(&mut r).map_err(|e| e.to_string())?,
            to: get_owner(&mut r).map_err(|e| e.to_string())?,
        },
        t => return Err(format!("unknown record tag {t}")),
    };
    r.finish().map_err(|e| e.to_string())?;
    Ok(op)
}

/// Decodes the record at the start of `bytes`: the record and its encoded length.
fn decode_one(bytes: &[u8]) -> Result<(u64, WalOp, usize), String> {
    if bytes.len() < RECORD_HEADER_LEN {
        return Err(format!("{} bytes of a record header", bytes.len()));
    }
    let u32_at =
        |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    let magic = u32_at(0);
    if magic != WAL_MAGIC {
        return Err(format!("bad magic {magic:#010x}"));
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&bytes[4..12]);
    let seq = u64::from_le_bytes(seq);
    let len = u32_at(12);
    let crc = u32_at(16);
    if len > MAX_RECORD_BODY {
        return Err(format!("record length {len} over the limit"));
    }
    let end = RECORD_HEADER_LEN + len as usize;
    let body = bytes.get(RECORD_HEADER_LEN..end).ok_or_else(|| {
        format!(
            "record of {len} bytes cut after {}",
            bytes.len() - RECORD_HEADER_LEN
        )
    })?;
    if record_crc(seq, len, body) != crc {
        return Err("checksum mismatch".into());
    }
    Ok((seq, decode_body(body)?, end))
}

/// Decodes a whole log. Sequence numbers must be consecutive; the first one may be anything
/// (the log restarts after each checkpoint).
pub fn decode_wal(bytes: &[u8]) -> Result<WalScan, WalError> {
    let mut scan = WalScan::default();
    let mut pos = 0;
    while pos < bytes.len() {
        let bad = match decode_one(&bytes[pos..]) {
            Ok((seq, op, n)) => {
                let expected = scan.records.last().map(|r| r.seq.wrapping_add(1));
                if expected.is_none_or(|e| e == seq) {
                    scan.records.push(WalRecord { seq, op });
                    pos += n;
                    scan.valid_len = pos;
                    continue;
                }
                format!(
                    "sequence {seq} after {}",
                    scan.records.last().map_or(0, |r| r.seq)
                )
            }
            Err(reason) => reason,
        };
        // Anything valid further on means this is not a torn append but damage.
        if let Some(next_valid) = (pos + 1..bytes.len()).find(|&p| decode_one(&bytes[p..]).is_ok())
        {
            return Err(WalError::CorruptMiddle {
                offset: pos,
                reason: bad,
                next_valid,
            });
        }
        scan.torn = Some(TornTail {
            offset: pos,
            reason: bad,
        });
        break;
    }
    Ok(scan)
}

/// Why a record could not be made durable.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("write-ahead log {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("write-ahead log {path} is in an unknown state after an earlier failure; restart the resource manager")]
    Poisoned { path: PathBuf },
    #[error("record not encodable: {0}")]
    Encode(#[from] maru_proto::EncodeError),
}

/// The open log file.
#[derive(Debug)]
pub(crate) struct Wal {
    path: PathBuf,
    file: File,
    /// Bytes of complete, durable records.
    len: u64,
    /// Sequence number of the last durable record.
    seq: u64,
    /// Set when a failed append could not be rolled back: the file may end in a record that
    /// was never applied, so nothing more may be appended after it.
    poisoned: bool,
}

impl Wal {
    /// `file` is positioned anywhere; appends go to `len` via the file's append mode.
    pub(crate) fn new(path: &Path, file: File, len: u64, seq: u64) -> Wal {
        Wal {
            path: path.to_owned(),
            file,
            len,
            seq,
            poisoned: false,
        }
    }

    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    /// Continues numbering after recovery (the checkpoint or the replayed log's last record).
    pub(crate) fn set_seq(&mut self, seq: u64) {
        self.seq = seq;
    }

    #[cfg(test)]
    pub(crate) fn replace_file_for_test(&mut self, file: File) {
        self.file = file;
    }

    /// Appends and syncs one record. On failure the log is rolled back to its previous
    /// length (or poisoned when even that fails) and nothing counts as written.
    pub(crate) fn append(&mut self, op: &WalOp) -> Result<u64, AppendError> {
        if self.poisoned {
            return Err(AppendError::Poisoned {
                path: self.path.clone(),
            });
        }
        let seq = self.seq + 1;
        let rec = encode_record(seq, op)?;
        let result = self
            .file
            .write_all(&rec)
            .and_then(|()| self.file.sync_data());
        match result {
            Ok(()) => {
                self.len += rec.len() as u64;
                self.seq = seq;
                Ok(seq)
            }
            Err(source) => {
                let rolled_back = self
                    .file
                    .set_len(self.len)
                    .and_then(|()| self.file.sync_data());
                if rolled_back.is_err() {
                    self.poisoned = true;
                }
                Err(AppendError::Io {
                    path: self.path.clone(),
                    source,
                })
            }
        }
    }

    /// Empties the log after a checkpoint made every record in it redundant. `seq` goes on
    /// from where it was.
    pub(crate) fn reset(&mut self) -> io::Result<()> {
        if self.poisoned {
            return Err(io::Error::other("log poisoned"));
        }
        self.file.set_len(0)?;
        self.file.sync_data()?;
        self.len = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(id: u64) -> WalOp {
        WalOp::Alloc(Allocation {
            region_id: id,
            pool: "/dev/shm/p".into(),
            offset: id << 21,
            len: 2 << 20,
            owner: Owner {
                host: "h".into(),
                pid: 7,
                start_time: 99,
            },
        })
    }

    fn log(ops: &[WalOp], first_seq: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            out.extend(encode_record(first_seq + i as u64, op).unwrap());
        }
        out
    }

    #[test]
    fn records_round_trip() {
        let ops = vec![
            alloc(1),
            alloc(2),
            WalOp::Free { region_id: 1 },
            WalOp::Reclaim { region_id: 2 },
        ];
        let bytes = log(&ops, 41);
        let scan = decode_wal(&bytes).unwrap();
        assert_eq!(scan.torn, None);
        assert_eq!(scan.valid_len, bytes.len());
        assert_eq!(
            scan.records
                .iter()
                .map(|r| (r.seq, r.op.clone()))
                .collect::<Vec<_>>(),
            ops.into_iter()
                .enumerate()
                .map(|(i, o)| (41 + i as u64, o))
                .collect::<Vec<_>>()
        );
        assert_eq!(decode_wal(&[]).unwrap(), WalScan::default());
    }

    #[test]
    fn every_truncation_is_a_torn_tail_at_a_record_boundary() {
        let bytes = log(&[alloc(1), alloc(2), WalOp::Free { region_id: 1 }], 1);
        let first = encode_record(1, &alloc(1)).unwrap().len();
        for cut in 0..bytes.len() {
            let scan = decode_wal(&bytes[..cut]).unwrap();
            assert!(scan.valid_len <= cut);
            assert_eq!(scan.torn.is_some(), scan.valid_len < cut, "cut at {cut}");
            if cut >= first {
                assert!(!scan.records.is_empty());
            }
        }
    }

    #[test]
    fn flipped_byte_in_the_last_record_is_cut_elsewhere_refused() {
        let bytes = log(&[alloc(1), alloc(2)], 1);
        let first = encode_record(1, &alloc(1)).unwrap().len();
        let mut tail = bytes.clone();
        let n = tail.len();
        tail[n - 3] ^= 0x40;
        let scan = decode_wal(&tail).unwrap();
        assert_eq!(scan.records.len(), 1);
        assert_eq!(scan.valid_len, first);
        assert!(scan.torn.unwrap().reason.contains("checksum"));

        let mut middle = bytes.clone();
        middle[25] ^= 0x40;
        match decode_wal(&middle) {
            Err(WalError::CorruptMiddle {
                offset, next_valid, ..
            }) => {
                assert_eq!((offset, next_valid), (0, first));
            }
            other => panic!("corruption in the middle accepted: {other:?}"),
        }
    }

    #[test]
    fn sequence_gap_is_cut_at_the_end_and_refused_before_valid_records() {
        let mut bytes = log(&[alloc(1)], 5);
        bytes.extend(encode_record(7, &alloc(2)).unwrap());
        let scan = decode_wal(&bytes).unwrap();
        assert_eq!(scan.records.len(), 1);
        assert!(scan.torn.unwrap().reason.contains("sequence"));
        bytes.extend(encode_record(8, &alloc(3)).unwrap());
        assert!(matches!(
            decode_wal(&bytes),
            Err(WalError::CorruptMiddle { .. })
        ));
    }
}
