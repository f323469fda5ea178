//! Copies into shared memory that bypass the cache.
//!
//! A value written into a page is read by other instances later, rarely by the writer's core
//! soon after, and the page was last touched long ago: an ordinary copy first reads each
//! destination line into the cache (read-for-ownership) and so moves every byte twice. On the
//! 2-vCPU hosts Maru is measured on, storing a 1 MiB chunk into a page not touched for a while
//! runs at ~16 GB/s with `memcpy` and ~27 GB/s with non-temporal stores, which write whole
//! lines straight to memory. Small copies stay ordinary: they are cheap either way and their
//! lines may be read again while still cached.

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
        ] {
            for (s_off, d_off) in [(0, 0), (3, 0), (0, 5), (17, 9), (64, 1)] {
                let mut dst = vec![0xEEu8; len + d_off + 32];
                // SAFETY: both ranges are inside their vectors and distinct allocations.
                unsafe {
                    copy_to_shared(dst.as_mut_ptr().add(d_off), src.as_ptr().add(s_off), len)
                };
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
