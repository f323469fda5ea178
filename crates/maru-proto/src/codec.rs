//! Little-endian primitives. [`Reader`] checks every length against what is left *and*
//! against a named limit before it allocates or slices.

use crate::error::{DecodeError, EncodeError};
use crate::{MAX_BATCH, MAX_KEY_LEN, MAX_STRING_LEN};

/// Appends little-endian values to a byte buffer.
pub struct Writer<'a> {
    buf: &'a mut Vec<u8>,
}

impl<'a> Writer<'a> {
    pub fn new(buf: &'a mut Vec<u8>) -> Self {
        Writer { buf }
    }
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub fn bool(&mut self, v: bool) {
        self.buf.push(v as u8);
    }
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn raw(&mut self, v: &[u8]) {
        self.buf.extend_from_slice(v);
    }
    fn len_prefixed(
        &mut self,
        what: &'static str,
        v: &[u8],
        max: usize,
    ) -> Result<(), EncodeError> {
        if v.len() > max {
            return Err(EncodeError::TooLong {
                what,
                len: v.len(),
                max,
            });
        }
        self.u32(v.len() as u32);
        self.raw(v);
        Ok(())
    }
    pub fn key(&mut self, v: &[u8]) -> Result<(), EncodeError> {
        self.len_prefixed("key", v, MAX_KEY_LEN)
    }
    pub fn str(&mut self, v: &str) -> Result<(), EncodeError> {
        self.len_prefixed("string", v.as_bytes(), MAX_STRING_LEN)
    }
    /// A free-form blob (JSON stats); bounded only by the frame limit.
    pub fn blob(&mut self, v: &[u8]) -> Result<(), EncodeError> {
        self.len_prefixed("blob", v, crate::MAX_FRAME as usize)
    }
    pub fn count(&mut self, n: usize) -> Result<(), EncodeError> {
        if n > MAX_BATCH {
            return Err(EncodeError::TooLong {
                what: "batch",
                len: n,
                max: MAX_BATCH,
            });
        }
        self.u32(n as u32);
        Ok(())
    }
}

/// Reads little-endian values from a byte slice, borrowing byte strings from it.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated {
                needed: n,
                got: self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    pub fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::InvalidField("bool")),
        }
    }
    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub fn fixed<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        self.array()
    }
    fn len_prefixed(&mut self, what: &'static str, max: usize) -> Result<&'a [u8], DecodeError> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(DecodeError::TooLong { what, len, max });
        }
        self.take(len)
    }
    pub fn key(&mut self) -> Result<&'a [u8], DecodeError> {
        self.len_prefixed("key", MAX_KEY_LEN)
    }
    pub fn str(&mut self) -> Result<&'a str, DecodeError> {
        let bytes = self.len_prefixed("string", MAX_STRING_LEN)?;
        std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidField("utf-8 string"))
    }
    pub fn blob(&mut self) -> Result<&'a [u8], DecodeError> {
        self.len_prefixed("blob", crate::MAX_FRAME as usize)
    }
    /// A batch count. Also checked against the bytes left (each item needs at least
    /// `min_item_len` bytes), so a lying count cannot make the caller reserve memory.
    pub fn count(&mut self, min_item_len: usize) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        if n > MAX_BATCH {
            return Err(DecodeError::TooLong {
                what: "batch",
                len: n,
                max: MAX_BATCH,
            });
        }
        if n.saturating_mul(min_item_len) > self.buf.len() {
            return Err(DecodeError::Truncated {
                needed: n * min_item_len,
                got: self.buf.len(),
            });
        }
        Ok(n)
    }
    pub fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes(self.buf.len()))
        }
    }
}
