//! Changes as clients send them, validated field by field.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::hlc::Hlc;
use crate::wire::{REASON_INVALID_TEXT, REASON_VALUE_TOO_LARGE};

/// Longest accepted model name, pk, actor and tenant, in bytes (they are index keys).
pub const MAX_NAME_BYTES: usize = 255;
/// Longest accepted pk, in bytes.
pub const MAX_PK_BYTES: usize = 1024;

/// The kind of a change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Insert,
    Update,
    Delete,
    /// Scoped pulls only: the row left every instance the device pulls. The device drops its copy; it
    /// is not a delete (the row lives on elsewhere). Never pushed.
    Leave,
}

impl Op {
    /// The op's wire name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Leave => "leave",
        }
    }
}

impl FromStr for Op {
    type Err = ();

    fn from_str(text: &str) -> Result<Self, ()> {
        match text {
            "insert" => Ok(Op::Insert),
            "update" => Ok(Op::Update),
            "delete" => Ok(Op::Delete),
            _ => Err(()),
        }
    }
}

/// One change to one row: an insert (the full row), an update (a patch) or a delete.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The idempotency key, unique per tenant.
    pub op_id: Uuid,
    pub model: String,
    pub pk: String,
    pub op: Op,
    pub hlc: Hlc,
    /// The device or process that made the change.
    pub actor: String,
    /// The row for an insert, the changed fields for an update, `None` for a delete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Map<String, Value>>,
}

/// How a malformed input is classified (maps to SQLSTATE 22023 or 22P02 in the extension).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireErrorKind {
    /// A missing field, a wrong JSON type, a value out of range.
    InvalidValue,
    /// A string that does not parse as what it must be (uuid, hlc).
    InvalidText,
}

/// How deep a change's value may nest (the value object itself is level 1): a pull page wraps a value two
/// levels deeper, and must stay within what every JSON reader accepts (serde's limit is 128).
pub const MAX_VALUE_DEPTH: usize = 100;

/// How deep `value` nests (a scalar is 0, `{}` and `[]` are 1).
fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(fields) => 1 + fields.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// What the server accepts in one push.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The most changes in one batch.
    pub max_changes: usize,
    /// The largest value of one change, in bytes of its JSON.
    pub max_value_bytes: usize,
}

/// A malformed push, naming where: `changes[3].hlc: ...`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{location}: {problem}")]
pub struct WireError {
    pub kind: WireErrorKind,
    pub location: String,
    pub problem: String,
}

impl WireError {
    /// An error about a value that is not what it must be.
    pub fn invalid(location: impl Into<String>, problem: impl Into<String>) -> Self {
        Self { kind: WireErrorKind::InvalidValue, location: location.into(), problem: problem.into() }
    }

    fn text(location: impl Into<String>, problem: impl Into<String>) -> Self {
        Self { kind: WireErrorKind::InvalidText, location: location.into(), problem: problem.into() }
    }
}

/// Checks a tenant name: non-empty, at most [`MAX_NAME_BYTES`].
pub fn validate_tenant(tenant: &str) -> Result<(), WireError> {
    validate_name("tenant", tenant)
}

/// Checks a name (tenant, model, actor): non-empty, at most [`MAX_NAME_BYTES`], no NUL.
pub fn validate_name(location: &str, text: &str) -> Result<(), WireError> {
    check_name(location, text, MAX_NAME_BYTES)
}

pub(crate) fn check_name(location: &str, text: &str, max_bytes: usize) -> Result<(), WireError> {
    if text.is_empty() {
        return Err(WireError::invalid(location, "must not be empty"));
    }
    if text.len() > max_bytes {
        return Err(WireError::invalid(location, format!("is {} bytes, the limit is {max_bytes}", text.len())));
    }
    if text.contains('\0') {
        return Err(WireError::invalid(location, "must not contain NUL characters"));
    }
    Ok(())
}

/// A push body read: every change in order, and those that are well formed but cannot be stored
/// (a value over the size limit, a NUL character in a string), by index, with the reasons they are refused.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParsedBatch {
    pub changes: Vec<Change>,
    pub refused: HashMap<usize, String>,
}

/// Parses a push body: a JSON array of changes within `limits`. Malformed input is an error of the
/// whole body; a change that cannot be stored is refused alone (see [`ParsedBatch`]).
pub fn parse_changes(input: &Value, limits: &Limits) -> Result<ParsedBatch, WireError> {
    let max_changes = limits.max_changes;
    let items = input
        .as_array()
        .ok_or_else(|| WireError::invalid("changes", format!("expected a JSON array, got {}", json_type(input))))?;
    if items.len() > max_changes {
        return Err(WireError::invalid(
            "changes",
            format!("{} changes exceed max_push_changes ({max_changes})", items.len()),
        ));
    }
    let mut batch = ParsedBatch { changes: Vec::with_capacity(items.len()), refused: HashMap::new() };
    for (index, item) in items.iter().enumerate() {
        let mut change = parse_change(index, item)?;
        if let Some(reason) = unstorable(&format_args!("changes[{index}]"), &change, limits.max_value_bytes) {
            // Its value is never used: free it now.
            change.value = change.value.map(|_| Map::new());
            batch.refused.insert(index, reason);
        }
        batch.changes.push(change);
    }
    Ok(batch)
}

/// Why a well-formed change cannot be stored, if it cannot, as a rejection reason naming the change by
/// `location`: a value over `max_value_bytes` (`value_too_large`), or a NUL character, which Postgres text
/// and jsonb cannot hold, in a field name or a string (`invalid_text`). Clients check it before sending.
pub fn unstorable(location: &dyn fmt::Display, change: &Change, max_value_bytes: usize) -> Option<String> {
    let value = change.value.as_ref()?;
    let size = value.iter().map(|(name, item)| name.len() + 4 + json_size(item, max_value_bytes)).sum::<usize>() + 2;
    if size > max_value_bytes {
        return Some(format!("{REASON_VALUE_TOO_LARGE}: {location}.value is over {max_value_bytes} bytes (max_value_bytes)"));
    }
    let path = nul_path(value)?;
    Some(format!("{REASON_INVALID_TEXT}: {location}.value{path} holds a NUL character, which Postgres cannot store"))
}

/// Where in an object a NUL character stands (`.title`, `.tags[2]`), if anywhere.
fn nul_path(fields: &Map<String, Value>) -> Option<String> {
    fn within(value: &Value) -> Option<String> {
        match value {
            Value::String(text) => text.contains('\0').then(String::new),
            Value::Array(items) => items.iter().enumerate().find_map(|(i, item)| within(item).map(|rest| format!("[{i}]{rest}"))),
            Value::Object(fields) => nul_path(fields),
            _ => None,
        }
    }
    fields.iter().find_map(|(name, item)| {
        if name.contains('\0') {
            return Some(format!(".{}", name.escape_debug()));
        }
        within(item).map(|rest| format!(".{name}{rest}"))
    })
}

/// The size of a value's compact JSON, counted without writing it (stops counting past `limit`).
fn json_size(value: &Value, limit: usize) -> usize {
    match value {
        Value::Null | Value::Bool(_) => 5,
        Value::Number(number) => number.to_string().len(),
        Value::String(text) => text.len() + 2,
        Value::Array(items) => items.iter().try_fold(2, |size, item| {
            let size = size + json_size(item, limit) + 1;
            if size > limit { Err(size) } else { Ok(size) }
        }).unwrap_or_else(|size| size),
        Value::Object(fields) => fields.iter().try_fold(2, |size, (name, item)| {
            let size = size + name.len() + 4 + json_size(item, limit);
            if size > limit { Err(size) } else { Ok(size) }
        }).unwrap_or_else(|size| size),
    }
}

fn parse_change(index: usize, item: &Value) -> Result<Change, WireError> {
    let at = |field: &str| format!("changes[{index}].{field}");
    let object = item
        .as_object()
        .ok_or_else(|| WireError::invalid(format!("changes[{index}]"), format!("expected an object, got {}", json_type(item))))?;
    let string = |field: &str| -> Result<&str, WireError> {
        match object.get(field) {
            Some(Value::String(text)) => Ok(text),
            Some(other) => Err(WireError::invalid(at(field), format!("expected a string, got {}", json_type(other)))),
            None => Err(WireError::invalid(at(field), "is missing")),
        }
    };
    let op_id_text = string("op_id")?;
    let op_id = Uuid::try_parse(op_id_text)
        .map_err(|_| WireError::text(at("op_id"), format!("expected a UUID, got {op_id_text:?}")))?;
    let model = string("model")?;
    validate_name(&at("model"), model)?;
    let pk = string("pk")?;
    check_name(&at("pk"), pk, MAX_PK_BYTES)?;
    let op_text = string("op")?;
    let op: Op = op_text.parse().map_err(|_| {
        WireError::invalid(at("op"), format!("expected \"insert\", \"update\" or \"delete\", got {op_text:?}"))
    })?;
    let hlc: Hlc = string("hlc")?.parse().map_err(|e: crate::hlc::HlcParseError| WireError::text(at("hlc"), e.to_string()))?;
    let actor = string("actor")?;
    validate_name(&at("actor"), actor)?;
    let value = match (op, object.get("value")) {
        (Op::Delete, None | Some(Value::Null)) => None,
        (Op::Delete, Some(other)) => {
            return Err(WireError::invalid(at("value"), format!("a delete carries no value, got {}", json_type(other))))
        }
        (_, Some(value @ Value::Object(fields))) => {
            if depth(value) > MAX_VALUE_DEPTH {
                return Err(WireError::invalid(at("value"), format!("is nested more than {MAX_VALUE_DEPTH} levels deep")));
            }
            Some(fields.clone())
        }
        (_, None) => return Err(WireError::invalid(at("value"), format!("is missing (an {} needs an object)", op.as_str()))),
        (_, Some(other)) => return Err(WireError::invalid(at("value"), format!("expected an object, got {}", json_type(other)))),
    };
    Ok(Change { op_id, model: model.to_owned(), pk: pk.to_owned(), op, hlc, actor: actor.to_owned(), value })
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl Change {
    /// SHA-256 of the change's canonical JSON without its op_id: `{"actor","hlc","model","op","pk","value"}`
    /// with object keys sorted by their UTF-8 bytes, no whitespace, and `value` null for a delete.
    /// Numbers are written in their canonical form ([`crate::numbers::write_canonical`]), so a
    /// re-send that spells `1` as `1.0` hashes alike. Two sends of one op_id are the same change exactly
    /// when their hashes are equal.
    pub fn payload_hash(&self) -> [u8; 32] {
        self.hash_with(NumberForm::Canonical)
    }

    /// The hash as versions before 0.3.0 computed it (numbers as spelled), which their log entries
    /// carry: a re-send of such an entry is recognized by either.
    pub fn legacy_payload_hash(&self) -> [u8; 32] {
        self.hash_with(NumberForm::AsParsed)
    }

    fn hash_with(&self, numbers: NumberForm) -> [u8; 32] {
        // The canonical form: {"actor":..,"hlc":..,"model":..,"op":..,"pk":..,"value":..}, keys in
        // byte order at every level, no whitespace, numbers canonical. Stored hashes depend on it: never
        // change it (entries of versions before 0.3.0 carry legacy_payload_hash, numbers as spelled).
        let mut canonical = Vec::with_capacity(256);
        let hlc = self.hlc.to_string();
        let envelope = [("{\"actor\":", self.actor.as_str()), (",\"hlc\":", &hlc), (",\"model\":", &self.model), (",\"op\":", self.op.as_str()), (",\"pk\":", &self.pk)];
        for (key, text) in envelope {
            canonical.extend_from_slice(key.as_bytes());
            write_json_string(text, &mut canonical);
        }
        canonical.extend_from_slice(b",\"value\":");
        match &self.value {
            Some(fields) => write_canonical_object(fields, numbers, &mut canonical),
            None => canonical.extend_from_slice(b"null"),
        }
        canonical.push(b'}');
        Sha256::digest(&canonical).into()
    }
}

fn write_json_string(text: &str, out: &mut Vec<u8>) {
    serde_json::to_writer(out, text).expect("strings serialize");
}

/// Writes an object's fields, given in UTF-8 byte order of their names, in canonical JSON: keys in UTF-8
/// byte order at every level, no whitespace, numbers in their canonical form (what the payload hash and
/// the state digest read).
pub(crate) fn write_canonical_fields<'a>(fields: impl Iterator<Item = (&'a String, &'a Value)>, out: &mut Vec<u8>) {
    out.push(b'{');
    for (position, (key, item)) in fields.enumerate() {
        if position > 0 {
            out.push(b',');
        }
        write_json_string(key, out);
        out.push(b':');
        write_canonical(item, NumberForm::Canonical, out);
    }
    out.push(b'}');
}

/// How the payload hash writes numbers.
#[derive(Clone, Copy)]
enum NumberForm {
    Canonical,
    AsParsed,
}

fn write_canonical_object(map: &Map<String, Value>, numbers: NumberForm, out: &mut Vec<u8>) {
    let mut entries: Vec<_> = map.iter().collect();
    entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    out.push(b'{');
    for (position, (key, item)) in entries.into_iter().enumerate() {
        if position > 0 {
            out.push(b',');
        }
        write_json_string(key, out);
        out.push(b':');
        write_canonical(item, numbers, out);
    }
    out.push(b'}');
}

fn write_canonical(value: &Value, numbers: NumberForm, out: &mut Vec<u8>) {
    match (value, numbers) {
        (Value::Object(map), _) => write_canonical_object(map, numbers, out),
        (Value::Array(items), _) => {
            out.push(b'[');
            for (position, item) in items.iter().enumerate() {
                if position > 0 {
                    out.push(b',');
                }
                write_canonical(item, numbers, out);
            }
            out.push(b']');
        }
        (Value::Number(number), NumberForm::Canonical) => crate::numbers::write_canonical(number, out),
        (scalar, _) => serde_json::to_writer(out, scalar).expect("scalars serialize"),
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIMITS: Limits = Limits { max_changes: 100, max_value_bytes: 1000 };

    fn valid() -> Value {
        json!({"op_id": "7f1e8c3a-0000-4000-8000-000000000001", "model": "todo", "pk": "1", "op": "insert",
               "hlc": "2026-11-24T10:00:00.000Z-0001", "actor": "device-a", "value": {"title": "x"}})
    }

    fn error_of(change: Value) -> WireError {
        parse_changes(&json!([valid(), change]), &LIMITS).unwrap_err()
    }

    #[test]
    fn parses_a_valid_change() {
        let changes = parse_changes(&json!([valid()]), &LIMITS).unwrap().changes;
        assert_eq!(changes[0].op, Op::Insert);
        assert_eq!(changes[0].value.as_ref().unwrap()["title"], "x");
    }

    #[test]
    fn errors_name_the_index_and_the_field() {
        let mut missing = valid();
        missing.as_object_mut().unwrap().remove("hlc");
        assert_eq!(error_of(missing).to_string(), "changes[1].hlc: is missing");
        let mut bad_uuid = valid();
        bad_uuid["op_id"] = json!("nope");
        let err = error_of(bad_uuid);
        assert_eq!((err.kind, err.location.as_str()), (WireErrorKind::InvalidText, "changes[1].op_id"));
        let mut bad_op = valid();
        bad_op["op"] = json!("upsert");
        assert_eq!(error_of(bad_op).location, "changes[1].op");
        let mut wrong_type = valid();
        wrong_type["actor"] = json!(7);
        assert_eq!(error_of(wrong_type).to_string(), "changes[1].actor: expected a string, got a number");
        let mut delete_with_value = valid();
        delete_with_value["op"] = json!("delete");
        assert_eq!(error_of(delete_with_value).location, "changes[1].value");
        assert_eq!(parse_changes(&json!({}), &LIMITS).unwrap_err().location, "changes");
        let one = Limits { max_changes: 1, ..LIMITS };
        assert_eq!(parse_changes(&json!([valid(), valid()]), &one).unwrap_err().location, "changes");
    }

    #[test]
    fn a_value_may_nest_at_most_max_value_depth_levels() {
        let nested = |levels: usize| {
            let mut value = json!(1);
            for _ in 1..levels {
                value = json!([value]);
            }
            let mut change = valid();
            change["value"] = json!({"deep": value});
            change
        };
        assert!(parse_changes(&json!([nested(MAX_VALUE_DEPTH)]), &LIMITS).is_ok());
        assert_eq!(error_of(nested(MAX_VALUE_DEPTH + 1)).to_string(), "changes[1].value: is nested more than 100 levels deep");
    }

    #[test]
    fn a_change_that_cannot_be_stored_is_refused_alone() {
        let mut large = valid();
        large["value"] = json!({"blob": "x".repeat(2000)});
        let mut nul = valid();
        nul["value"] = json!({"tags": ["ok", "a\u{0}b"]});
        let batch = parse_changes(&json!([valid(), large, nul, valid()]), &LIMITS).unwrap();
        assert_eq!(batch.changes.len(), 4);
        assert_eq!(batch.refused.len(), 2);
        assert_eq!(batch.refused[&1], "value_too_large: changes[1].value is over 1000 bytes (max_value_bytes)");
        assert_eq!(batch.refused[&2], "invalid_text: changes[2].value.tags[1] holds a NUL character, which Postgres cannot store");
        assert_eq!(batch.changes[1].value, Some(Map::new()), "the refused value is not kept");
    }

    #[test]
    fn payload_hash_is_the_sha256_of_the_canonical_form() {
        let mut change = parse_changes(&json!([valid()]), &LIMITS).unwrap().changes.remove(0);
        change.value = Some(json!({"z": [1, "é\"", {"b": null, "a": 2.5}], "a": true}).as_object().unwrap().clone());
        let canonical = format!(
            r#"{{"actor":"{}","hlc":"{}","model":"{}","op":"{}","pk":"{}","value":{{"a":true,"z":[1,"é\"",{{"a":2.5,"b":null}}]}}}}"#,
            change.actor, change.hlc, change.model, change.op, change.pk
        );
        let expected: [u8; 32] = Sha256::digest(canonical.as_bytes()).into();
        assert_eq!(change.payload_hash(), expected);
    }

    #[test]
    fn payload_hash_ignores_key_order_and_op_id_but_not_content() {
        let a = parse_changes(&json!([valid()]), &LIMITS).unwrap().changes.remove(0);
        let mut b = a.clone();
        b.op_id = Uuid::nil();
        assert_eq!(a.payload_hash(), b.payload_hash());
        b.value.as_mut().unwrap().insert("title".into(), json!("y"));
        assert_ne!(a.payload_hash(), b.payload_hash());
    }
}
