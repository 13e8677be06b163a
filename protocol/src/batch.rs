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
use crate::wire::{ChangeResult, Status, REASON_CLOCK_SKEW, REASON_OP_ID_CONFLICT, REASON_STALE};

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
}

/// A row whose state the batch changed, with the seq of the last change that did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TouchedRow {
    pub state: RowState,
    pub seq: i64,
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
pub struct BatchContext {
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
}

/// Decides the outcome of every change of a batch, in order.
pub fn merge_batch(changes: &[Change], context: BatchContext) -> BatchOutcome {
    let BatchContext { mut last_seq, mut logged, mut rows, latest_allowed_millis, stale_through, refused } = context;
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
                let won = row.apply(change);
                if won.anything() {
                    last_seq += 1;
                    logged.insert(change.op_id, LoggedOp { seq: last_seq, payload_hash: hash });
                    outcome.rows.insert(key, TouchedRow { state: row.clone(), seq: last_seq });
                    let payload = change.value.as_ref().map(|_| won.fields);
                    outcome.appended.push(Appended { seq: last_seq, index, payload, payload_hash: hash });
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
