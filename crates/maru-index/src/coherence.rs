//! The coherence hook: what the index does around its loads and stores when the memory it
//! lives in is not kept coherent by hardware.
//!
//! On one host (tmpfs, DAX on local memory) and on CXL 3 back-invalidate sharing, caches are
//! coherent and the hook does nothing: [`Coherent`], which compiles away. On CXL 2.0 memory
//! shared between hosts, a host may keep reading a stale line from its own cache and its stores
//! may sit in its cache, so the writer must write lines back before it publishes them and a
//! reader must drop its cached copy before it loads: [`FlushLines`].
//!
//! Where the index calls it (the points the protocol's ordering rests on):
//! - writer: [`Coherence::publish`] after the key bytes are written (before the entry that
//!   names them), after each of the entry's two stores of its version (odd, then the finished
//!   entry), after a bucket's tag or overflow count changes, and after the header's counters
//!   change;
//! - reader: [`Coherence::refresh`] before loading a bucket's line, an entry's line, and the
//!   key bytes an entry names.
//!
//! An entry is exactly one 64-byte line, so a write-back carries its version and its fields
//! together: a reader that refreshed the line sees either the old entry, the odd version, or
//! the new entry, never a mix.

/// What to do around loads and stores of index memory.
pub trait Coherence: Send + Sync {
    /// The writer stored `len` bytes at `addr`; make them visible to other hosts before any
    /// later store can be seen.
    fn publish(&self, addr: *const u8, len: usize);
    /// A reader is about to load `len` bytes at `addr`; drop any stale cached copy.
    fn refresh(&self, addr: *const u8, len: usize);
}

/// Memory whose caches hardware keeps coherent: nothing to do.
#[derive(Debug, Clone, Copy, Default)]
pub struct Coherent;

impl Coherence for Coherent {
    #[inline(always)]
    fn publish(&self, _addr: *const u8, _len: usize) {}
    #[inline(always)]
    fn refresh(&self, _addr: *const u8, _len: usize) {}
}

/// Memory shared without hardware coherence (CXL 2.0 multi-host): write back / invalidate each
/// 64-byte line touched (`clflush`, fenced). Elsewhere than x86-64 it is a full fence only.
#[derive(Debug, Clone, Copy, Default)]
pub struct FlushLines;

const LINE: usize = 64;

impl FlushLines {
    fn flush(addr: *const u8, len: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            let start = addr as usize & !(LINE - 1);
            let end = addr as usize + len;
            let mut line = start;
            // SAFETY: mfence and clflush have no memory-safety preconditions beyond `line`
            // being an address; clflush of a mapped (even read-only) address is defined, and
            // every line lies within the range the index passed, which it has mapped.
            unsafe {
                std::arch::x86_64::_mm_mfence();
                while line < end {
                    std::arch::x86_64::_mm_clflush(line as *const u8);
                    line += LINE;
                }
                std::arch::x86_64::_mm_mfence();
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (addr, len);
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        }
    }
}

impl Coherence for FlushLines {
    fn publish(&self, addr: *const u8, len: usize) {
        Self::flush(addr, len);
    }
    fn refresh(&self, addr: *const u8, len: usize) {
        Self::flush(addr, len);
    }
}
