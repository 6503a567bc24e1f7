//! Reconnect backoff: capped exponential with full jitter, no longer than the outage so far,
//! and the tiny random source it needs.
//!
//! After the `n`-th consecutive failure the agent sleeps a uniformly random time in
//! `[0, ceiling]`, where the ceiling is `min(cap, base × 2ⁿ, max(base, outage))` and `outage` is
//! how long the agent has been failing (since the first failure after its last healthy tunnel).
//! "Full jitter", as in the AWS architecture blog's comparison of backoff schemes: when an
//! engine restarts, every agent notices in the same second; their first redials spread over
//! `[0, base]`, their second over `[0, 2·base]`, and so on, so a thousand agents arrive as a
//! trickle rather than a wave.
//!
//! The outage bound is what keeps the tail short. Exponential growth by count alone lets an
//! agent whose early draws were small (several quick refusals while the engine was still
//! starting) reach a ceiling many times the outage: after a 1.3 s restart, 9,900 emulated
//! agents were back within 5 s but for a few that waited 7-12 s more (BENCHMARKS.md, "Reconnect
//! storm: the backoff's tail"). With the bound, an agent that failed until time `t` of an
//! outage is back by about `2t` (plus the engine's queue), whatever its draws; the spread and the
//! growth of a long outage stay as they were (the bound grows with the outage, about 1.5x per
//! retry, up to the cap).
//!
//! The failure count and the outage reset once a tunnel has stayed up for
//! [`BackoffConfig::healthy_after`]: a tunnel that dies right after opening (an engine in a crash
//! loop, a certificate it accepts and then rejects) keeps growing the delay instead of resetting
//! it.
//!
//! Pure: no clock read (callers pass `now`), no I/O. The random source is a xorshift64* seeded
//! once per agent from `/dev/urandom` (or the clock and pid if that fails); it needs to be
//! different per agent, not unpredictable, so no `rand` crate.
use std::io::Read;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// First backoff ceiling: short enough that a brief blip costs little, long enough that a
/// thousand agents' first redials spread over 200 ms instead of arriving in one.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(200);

/// Largest backoff ceiling: an agent whose engine is down for long retries at least twice a
/// minute on average, which is cheap for the engine and quick enough for people waiting on it.
pub const DEFAULT_BACKOFF_CAP: Duration = Duration::from_secs(30);

/// A tunnel that stayed up this long was healthy: the failure count starts over when it ends.
/// Longer than a handshake plus the engine's first keepalive, so a tunnel the engine drops
/// right after accepting does not count.
pub const DEFAULT_HEALTHY_AFTER: Duration = Duration::from_secs(10);

/// Failures after which the ceiling stops growing regardless of the cap (2^31 × base is far
/// beyond any sensible cap); keeps the shift and the multiplication in range.
const MAX_EXPONENT: u32 = 31;

/// The backoff's parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackoffConfig {
    /// Ceiling after the first failure.
    pub base: Duration,
    /// Largest ceiling.
    pub cap: Duration,
    /// How long a tunnel must have stayed up for its end to reset the failure count.
    pub healthy_after: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            base: DEFAULT_BACKOFF_BASE,
            cap: DEFAULT_BACKOFF_CAP,
            healthy_after: DEFAULT_HEALTHY_AFTER,
        }
    }
}

impl BackoffConfig {
    /// Checks `0 < base <= cap`.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.base.is_zero() {
            return Err("the backoff base must be above zero");
        }
        if self.cap < self.base {
            return Err("the backoff cap must be at least the base");
        }
        Ok(())
    }
}

/// The reconnect schedule of one agent.
#[derive(Clone, Debug)]
pub struct Backoff {
    config: BackoffConfig,
    /// Consecutive failures since the last reset.
    failures: u32,
    /// When the first failure since the last reset was recorded: the outage's start.
    failing_since: Option<Instant>,
    rng: XorShift64,
}

impl Backoff {
    /// A schedule with no failures yet, drawing from a generator seeded with `seed`.
    pub fn new(config: BackoffConfig, seed: u64) -> Backoff {
        debug_assert!(config.validate().is_ok());
        Backoff {
            config,
            failures: 0,
            failing_since: None,
            rng: XorShift64::new(seed),
        }
    }

    /// Consecutive failures since the last reset.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The ceiling of a delay drawn at `now`: `min(cap, base × 2^failures, max(base, outage))`,
    /// the outage being `now` less the first failure since the last reset (zero if none yet).
    pub fn ceiling(&self, now: Instant) -> Duration {
        let exponent = self.failures.min(MAX_EXPONENT);
        let grown = self
            .config
            .base
            .checked_mul(1u32 << exponent)
            .unwrap_or(self.config.cap);
        let outage = self
            .failing_since
            .map_or(Duration::ZERO, |since| now.saturating_duration_since(since));
        grown.min(outage.max(self.config.base)).min(self.config.cap)
    }

    /// Records a failure at `now` and returns how long to wait before the next attempt: uniform
    /// in `[0, ceiling]`, the ceiling taken before this failure is counted.
    pub fn next_delay(&mut self, now: Instant) -> Duration {
        if self.failing_since.is_none() {
            self.failing_since = Some(now);
        }
        let ceiling = self.ceiling(now);
        self.failures = self.failures.saturating_add(1);
        let ceiling_nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        let delay = Duration::from_nanos(self.rng.below(ceiling_nanos.saturating_add(1)));
        debug_assert!(delay <= ceiling);
        delay
    }

    /// Starts over, as after a healthy tunnel.
    pub fn reset(&mut self) {
        self.failures = 0;
        self.failing_since = None;
    }

    /// A tunnel ended after `lived`: if it was healthy, start over. Returns whether it reset.
    pub fn tunnel_ended(&mut self, lived: Duration) -> bool {
        let healthy = lived >= self.config.healthy_after;
        if healthy {
            self.reset();
        }
        healthy
    }
}

/// xorshift64* (Vigna): fast, 64 bits of state, good enough to spread agents apart.
#[derive(Clone, Debug)]
pub struct XorShift64(u64);

impl XorShift64 {
    /// A generator from `seed` (a zero seed, which would stay zero forever, is replaced).
    pub fn new(seed: u64) -> XorShift64 {
        XorShift64(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[0, n)` (0 when `n` is 0), by multiply-shift: unbiased enough for delays
    /// (the bias is below n / 2^64).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// A seed that differs between agents and between restarts of one agent: 8 bytes of
/// `/dev/urandom`, or the clock mixed with the pid if that cannot be read.
pub fn seed() -> u64 {
    let mut bytes = [0u8; 8];
    let from_urandom = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_ok();
    if from_urandom {
        return u64::from_le_bytes(bytes);
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    splitmix64(nanos ^ (u64::from(std::process::id()) << 32))
}

/// One round of splitmix64: spreads a low-entropy seed over all 64 bits.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn backoff(seed: u64) -> Backoff {
        Backoff::new(BackoffConfig::default(), seed)
    }

    /// Failures a minute apart: the outage never bounds the ceiling, so it is the exponential.
    fn slow_failures(b: &mut Backoff, t0: Instant, n: u32) -> Instant {
        let mut now = t0;
        for _ in 0..n {
            b.next_delay(now);
            now += Duration::from_secs(60);
        }
        now
    }

    #[test]
    fn ceiling_doubles_from_base_to_cap() {
        let mut b = backoff(1);
        let t0 = Instant::now();
        let mut ceilings = Vec::new();
        let mut now = t0;
        for _ in 0..12 {
            ceilings.push(b.ceiling(now));
            b.next_delay(now);
            now += Duration::from_secs(60);
        }
        let expected: Vec<Duration> = [
            200, 400, 800, 1_600, 3_200, 6_400, 12_800, 25_600, 30_000, 30_000, 30_000, 30_000,
        ]
        .iter()
        .map(|&ms| ms * MS)
        .collect();
        assert_eq!(ceilings, expected);
        // Far past the exponent bound, still the cap and no overflow.
        let now = slow_failures(&mut b, now, 100);
        assert_eq!(b.ceiling(now), DEFAULT_BACKOFF_CAP);
        assert_eq!(b.failures(), 112);
    }

    #[test]
    fn the_ceiling_is_never_above_the_outage_so_far() {
        // Eight refusals within 80 ms (an engine still starting): the count alone would allow
        // 51 s (capped to 30 s); the outage allows the base.
        let mut b = backoff(5);
        let t0 = Instant::now();
        for k in 0..8 {
            b.next_delay(t0 + k * 10 * MS);
        }
        assert_eq!(b.failures(), 8);
        assert_eq!(b.ceiling(t0 + 80 * MS), DEFAULT_BACKOFF_BASE);
        // 1.3 s into the outage the ceiling is the outage; much later, the exponential (8
        // failures: 51.2 s, capped at 30 s).
        assert_eq!(b.ceiling(t0 + 1_300 * MS), 1_300 * MS);
        assert_eq!(
            b.ceiling(t0 + Duration::from_secs(600)),
            DEFAULT_BACKOFF_CAP
        );
    }

    #[test]
    fn ten_thousand_agents_are_back_within_twice_the_outage() {
        // The engine is down for 1.3 s from t0 (every dial before then is refused at once), as
        // in the reconnect storm. Each agent noticed at t0 and redials on its own schedule.
        let outage = 1_300 * MS;
        let t0 = Instant::now();
        let mut seeds = XorShift64::new(17);
        let mut latest = Duration::ZERO;
        let mut total = Duration::ZERO;
        for _ in 0..10_000 {
            let mut b = backoff(seeds.next_u64());
            let mut now = t0;
            loop {
                now += b.next_delay(now);
                if now >= t0 + outage {
                    break;
                }
            }
            latest = latest.max(now - t0);
            total += now - t0;
        }
        // The last failure was before 1.3 s and waited at most the outage so far.
        assert!(
            latest <= 2 * outage,
            "the last agent came back after {latest:?}"
        );
        // And they do not all pile up at the end of the outage: the mean is well inside.
        let mean = total / 10_000;
        assert!(mean < outage + outage / 2, "mean {mean:?}");
    }

    #[test]
    fn every_delay_is_within_its_ceiling() {
        for seed in 1..200 {
            let mut b = backoff(seed);
            let t0 = Instant::now();
            for k in 0..20u32 {
                let now = t0 + k * 150 * MS;
                let ceiling = b.ceiling(now);
                let delay = b.next_delay(now);
                assert!(delay <= ceiling, "{delay:?} > {ceiling:?}");
            }
        }
    }

    #[test]
    fn delays_are_spread_over_the_whole_window() {
        // A thousand agents restarting together: their first redials cover [0, 200 ms] and no
        // 10 ms slice holds more than a few percent of them.
        let mut seeds = XorShift64::new(42);
        let mut buckets = [0usize; 21];
        let mut total = Duration::ZERO;
        let now = Instant::now();
        for _ in 0..1000 {
            let delay = backoff(seeds.next_u64()).next_delay(now);
            buckets[(delay.as_millis() / 10) as usize] += 1;
            total += delay;
        }
        assert!(buckets[..20].iter().all(|&n| n > 0), "{buckets:?}");
        assert!(buckets.iter().all(|&n| n < 100), "{buckets:?}");
        let mean = total / 1000;
        assert!(mean > 80 * MS && mean < 120 * MS, "mean {mean:?}");
    }

    #[test]
    fn grows_while_failing_and_resets_after_a_healthy_tunnel() {
        let mut b = backoff(7);
        let t0 = Instant::now();
        let now = slow_failures(&mut b, t0, 5);
        assert_eq!(b.ceiling(now), 6_400 * MS);
        // A tunnel that died quickly does not reset the schedule (nor the outage).
        assert!(!b.tunnel_ended(Duration::from_secs(2)));
        assert_eq!(b.ceiling(now), 6_400 * MS);
        // One that stayed up does.
        assert!(b.tunnel_ended(DEFAULT_HEALTHY_AFTER));
        assert_eq!(b.failures(), 0);
        assert_eq!(b.ceiling(now), DEFAULT_BACKOFF_BASE);
        assert!(b.next_delay(now) <= DEFAULT_BACKOFF_BASE);
        // The new outage starts at that failure: a second one 50 ms later is still bounded
        // by the base, not by the minutes since t0.
        assert_eq!(b.ceiling(now + 50 * MS), DEFAULT_BACKOFF_BASE);
    }

    #[test]
    fn config_is_validated() {
        assert!(BackoffConfig::default().validate().is_ok());
        let zero = BackoffConfig {
            base: Duration::ZERO,
            ..BackoffConfig::default()
        };
        assert!(zero.validate().is_err());
        let inverted = BackoffConfig {
            base: Duration::from_secs(2),
            cap: Duration::from_secs(1),
            ..BackoffConfig::default()
        };
        assert!(inverted.validate().is_err());
    }

    #[test]
    fn generator_and_seed() {
        let mut zero = XorShift64::new(0);
        assert_ne!(zero.next_u64(), 0);
        let mut r = XorShift64::new(3);
        assert!((0..1000).all(|_| r.below(10) < 10));
        assert_eq!(r.below(0), 0);
        // Two seeds in a row differ (urandom, or clock + pid + splitmix).
        assert_ne!(seed(), seed());
        assert_ne!(splitmix64(1), splitmix64(2));
    }
}
