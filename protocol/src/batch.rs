//! Merging one pushed batch into the rows it touches: the whole push decision, free of storage.
//!
//! The extension loads the batch's known op_ids and row states in one read each, calls
//! [`merge_batch`], then writes what it returns in one statement per table.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Map, Value};
use uuid::Uuid;

use crate::change::Change;
use crate::merge::RowState;
use crate::hlc::Hlc;
use crate::scope::{Instances, Scopes, TENANT_WIDE};
use crate::wire::{ChangeResult, Status, REASON_CLOCK_SKEW, REASON_OP_ID_CONFLICT, REASON_OUT_OF_SCOPE, REASON_STALE};

/// A row's identity within a tenant: (model, pk).
pub type RowKey = (String, String);

/// An op_id already in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoggedOp {
    pub seq: i64,
    pub payload_hash: [u8; 32],
}

/// A change to append to the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    pub seq: i64,
    /// Index of the change in the pushed batch.
    pub index: usize,
    /// The fields the change won (`None` for a delete).
    pub payload: Option<Map<String, Value>>,
    pub payload_hash: [u8; 32],
    /// The scope instances the row was in before the change (for a row no change had reached, those
    /// it is in after: its first change is delivered as it is, whole).
    pub before: Instances,
    /// The scope instances the row is in after the change.
    pub after: Instances,
}

/// A row whose state the batch changed, with the seq of the last change that did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TouchedRow {
    pub state: RowState,
    pub seq: i64,
    /// The scope instances the row is in now.
    pub instances: Instances,
}

/// Everything a push decides.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// One result per pushed change, in order.
    pub results: Vec<ChangeResult>,
    /// Log entries with consecutive seqs after the tenant's last seq.
    pub appended: Vec<Appended>,
    /// New states of the rows that changed.
    pub rows: HashMap<RowKey, TouchedRow>,
    /// The tenant's last seq after the batch.
    pub last_seq: i64,
}

/// The state a batch is merged against.
pub struct BatchContext<'a> {
    /// The tenant's last seq before the batch.
    pub last_seq: i64,
    /// Op_ids of the batch that are already logged.
    pub logged: HashMap<Uuid, LoggedOp>,
    /// Current states of the rows the batch touches (absent rows were never written).
    pub rows: HashMap<RowKey, RowState>,
    /// Changes whose hlc wall time is past this (milliseconds since the epoch) are rejected for clock skew.
    pub latest_allowed_millis: i64,
    /// Changes stamped at or before this hlc are refused `stale`: compaction removed log entries up to
    /// it, so such a change may be one whose op_id the log no longer remembers, or an edit to a row whose
    /// delete was compacted away. Applying it could diverge from replicas that saw what was compacted.
    pub stale_through: Option<Hlc>,
    /// Changes refused before merging (by index in the batch), with their reasons.
    pub refused: HashMap<usize, String>,
    /// The database's scope definitions.
    pub scopes: &'a Scopes,
    /// The scope instances of the rows of scoped models the batch touches, as stored.
    pub instances: HashMap<RowKey, Instances>,
    /// For a writer that may touch only some instances (besides tenant-wide rows): those. A change to a
    /// row outside them, before or after the change, is refused `out_of_scope`.
    pub writable: Option<Instances>,
}

/// Decides the outcome of every change of a batch, in order.
pub fn merge_batch(changes: &[Change], context: BatchContext<'_>) -> BatchOutcome {
    let BatchContext { mut last_seq, mut logged, mut rows, latest_allowed_millis, stale_through, refused, scopes, mut instances, writable } = context;
    let within = |set: &Instances| writable.as_ref().is_none_or(|allowed| set.iter().any(|instance| instance == TENANT_WIDE || allowed.contains(instance)));
    let mut seen_unlogged: HashMap<Uuid, [u8; 32]> = HashMap::new();
    let mut outcome = BatchOutcome::default();
    for (index, change) in changes.iter().enumerate() {
        let hash = change.payload_hash();
        let earlier = logged.get(&change.op_id).map(|op| (op.payload_hash, Some(op.seq)));
        let earlier = earlier.or_else(|| seen_unlogged.get(&change.op_id).map(|hash| (*hash, None)));
        let status = match earlier {
            _ if refused.contains_key(&index) => Status::Rejected { reason: refused[&index].clone() },
            Some((earlier_hash, _)) if earlier_hash != hash && earlier_hash != change.legacy_payload_hash() => {
                Status::Rejected { reason: REASON_OP_ID_CONFLICT.into() }
            }
            Some((_, Some(seq))) => Status::Duplicate { seq },
            _ if change.hlc.millis() > latest_allowed_millis => Status::Rejected { reason: REASON_CLOCK_SKEW.into() },
            _ if stale_through.is_some_and(|horizon| change.hlc <= horizon) => Status::Rejected { reason: REASON_STALE.into() },
            _ => {
                let key = (change.model.clone(), change.pk.clone());
                let row = rows.entry(key.clone()).or_default();
                let existed = row.existence.is_some();
                let before = scopes.membership(&key.0, row, instances.get(&key));
                // A writer held to some instances merges into a copy, kept only if the row stays within them.
                let mut copy = writable.as_ref().map(|_| row.clone());
                let won = match copy.as_mut() {
                    Some(copy) => copy.apply(change),
                    None => row.apply(change),
                };
                let merged = copy.as_ref().unwrap_or(&*row);
                let after = if merged.is_deleted() || !scopes.is_scoped(&key.0) { before.clone() } else { scopes.instances(&key.0, &merged.field_values()) };
                if (existed && !within(&before)) || !within(&after) {
                    Status::Rejected { reason: REASON_OUT_OF_SCOPE.into() }
                } else if won.anything() {
                    if let Some(copy) = copy {
                        *row = copy;
                    }
                    let row = rows.get(&key).expect("merged above");
                    last_seq += 1;
                    logged.insert(change.op_id, LoggedOp { seq: last_seq, payload_hash: hash });
                    if scopes.is_scoped(&key.0) {
                        instances.insert(key.clone(), after.clone());
                    }
                    outcome.rows.insert(key, TouchedRow { state: row.clone(), seq: last_seq, instances: after.clone() });
                    let payload = change.value.as_ref().map(|_| won.fields);
                    let before = if existed { before } else { after.clone() };
                    outcome.appended.push(Appended { seq: last_seq, index, payload, payload_hash: hash, before, after });
                    Status::Applied { seq: last_seq }
                } else {
                    seen_unlogged.insert(change.op_id, hash);
                    Status::Superseded
                }
            }
        };
        outcome.results.push(ChangeResult { op_id: change.op_id, status });
    }
    outcome.last_seq = last_seq;
    outcome
}

/// Merges changes, in the order given, into rows that start unwritten.
pub fn merge_all<'a>(changes: impl IntoIterator<Item = &'a Change>) -> BTreeMap<RowKey, RowState> {
    let mut rows = BTreeMap::new();
    for change in changes {
        rows.entry((change.model.clone(), change.pk.clone())).or_insert_with(RowState::default).apply(change);
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::Op;
    use crate::scope::ScopeDefinition;
    use serde_json::json;

    fn change(n: u128, op: Op, value: Value) -> Change {
        Change {
            op_id: Uuid::from_u128(n),
            model: "task".into(),
            pk: "1".into(),
            op,
            hlc: format!("2026-11-24T10:00:0{n}.000Z-0000").parse().unwrap(),
            actor: "a".into(),
            value: value.as_object().cloned(),
        }
    }

    fn merge(scopes: &Scopes, changes: &[Change], writable: Option<&[&str]>) -> BatchOutcome {
        let context = BatchContext {
            last_seq: 0,
            logged: HashMap::new(),
            rows: HashMap::new(),
            latest_allowed_millis: i64::MAX,
            stale_through: None,
            refused: HashMap::new(),
            scopes,
            instances: HashMap::new(),
            writable: writable.map(|instances| instances.iter().map(|instance| instance.to_string()).collect()),
        };
        merge_batch(changes, context)
    }

    fn set(instances: &[&str]) -> Instances {
        instances.iter().map(|instance| instance.to_string()).collect()
    }

    fn project_scope() -> Scopes {
        Scopes::new([ScopeDefinition { scope: "project".into(), model: "task".into(), field: "project".into() }])
    }

    #[test]
    fn membership_follows_the_merged_row_and_a_delete_keeps_it() {
        let scopes = project_scope();
        let changes = [
            change(1, Op::Insert, json!({"project": "a", "title": "x"})),
            change(2, Op::Update, json!({"title": "y"})),
            change(3, Op::Update, json!({"project": "b"})),
            change(4, Op::Delete, Value::Null),
            change(5, Op::Update, json!({"title": "back"})),
        ];
        let outcome = merge(&scopes, &changes, None);
        let moves: Vec<(Instances, Instances)> = outcome.appended.iter().map(|entry| (entry.before.clone(), entry.after.clone())).collect();
        assert_eq!(
            moves,
            [
                (set(&["project:a"]), set(&["project:a"])),
                (set(&["project:a"]), set(&["project:a"])),
                (set(&["project:a"]), set(&["project:b"])),
                (set(&["project:b"]), set(&["project:b"])),
                (set(&["project:b"]), set(&[])),
            ],
            "a new row's first change is whole where it lands; a revived row holds only its new fields"
        );
        assert_eq!(outcome.rows[&("task".to_owned(), "1".to_owned())].instances, set(&[]));
    }

    #[test]
    fn a_writer_held_to_instances_cannot_write_outside_them_before_or_after() {
        let scopes = project_scope();
        let outcome = merge(
            &scopes,
            &[
                change(1, Op::Insert, json!({"project": "b"})),
                change(2, Op::Insert, json!({"project": "a"})),
                change(3, Op::Update, json!({"project": "b"})),
                change(4, Op::Update, json!({"project": null})),
                change(5, Op::Update, json!({"title": "fine"})),
            ],
            Some(&["project:a"]),
        );
        let statuses: Vec<&Status> = outcome.results.iter().map(|result| &result.status).collect();
        let out = Status::Rejected { reason: REASON_OUT_OF_SCOPE.into() };
        assert_eq!(statuses, [&out, &Status::Applied { seq: 1 }, &out, &out, &Status::Applied { seq: 2 }]);
        let mut label = change(6, Op::Insert, json!({"name": "tenant-wide"}));
        label.model = "label".into();
        assert_eq!(merge(&scopes, &[label], Some(&[])).results[0].status, Status::Applied { seq: 1 }, "tenant-wide models stay writable");
    }
}
