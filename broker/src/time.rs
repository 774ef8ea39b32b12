//! The clock as an input.
//!
//! Invariant: nothing in the broker reads the system time except [`SystemClock::now`]. Expiry,
//! leeway, TTL and reaper decisions take a [`Clock`] so tests can drive time deterministically.
//! `clippy.toml` bans `OffsetDateTime::now_utc` and `SystemTime::now` elsewhere.

use std::sync::{Arc, Mutex};
use time::{Duration, OffsetDateTime};

/// A source of the current time.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    fn now(&self) -> OffsetDateTime;
}

/// Shared handle to a clock.
pub type SharedClock = Arc<dyn Clock>;

/// The real clock. The only caller of the system time in the code base.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)] // the one permitted call: this is the clock
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

/// A clock that only moves when told to (tests, simulations).
#[derive(Debug)]
pub struct ManualClock(Mutex<OffsetDateTime>);

impl ManualClock {
    pub fn new(start: OffsetDateTime) -> Self {
        Self(Mutex::new(start))
    }
    pub fn at_unix(secs: i64) -> Self {
        Self::new(OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH))
    }
    pub fn set(&self, t: OffsetDateTime) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = t;
    }
    pub fn advance(&self, d: Duration) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *g += d;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why a duration could not be parsed; names the text, which is never a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("invalid duration {text:?}: {reason}")]
    Invalid { text: String, reason: String },
    #[error("duration {0:?} is out of range")]
    OutOfRange(String),
}

/// Parse a human duration such as `15m`, `1h30m`, `900s`.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let std = humantime::parse_duration(s.trim()).map_err(|e| DurationError::Invalid {
        text: s.to_owned(),
        reason: e.to_string(),
    })?;
    Duration::try_from(std).map_err(|_| DurationError::OutOfRange(s.to_owned()))
}

/// Serde helpers for durations written as `15m` in YAML/JSON.
pub mod serde_duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_duration(&s).map_err(serde::de::Error::custom)
    }
    pub fn serialize<S: Serializer>(v: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*v))
    }

    /// For `Option<Duration>` fields.
    pub mod option {
        use serde::{Deserialize, Deserializer, Serializer};
        use time::Duration;
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            let s = Option::<String>::deserialize(d)?;
            s.map(|s| super::super::parse_duration(&s).map_err(serde::de::Error::custom))
                .transpose()
        }
        pub fn serialize<S: Serializer>(v: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match v {
                Some(d) => s.serialize_str(&super::super::format_duration(*d)),
                None => s.serialize_none(),
            }
        }
    }
}

/// Format a duration the way config files write it (`15m`, `1h`, `90s`).
pub fn format_duration(d: Duration) -> String {
    let secs = d.whole_seconds().max(0) as u64;
    humantime::format_duration(std::time::Duration::from_secs(secs))
        .to_string()
        .replace(' ', "")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::at_unix(1_700_000_000);
        assert_eq!(c.now().unix_timestamp(), 1_700_000_000);
        c.advance(Duration::seconds(5));
        assert_eq!(c.now().unix_timestamp(), 1_700_000_005);
    }

    #[test]
    fn durations_round_trip() {
        assert_eq!(parse_duration("15m"), Ok(Duration::minutes(15)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::minutes(90)));
        assert_eq!(format_duration(Duration::minutes(90)), "1h30m");
        let e = parse_duration("soon").unwrap_err().to_string();
        assert!(e.starts_with("invalid duration \"soon\": "), "{e}");
    }
}
