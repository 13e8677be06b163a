//! Hybrid logical clock stamps: `YYYY-MM-DDTHH:MM:SS.sssZ-XXXX`.
//!
//! The wall time is UTC with milliseconds; `XXXX` is a logical counter in four uppercase hex digits.
//! The text is fixed width, so comparing two stamps as strings orders them in time.

use std::fmt;
use std::str::FromStr;

use crate::calendar::{civil_from_unix_days, format_date, unix_days_from_civil, CivilDate};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Length of an HLC in its wire form.
pub const HLC_TEXT_LEN: usize = 29;

/// One HLC reading: milliseconds since the Unix epoch and a logical counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hlc {
    millis: i64,
    counter: u16,
}

/// Why a text is not an HLC.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("expected an HLC like 2026-11-24T10:00:00.000Z-0001 (UTC wall time from 1970 on, a dash, 4 uppercase hex digits), got {0:?}")]
pub struct HlcParseError(pub String);

/// First and last wall times an HLC can carry: the Unix epoch, and the end of year 9999 (4 year digits).
const MIN_MILLIS: i64 = 0;
const MAX_MILLIS: i64 = 253_402_300_799_999;

impl Hlc {
    /// A stamp from its parts; `None` when the wall time is before 1970 or after year 9999.
    pub fn new(millis: i64, counter: u16) -> Option<Self> {
        (MIN_MILLIS..=MAX_MILLIS).contains(&millis).then_some(Self { millis, counter })
    }

    /// Wall time in milliseconds since the Unix epoch.
    pub fn millis(&self) -> i64 {
        self.millis
    }

    /// Logical counter.
    pub fn counter(&self) -> u16 {
        self.counter
    }
}

const MILLIS_PER_DAY: i64 = 86_400_000;

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let date = format_date(civil_from_unix_days(self.millis.div_euclid(MILLIS_PER_DAY)));
        let ms = self.millis.rem_euclid(MILLIS_PER_DAY);
        let (hours, minutes, seconds) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1_000 % 60);
        write!(f, "{date}T{hours:02}:{minutes:02}:{seconds:02}.{:03}Z-{:04X}", ms % 1_000, self.counter)
    }
}

impl FromStr for Hlc {
    type Err = HlcParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = || HlcParseError(text.to_owned());
        let b = text.as_bytes();
        if b.len() != HLC_TEXT_LEN {
            return Err(err());
        }
        let digits = |range: std::ops::Range<usize>| -> Result<u32, HlcParseError> {
            b[range.clone()]
                .iter()
                .try_fold(0u32, |acc, &c| c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0')))
                .ok_or_else(err)
        };
        let punctuation = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':'), (19, b'.'), (23, b'Z'), (24, b'-')];
        if punctuation.iter().any(|&(at, c)| b[at] != c) {
            return Err(err());
        }
        let counter_hex = &b[25..29];
        if !counter_hex.iter().all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(c)) {
            return Err(err());
        }
        let counter = u16::from_str_radix(&text[25..29], 16).map_err(|_| err())?;
        let date = CivilDate { year: i64::from(digits(0..4)?), month: digits(5..7)?, day: digits(8..10)? };
        let days = unix_days_from_civil(date).ok_or_else(err)?;
        let (hours, minutes, seconds) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
        if hours > 23 || minutes > 59 || seconds > 59 {
            return Err(err());
        }
        let time_of_day = i64::from(((hours * 60 + minutes) * 60 + seconds) * 1_000 + digits(20..23)?);
        Hlc::new(days * MILLIS_PER_DAY + time_of_day, counter).ok_or_else(err)
    }
}

impl Serialize for Hlc {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Hlc {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A hybrid logical clock: it never goes backwards and moves past every stamp it observes,
/// so a change made after seeing another always carries a larger stamp.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HlcClock {
    last: Option<Hlc>,
}

impl HlcClock {
    /// A clock that resumes after `last` (the value persisted by a previous run).
    pub fn resume(last: Option<Hlc>) -> Self {
        Self { last }
    }

    /// The latest stamp issued or observed.
    pub fn last(&self) -> Option<Hlc> {
        self.last
    }

    /// Issues a stamp for a local change, given the wall clock in milliseconds.
    pub fn tick(&mut self, wall_millis: i64) -> Hlc {
        let next = match self.last {
            Some(last) if last.millis >= wall_millis => successor(last),
            _ => Hlc::new(wall_millis, 0).expect("wall clock between 1970 and year 9999"),
        };
        self.last = Some(next);
        next
    }

    /// Moves the clock past a stamp received from elsewhere.
    pub fn observe(&mut self, seen: Hlc) {
        if self.last.is_none_or(|last| seen > last) {
            self.last = Some(seen);
        }
    }
}

/// The smallest stamp greater than `hlc`: the next counter, or the next millisecond once the counter is full.
fn successor(hlc: Hlc) -> Hlc {
    match hlc.counter.checked_add(1) {
        Some(counter) => Hlc { millis: hlc.millis, counter },
        None => Hlc::new(hlc.millis + 1, 0).expect("HLC wall time before year 9999"),
    }
}

/// The current wall clock in milliseconds since the Unix epoch.
pub fn wall_clock_millis() -> i64 {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the system clock is after 1970");
    i64::try_from(since_epoch.as_millis()).expect("the system clock is before year 9999")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_the_wire_form() {
        let hlc: Hlc = "2026-11-24T10:00:00.000Z-0001".parse().unwrap();
        assert_eq!(hlc.counter(), 1);
        assert_eq!(hlc.millis(), 1_795_514_400_000);
        assert_eq!(hlc.to_string(), "2026-11-24T10:00:00.000Z-0001");
        let edge: Hlc = "9999-12-31T23:59:59.999Z-FFFF".parse().unwrap();
        assert_eq!(edge.to_string(), "9999-12-31T23:59:59.999Z-FFFF");
        let epoch: Hlc = "1970-01-01T00:00:00.000Z-0000".parse().unwrap();
        assert_eq!(epoch.millis(), 0);
    }

    #[test]
    fn rejects_every_malformed_text() {
        for bad in [
            "",
            "1969-12-31T23:59:59.999Z-0000",
            "2026-11-24T10:00:00.000Z-001",
            "2026-11-24T10:00:00.000Z-00001",
            "2026-11-24T10:00:00.000Z-000a",
            "2026-11-24 10:00:00.000Z-0001",
            "2026-13-24T10:00:00.000Z-0001",
            "2026-02-30T10:00:00.000Z-0001",
            "2026-11-24T24:00:00.000Z-0001",
            "2026-11-24T10:00:00.000+0001",
            "+026-11-24T10:00:00.000Z-0001",
            "2026-11-24T10:00:00,000Z-0001",
            "2026-11-24T10:00:0٠.000Z-001",
        ] {
            assert!(bad.parse::<Hlc>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn string_order_is_time_order() {
        let a: Hlc = "2026-11-24T10:00:00.000Z-FFFF".parse().unwrap();
        let b: Hlc = "2026-11-24T10:00:00.001Z-0000".parse().unwrap();
        assert!(a < b);
        assert!(a.to_string() < b.to_string());
    }

    #[test]
    fn clock_is_monotonic_and_moves_past_observed_stamps() {
        let mut clock = HlcClock::default();
        let first = clock.tick(1_000);
        let same_ms = clock.tick(1_000);
        assert!(same_ms > first);
        let wall_went_back = clock.tick(500);
        assert!(wall_went_back > same_ms);
        let remote = Hlc::new(9_000, 7).unwrap();
        clock.observe(remote);
        assert!(clock.tick(2_000) > remote);
        let mut full = HlcClock::resume(Hlc::new(3_000, u16::MAX));
        assert_eq!(full.tick(3_000), Hlc::new(3_001, 0).unwrap());
    }
}
