//! Human durations as written in config files and resources: `500ms`, `90s`, `30m`, `12h`,
//! `1h30m`, `7d`.
//!
//! [`Duration`] wraps [`std::time::Duration`]; it parses from and displays as that compact form
//! (Display is canonical: `90s` prints as `1m30s`, `720h` as `30d`) and serializes as the same
//! string, so a value read from YAML prints back in a form that parses to the same value.
//! Only whole numbers of each unit are accepted (`1.5h` is an error: write `1h30m`). Units:
//! `d` (24 h, no calendar), `h`, `m`, `s`, `ms`, `us`, `ns`.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a config author sees when a duration does not parse.
pub const EXPECTED_DURATION: &str = "expected a duration such as 30m or 12h";

/// A span of time written like `1h30m`. Wraps [`std::time::Duration`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(pub std::time::Duration);

/// Why a duration string did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseDurationError {
    #[error("empty duration")]
    Empty,
    #[error("missing unit after {number} (use ms, s, m, h or d)")]
    MissingUnit { number: String },
    #[error("unknown unit {unit:?} (use ms, s, m, h or d)")]
    UnknownUnit { unit: String },
    #[error("expected a number before {found:?}")]
    MissingNumber { found: String },
    #[error("fractions are not supported (write 1h30m rather than 1.5h)")]
    Fraction,
    #[error("duration is too large")]
    Overflow,
}

impl Duration {
    pub const ZERO: Duration = Duration(std::time::Duration::ZERO);

    pub const fn from_millis(millis: u64) -> Self {
        Duration(std::time::Duration::from_millis(millis))
    }

    pub const fn from_secs(secs: u64) -> Self {
        Duration(std::time::Duration::from_secs(secs))
    }

    pub const fn from_mins(mins: u64) -> Self {
        Duration(std::time::Duration::from_secs(mins.saturating_mul(60)))
    }

    pub const fn from_hours(hours: u64) -> Self {
        Duration(std::time::Duration::from_secs(hours.saturating_mul(3600)))
    }

    pub const fn from_days(days: u64) -> Self {
        Duration(std::time::Duration::from_secs(days.saturating_mul(86_400)))
    }

    pub const fn as_std(self) -> std::time::Duration {
        self.0
    }

    pub const fn as_secs(self) -> u64 {
        self.0.as_secs()
    }

    /// Whole milliseconds, saturating at `u64::MAX`.
    pub fn as_millis_u64(self) -> u64 {
        u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX)
    }

    pub const fn is_zero(self) -> bool {
        self.0.is_zero()
    }

    /// Parses `1h30m`-style text. Surrounding whitespace is ignored; inner whitespace is not.
    pub fn parse(text: &str) -> Result<Self, ParseDurationError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(ParseDurationError::Empty);
        }
        let mut total = std::time::Duration::ZERO;
        let mut rest = text;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(ParseDurationError::MissingNumber {
                    found: rest.to_string(),
                });
            }
            let (number, after) = rest.split_at(digits);
            if after.starts_with('.') {
                return Err(ParseDurationError::Fraction);
            }
            let unit_len = after.bytes().take_while(u8::is_ascii_alphabetic).count();
            let (unit, after) = after.split_at(unit_len);
            if unit.is_empty() {
                return Err(ParseDurationError::MissingUnit {
                    number: number.to_string(),
                });
            }
            let value: u64 = number.parse().map_err(|_| ParseDurationError::Overflow)?;
            let part = unit_duration(unit, value)?;
            total = total
                .checked_add(part)
                .ok_or(ParseDurationError::Overflow)?;
            rest = after;
        }
        Ok(Duration(total))
    }
}

impl From<std::time::Duration> for Duration {
    fn from(value: std::time::Duration) -> Self {
        Duration(value)
    }
}

impl From<Duration> for std::time::Duration {
    fn from(value: Duration) -> Self {
        value.0
    }
}

impl FromStr for Duration {
    type Err = ParseDurationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Duration::parse(text)
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_zero() {
            return f.write_str("0s");
        }
        let secs = self.0.as_secs();
        let nanos = u64::from(self.0.subsec_nanos());
        let parts = [
            (secs / 86_400, "d"),
            (secs % 86_400 / 3600, "h"),
            (secs % 3600 / 60, "m"),
            (secs % 60, "s"),
            (nanos / 1_000_000, "ms"),
            (nanos % 1_000_000 / 1000, "us"),
            (nanos % 1000, "ns"),
        ];
        for (value, unit) in parts {
            if value != 0 {
                write!(f, "{value}{unit}")?;
            }
        }
        Ok(())
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(DurationVisitor)
    }
}

struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration such as 30m or 12h")
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<Duration, E> {
        Duration::parse(value).map_err(|error| match error {
            ParseDurationError::Overflow | ParseDurationError::Fraction => {
                E::custom(format!("{EXPECTED_DURATION} ({error})"))
            }
            _ => E::custom(EXPECTED_DURATION),
        })
    }

    // A bare number is almost always a forgotten unit: say so rather than guess seconds.
    fn visit_u64<E: de::Error>(self, value: u64) -> Result<Duration, E> {
        Err(E::custom(format!(
            "{EXPECTED_DURATION} (add a unit to {value}, such as {value}s)"
        )))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<Duration, E> {
        Err(E::custom(format!("{EXPECTED_DURATION} (found {value})")))
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<Duration, E> {
        Err(E::custom(format!("{EXPECTED_DURATION} (found {value})")))
    }
}

fn unit_duration(unit: &str, value: u64) -> Result<std::time::Duration, ParseDurationError> {
    let overflow = ParseDurationError::Overflow;
    let duration = match unit {
        "ns" => std::time::Duration::from_nanos(value),
        "us" => std::time::Duration::from_micros(value),
        "ms" => std::time::Duration::from_millis(value),
        "s" => std::time::Duration::from_secs(value),
        "m" => std::time::Duration::from_secs(value.checked_mul(60).ok_or(overflow)?),
        "h" => std::time::Duration::from_secs(value.checked_mul(3600).ok_or(overflow)?),
        "d" => std::time::Duration::from_secs(value.checked_mul(86_400).ok_or(overflow)?),
        _ => {
            return Err(ParseDurationError::UnknownUnit {
                unit: unit.to_string(),
            })
        }
    };
    Ok(duration)
}

/// Seconds for people reading a list, in the two largest units: `12h0m`, `29m59s`, `3d4h`, `5s`
/// (the CLI's and the web UI's "valid for", "age"). Not a [`Duration`]'s Display, which is exact.
pub fn human(secs: u64) -> String {
    let (d, h, m, s) = (
        secs / 86400,
        secs % 86400 / 3600,
        secs % 3600 / 60,
        secs % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, _) => format!("{h}h{m}m"),
        _ => format!("{d}d{h}h"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn secs(text: &str) -> u64 {
        Duration::parse(text).unwrap().as_secs()
    }

    #[test]
    fn parses_the_documented_forms() {
        assert_eq!(secs("90s"), 90);
        assert_eq!(secs("30m"), 1800);
        assert_eq!(secs("12h"), 43_200);
        assert_eq!(secs("1h30m"), 5400);
        assert_eq!(secs("7d"), 604_800);
        assert_eq!(Duration::parse("500ms").unwrap().as_millis_u64(), 500);
        assert_eq!(Duration::parse(" 10s ").unwrap(), Duration::from_secs(10));
        assert_eq!(Duration::parse("0s").unwrap(), Duration::ZERO);
    }

    #[test]
    fn rejects_malformed_text() {
        assert_eq!(Duration::parse(""), Err(ParseDurationError::Empty));
        assert_eq!(
            Duration::parse("90"),
            Err(ParseDurationError::MissingUnit {
                number: "90".into()
            })
        );
        assert_eq!(
            Duration::parse("5y"),
            Err(ParseDurationError::UnknownUnit { unit: "y".into() })
        );
        assert!(matches!(
            Duration::parse("h"),
            Err(ParseDurationError::MissingNumber { .. })
        ));
        assert_eq!(Duration::parse("1.5h"), Err(ParseDurationError::Fraction));
        assert!(matches!(
            Duration::parse("-1s"),
            Err(ParseDurationError::MissingNumber { .. })
        ));
        assert!(matches!(
            Duration::parse("1h 30m"),
            Err(ParseDurationError::MissingNumber { .. })
        ));
        assert_eq!(
            Duration::parse("99999999999999999999999s"),
            Err(ParseDurationError::Overflow)
        );
        assert_eq!(
            Duration::parse("18446744073709551615d"),
            Err(ParseDurationError::Overflow)
        );
    }

    #[test]
    fn displays_canonically_and_round_trips() {
        for (input, shown) in [
            ("90s", "1m30s"),
            ("30m", "30m"),
            ("12h", "12h"),
            ("1h30m", "1h30m"),
            ("7d", "7d"),
            ("720h", "30d"),
            ("500ms", "500ms"),
            ("0s", "0s"),
            ("1d1h1m1s1ms1us1ns", "1d1h1m1s1ms1us1ns"),
        ] {
            let parsed = Duration::parse(input).unwrap();
            assert_eq!(parsed.to_string(), shown, "{input}");
            assert_eq!(Duration::parse(shown).unwrap(), parsed, "{input}");
        }
    }

    #[test]
    fn serde_uses_the_string_form() {
        let parsed: Duration = serde_json::from_str("\"1h30m\"").unwrap();
        assert_eq!(parsed, Duration::from_mins(90));
        assert_eq!(serde_json::to_string(&parsed).unwrap(), "\"1h30m\"");

        let error = serde_json::from_str::<Duration>("\"soon\"")
            .unwrap_err()
            .to_string();
        assert!(error.starts_with(EXPECTED_DURATION), "{error}");
        let error = serde_json::from_str::<Duration>("90")
            .unwrap_err()
            .to_string();
        assert!(error.contains("such as 90s"), "{error}");
    }

    #[test]
    fn const_constructors_agree_with_the_parser() {
        assert_eq!(Duration::from_days(30), Duration::parse("720h").unwrap());
        assert_eq!(Duration::from_hours(12), Duration::parse("12h").unwrap());
        assert_eq!(Duration::from_mins(30), Duration::parse("30m").unwrap());
        assert_eq!(
            Duration::from_millis(1500),
            Duration::parse("1s500ms").unwrap()
        );
    }
}
