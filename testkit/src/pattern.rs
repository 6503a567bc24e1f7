//! A test pattern for bulk transfers: a fixed pseudo-random block, periodic with a prime period
//! (so no power-of-two frame, record or buffer size lines up with it), followed by one more
//! [`PATTERN_CHUNK`] of the next period so that any chunk of the stream is one contiguous slice.

use std::sync::OnceLock;

/// The pattern's period: a prime.
pub const PATTERN_PERIOD: usize = 1_048_573;

/// The longest slice of the pattern to be taken at once.
pub const PATTERN_CHUNK: usize = 64 * 1024;

/// One period of the pattern and then [`PATTERN_CHUNK`] bytes of the next.
pub fn pattern_block() -> &'static [u8] {
    static BLOCK: OnceLock<Vec<u8>> = OnceLock::new();
    BLOCK.get_or_init(|| {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut out = Vec::with_capacity(PATTERN_PERIOD + PATTERN_CHUNK + 8);
        while out.len() < PATTERN_PERIOD {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        out.truncate(PATTERN_PERIOD);
        out.extend_from_within(..PATTERN_CHUNK);
        out
    })
}
