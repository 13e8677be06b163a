//! Results of a push and the body of a pull, as they travel on the wire.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::change::{Change, Op};
use crate::merge::{RowState, Stamp};
use crate::stored::StoredRow;
use crate::hlc::Hlc;

/// Reason of a change refused because its op_id was already used with a different payload.
pub const REASON_OP_ID_CONFLICT: &str = "op_id_conflict";
/// Reason of a change refused because its hlc is too far ahead of the server clock.
pub const REASON_CLOCK_SKEW: &str = "clock_skew";
/// Reason of a change refused because it is stamped at or before the tenant's compaction horizon.
pub const REASON_STALE: &str = "stale";
/// Reason of a change refused because its value is over the server's `max_value_bytes`.
pub const REASON_VALUE_TOO_LARGE: &str = "value_too_large";
/// Reason of a change refused because its writer may write only some scope instances, and the row is
/// outside them before or after the change.
pub const REASON_OUT_OF_SCOPE: &str = "out_of_scope";
/// Reason of a change refused because devices may not write its model.
pub const REASON_READ_ONLY: &str = "read_only";
/// Reason of a change refused because a string of its value holds a NUL character.
pub const REASON_INVALID_TEXT: &str = "invalid_text";

/// The outcome of one pushed change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Status {
    /// The change won something; it was logged at `seq`.
    Applied { seq: i64 },
    /// The op_id was already applied, at `seq`; nothing changed.
    Duplicate { seq: i64 },
    /// Newer changes hold every register the change could write; nothing changed.
    Superseded,
    /// The change was refused; the rest of the batch went on.
    Rejected { reason: String },
}

impl Status {
    /// Whether the client may drop the change from its outbox as acknowledged.
    pub fn is_acknowledged(&self) -> bool {
        !matches!(self, Status::Rejected { .. })
    }
}

/// One entry of a push's `results`, in the order of the pushed changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeResult {
    pub op_id: Uuid,
    #[serde(flatten)]
    pub status: Status,
}

/// What `sync_push` returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushResponse {
    /// The tenant's latest seq after the push.
    pub cursor: i64,
    pub results: Vec<ChangeResult>,
    /// The server's limits on pushes (servers before 0.3.0 send none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<PushLimits>,
}

/// What one push may carry, as the server tells its clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushLimits {
    /// The most changes in one push.
    pub max_push_changes: i32,
    /// The largest push body, in bytes.
    pub max_push_bytes: i32,
    /// The largest value of one change, in bytes of its compact JSON.
    pub max_value_bytes: i32,
}

/// A change as a pull delivers it: what it won, at its seq.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PulledChange {
    pub seq: i64,
    pub op_id: Uuid,
    pub model: String,
    pub pk: String,
    pub op: Op,
    pub hlc: Hlc,
    pub actor: String,
    /// The fields the change won (`None` for a delete); in a reset page, the row's current fields.
    #[serde(default)]
    pub value: Option<Map<String, Value>>,
    /// Whole rows only (reset pages, move-ins): the stamps of fields written by another change than this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field_stamps: Option<Map<String, Value>>,
    /// Whole rows only (reset pages, move-ins): the hlc of the row's latest delete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_hlc: Option<Hlc>,
}

impl PulledChange {
    /// The change as its receiver merges it (its value being what it won on the server).
    pub fn to_change(&self) -> Change {
        Change {
            op_id: self.op_id,
            model: self.model.clone(),
            pk: self.pk.clone(),
            op: self.op,
            hlc: self.hlc,
            actor: self.actor.clone(),
            value: self.value.clone(),
        }
    }

    /// Whether the change is a row's whole state (a reset row, or a row moving into a scoped pull's
    /// instances): it carries the row's merge registers, and replaces what the receiver held of the row.
    pub fn is_whole_row(&self) -> bool {
        self.field_stamps.is_some()
    }

    /// What a replica holds of the row after this change, given what it `held`: a `leave` drops the row,
    /// a whole row replaces it, any other change merges into it. (A replica with unsent changes of the row
    /// merges them on top again, as the client crate does.)
    pub fn apply_to(&self, held: Option<RowState>) -> Result<Option<RowState>, String> {
        if self.op == Op::Leave {
            return Ok(None);
        }
        if self.is_whole_row() {
            return self.to_row_state().map(Some);
        }
        let mut state = held.unwrap_or_default();
        state.apply(&self.to_change());
        Ok(Some(state))
    }

    /// The full merge state of a row sent in a reset page (or moving into a scoped pull's instances).
    pub fn to_row_state(&self) -> Result<RowState, String> {
        StoredRow {
            value: self.value.clone().unwrap_or_default(),
            stamp: Stamp { hlc: self.hlc, actor: self.actor.clone(), op_id: self.op_id },
            deleted: self.op == Op::Delete,
            deleted_hlc: self.deleted_hlc,
            field_stamps: self.field_stamps.clone().unwrap_or_default(),
        }
        .into_state()
    }
}

/// What `sync_pull` returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullResponse {
    /// Changes in seq order.
    pub changes: Vec<PulledChange>,
    /// The seq of the last change returned, or the `since` asked for when there is none.
    pub cursor: i64,
    /// More changes follow the cursor.
    pub has_more: bool,
    /// The page holds current rows instead of changes: the cursor asked for was below the tenant's
    /// compaction horizon or above its last seq. The client replaces its confirmed rows with these
    /// (over all reset pages, until `has_more` is false) and keeps its unsent changes on top.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reset: bool,
    /// On the page that ends at the tenant's last seq: the digest of the tenant's visible rows at that
    /// seq (see [`crate::digest`]), so the client can check its replica. Absent on other pages and on
    /// scoped pulls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Scoped pulls, on the page that ends at the tenant's last seq: the digest of the visible rows of
    /// each listed instance, and under `""` ([`crate::scope::TENANT_WIDE`]) of the tenant-wide rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digests: Option<std::collections::BTreeMap<String, String>>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pulled(op: &str, hlc: &str, value: Value, whole: bool) -> PulledChange {
        let mut change = json!({"seq": 1, "op_id": Uuid::nil(), "model": "task", "pk": "1", "op": op,
                                "hlc": format!("2026-01-01T00:00:{hlc}Z-0000"), "actor": "a", "value": value});
        if whole {
            change["field_stamps"] = json!({});
        }
        serde_json::from_value(change).expect("a pulled change")
    }

    #[test]
    fn a_leave_drops_a_whole_row_replaces_and_any_other_change_merges() {
        let held = pulled("insert", "01.000", json!({"title": "a", "done": false}), false).apply_to(None).unwrap();
        let merged = pulled("update", "02.000", json!({"done": true}), false).apply_to(held.clone()).unwrap().unwrap();
        assert_eq!(merged.visible(), json!({"title": "a", "done": true}).as_object().cloned());
        let older = pulled("update", "00.500", json!({"done": true}), false).apply_to(held.clone()).unwrap().unwrap();
        assert_eq!(older.visible(), held.clone().unwrap().visible(), "an older change loses the merge");
        let replaced = pulled("insert", "00.500", json!({"title": "b"}), true).apply_to(held.clone()).unwrap().unwrap();
        assert_eq!(replaced.visible(), json!({"title": "b"}).as_object().cloned(), "a whole row replaces, whatever its stamps");
        assert_eq!(pulled("leave", "03.000", Value::Null, false).apply_to(held).unwrap(), None);
    }
}
