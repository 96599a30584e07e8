//! Durations as Envoy and Istio write them: `"10s"`, `"250ms"`, `"1.5s"`, `"1m"`, `"1h30m"`, or a
//! bare number of seconds.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserializer, Serializer};

/// Parses `"10s"`, `"250ms"`, `"1.5s"`, `"1m"`, `"2h"`, `"1h30m"`, `"100us"`, `"5ns"`, or a bare
/// (possibly fractional) number of seconds (`"10"`, `"0.5"`). Negative durations are refused.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    let invalid = || {
        format!(
            "invalid duration {text:?}: expected a number with a unit (ns, us, ms, s, m, h), \
             e.g. \"10s\", \"250ms\", \"1.5s\", \"1m\", or a number of seconds"
        )
    };
    if s.is_empty() {
        return Err(invalid());
    }
    if s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let (int, frac) = split_number(s).ok_or_else(invalid)?;
        return scaled(int, frac, 1_000_000_000).ok_or_else(invalid);
    }
    let mut rest = s;
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(invalid)?;
        let (int, frac) = split_number(&rest[..num_len]).ok_or_else(invalid)?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit_nanos: u128 = match &rest[..unit_len] {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(invalid()),
        };
        rest = &rest[unit_len..];
        let nanos = scaled_nanos(int, frac, unit_nanos).ok_or_else(invalid)?;
        total = total.checked_add(nanos).ok_or_else(invalid)?;
    }
    nanos_to_duration(total).ok_or_else(invalid)
}

/// Formats a duration so that [`parse_duration`] reads it back: `"15s"`, `"250ms"`, `"1.5s"`.
pub fn format_duration(d: Duration) -> String {
    let (secs, nanos) = (d.as_secs(), d.subsec_nanos());
    if nanos == 0 {
        format!("{secs}s")
    } else if secs == 0 && nanos % 1_000_000 == 0 {
        format!("{}ms", nanos / 1_000_000)
    } else {
        let frac = format!("{nanos:09}");
        format!("{secs}.{}s", frac.trim_end_matches('0'))
    }
}

fn split_number(s: &str) -> Option<(&str, &str)> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let all_digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !all_digits(int) || !all_digits(frac) {
        return None;
    }
    Some((int, frac))
}

fn scaled(int: &str, frac: &str, unit_nanos: u128) -> Option<Duration> {
    nanos_to_duration(scaled_nanos(int, frac, unit_nanos)?)
}

/// `int.frac` × `unit_nanos`, exactly, truncated to whole nanoseconds.
fn scaled_nanos(int: &str, frac: &str, unit_nanos: u128) -> Option<u128> {
    let int_value: u128 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let frac = &frac[..frac.len().min(18)];
    let frac_value: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().ok()?
    };
    let frac_nanos = frac_value.checked_mul(unit_nanos)? / 10u128.pow(frac.len() as u32);
    int_value.checked_mul(unit_nanos)?.checked_add(frac_nanos)
}

fn nanos_to_duration(nanos: u128) -> Option<Duration> {
    let secs = u64::try_from(nanos / 1_000_000_000).ok()?;
    Some(Duration::new(secs, (nanos % 1_000_000_000) as u32))
}

struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "a duration such as \"10s\", \"250ms\", \"1.5s\", \"1m\", or a number of seconds",
        )
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
        Ok(Duration::from_secs(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
        u64::try_from(v)
            .map(Duration::from_secs)
            .map_err(|_| E::custom(format!("invalid duration {v}: must not be negative")))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
        Duration::try_from_secs_f64(v).map_err(|_| {
            E::custom(format!(
                "invalid duration {v}: must be a finite, non-negative number of seconds"
            ))
        })
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
        parse_duration(v).map_err(E::custom)
    }
}

pub(crate) mod serde_duration {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(DurationVisitor)
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(*d))
    }
}

pub(crate) mod serde_opt_duration {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        d.deserialize_any(DurationVisitor).map(Some)
    }

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&format_duration(*d)),
            None => s.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envoy_and_istio_spellings() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0.250s"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("100us"), Ok(Duration::from_micros(100)));
        assert_eq!(parse_duration("5ns"), Ok(Duration::from_nanos(5)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration(" 0s "), Ok(Duration::ZERO));
    }

    #[test]
    fn refuses_nonsense() {
        for bad in ["", "s", "10x", "-1s", "1.2.3s", ".s", "10 s", "1e3s"] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.starts_with("invalid duration"), "{bad}: {err}");
        }
    }

    #[test]
    fn format_round_trips() {
        for d in [
            Duration::from_secs(15),
            Duration::from_millis(250),
            Duration::from_millis(1500),
            Duration::from_nanos(1_000_000_001),
            Duration::ZERO,
        ] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
        assert_eq!(format_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
    }

    #[derive(serde::Deserialize)]
    struct T {
        #[serde(with = "serde_duration")]
        d: Duration,
    }

    #[test]
    fn yaml_numbers_are_seconds() {
        let t: T = serde_yaml::from_str("d: 3").unwrap();
        assert_eq!(t.d, Duration::from_secs(3));
        let t: T = serde_yaml::from_str("d: 0.25").unwrap();
        assert_eq!(t.d, Duration::from_millis(250));
        let t: T = serde_yaml::from_str("d: 1m").unwrap();
        assert_eq!(t.d, Duration::from_secs(60));
        assert!(serde_yaml::from_str::<T>("d: -3").is_err());
        assert!(serde_yaml::from_str::<T>("d: [1]").is_err());
    }
}
