//! Portable JSON forms of the Postgres values that a bare JSON primitive cannot carry exactly.
//!
//! Times are given in Postgres' own units (microseconds or days since 2000-01-01) so the extension
//! converts without loss and clients can use them with any date library.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde_json::{Number, Value};

use crate::calendar::{civil_from_unix_days, format_date as format_civil, parse_date_prefix, two_digits, unix_days_from_civil, PG_EPOCH_UNIX_DAYS};

const MICROS_PER_SECOND: i64 = 1_000_000;
const MICROS_PER_DAY: i64 = 86_400 * MICROS_PER_SECOND;
/// First day Postgres dates and timestamps accept (4714-11-24 BC), in days since 2000-01-01.
const FIRST_PG_DAY: i64 = -2_451_545;
/// The day after the last one a Postgres timestamp accepts (294277-01-01).
const TIMESTAMP_END_PG_DAY: i64 = 106_751_983;
/// The day after the last one a Postgres date accepts (5874898-01-01).
const DATE_END_PG_DAY: i64 = 2_145_031_949;
/// The largest integer every JSON reader holds exactly (2^53).
const SAFE_INTEGER_LIMIT: i64 = 1 << 53;

/// A portable value that does not decode: what was expected, and what came.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("expected {expected}, got {got}")]
pub struct CodecError {
    pub expected: &'static str,
    pub got: String,
}

fn mismatch(expected: &'static str, got: impl std::fmt::Display) -> CodecError {
    CodecError { expected, got: got.to_string() }
}

/// How bigint and numeric values are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NumberMode {
    /// Always strings with their exact digits.
    #[default]
    String,
    /// JSON numbers for integers of magnitude below 2^53 (exact in every JSON reader), strings otherwise.
    NumberWhenSafe,
}

/// The portable form of a bigint or numeric given as its Postgres text (`"3.50"`, `"NaN"`, `"-12"`).
pub fn encode_exact_number(text: &str, mode: NumberMode) -> Value {
    if mode == NumberMode::NumberWhenSafe {
        if let Ok(integer) = text.parse::<i64>() {
            if integer.unsigned_abs() < SAFE_INTEGER_LIMIT as u64 {
                return Value::from(integer);
            }
        }
    }
    Value::String(text.to_owned())
}

/// The Postgres text of a bigint or numeric from its portable form: a string of exact digits
/// (`"3.50"`, `"1e-5"`, `"NaN"`, `"Infinity"`, `"-Infinity"`) or a JSON integer.
pub fn decode_exact_number(value: &Value) -> Result<String, CodecError> {
    const EXPECTED: &str = "a string of exact digits like \"3.50\" (or a JSON integer)";
    match value {
        Value::String(text) if is_decimal_text(text) || matches!(text.as_str(), "NaN" | "Infinity" | "-Infinity") => {
            Ok(text.clone())
        }
        Value::Number(number) if number.is_i64() || number.is_u64() => Ok(number.to_string()),
        other => Err(mismatch(EXPECTED, other)),
    }
}

fn is_decimal_text(text: &str) -> bool {
    let unsigned = text.strip_prefix(['-', '+']).unwrap_or(text);
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(at) => (&unsigned[..at], Some(&unsigned[at + 1..])),
        None => (unsigned, None),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['-', '+']).unwrap_or(e);
        !e.is_empty() && e.len() <= 6 && digits(e)
    });
    !(whole.is_empty() && fraction.is_empty()) && digits(whole) && digits(fraction) && exponent_ok
}

/// A smallint or integer from a JSON integer within `min..=max`.
pub fn decode_integer(value: &Value, min: i64, max: i64) -> Result<i64, CodecError> {
    value
        .as_i64()
        .filter(|integer| (min..=max).contains(integer))
        .ok_or_else(|| mismatch(if max <= i64::from(i16::MAX) { "a JSON integer from -32768 to 32767" } else { "a JSON integer from -2147483648 to 2147483647" }, value))
}

/// A double as JSON: a number, or `"NaN"`, `"Infinity"`, `"-Infinity"`, and `"-0"` for negative zero
/// (jsonb cannot hold a negative zero).
pub fn encode_double(number: f64) -> Value {
    encode_float_with(number, || Number::from_f64(number).map(Value::Number))
}

/// A real as JSON, written with the shortest digits that read back as the same real.
pub fn encode_real(number: f32) -> Value {
    encode_float_with(f64::from(number), || serde_json::from_str::<Value>(&format!("{number:e}")).ok())
}

fn encode_float_with(number: f64, finite: impl FnOnce() -> Option<Value>) -> Value {
    if number.is_nan() {
        Value::from("NaN")
    } else if number.is_infinite() {
        Value::from(if number > 0.0 { "Infinity" } else { "-Infinity" })
    } else if number == 0.0 && number.is_sign_negative() {
        Value::from("-0")
    } else {
        finite().expect("finite floats are JSON numbers")
    }
}

/// A double from its portable form.
pub fn decode_double(value: &Value) -> Result<f64, CodecError> {
    decode_float_text(value)?.parse().map_err(|_| mismatch(FLOAT_EXPECTED, value))
}

/// A real from its portable form (read from the JSON digits directly, so no double rounding).
pub fn decode_real(value: &Value) -> Result<f32, CodecError> {
    let real: f32 = decode_float_text(value)?.parse().map_err(|_| mismatch(FLOAT_EXPECTED, value))?;
    if real.is_infinite() && !matches!(value, Value::String(_)) {
        return Err(mismatch("a JSON number within the range of real", value));
    }
    Ok(real)
}

const FLOAT_EXPECTED: &str = "a JSON number or \"NaN\", \"Infinity\", \"-Infinity\", \"-0\"";

fn decode_float_text(value: &Value) -> Result<String, CodecError> {
    match value {
        Value::Number(number) => Ok(number.to_string()),
        Value::String(text) if matches!(text.as_str(), "NaN" | "Infinity" | "-Infinity" | "-0") => Ok(match text.as_str() {
            "Infinity" => "inf".to_owned(),
            "-Infinity" => "-inf".to_owned(),
            other => other.to_owned(),
        }),
        other => Err(mismatch(FLOAT_EXPECTED, other)),
    }
}

/// Bytes as standard padded base64.
pub fn encode_bytes(bytes: &[u8]) -> Value {
    Value::String(BASE64.encode(bytes))
}

/// Bytes from standard padded base64.
pub fn decode_bytes(value: &Value) -> Result<Vec<u8>, CodecError> {
    const EXPECTED: &str = "a string of standard padded base64";
    let text = value.as_str().ok_or_else(|| mismatch(EXPECTED, value))?;
    BASE64.decode(text).map_err(|_| mismatch(EXPECTED, value))
}

/// A timestamp (microseconds since 2000-01-01, `i64::MIN`/`i64::MAX` for -infinity/infinity) as
/// ISO 8601: `2026-11-24T10:00:00.123456Z` with a zone (always UTC), without `Z` otherwise.
/// Microseconds are written only when not zero.
pub fn format_timestamp(micros: i64, with_zone: bool) -> String {
    match micros {
        i64::MAX => "infinity".to_owned(),
        i64::MIN => "-infinity".to_owned(),
        _ => {
            let date = format_civil(civil_from_unix_days(micros.div_euclid(MICROS_PER_DAY) + PG_EPOCH_UNIX_DAYS));
            let time = format_time(micros.rem_euclid(MICROS_PER_DAY));
            format!("{date}T{time}{}", if with_zone { "Z" } else { "" })
        }
    }
}

/// Parses a timestamp. With a zone: a `Z` or `+HH:MM`/`-HH:MM` offset is required; without: none is allowed.
pub fn parse_timestamp(value: &Value, with_zone: bool) -> Result<i64, CodecError> {
    let expected = if with_zone {
        "an ISO 8601 timestamp with a zone like \"2026-11-24T10:00:00.123456Z\", or \"infinity\", \"-infinity\""
    } else {
        "an ISO 8601 timestamp without a zone like \"2026-11-24T10:00:00.123456\", or \"infinity\", \"-infinity\""
    };
    let bad = || mismatch(expected, value);
    let text = value.as_str().ok_or_else(bad)?;
    match text {
        "infinity" => return Ok(i64::MAX),
        "-infinity" => return Ok(i64::MIN),
        _ => {}
    }
    let (date, rest) = parse_date_prefix(text).ok_or_else(bad)?;
    let rest = rest.strip_prefix(['T', ' ']).ok_or_else(bad)?;
    let time_len = rest.find(['Z', '+', '-']).unwrap_or(rest.len());
    let (time, zone) = rest.split_at(time_len);
    let offset_micros = match (with_zone, zone) {
        (false, "") => 0,
        (true, "Z") => 0,
        (true, offset) if offset.len() == 6 && offset.as_bytes()[3] == b':' => {
            let (hours, minutes) = (two_digits(&offset[1..3]).ok_or_else(bad)?, two_digits(&offset[4..6]).ok_or_else(bad)?);
            if hours > 15 || minutes > 59 {
                return Err(bad());
            }
            let magnitude = i64::from(hours * 60 + minutes) * 60 * MICROS_PER_SECOND;
            if offset.starts_with('-') { -magnitude } else { magnitude }
        }
        _ => return Err(bad()),
    };
    let days = unix_days_from_civil(date).ok_or_else(bad)? - PG_EPOCH_UNIX_DAYS;
    let time_micros = parse_time_text(time).filter(|&t| t < MICROS_PER_DAY).ok_or_else(bad)?;
    let micros = days
        .checked_mul(MICROS_PER_DAY)
        .and_then(|m| m.checked_add(time_micros))
        .and_then(|m| m.checked_sub(offset_micros))
        .ok_or_else(bad)?;
    let in_range = (FIRST_PG_DAY * MICROS_PER_DAY..TIMESTAMP_END_PG_DAY * MICROS_PER_DAY).contains(&micros);
    in_range.then_some(micros).ok_or_else(bad)
}

/// A date (days since 2000-01-01, `i32::MIN`/`i32::MAX` for -infinity/infinity) as `YYYY-MM-DD`.
pub fn format_date(days: i32) -> String {
    match days {
        i32::MAX => "infinity".to_owned(),
        i32::MIN => "-infinity".to_owned(),
        _ => format_civil(civil_from_unix_days(i64::from(days) + PG_EPOCH_UNIX_DAYS)),
    }
}

/// Parses a date written by [`format_date`].
pub fn parse_date(value: &Value) -> Result<i32, CodecError> {
    let bad = || mismatch("a date like \"2026-11-24\", or \"infinity\", \"-infinity\"", value);
    match value.as_str().ok_or_else(bad)? {
        "infinity" => Ok(i32::MAX),
        "-infinity" => Ok(i32::MIN),
        text => {
            let (date, rest) = parse_date_prefix(text).filter(|(_, rest)| rest.is_empty()).ok_or_else(bad)?;
            debug_assert!(rest.is_empty());
            let days = unix_days_from_civil(date).ok_or_else(bad)? - PG_EPOCH_UNIX_DAYS;
            let days = (FIRST_PG_DAY..DATE_END_PG_DAY).contains(&days).then_some(days).ok_or_else(bad)?;
            i32::try_from(days).map_err(|_| bad())
        }
    }
}

/// A time of day (microseconds since midnight, up to 24:00:00) as `HH:MM:SS[.ffffff]`.
pub fn format_time(micros: i64) -> String {
    let seconds = micros / MICROS_PER_SECOND;
    let fraction = micros % MICROS_PER_SECOND;
    let hms = format!("{:02}:{:02}:{:02}", seconds / 3_600, seconds / 60 % 60, seconds % 60);
    if fraction == 0 { hms } else { format!("{hms}.{fraction:06}") }
}

/// Parses a time of day written by [`format_time`] (1 to 6 fraction digits).
pub fn parse_time(value: &Value) -> Result<i64, CodecError> {
    let bad = || mismatch("a time like \"10:00:00.5\"", value);
    let micros = value.as_str().and_then(parse_time_text).ok_or_else(bad)?;
    (micros <= MICROS_PER_DAY).then_some(micros).ok_or_else(bad)
}

fn parse_time_text(text: &str) -> Option<i64> {
    let (hms, fraction) = text.split_once('.').unwrap_or((text, ""));
    let bytes = hms.as_bytes();
    if bytes.len() != 8 || bytes[2] != b':' || bytes[5] != b':' {
        return None;
    }
    let (hours, minutes, seconds) = (two_digits(&hms[0..2])?, two_digits(&hms[3..5])?, two_digits(&hms[6..8])?);
    if hours > 24 || minutes > 59 || seconds > 59 {
        return None;
    }
    let fraction_micros = if text.contains('.') { fraction_micros(fraction)? } else { 0 };
    let micros = i64::from((hours * 60 + minutes) * 60 + seconds) * MICROS_PER_SECOND + fraction_micros;
    (hours < 24 || micros == MICROS_PER_DAY).then_some(micros)
}

fn fraction_micros(digits: &str) -> Option<i64> {
    if digits.is_empty() || digits.len() > 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    format!("{digits:0<6}").parse().ok()
}

/// An interval as an ISO 8601 duration with signed parts, e.g. `P1Y2M-3DT4H5M6.5S` (`PT0S` when zero).
pub fn format_interval(months: i32, days: i32, micros: i64) -> String {
    let mut text = String::from("P");
    for (amount, unit) in [(months / 12, 'Y'), (months % 12, 'M'), (days, 'D')] {
        if amount != 0 {
            text.push_str(&format!("{amount}{unit}"));
        }
    }
    let seconds = micros / MICROS_PER_SECOND;
    let fraction = (micros % MICROS_PER_SECOND).unsigned_abs();
    let mut time = String::new();
    for (amount, unit) in [(seconds / 3_600, 'H'), (seconds / 60 % 60, 'M')] {
        if amount != 0 {
            time.push_str(&format!("{amount}{unit}"));
        }
    }
    if seconds % 60 != 0 || fraction != 0 {
        let sign = if micros < 0 && seconds % 60 == 0 { "-" } else { "" };
        let fraction_text = format!("{fraction:06}");
        let fraction_text = fraction_text.trim_end_matches('0');
        let dot = if fraction_text.is_empty() { "" } else { "." };
        time.push_str(&format!("{sign}{}{dot}{fraction_text}S", seconds % 60));
    }
    if !time.is_empty() {
        text.push('T');
        text.push_str(&time);
    }
    if text == "P" { "PT0S".to_owned() } else { text }
}

/// Parses an ISO 8601 duration (`P[nY][nM][nW][nD][T[nH][nM][n[.f]S]]`, each part optionally signed)
/// into Postgres' (months, days, microseconds).
pub fn parse_interval(value: &Value) -> Result<(i32, i32, i64), CodecError> {
    let bad = || mismatch("an ISO 8601 duration like \"P1Y2M3DT4H5M6.5S\"", value);
    let text = value.as_str().ok_or_else(bad)?;
    let body = text.strip_prefix('P').filter(|body| !body.is_empty()).ok_or_else(bad)?;
    let (date_part, time_part) = match body.split_once('T') {
        Some((_, "")) => return Err(bad()),
        Some((date, time)) => (date, Some(time)),
        None => (body, None),
    };
    let (mut months, mut days, mut micros) = (0i64, 0i64, 0i64);
    for (amount, unit) in duration_parts(date_part).ok_or_else(bad)? {
        let whole = amount.whole;
        if amount.fraction_micros != 0 {
            return Err(bad());
        }
        match unit {
            'Y' => months += whole.checked_mul(12).ok_or_else(bad)?,
            'M' => months += whole,
            'W' => days += whole.checked_mul(7).ok_or_else(bad)?,
            'D' => days += whole,
            _ => return Err(bad()),
        }
    }
    for (amount, unit) in time_part.map(duration_parts).unwrap_or(Some(Vec::new())).ok_or_else(bad)? {
        let scale = match unit {
            'H' => 3_600 * MICROS_PER_SECOND,
            'M' => 60 * MICROS_PER_SECOND,
            'S' => MICROS_PER_SECOND,
            _ => return Err(bad()),
        };
        if unit != 'S' && amount.fraction_micros != 0 {
            return Err(bad());
        }
        let part = amount.whole.checked_mul(scale).and_then(|m| m.checked_add(amount.fraction_micros)).ok_or_else(bad)?;
        micros = micros.checked_add(part).ok_or_else(bad)?;
    }
    Ok((i32::try_from(months).map_err(|_| bad())?, i32::try_from(days).map_err(|_| bad())?, micros))
}

struct DurationAmount {
    whole: i64,
    /// Signed like `whole`.
    fraction_micros: i64,
}

fn duration_parts(text: &str) -> Option<Vec<(DurationAmount, char)>> {
    let mut parts = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let unit_at = rest.find(|c: char| c.is_ascii_alphabetic())?;
        let (number, tail) = rest.split_at(unit_at);
        let unit = tail.chars().next()?;
        rest = &tail[1..];
        let negative = number.starts_with('-');
        let unsigned = number.strip_prefix(['-', '+']).unwrap_or(number);
        let (whole, fraction) = unsigned.split_once('.').unwrap_or((unsigned, ""));
        if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let whole: i64 = whole.parse().ok()?;
        let fraction = if unsigned.contains('.') { fraction_micros(fraction)? } else { 0 };
        let sign = if negative { -1 } else { 1 };
        parts.push((DurationAmount { whole: sign * whole, fraction_micros: sign * fraction }, unit));
    }
    Some(parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn exact_numbers_keep_their_digits() {
        assert_eq!(encode_exact_number("3.50", NumberMode::String), json!("3.50"));
        assert_eq!(encode_exact_number("42", NumberMode::NumberWhenSafe), json!(42));
        assert_eq!(encode_exact_number("9007199254740992", NumberMode::NumberWhenSafe), json!("9007199254740992"));
        assert_eq!(encode_exact_number("9007199254740991", NumberMode::NumberWhenSafe), json!(9007199254740991i64));
        assert_eq!(encode_exact_number("3.0", NumberMode::NumberWhenSafe), json!("3.0"));
        assert_eq!(decode_exact_number(&json!("-1.5e-3")).unwrap(), "-1.5e-3");
        assert_eq!(decode_exact_number(&json!(12)).unwrap(), "12");
        for bad in [json!("abc"), json!(""), json!("1.2.3"), json!("."), json!(1.5), json!(null), json!("1e")] {
            assert!(decode_exact_number(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn floats_round_trip_bit_for_bit() {
        for x in [0.0, -0.0, 1.5, f64::MIN_POSITIVE, 5e-324, f64::MAX, -f64::MAX, 0.1, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let back = decode_double(&encode_double(x)).unwrap();
            assert!(back.to_bits() == x.to_bits() || (x.is_nan() && back.is_nan()), "{x}");
        }
        for x in [0.1f32, -0.0, 1e-45, f32::MAX, f32::MIN_POSITIVE, 16_777_217.0, f32::NAN, f32::NEG_INFINITY] {
            let back = decode_real(&encode_real(x)).unwrap();
            assert!(back.to_bits() == x.to_bits() || (x.is_nan() && back.is_nan()), "{x}");
        }
        assert_eq!(encode_real(0.1), json!(0.1));
        assert_eq!(encode_double(-0.0), json!("-0"));
        assert!(decode_real(&json!(1e300)).is_err());
    }

    #[test]
    fn timestamps_are_iso_8601_utc_with_microseconds_when_present() {
        let z = |text: &str| parse_timestamp(&json!(text), true).unwrap();
        assert_eq!(format_timestamp(0, true), "2000-01-01T00:00:00Z");
        let micros = z("2026-11-24T10:00:00.123456Z");
        assert_eq!(format_timestamp(micros, true), "2026-11-24T10:00:00.123456Z");
        assert_eq!(z("2026-11-24T12:00:00.5+02:00"), z("2026-11-24T10:00:00.500000Z"));
        assert_eq!(format_timestamp(i64::MAX, true), "infinity");
        assert_eq!(z("-infinity"), i64::MIN);
        let first = z("-004713-11-24T00:00:00Z");
        assert_eq!(format_timestamp(first, true), "-004713-11-24T00:00:00Z");
        assert!(parse_timestamp(&json!("-004713-11-23T23:59:59.999999Z"), true).is_err());
        let last = z("+294276-12-31T23:59:59.999999Z");
        assert_eq!(format_timestamp(last, true), "+294276-12-31T23:59:59.999999Z");
        assert!(parse_timestamp(&json!("+294277-01-01T00:00:00Z"), true).is_err());
        assert_eq!(format_timestamp(parse_timestamp(&json!("1999-12-31T23:59:59.999999"), false).unwrap(), false), "1999-12-31T23:59:59.999999");
        for bad in ["2026-11-24T10:00:00", "2026-11-24T10:00:00.1234567Z", "2026-11-24T25:00:00Z", "2026-02-30T00:00:00Z", "x"] {
            assert!(parse_timestamp(&json!(bad), true).is_err(), "{bad}");
        }
        assert!(parse_timestamp(&json!("2026-11-24T10:00:00Z"), false).is_err());
    }

    #[test]
    fn dates_times_and_intervals_round_trip() {
        for days in [0, -1, 9_000, -2_451_545, 2_145_031_948, i32::MAX, i32::MIN] {
            assert_eq!(parse_date(&json!(format_date(days))).unwrap(), days);
        }
        assert_eq!(format_date(9_824), "2026-11-24");
        assert!(parse_date(&json!("+5874898-01-01")).is_err());
        for micros in [0, 1, 86_399_999_999, MICROS_PER_DAY, 37_230_500_000] {
            assert_eq!(parse_time(&json!(format_time(micros))).unwrap(), micros);
        }
        assert_eq!(format_time(37_230_500_000), "10:20:30.500000");
        assert!(parse_time(&json!("24:00:00.1")).is_err());
        for (months, days, micros) in [(0, 0, 0), (14, 3, 14_706_500_000), (-14, -3, -14_706_500_000), (1, -1, 1), (0, 0, -500_000), (i32::MAX, i32::MIN, i64::MAX), (i32::MIN, 0, i64::MIN + 1)] {
            let text = format_interval(months, days, micros);
            assert_eq!(parse_interval(&json!(text)).unwrap(), (months, days, micros), "{text}");
        }
        assert_eq!(format_interval(14, 3, 14_706_500_000), "P1Y2M3DT4H5M6.5S");
        assert_eq!(format_interval(0, 0, 0), "PT0S");
        assert_eq!(format_interval(0, 0, -500_000), "PT-0.5S");
        assert_eq!(parse_interval(&json!("P2W")).unwrap(), (0, 14, 0));
        for bad in ["", "P", "PT", "1D", "P1.5D", "PT1.5H", "P1X"] {
            assert!(parse_interval(&json!(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn bytes_are_padded_base64() {
        let every_byte: Vec<u8> = (0..=255).collect();
        assert_eq!(decode_bytes(&encode_bytes(&every_byte)).unwrap(), every_byte);
        assert_eq!(encode_bytes(b""), json!(""));
        assert_eq!(encode_bytes(b"ab"), json!("YWI="));
        assert!(decode_bytes(&json!("YWI")).is_err());
    }
}
