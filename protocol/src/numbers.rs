//! JSON numbers are carried exactly or refused, never rounded.
//!
//! A JSON number travels as what every reader (serde, JavaScript, MessagePack) holds: a 64-bit integer or
//! a double. A number written with more precision than that (`18446744073709551617`, thirty digits,
//! `0.1000000000000000055511151231257827`) would be rounded silently, so it is refused: send it as a
//! string. A number is carried exactly when it is an integer within the signed or unsigned 64-bit
//! range, or when the double nearest to it reads back, in its shortest form, as the same value.
//!
//! The payload hash writes every number in one canonical form, so `1`, `1.0` and `1e0` hash alike.

use crate::change::WireError;

/// Whether a JSON number literal is carried exactly (see the module documentation).
pub fn is_exact(literal: &str) -> bool {
    if literal.parse::<i64>().is_ok() || literal.parse::<u64>().is_ok() {
        return true;
    }
    match literal.parse::<f64>() {
        Ok(double) if double.is_finite() => decimal(literal) == decimal(&double.to_string()),
        _ => false,
    }
}

/// A decimal number as (negative, significant digits without leading or trailing zeros, exponent of
/// the last digit), so that equal values compare equal whatever their spelling. Zero is `(false, "", 0)`.
fn decimal(literal: &str) -> (bool, String, i64) {
    let (negative, unsigned) = match literal.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, literal.strip_prefix('+').unwrap_or(literal)),
    };
    let (mantissa, exponent) = match unsigned.split_once(['e', 'E']) {
        Some((mantissa, exponent)) => (mantissa, exponent.parse::<i64>().unwrap_or(0)),
        None => (unsigned, 0),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = format!("{whole}{fraction}");
    let significant = digits.trim_start_matches('0');
    let trimmed = significant.trim_end_matches('0');
    if trimmed.is_empty() {
        return (false, String::new(), 0);
    }
    let trailing_zeros = (significant.len() - trimmed.len()) as i64;
    (negative, trimmed.to_owned(), exponent - fraction.len() as i64 + trailing_zeros)
}

/// Writes a number in its canonical form for hashing: an integer's digits, or the shortest form of its
/// double (`1.0` and `1e0` both as `1`).
pub fn write_canonical(number: &serde_json::Number, out: &mut Vec<u8>) {
    let text = match (number.as_i64(), number.as_u64(), number.as_f64()) {
        (Some(integer), _, _) => integer.to_string(),
        (_, Some(integer), _) => integer.to_string(),
        (_, _, Some(double)) if double.fract() == 0.0 && double.abs() < 9.007_199_254_740_992e15 => format!("{}", double as i64),
        (_, _, Some(double)) => double.to_string(),
        _ => number.to_string(),
    };
    out.extend_from_slice(text.as_bytes());
}

/// How deep a JSON text may nest before it is read (below serde's own limit, so the scanner and the
/// parser never recurse further).
pub const MAX_JSON_DEPTH: usize = 120;

/// Checks every number of a JSON text (`root` names the whole text in the error, e.g. `changes`) and
/// fails with 22023 naming the first that is not carried exactly (`changes[0].value.n: 1e400 ...`), or
/// where the text nests more than [`MAX_JSON_DEPTH`] levels.
pub fn check_json_numbers(text: &str, root: &str) -> Result<(), WireError> {
    let mut scanner = Scanner { bytes: text.as_bytes(), at: 0, path: Vec::new() };
    scanner.value().map_err(|problem| {
        let literal = match problem {
            Problem::TooDeep => {
                let start: String = scanner.path.iter().take(3).map(Segment::to_string).collect();
                return WireError::invalid(format!("{root}{start}"), format!("is nested more than {MAX_JSON_DEPTH} levels deep"));
            }
            Problem::Inexact(literal) => literal,
        };
        // Postgres writes numbers out in full (1e400 as 401 digits): name a long one by its start.
        let literal = match literal.char_indices().nth(40) {
            Some((cut, _)) => format!("{}... ({} characters)", &literal[..cut], literal.len()),
            None => literal,
        };
        WireError::invalid(
            format!("{root}{}", scanner.path.iter().map(Segment::to_string).collect::<String>()),
            format!("the number {literal} cannot be carried exactly as a JSON number (send it as a string)"),
        )
    })
}

/// Where in a JSON document the scanner is.
enum Segment {
    Index(usize),
    Key(String),
}

impl std::fmt::Display for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Segment::Index(index) => write!(f, "[{index}]"),
            Segment::Key(key) => write!(f, ".{key}"),
        }
    }
}

/// Why the scanner stopped.
enum Problem {
    /// A number that is not carried exactly, as written.
    Inexact(String),
    /// Nesting deeper than [`MAX_JSON_DEPTH`].
    TooDeep,
}

/// A scanner over valid JSON (as Postgres writes jsonb) that stops at the first inexact number or at
/// too deep a nesting, with the path to it.
struct Scanner<'a> {
    bytes: &'a [u8],
    at: usize,
    path: Vec<Segment>,
}

impl Scanner<'_> {
    fn skip_whitespace(&mut self) {
        while self.bytes.get(self.at).is_some_and(u8::is_ascii_whitespace) {
            self.at += 1;
        }
    }

    /// Scans one value.
    fn value(&mut self) -> Result<(), Problem> {
        self.skip_whitespace();
        match self.bytes.get(self.at) {
            Some(b'{') => self.container(b'}', true),
            Some(b'[') => self.container(b']', false),
            Some(b'"') => {
                self.string();
                Ok(())
            }
            Some(b'-' | b'0'..=b'9') => {
                let start = self.at;
                while self.bytes.get(self.at).is_some_and(|byte| matches!(byte, b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')) {
                    self.at += 1;
                }
                let literal = String::from_utf8_lossy(&self.bytes[start..self.at]).into_owned();
                if is_exact(&literal) { Ok(()) } else { Err(Problem::Inexact(literal)) }
            }
            _ => {
                // true, false, null
                while self.bytes.get(self.at).is_some_and(u8::is_ascii_alphabetic) {
                    self.at += 1;
                }
                Ok(())
            }
        }
    }

    fn container(&mut self, close: u8, object: bool) -> Result<(), Problem> {
        if self.path.len() >= MAX_JSON_DEPTH {
            return Err(Problem::TooDeep);
        }
        self.at += 1;
        let mut index = 0;
        loop {
            self.skip_whitespace();
            match self.bytes.get(self.at) {
                None => return Ok(()),
                Some(&byte) if byte == close => {
                    self.at += 1;
                    return Ok(());
                }
                Some(b',') => {
                    self.at += 1;
                    continue;
                }
                _ => {}
            }
            let segment = if object {
                let key = self.string();
                self.skip_whitespace();
                self.at += 1; // the colon
                Segment::Key(key)
            } else {
                Segment::Index(index)
            };
            self.path.push(segment);
            self.value()?;
            self.path.pop();
            index += 1;
        }
    }

    /// Scans a string and returns its text.
    fn string(&mut self) -> String {
        let start = self.at;
        self.at += 1;
        while let Some(&byte) = self.bytes.get(self.at) {
            self.at += 1;
            match byte {
                b'\\' => self.at += 1,
                b'"' => break,
                _ => {}
            }
        }
        let quoted = &self.bytes[start..self.at.min(self.bytes.len())];
        serde_json::from_slice::<String>(quoted).unwrap_or_else(|_| String::from_utf8_lossy(quoted).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_that_a_double_or_a_64_bit_integer_holds_are_exact() {
        let huge = format!("15{}", "0".repeat(299));
        assert!(is_exact(&huge), "1.5e300 written out, as Postgres writes numerics");
        for exact in ["0", "-0", "1", "1.0", "1e0", "-12.5", "0.1", "1e20", "1.5e300", "9223372036854775807", "18446744073709551615", "-9223372036854775808"] {
            assert!(is_exact(exact), "{exact}");
        }
        for inexact in ["18446744073709551617", "123456789012345678901234567890", "0.1000000000000000055511151231257827", "1e400", "-9223372036854775809", "0.30000000000000000001"] {
            assert!(!is_exact(inexact), "{inexact}");
        }
    }

    #[test]
    fn the_first_inexact_number_is_named_by_its_path() {
        let body = r#"[{"op_id": "x", "value": {"ok": 1.5, "list": [1, {"deep": 18446744073709551617}]}}]"#;
        let error = check_json_numbers(body, "changes").unwrap_err();
        assert_eq!(error.to_string(), "changes[0].value.list[1].deep: the number 18446744073709551617 cannot be carried exactly as a JSON number (send it as a string)");
        assert!(check_json_numbers(r#"{"a": "18446744073709551617", "b\"": [0.25, -3]}"#, "x").is_ok(), "numbers in strings are text");
        let long = check_json_numbers(&format!("[1{}]", "0".repeat(400)), "x").unwrap_err();
        assert_eq!(long.to_string(), "x[0]: the number 1000000000000000000000000000000000000000... (401 characters) cannot be carried exactly as a JSON number (send it as a string)");
    }

    #[test]
    fn nesting_past_the_limit_is_refused_naming_where_it_starts() {
        let deep = format!(r#"[{{"value": {{"d": {}1{}}}}}]"#, "[".repeat(200), "]".repeat(200));
        assert_eq!(check_json_numbers(&deep, "changes").unwrap_err().to_string(), "changes[0].value.d: is nested more than 120 levels deep");
        let at_the_limit = format!("{}{}", "[".repeat(MAX_JSON_DEPTH), "]".repeat(MAX_JSON_DEPTH));
        assert!(check_json_numbers(&at_the_limit, "x").is_ok());
    }

    #[test]
    fn spellings_of_one_value_write_one_canonical_form() {
        let canonical = |text: &str| {
            let mut out = Vec::new();
            write_canonical(&serde_json::from_str(text).unwrap(), &mut out);
            String::from_utf8(out).unwrap()
        };
        assert_eq!([canonical("1"), canonical("1.0"), canonical("1e0"), canonical("10e-1")], ["1", "1", "1", "1"]);
        assert_eq!([canonical("2.50"), canonical("25e-1")], ["2.5", "2.5"]);
        assert_eq!(canonical("-0.0"), "0");
    }
}
