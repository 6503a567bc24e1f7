//! [`IdHasher`]: the stream table's hasher. Every DATA frame, every `send` and every read looks
//! a stream up by its id, a dozen lookups per 16 KiB moved; std's SipHash costs ~20 ns each,
//! about a tenth of the core's time at 5 GB/s. Stream ids are chosen by the peer, so the hash is
//! still keyed: a folded 64×64→128-bit multiply of the id with two random per-table keys (as
//! `foldhash` does for integers), about 2 ns. Without the keys a hostile peer cannot aim its
//! ids at one bucket; and a tunnel holds at most [`super::MAX_STREAMS`] streams anyway.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

/// Builds [`IdHasher`]s with keys drawn once per table.
#[derive(Clone, Debug)]
pub(crate) struct IdHashBuilder {
    k0: u64,
    k1: u64,
}

impl Default for IdHashBuilder {
    fn default() -> IdHashBuilder {
        // std's per-instance random SipHash keys, drawn from the OS once per thread.
        let random = RandomState::new();
        IdHashBuilder {
            k0: random.hash_one(0x6a75_6e74_u64),
            k1: random.hash_one(0x006d_7578_u64) | 1,
        }
    }
}

impl BuildHasher for IdHashBuilder {
    type Hasher = IdHasher;

    fn build_hasher(&self) -> IdHasher {
        IdHasher {
            state: self.k0,
            k1: self.k1,
        }
    }
}

/// Hashes integer keys (the stream ids); other input is folded in 8 bytes at a time.
#[derive(Clone, Debug)]
pub(crate) struct IdHasher {
    state: u64,
    k1: u64,
}

impl IdHasher {
    #[inline]
    fn mix(&mut self, word: u64) {
        let full = u128::from(self.state ^ word) * u128::from(self.k1);
        self.state = (full as u64) ^ ((full >> 64) as u64);
    }
}

impl Hasher for IdHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            if let Some(dst) = word.get_mut(..chunk.len()) {
                dst.copy_from_slice(chunk);
            }
            self.mix(u64::from_le_bytes(word));
        }
    }

    #[inline]
    fn write_u32(&mut self, id: u32) {
        self.mix(u64::from(id));
    }

    /// One more folded multiply, by a fixed odd constant, after a rotation: a single keyed
    /// round leaves sequential ids clustered in the low and top bits for some keys (seen as a
    /// flaky bucket-spread test); the second round spreads them like a random function.
    #[inline]
    fn finish(&self) -> u64 {
        const MUL: u64 = 0x9e37_79b9_7f4a_7c15;
        let full = u128::from(self.state.rotate_left(23)) * u128::from(MUL);
        (full as u64) ^ ((full >> 64) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_spread_over_buckets_and_keys_differ_per_table() {
        let a = IdHashBuilder::default();
        let b = IdHashBuilder::default();
        assert_ne!((a.k0, a.k1), (b.k0, b.k1));
        // Sequential ids of one parity (what a peer sends) fill the low bits hashbrown indexes
        // by, and the top 7 bits it tags with, evenly enough.
        let ids = (0..4096u32).map(|i| 2 * i + 1);
        let low: HashSet<u64> = ids.clone().map(|id| a.hash_one(id) & 4095).collect();
        let top: HashSet<u64> = ids.map(|id| a.hash_one(id) >> 57).collect();
        assert!(low.len() > 2400, "{} of 4096 buckets", low.len());
        assert_eq!(top.len(), 128);
    }
}
