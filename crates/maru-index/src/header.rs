//! What the index file's header and the hold lanes file's header share: a magic, a layout
//! version and the header's size up front, the format's own fields after them, and a CRC32
//! of everything before it. Written once by the file's creator, checked by everyone who maps
//! the file, in the order a reader of a broken file learns most from: size, magic, version,
//! checksum (the format's own fields are checked after, by the format).

use crate::error::ErrorKind;

/// One file format's header: its magic, layout version, header size in the file, and where
/// the checksummed part ends (the CRC32 follows it).
pub(crate) struct HeaderFormat {
    pub magic: [u8; 8],
    pub version: u32,
    pub header_bytes: u64,
    pub crc_end: usize,
}

impl HeaderFormat {
    /// A header of this format with its common fields set; the format fills in the rest of
    /// `..crc_end` and then [`seal`](Self::seal)s it.
    pub fn begin<const N: usize>(&self) -> [u8; N] {
        debug_assert_eq!(N, self.crc_end + 4);
        let mut h = [0u8; N];
        h[0..8].copy_from_slice(&self.magic);
        h[8..12].copy_from_slice(&self.version.to_le_bytes());
        h[12..16].copy_from_slice(&(self.header_bytes as u32).to_le_bytes());
        h
    }

    /// Writes the checksum of `h[..crc_end]` after it.
    pub fn seal(&self, h: &mut [u8]) {
        let crc = crc32fast::hash(&h[..self.crc_end]);
        h[self.crc_end..self.crc_end + 4].copy_from_slice(&crc.to_le_bytes());
    }

    /// Checks the common part of a header read from a file of `file_len` bytes; its fields,
    /// for the format to check the rest of.
    pub fn check<'h>(&self, h: &'h [u8], file_len: u64) -> Result<Fields<'h>, ErrorKind> {
        if h.len() < self.crc_end + 4 || file_len < self.header_bytes {
            return Err(ErrorKind::Truncated {
                found: file_len,
                expected: self.header_bytes,
            });
        }
        let f = Fields(h);
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&h[0..8]);
        if magic != self.magic {
            return Err(ErrorKind::BadMagic { found: magic });
        }
        let version = f.u32_at(8);
        if version != self.version {
            return Err(ErrorKind::VersionMismatch {
                found: version,
                expected: self.version,
            });
        }
        let stored = f.u32_at(self.crc_end);
        let computed = crc32fast::hash(&h[..self.crc_end]);
        if stored != computed {
            return Err(ErrorKind::HeaderChecksum { stored, computed });
        }
        if u64::from(f.u32_at(12)) != self.header_bytes {
            return Err(ErrorKind::Geometry(format!(
                "header bytes is {}, layout version {} has {}",
                f.u32_at(12),
                self.version,
                self.header_bytes
            )));
        }
        Ok(f)
    }
}

/// The little-endian fields of a header that passed [`HeaderFormat::check`].
pub(crate) struct Fields<'h>(&'h [u8]);

impl Fields<'_> {
    pub fn u32_at(&self, o: usize) -> u32 {
        u32::from_le_bytes([self.0[o], self.0[o + 1], self.0[o + 2], self.0[o + 3]])
    }

    pub fn u64_at(&self, o: usize) -> u64 {
        let mut w = [0u8; 8];
        w.copy_from_slice(&self.0[o..o + 8]);
        u64::from_le_bytes(w)
    }
}
