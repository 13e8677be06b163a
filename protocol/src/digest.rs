//! The state digest: a checksum of a tenant's visible rows that does not depend on the order they were
//! written in, kept by the server on every write and recomputed by a client over its replica.
//!
//! A row's digest is the first 8 bytes (big-endian) of the SHA-256 of
//! `{"model":<model>,"pk":<pk>,"value":<value>}` in canonical JSON (keys in UTF-8 byte order at every
//! level, no whitespace, numbers in their canonical form, strings as JSON writes them). A tenant's digest is
//! the sum of its visible rows' digests modulo 2^64, written on the wire as 16 lowercase hex digits.
//! Deleted rows count for nothing, so an empty tenant's digest is `0000000000000000`.

use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};

use crate::merge::RowState;

/// The digest of one visible row.
pub fn row_digest(model: &str, pk: &str, value: &Map<String, Value>) -> u64 {
    let mut fields: Vec<(&String, &Value)> = value.iter().collect();
    fields.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    digest_fields(model, pk, fields.into_iter())
}

/// The digest of a row in merge state `row`, or 0 when it is not visible (read without copying it).
pub fn row_state_digest(model: &str, pk: &str, row: &RowState) -> u64 {
    if row.is_deleted() {
        return 0;
    }
    // A BTreeMap of Strings is in UTF-8 byte order already.
    digest_fields(model, pk, row.fields.iter().map(|(name, field)| (name, &field.value)))
}

fn digest_fields<'a>(model: &str, pk: &str, fields: impl Iterator<Item = (&'a String, &'a Value)>) -> u64 {
    let mut canonical = Vec::with_capacity(128);
    canonical.extend_from_slice(b"{\"model\":");
    serde_json::to_writer(&mut canonical, model).expect("strings serialize");
    canonical.extend_from_slice(b",\"pk\":");
    serde_json::to_writer(&mut canonical, pk).expect("strings serialize");
    canonical.extend_from_slice(b",\"value\":");
    crate::change::write_canonical_fields(fields, &mut canonical);
    canonical.push(b'}');
    let hash = Sha256::digest(&canonical);
    u64::from_be_bytes(hash[..8].try_into().expect("a SHA-256 has 32 bytes"))
}

/// The digest of a set of visible rows, given as (model, pk, value).
pub fn digest_of<'a>(rows: impl IntoIterator<Item = (&'a str, &'a str, &'a Map<String, Value>)>) -> u64 {
    rows.into_iter().fold(0, |digest, (model, pk, value)| digest.wrapping_add(row_digest(model, pk, value)))
}

/// A digest as it travels: 16 lowercase hex digits.
pub fn to_wire(digest: u64) -> String {
    format!("{digest:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap()
    }

    #[test]
    fn a_row_digest_is_the_sha256_of_its_canonical_json() {
        let expected = Sha256::digest(br#"{"model":"todo","pk":"1","value":{"a":1,"b":[2.5,"x"]}}"#);
        let expected = u64::from_be_bytes(expected[..8].try_into().unwrap());
        assert_eq!(row_digest("todo", "1", &object(json!({"b": [2.5, "x"], "a": 1.0}))), expected, "key order and number spelling do not matter");
    }

    #[test]
    fn the_digest_of_rows_does_not_depend_on_their_order() {
        let (a, b) = (object(json!({"t": "a"})), object(json!({"t": "b"})));
        let one = digest_of([("todo", "1", &a), ("todo", "2", &b)]);
        let other = digest_of([("todo", "2", &b), ("todo", "1", &a)]);
        assert_eq!(one, other);
        assert_ne!(one, digest_of([("todo", "1", &b), ("todo", "2", &a)]), "which row holds what matters");
        let mut row = RowState::default();
        assert_eq!(row_state_digest("todo", "1", &row), 0, "an unwritten row counts nothing");
        let insert: crate::Change = serde_json::from_value(json!({"op_id": "00000000-0000-4000-8000-000000000001", "model": "todo", "pk": "1",
            "op": "insert", "hlc": "2026-01-01T00:00:00.000Z-0000", "actor": "a", "value": {"ß": 1, "t": "a", "Z": [0.5]}})).unwrap();
        row.apply(&insert);
        assert_eq!(row_state_digest("todo", "1", &row), row_digest("todo", "1", &row.visible().unwrap()), "read in place, the same digest");
        assert_eq!(to_wire(0), "0000000000000000");
        assert_eq!(to_wire(u64::MAX), "ffffffffffffffff");
    }
}
