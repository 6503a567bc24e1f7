//! [`copy`]: the byte copy the core uses for payload (into the send queue, out of a stream's
//! receive buffer), written around a `memcpy` pathology that costs 20× on common servers.
//!
//! On AMD Zen 3/4 (FSRM), glibc without the fix for its bug 30994 (e.g. Debian 12's 2.36)
//! copies blocks above `glibc.cpu.x86_rep_movsb_threshold` (≈ 2 KiB) with `rep movsb`, which
//! runs about 20× slower (measured on the AMD EPYC bench host: ≈ 2.5 GB/s instead of 40–90 GB/s
//! from L2) when the destination lies 1..=31 bytes after the source modulo 64. A DATA payload
//! sits 12 bytes after its header, so which copies hit that layout depends on where the
//! allocator put the buffers: a lottery per buffer, worth 1.5–3× of the mux's throughput.
//! Below the threshold glibc takes its vector loop, which does not care (≈ 45 GB/s in 2 KiB
//! pieces there); so a copy in that layout goes in [`CHUNK`]-byte pieces. Elsewhere it is one
//! `memcpy`, so other CPUs and fixed glibc pay at most a call per 2 KiB in half the layouts.

/// Piece size for copies in the slow layout: below glibc's default `rep movsb` threshold on
/// every x86-64 (2 KiB × vector size / 16, so at least 2 KiB plus).
pub(crate) const CHUNK: usize = 2048;

/// Copies `src` into `dst`, which must have the same length (a shorter side bounds the copy).
#[inline]
pub(crate) fn copy(dst: &mut [u8], src: &[u8]) {
    let n = dst.len().min(src.len());
    let (Some(dst), Some(src)) = (dst.get_mut(..n), src.get(..n)) else {
        return;
    };
    if n <= CHUNK || !slow_layout(dst.as_ptr() as usize, src.as_ptr() as usize) {
        dst.copy_from_slice(src);
        return;
    }
    for (d, s) in dst.chunks_mut(CHUNK).zip(src.chunks(CHUNK)) {
        d.copy_from_slice(s);
    }
}

/// Whether a large copy from `src` to `dst` (addresses) is in the layout `rep movsb` handles
/// badly: the destination 1..=31 bytes after the source modulo 64.
#[inline]
fn slow_layout(dst: usize, src: usize) -> bool {
    cfg!(target_arch = "x86_64") && (1..32).contains(&(dst.wrapping_sub(src) % 64))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn copies_every_length_and_layout() {
        let src: Vec<u8> = (0..3 * CHUNK as u32 + 77)
            .map(|i| (i % 253) as u8)
            .collect();
        let mut dst = vec![0u8; src.len() + 64];
        for skew in [0usize, 1, 12, 31, 32, 63] {
            for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 13] {
                dst.fill(0);
                copy(&mut dst[skew..skew + len], &src[..len]);
                assert_eq!(&dst[skew..skew + len], &src[..len], "skew {skew} len {len}");
                assert!(dst[..skew].iter().all(|&b| b == 0));
                assert!(dst[skew + len..].iter().all(|&b| b == 0));
            }
        }
        // Unequal lengths copy the shorter.
        let mut short = [0u8; 3];
        copy(&mut short, b"abcdef");
        assert_eq!(&short, b"abc");
    }

    #[test]
    fn slow_layout_is_the_first_half_of_each_64_byte_period() {
        let x86 = cfg!(target_arch = "x86_64");
        assert!(!slow_layout(1000, 1000));
        assert_eq!(slow_layout(1012, 1000), x86);
        assert_eq!(slow_layout(1031, 1000), x86);
        assert!(!slow_layout(1032, 1000));
        assert!(!slow_layout(988, 1000));
        assert_eq!(slow_layout(1000 + 64 + 4, 1000), x86);
    }
}
