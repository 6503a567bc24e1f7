//! [`Coverage`]: which engine shards this agent has a tunnel to, which one the next dial asks
//! for, and what to do with the next connection. Pure: fed tunnel hellos and tunnel ends, it
//! answers keep / close / reset and whether to dial again.
//!
//! Every shard listens on the same port with `SO_REUSEPORT`, and the kernel hashes each new
//! connection to one of them. Once the first tunnel hello has told the shard count, each dial
//! asks for the lowest shard still missing ([`Coverage::wanted`], sent as a `jaunt-shard.<k>`
//! ALPN entry); an engine that honours it hands the connection to that shard, so `n` shards
//! take `n` dials. An engine that does not (an older one) leaves the connection where the
//! kernel put it: the agent reads which shard accepted ([`TunnelHello`]), keeps the connection
//! if that shard had no tunnel yet and closes it otherwise, and dials again until every shard
//! `0..shards` is covered. That fallback takes about `n · H(n)` dials (the coupon collector's
//! problem: 1 for one shard, about 8 for 4, 22 for 8, 300 for 64); one round allows twice the
//! expected count for the shards still missing ([`Coverage::round_budget`]) before the agent
//! backs off, so a kernel that keeps hashing to the same shard cannot make it spin.
//!
//! A hello with another shard count than the tunnels so far means the engine restarted with
//! another layout (or a second engine answers behind the same address): the set starts over
//! from the new hello, and the older tunnels are drained. Per-engine coverage (several engines
//! learned from the hello) is a later addition keyed by engine id.

use jaunt_config::wire::TunnelHello;

/// Identifies one tunnel of this agent (a counter; never reused).
pub type TunnelId = u64;

/// Most dials in one round, whatever the shard count: bounds the handshakes one agent makes
/// in a burst (about 2 × 64 · H(64) for a 64-shard engine fits).
pub const MAX_DIALS_PER_ROUND: usize = 1024;

/// What to do with a connection whose tunnel hello just arrived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A shard without a tunnel: keep it (send the AgentHello, start the mux).
    Keep,
    /// The shard already has a tunnel: close this connection before sending anything.
    Duplicate,
    /// The engine's shard count changed: keep this one, and drain these tunnels of the old
    /// layout.
    Reset {
        /// Tunnels to drain.
        stale: Vec<TunnelId>,
    },
}

/// The shards covered by this agent's tunnels.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Coverage {
    /// Tunnel per shard index; its length is the engine's shard count (empty until the first
    /// hello).
    by_shard: Vec<Option<TunnelId>>,
}

impl Coverage {
    /// Nothing covered, shard count unknown.
    pub fn new() -> Coverage {
        Coverage::default()
    }

    /// The engine's shard count, once a hello told it.
    pub fn shards(&self) -> Option<usize> {
        (!self.by_shard.is_empty()).then_some(self.by_shard.len())
    }

    /// Shards with a tunnel.
    pub fn covered(&self) -> usize {
        self.by_shard.iter().filter(|t| t.is_some()).count()
    }

    /// Shards without a tunnel (1 while the count is unknown: one dial will tell).
    pub fn missing(&self) -> usize {
        match self.shards() {
            None => 1,
            Some(n) => n - self.covered(),
        }
    }

    /// Whether every shard has a tunnel.
    pub fn is_complete(&self) -> bool {
        self.shards().is_some() && self.missing() == 0
    }

    /// Whether to dial again.
    pub fn needs_dial(&self) -> bool {
        !self.is_complete()
    }

    /// The shard the next dial asks the engine for (a `jaunt-shard.<k>` ALPN entry): the lowest
    /// one without a tunnel, once the count is known. An engine that honours the hint hands the
    /// connection to that shard, so `n` shards take `n` dials; one that does not lands it where
    /// the kernel's hash does, and [`Coverage::offer`] sorts it out as before.
    pub fn wanted(&self) -> Option<usize> {
        self.by_shard.iter().position(Option::is_none)
    }

    /// The tunnel serving `shard`.
    pub fn tunnel(&self, shard: usize) -> Option<TunnelId> {
        self.by_shard.get(shard).copied().flatten()
    }

    /// Decides about connection `id`, which reached the shard its `hello` names (a hello that
    /// passed [`TunnelHello::parse`], so `shard < shards`), and records it when kept.
    pub fn offer(&mut self, id: TunnelId, hello: &TunnelHello) -> Verdict {
        debug_assert!(hello.shard < hello.shards);
        debug_assert!(
            !self.by_shard.contains(&Some(id)),
            "tunnel ids are never reused"
        );
        let verdict = if self.by_shard.len() != hello.shards {
            let stale: Vec<TunnelId> = self.by_shard.iter().flatten().copied().collect();
            self.by_shard = vec![None; hello.shards];
            if stale.is_empty() {
                Verdict::Keep
            } else {
                Verdict::Reset { stale }
            }
        } else if self.by_shard.get(hello.shard).copied().flatten().is_some() {
            Verdict::Duplicate
        } else {
            Verdict::Keep
        };
        if verdict != Verdict::Duplicate {
            if let Some(slot) = self.by_shard.get_mut(hello.shard) {
                *slot = Some(id);
            }
        }
        self.check_invariants();
        verdict
    }

    /// Tunnel `id` ended (or is going away); returns the shard it covered, `None` if it no
    /// longer covered one (replaced by a reset).
    pub fn remove(&mut self, id: TunnelId) -> Option<usize> {
        let shard = self.by_shard.iter().position(|t| *t == Some(id))?;
        if let Some(slot) = self.by_shard.get_mut(shard) {
            *slot = None;
        }
        self.check_invariants();
        Some(shard)
    }

    /// How many dials the next round may make: twice the expected number to cover the missing
    /// shards (`n · H(missing)`), at least 2, at most [`MAX_DIALS_PER_ROUND`].
    pub fn round_budget(&self) -> usize {
        let n = self.shards().unwrap_or(1);
        let harmonic: f64 = (1..=self.missing()).map(|k| 1.0 / k as f64).sum();
        let expected = n as f64 * harmonic;
        ((2.0 * expected).ceil() as usize).clamp(2, MAX_DIALS_PER_ROUND)
    }

    fn check_invariants(&self) {
        if cfg!(debug_assertions) {
            let mut ids: Vec<TunnelId> = self.by_shard.iter().flatten().copied().collect();
            let count = ids.len();
            ids.sort_unstable();
            ids.dedup();
            debug_assert_eq!(ids.len(), count, "one tunnel covers one shard");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(shards: usize, shard: usize) -> TunnelHello {
        TunnelHello::new(shards, shard)
    }

    #[test]
    fn one_shard_is_covered_by_the_first_tunnel() {
        let mut c = Coverage::new();
        assert!(c.needs_dial());
        assert_eq!((c.shards(), c.missing()), (None, 1));
        assert_eq!(c.offer(1, &hello(1, 0)), Verdict::Keep);
        assert!(c.is_complete());
        assert!(!c.needs_dial());
        assert_eq!(c.remove(1), Some(0));
        assert!(c.needs_dial());
        assert_eq!(c.shards(), Some(1), "the layout is remembered");
    }

    #[test]
    fn duplicates_are_closed_until_every_shard_is_covered() {
        // The kernel hands out shards 2, 2, 0, 2, 3, 1 of 4.
        let mut c = Coverage::new();
        let verdicts: Vec<Verdict> = [2, 2, 0, 2, 3, 1]
            .iter()
            .zip(1..)
            .map(|(&shard, id)| c.offer(id, &hello(4, shard)))
            .collect();
        assert_eq!(
            verdicts,
            [
                Verdict::Keep,
                Verdict::Duplicate,
                Verdict::Keep,
                Verdict::Duplicate,
                Verdict::Keep,
                Verdict::Keep
            ]
        );
        assert!(c.is_complete());
        assert_eq!(
            (0..4).map(|s| c.tunnel(s)).collect::<Vec<_>>(),
            [Some(3), Some(6), Some(1), Some(5)]
        );
        // Shard 1's tunnel ends: only it is missing; a duplicate id is not "removed".
        assert_eq!(c.remove(2), None);
        assert_eq!(c.remove(6), Some(1));
        assert_eq!((c.covered(), c.missing()), (3, 1));
        assert_eq!(c.offer(7, &hello(4, 3)), Verdict::Duplicate);
        assert_eq!(c.offer(8, &hello(4, 1)), Verdict::Keep);
        assert!(c.is_complete());
    }

    #[test]
    fn a_new_shard_count_starts_over() {
        let mut c = Coverage::new();
        assert_eq!(c.offer(1, &hello(2, 0)), Verdict::Keep);
        assert_eq!(c.offer(2, &hello(2, 1)), Verdict::Keep);
        // The engine came back with 3 shards; the old tunnels are stale, this one is kept.
        assert_eq!(
            c.offer(3, &hello(3, 1)),
            Verdict::Reset { stale: vec![1, 2] }
        );
        assert_eq!((c.shards(), c.covered()), (Some(3), 1));
        // The stale tunnels ending later do not uncover anything.
        assert_eq!(c.remove(1), None);
        assert_eq!(c.remove(2), None);
        assert_eq!(c.offer(4, &hello(3, 0)), Verdict::Keep);
        assert_eq!(c.offer(5, &hello(3, 2)), Verdict::Keep);
        assert!(c.is_complete());
        // A count change with nothing covered is a plain keep.
        let mut c = Coverage::new();
        c.offer(1, &hello(2, 0));
        c.remove(1);
        assert_eq!(c.offer(2, &hello(1, 0)), Verdict::Keep);
        assert!(c.is_complete());
    }

    #[test]
    fn the_wanted_shard_is_the_lowest_missing_one() {
        let mut c = Coverage::new();
        assert_eq!(c.wanted(), None, "unknown count: no hint");
        assert_eq!(c.offer(1, &hello(3, 1)), Verdict::Keep);
        assert_eq!(c.wanted(), Some(0));
        assert_eq!(c.offer(2, &hello(3, 0)), Verdict::Keep);
        assert_eq!(c.wanted(), Some(2));
        assert_eq!(c.offer(3, &hello(3, 2)), Verdict::Keep);
        assert_eq!(c.wanted(), None, "complete");
        c.remove(2);
        assert_eq!(c.wanted(), Some(0));
        // An engine that honours every hint: n shards, n dials, no duplicate.
        let mut c = Coverage::new();
        let mut dials = 1;
        c.offer(1, &hello(64, 17));
        while let Some(shard) = c.wanted() {
            dials += 1;
            assert_eq!(c.offer(dials, &hello(64, shard)), Verdict::Keep);
        }
        assert_eq!(dials, 64);
        assert!(c.is_complete());
    }

    #[test]
    fn round_budget_follows_the_coupon_collector() {
        let mut c = Coverage::new();
        assert_eq!(
            c.round_budget(),
            2,
            "unknown count: a couple of dials learn it"
        );
        c.offer(1, &hello(1, 0));
        c.remove(1);
        assert_eq!(c.round_budget(), 2);
        let mut c = Coverage::new();
        c.offer(1, &hello(4, 0));
        // 3 missing of 4: 2 × 4 × (1 + 1/2 + 1/3) = 14.67 → 15.
        assert_eq!(c.round_budget(), 15);
        let mut c = Coverage::new();
        c.offer(1, &hello(1024, 0));
        assert_eq!(c.round_budget(), MAX_DIALS_PER_ROUND);
    }

    #[test]
    fn random_arrivals_always_end_covered_within_a_few_rounds() {
        // Seeded simulation: shards from a uniform hash, tunnels dying at random; every
        // verdict is consistent with the state, and covering never needs unbounded rounds.
        let mut rng = crate::backoff::XorShift64::new(99);
        for shards in [1usize, 2, 3, 8, 16] {
            let mut c = Coverage::new();
            let mut next_id = 1;
            for _ in 0..50 {
                let mut rounds = 0;
                while c.needs_dial() {
                    rounds += 1;
                    assert!(rounds <= 10, "{shards} shards not covered after 10 rounds");
                    for _ in 0..c.round_budget() {
                        if c.is_complete() {
                            break;
                        }
                        let shard = rng.below(shards as u64) as usize;
                        let before = c.tunnel(shard);
                        let verdict = c.offer(next_id, &hello(shards, shard));
                        assert_eq!(verdict == Verdict::Duplicate, before.is_some());
                        next_id += 1;
                    }
                }
                // Some tunnels die.
                for shard in 0..shards {
                    if rng.below(3) == 0 {
                        if let Some(id) = c.tunnel(shard) {
                            assert_eq!(c.remove(id), Some(shard));
                        }
                    }
                }
            }
        }
    }
}
