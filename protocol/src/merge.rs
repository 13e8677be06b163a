//! The merge rule: per-row registers, last writer wins by stamp.
//!
//! A row has an *existence register* and one *register per field*. Each register keeps the value of
//! the change with the greatest stamp `(hlc, actor, op_id)` that wrote it. Because every register only
//! ever moves to a greater stamp, merging is commutative, associative and idempotent: replicas that
//! saw the same changes, in any order and any number of times, hold the same state.
//!
//! - inserts and updates write each field they carry wherever their stamp beats that field's stamp
//!   (the same change delivered again replaces the field's value: the server may hand back the
//!   value in the form its table stores, e.g. `"3.50"` for `"3.5"`);
//! - deletes and the other ops compete for the existence register by stamp; on equal hlc a delete
//!   wins, then actor and op_id order;
//! - a delete also hides every field written at or before its hlc, so a row brought back to life
//!   shows only the fields written after the latest delete.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::change::{Change, Op};
use crate::hlc::Hlc;

/// The order of two changes: hlc, then actor (byte-wise), then op_id (byte-wise).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stamp {
    pub hlc: Hlc,
    pub actor: String,
    pub op_id: Uuid,
}

impl Stamp {
    /// The stamp of a change.
    pub fn of(change: &Change) -> Self {
        Self { hlc: change.hlc, actor: change.actor.clone(), op_id: change.op_id }
    }
}

/// The existence register: whether the row is deleted, and the stamp that said so.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Existence {
    pub stamp: Stamp,
    pub deleted: bool,
}

impl Existence {
    /// Existence registers compare by hlc, then a delete above a non-delete, then actor and op_id.
    fn rank(&self) -> (Hlc, bool, &str, Uuid) {
        (self.stamp.hlc, self.deleted, &self.stamp.actor, self.stamp.op_id)
    }
}

impl Ord for Existence {
    fn cmp(&self, other: &Self) -> Ordering {
        self.rank().cmp(&other.rank())
    }
}

impl PartialOrd for Existence {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// One field's register.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldRegister {
    pub stamp: Stamp,
    pub value: Value,
}

/// The full merge state of one row. `RowState::default()` is a row nobody has written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RowState {
    /// `None` until a change reaches the row.
    pub existence: Option<Existence>,
    /// The hlc of the greatest delete seen: fields written at or before it stay hidden.
    pub deleted_hlc: Option<Hlc>,
    /// Live field registers (fields hidden by a delete are dropped).
    pub fields: BTreeMap<String, FieldRegister>,
}

/// What a change won when merged into a row. A change that won nothing is superseded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Won {
    /// The change now holds the existence register.
    pub existence: bool,
    /// A delete raised the row's delete horizon (hiding older fields), even if it lost existence.
    pub delete_horizon: bool,
    /// The fields (and their values) whose registers the change now holds.
    pub fields: Map<String, Value>,
}

impl Won {
    /// Whether the change altered the row's state at all.
    pub fn anything(&self) -> bool {
        self.existence || self.delete_horizon || !self.fields.is_empty()
    }
}

impl RowState {
    /// Merges one change into the row and reports what it won.
    pub fn apply(&mut self, change: &Change) -> Won {
        let mut won = Won::default();
        if change.op == Op::Leave {
            // Not a change of the row: what a scoped device is told when the row leaves its scopes.
            return won;
        }
        let stamp = Stamp::of(change);
        let candidate = Existence { stamp: stamp.clone(), deleted: change.op == Op::Delete };
        if self.existence.as_ref().is_none_or(|current| candidate > *current) {
            self.existence = Some(candidate);
            won.existence = true;
        }
        match (&change.op, &change.value) {
            (Op::Delete, _) => {
                if self.deleted_hlc.is_none_or(|horizon| change.hlc > horizon) {
                    self.deleted_hlc = Some(change.hlc);
                    self.fields.retain(|_, field| field.stamp.hlc > change.hlc);
                    won.delete_horizon = true;
                }
            }
            (Op::Insert | Op::Update, Some(value)) => {
                if self.deleted_hlc.is_some_and(|horizon| change.hlc <= horizon) {
                    return won;
                }
                for (name, field_value) in value {
                    let beats = self.fields.get(name).is_none_or(|field| {
                        stamp > field.stamp || (stamp == field.stamp && *field_value != field.value)
                    });
                    if beats {
                        self.fields.insert(
                            name.clone(),
                            FieldRegister { stamp: stamp.clone(), value: field_value.clone() },
                        );
                        won.fields.insert(name.clone(), field_value.clone());
                    }
                }
            }
            (Op::Insert | Op::Update, None) | (Op::Leave, _) => {}
        }
        won
    }

    /// Whether the row is currently deleted (or was never written).
    pub fn is_deleted(&self) -> bool {
        self.existence.as_ref().is_none_or(|existence| existence.deleted)
    }

    /// The row as readers see it: its live fields, or `None` when deleted or never written.
    pub fn visible(&self) -> Option<Map<String, Value>> {
        (!self.is_deleted()).then(|| self.field_values())
    }

    /// The values of the live field registers (empty for a deleted row).
    pub fn field_values(&self) -> Map<String, Value> {
        self.fields.iter().map(|(name, field)| (name.clone(), field.value.clone())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn change(op: Op, hlc: &str, actor: &str, op_id: u128, value: Option<Value>) -> Change {
        Change {
            op_id: Uuid::from_u128(op_id),
            model: "todo".into(),
            pk: "1".into(),
            op,
            hlc: format!("2026-11-24T10:00:00.{hlc}Z-0000").parse().unwrap(),
            actor: actor.into(),
            value: value.map(|v| v.as_object().unwrap().clone()),
        }
    }

    fn merged(changes: &[Change]) -> RowState {
        let mut row = RowState::default();
        for c in changes {
            row.apply(c);
        }
        row
    }

    #[test]
    fn patches_to_different_fields_both_survive_in_either_order() {
        let insert = change(Op::Insert, "000", "a", 1, Some(json!({"title": "x", "done": false})));
        let title = change(Op::Update, "001", "a", 2, Some(json!({"title": "y"})));
        let done = change(Op::Update, "002", "b", 3, Some(json!({"done": true})));
        let one = merged(&[insert.clone(), title.clone(), done.clone()]);
        let other = merged(&[done, title, insert]);
        assert_eq!(one, other);
        assert_eq!(Value::Object(one.visible().unwrap()), json!({"title": "y", "done": true}));
    }

    #[test]
    fn equal_hlc_delete_beats_update_then_actor_then_op_id_decide() {
        let update = change(Op::Update, "005", "zzz", 9, Some(json!({"a": 1})));
        let delete = change(Op::Delete, "005", "aaa", 1, None);
        assert!(merged(&[update.clone(), delete.clone()]).visible().is_none());
        assert!(merged(&[delete, update]).visible().is_none());

        let by_b = change(Op::Update, "005", "b", 1, Some(json!({"a": "b"})));
        let by_a = change(Op::Update, "005", "a", 2, Some(json!({"a": "a"})));
        assert_eq!(merged(&[by_b.clone(), by_a.clone()]).visible().unwrap()["a"], "b");
        assert_eq!(merged(&[by_a, by_b]).visible().unwrap()["a"], "b");

        let low_id = change(Op::Update, "005", "a", 1, Some(json!({"a": "low"})));
        let high_id = change(Op::Update, "005", "a", 2, Some(json!({"a": "high"})));
        assert_eq!(merged(&[high_id.clone(), low_id.clone()]).visible().unwrap()["a"], "high");
        assert_eq!(merged(&[low_id, high_id]).visible().unwrap()["a"], "high");
    }

    #[test]
    fn revived_row_shows_only_fields_written_after_the_delete() {
        let insert = change(Op::Insert, "000", "a", 1, Some(json!({"title": "x", "note": "n"})));
        let delete = change(Op::Delete, "001", "a", 2, None);
        let revive = change(Op::Update, "002", "b", 3, Some(json!({"title": "z"})));
        let late_old_patch = change(Op::Update, "000", "c", 4, Some(json!({"note": "late"})));
        let row = merged(&[insert, delete, revive, late_old_patch.clone()]);
        assert_eq!(Value::Object(row.visible().unwrap()), json!({"title": "z"}));
        let mut again = row.clone();
        assert!(!again.apply(&late_old_patch).anything(), "a patch older than the delete wins nothing");
    }

    #[test]
    fn a_change_that_wins_nothing_leaves_the_row_unchanged() {
        let newer = change(Op::Update, "009", "a", 1, Some(json!({"a": 1})));
        let older = change(Op::Update, "001", "a", 2, Some(json!({"a": 0})));
        let mut row = merged(&[newer]);
        let before = row.clone();
        assert!(!row.apply(&older).anything());
        assert_eq!(row, before);
    }

    #[test]
    fn the_same_change_delivered_again_brings_the_servers_form_of_its_values() {
        let written = change(Op::Insert, "000", "a", 1, Some(json!({"price": "3.5"})));
        let mut normalized = written.clone();
        normalized.value = Some(json!({"price": "3.50"}).as_object().unwrap().clone());
        let mut row = merged(&[written]);
        assert!(row.apply(&normalized).anything());
        assert_eq!(row.visible().unwrap()["price"], "3.50");
        assert!(!row.apply(&normalized).anything(), "identical redelivery changes nothing");
    }

    #[test]
    fn a_losing_delete_still_hides_older_fields() {
        let insert = change(Op::Insert, "000", "a", 1, Some(json!({"a": 1, "b": 2})));
        let patch = change(Op::Update, "005", "a", 2, Some(json!({"b": 3})));
        let delete = change(Op::Delete, "003", "b", 3, None);
        let mut row = merged(&[insert, patch]);
        let won = row.apply(&delete);
        assert!(!won.existence && won.delete_horizon);
        assert_eq!(Value::Object(row.visible().unwrap()), json!({"b": 3}));
    }
}
