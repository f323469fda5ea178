//! Copies into and out of shared memory that bypass the cache for large copies.
//!
//! A value written into a page is read by other instances later, rarely by the writer's core
//! soon after, and the page was last touched long ago: an ordinary copy first reads each
//! destination line into the cache (read-for-ownership) and so moves every byte twice. On the
//! 2-vCPU hosts Maru is measured on, storing a 1 MiB chunk into a page not touched for a while
//! runs at ~16 GB/s with `memcpy` and ~27 GB/s with non-temporal stores, which write whole
//! lines straight to memory. Small copies stay ordinary: they are cheap either way and their
//! lines may be read again while still cached.
//!
//! Copies out ([`copy_from_shared`]) are chosen the same way: a large chunk copied out of the
//! pool lands in a buffer bound for a device or a large host pool, not touched for a while.
//! Copying 1 MiB chunks into buffers far larger than the cache, streaming reached 1.1–1.3× the
//! cached copy's best (docs/PERFORMANCE.md, "The key index"); into a 4 MiB destination filled
//! again and again (it stays in the cache) it reached half, which is why small copies do not
//! stream.

/// Copies of at least this many bytes stream; smaller ones go through the cache.
pub const STREAM_COPY_MIN: usize = 64 * 1024;

/// Copies `len` bytes from `src` to `dst`, bypassing the cache for the bulk when `len` is at
/// least [`STREAM_COPY_MIN`]. The stores are visible to other cores when it returns.
///
/// # Safety
/// `src` is valid for `len` reads and `dst` for `len` writes, and the ranges do not overlap.
pub unsafe fn copy_to_shared(dst: *mut u8, src: *const u8, len: usize) {
    if len < STREAM_COPY_MIN {
        // SAFETY: the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
        return;
    }
    // SAFETY: the caller's contract.
    unsafe { stream(dst, src, len) }
}

#[cfg(target_arch = "x86_64")]
unsafe fn stream(dst: *mut u8, src: *const u8, len: usize) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
    const LINE: usize = 64;
    // Non-temporal stores need 16-byte aligned addresses: an ordinary copy up to the first
    // aligned byte of `dst`, lines of four 16-byte stores, and an ordinary copy of the tail.
    let head = dst.align_offset(16).min(len);
    // SAFETY: `head <= len`, within both ranges (the caller's contract).
    unsafe { std::ptr::copy_nonoverlapping(src, dst, head) };
    let mut at = head;
    while at + LINE <= len {
        // SAFETY: `at + 64 <= len`, so all four loads and stores lie inside the ranges; the
        // loads are unaligned loads, the stores hit 16-byte aligned addresses (`dst + head` is
        // aligned and `at - head` is a multiple of 64); SSE2 is part of x86-64.
        unsafe {
            let s = src.add(at).cast::<__m128i>();
            let d = dst.add(at).cast::<__m128i>();
            let (a, b, c, e) = (
                _mm_loadu_si128(s),
                _mm_loadu_si128(s.add(1)),
                _mm_loadu_si128(s.add(2)),
                _mm_loadu_si128(s.add(3)),
            );
            _mm_stream_si128(d, a);
            _mm_stream_si128(d.add(1), b);
            _mm_stream_si128(d.add(2), c);
            _mm_stream_si128(d.add(3), e);
        }
        at += LINE;
    }
    // SAFETY: the tail `at..len` lies inside both ranges. The fence orders the streaming
    // stores before whatever the caller does next (registering the key that points at them).
    unsafe {
        std::ptr::copy_nonoverlapping(src.add(at), dst.add(at), len - at);
        _mm_sfence();
    }
}

/// Copies `len` bytes out of shared memory that another process may be rewriting (a page
/// reused under a reader), for a reader that afterwards checks whether the bytes were stable
/// (the key index's generation recheck). The loads are the instructions' own, outside Rust's
/// memory model, so a concurrent store is not a data race of this program; the copy may be
/// torn, and the recheck discards it then. Copies of at least [`STREAM_COPY_MIN`] bytes store
/// with non-temporal stores, smaller ones are one `rep movsb` (memcpy speed with ERMSB). An
/// `lfence` at the end completes every load before whatever the caller loads next (the
/// recheck), and an `sfence` orders the streaming stores before later stores.
///
/// # Safety
/// `src` is valid for `len` reads (a live mapping), `dst` for `len` writes, and the ranges do
/// not overlap.
#[cfg(target_arch = "x86_64")]
pub unsafe fn copy_from_shared(dst: *mut u8, src: *const u8, len: usize) {
    if len < STREAM_COPY_MIN {
        // SAFETY: the caller's contract.
        unsafe { rep_movsb(dst, src, len) };
    } else {
        const LINE: usize = 64;
        let head = dst.align_offset(16).min(len);
        let lines = (len - head) / LINE;
        let tail = head + lines * LINE;
        // SAFETY: `head`, the lines and the tail partition `0..len`, inside both ranges (the
        // caller's contract). The line loop makes unaligned 16-byte loads and non-temporal
        // stores to `dst + head + 64 k`, 16-byte aligned; SSE2 is part of x86-64, and the
        // registers it changes are declared.
        unsafe {
            rep_movsb(dst, src, head);
            if lines > 0 {
                std::arch::asm!(
                    "2:",
                    "movdqu xmm0, [{s}]",
                    "movdqu xmm1, [{s} + 16]",
                    "movdqu xmm2, [{s} + 32]",
                    "movdqu xmm3, [{s} + 48]",
                    "movntdq [{d}], xmm0",
                    "movntdq [{d} + 16], xmm1",
                    "movntdq [{d} + 32], xmm2",
                    "movntdq [{d} + 48], xmm3",
                    "add {s}, 64",
                    "add {d}, 64",
                    "dec {n}",
                    "jnz 2b",
                    "sfence",
                    s = inout(reg) src.add(head) => _,
                    d = inout(reg) dst.add(head) => _,
                    n = inout(reg) lines => _,
                    out("xmm0") _,
                    out("xmm1") _,
                    out("xmm2") _,
                    out("xmm3") _,
                    options(nostack),
                );
            }
            rep_movsb(dst.add(tail), src.add(tail), len - tail);
        }
    }
    // SAFETY: a fence only.
    unsafe { std::arch::asm!("lfence", options(nostack, preserves_flags)) };
}

/// `rep movsb` of `len` bytes.
///
/// # Safety
/// As for [`copy_from_shared`].
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn rep_movsb(dst: *mut u8, src: *const u8, len: usize) {
    // SAFETY: the caller guarantees `src..src + len` is readable and `dst..dst + len` writable
    // and disjoint; `rep movsb` touches exactly those bytes (direction flag clear, as the ABI
    // guarantees) and the registers it changes are declared.
    unsafe {
        std::arch::asm!(
            "rep movsb",
            inout("rcx") len => _,
            inout("rsi") src => _,
            inout("rdi") dst => _,
            options(nostack, preserves_flags)
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn stream(dst: *mut u8, src: *const u8, len: usize) {
    // SAFETY: the caller's contract.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_every_byte_whatever_the_alignment_and_length() {
        check_copy(|d, s, n| {
            // SAFETY: `check_copy` passes ranges inside distinct vectors.
            unsafe { copy_to_shared(d, s, n) }
        });
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn copies_out_every_byte_whatever_the_alignment_and_length() {
        check_copy(|d, s, n| {
            // SAFETY: `check_copy` passes ranges inside distinct vectors.
            unsafe { copy_from_shared(d, s, n) }
        });
    }

    /// `copy(dst, src, len)` copies exactly `len` bytes at every alignment, around the
    /// streaming threshold and with a partial last line.
    fn check_copy(copy: impl Fn(*mut u8, *const u8, usize)) {
        let src: Vec<u8> = (0..STREAM_COPY_MIN * 3)
            .map(|i| (i * 7 + i / 251) as u8)
            .collect();
        for len in [
            0,
            1,
            63,
            STREAM_COPY_MIN - 1,
            STREAM_COPY_MIN,
            STREAM_COPY_MIN + 77,
            STREAM_COPY_MIN * 2 + 64 + 15,
        ] {
            for (s_off, d_off) in [(0, 0), (3, 0), (0, 5), (17, 9), (64, 1)] {
                let mut dst = vec![0xEEu8; len + d_off + 32];
                copy(dst[d_off..].as_mut_ptr(), src[s_off..].as_ptr(), len);
                assert_eq!(
                    &dst[d_off..d_off + len],
                    &src[s_off..s_off + len],
                    "{len} {s_off} {d_off}"
                );
                assert!(dst[..d_off].iter().all(|&b| b == 0xEE), "nothing before");
                assert!(
                    dst[d_off + len..].iter().all(|&b| b == 0xEE),
                    "nothing after"
                );
            }
        }
    }
}
