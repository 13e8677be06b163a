//! Serde helpers that map Rust types to sync_ext's portable JSON, for `#[serde(with = "...")]`:
//! exact decimals and 64-bit integers as strings, bytes as base64, timestamps as ISO 8601 UTC with
//! microseconds. Each module has an `option` submodule for `Option<T>` fields. (`uuid::Uuid`,
//! `Vec<T>`, `bool`, `String`, `i32` and `serde_json::Value` need no helper.)

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serializer};
use serde_json::Value;
use sync_ext_protocol::portable::{decode_bytes, decode_exact_number, encode_bytes, format_timestamp, parse_timestamp};

/// Defines `option` for a helper module with `serialize` and `deserialize`.
macro_rules! optional {
    ($ty:ty) => {
        /// The same mapping for `Option<T>` (`None` is `null`).
        pub mod option {
            use serde::{Deserialize, Deserializer, Serializer};

            pub fn serialize<S: Serializer>(value: &Option<$ty>, serializer: S) -> Result<S::Ok, S::Error> {
                match value {
                    Some(value) => super::serialize(value, serializer),
                    None => serializer.serialize_none(),
                }
            }

            pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<$ty>, D::Error> {
                let value = Option::<serde_json::Value>::deserialize(deserializer)?;
                value.filter(|value| !value.is_null()).map(|value| super::deserialize(value).map_err(serde::de::Error::custom)).transpose()
            }
        }
    };
}

/// The exact text of a bigint or numeric from its portable form (a string, or a JSON integer).
fn exact_text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    decode_exact_number(&Value::deserialize(deserializer)?).map_err(D::Error::custom)
}

/// `rust_decimal::Decimal` as a string with its exact digits and scale (`"3.50"`).
pub mod decimal {
    use super::*;
    use rust_decimal::Decimal;

    pub fn serialize<S: Serializer>(value: &Decimal, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(value)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Decimal, D::Error> {
        let text = exact_text(deserializer)?;
        Decimal::from_str_exact(&text).or_else(|_| Decimal::from_scientific(&text)).map_err(D::Error::custom)
    }

    optional!(rust_decimal::Decimal);
}

/// `i64` as a string (`"9007199254740993"`), exact beyond JavaScript's 2^53.
pub mod i64_string {
    use super::*;

    pub fn serialize<S: Serializer>(value: &i64, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(value)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
        exact_text(deserializer)?.parse().map_err(D::Error::custom)
    }

    optional!(i64);
}

/// `Vec<u8>` as standard padded base64.
pub mod bytes {
    use super::*;

    pub fn serialize<S: Serializer>(value: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(encode_bytes(value).as_str().expect("base64 is a string"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        decode_bytes(&Value::deserialize(deserializer)?).map_err(D::Error::custom)
    }

    optional!(Vec<u8>);
}

/// `chrono::DateTime<Utc>` as ISO 8601 UTC with microseconds when present (`"2026-11-24T10:00:00.123456Z"`).
pub mod timestamp {
    use super::*;
    use chrono::{DateTime, Utc};

    /// Microseconds from the Unix epoch to 2000-01-01, the Postgres epoch.
    const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

    pub fn serialize<S: Serializer>(value: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format_timestamp(value.timestamp_micros() - PG_EPOCH_MICROS, true))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<DateTime<Utc>, D::Error> {
        let micros = parse_timestamp(&Value::deserialize(deserializer)?, true).map_err(D::Error::custom)?;
        if micros == i64::MIN || micros == i64::MAX {
            return Err(D::Error::custom("infinite timestamps have no DateTime"));
        }
        DateTime::from_timestamp_micros(micros + PG_EPOCH_MICROS).ok_or_else(|| D::Error::custom("timestamp out of chrono's range"))
    }

    optional!(chrono::DateTime<chrono::Utc>);
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};
    use serde_json::json;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Typed {
        #[serde(with = "super::decimal")]
        price: rust_decimal::Decimal,
        #[serde(with = "super::i64_string")]
        big: i64,
        #[serde(with = "super::bytes")]
        blob: Vec<u8>,
        #[serde(with = "super::timestamp")]
        at: chrono::DateTime<chrono::Utc>,
        #[serde(with = "super::decimal::option", default)]
        discount: Option<rust_decimal::Decimal>,
        id: uuid::Uuid,
        tags: Vec<String>,
    }

    #[test]
    fn rust_types_map_to_portable_json_and_back() {
        let portable = json!({"price": "3.50", "big": "9007199254740993", "blob": "AP8=", "at": "2026-11-24T10:00:00.123456Z",
                              "discount": null, "id": "7f1e8c3a-5b7d-4e2a-9c1f-2b3d4e5f6a7b", "tags": ["a"]});
        let typed: Typed = serde_json::from_value(portable.clone()).unwrap();
        assert_eq!(typed.price.to_string(), "3.50");
        assert_eq!(typed.big, 9_007_199_254_740_993);
        assert_eq!(typed.blob, [0, 255]);
        assert_eq!(typed.at.timestamp_subsec_micros(), 123_456);
        assert_eq!(serde_json::to_value(&typed).unwrap(), portable);
        let from_numbers: Typed = serde_json::from_value(json!({"price": 3, "big": 42, "blob": "", "at": "2026-11-24T12:00:00+02:00",
                                                                "discount": "0.10", "id": "7f1e8c3a-5b7d-4e2a-9c1f-2b3d4e5f6a7b", "tags": []})).unwrap();
        assert_eq!((from_numbers.price.to_string(), from_numbers.big, from_numbers.discount.map(|d| d.to_string())), ("3".into(), 42, Some("0.10".into())));
        assert!(serde_json::from_value::<Typed>(json!({"price": "abc"})).is_err());
    }
}
