//! Local writes and reads: each write is stamped, merged into the row the app sees and appended to the
//! outbox in one local transaction.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};
use sync_ext_protocol::change::validate_name;
use sync_ext_protocol::{Change, HlcClock, Op};
use uuid::Uuid;

use crate::clock::{read_clock, write_clock};
use crate::error::{Error, Result};
use crate::status::Origin;
use crate::store::Transaction;
use crate::{Remote, SyncClient};

pub(crate) fn to_object(value: &impl Serialize) -> Result<Map<String, Value>> {
    match serde_json::to_value(value).map_err(|error| Error::InvalidChange(error.to_string()))? {
        Value::Object(fields) => Ok(fields),
        other => Err(Error::InvalidChange(format!("a row or patch must serialize to a JSON object, not {other}"))),
    }
}

impl<R: Remote> SyncClient<R> {
    /// Runs `body` with the clock in one local transaction (serialized with other local writes), then
    /// sends the status and the event for the rows `body` returns.
    pub(crate) fn write<T>(&self, body: impl FnOnce(&mut dyn Transaction, &mut HlcClock) -> Result<(T, Vec<(String, String)>)>) -> Result<T> {
        let _writing = self.writing.lock().map_err(|_| Error::store("a previous write panicked"))?;
        let (value, rows, pending, rejections) = self.store.transaction(|t| {
            let mut clock = read_clock(t)?;
            let (value, rows) = body(t, &mut clock)?;
            write_clock(t, &clock)?;
            Ok((value, rows, t.outbox_len()?, t.rejections()?.len()))
        })?;
        self.counted(pending, rejections);
        self.emit(Origin::Local, rows, false);
        Ok(value)
    }

    /// Stamps a change, merges it into the row the app sees and appends it to the outbox.
    pub(crate) fn record(&self, t: &mut dyn Transaction, clock: &mut HlcClock, model: &str, pk: &str, op: Op, value: Option<Map<String, Value>>) -> Result<Change> {
        validate_name("model", model)?;
        validate_name("pk", pk)?;
        if op != Op::Delete && value.is_none() {
            return Err(Error::InvalidChange(format!("an {} needs a value", op.as_str())));
        }
        let change = Change {
            op_id: Uuid::new_v4(),
            model: model.to_owned(),
            pk: pk.to_owned(),
            op,
            hlc: clock.tick(self.now()),
            actor: self.actor.clone(),
            value: if op == Op::Delete { None } else { value },
        };
        let max_value_bytes = self.limits().map_or(usize::MAX, |limits| usize::try_from(limits.max_value_bytes).unwrap_or(0));
        if let Some(reason) = sync_ext_protocol::change::unstorable(&"change", &change, max_value_bytes) {
            return Err(Error::Unstorable(reason));
        }
        let mut row = t.row(model, pk)?;
        row.local.apply(&change);
        t.put_row(model, pk, &row)?;
        t.enqueue(&change)?;
        Ok(change)
    }

    /// Records a change locally, at once and offline: stamps it with the clock, merges it into the
    /// row the app sees and appends it to the outbox, in one local transaction. A change the server
    /// would refuse as `value_too_large` (once a push has told its limits) or `invalid_text` (a NUL
    /// character) is refused here, with [`Error::Unstorable`], and changes nothing.
    pub fn apply_change(&self, model: &str, pk: &str, op: Op, value: Option<Map<String, Value>>) -> Result<Change> {
        self.write(|t, clock| {
            let change = self.record(t, clock, model, pk, op, value)?;
            Ok((change, vec![(model.to_owned(), pk.to_owned())]))
        })
    }

    /// Inserts a full row.
    pub fn insert(&self, model: &str, pk: &str, row: &impl Serialize) -> Result<Change> {
        self.apply_change(model, pk, Op::Insert, Some(to_object(row)?))
    }

    /// Updates the fields of `patch` (a struct or map of the changed fields only).
    pub fn update(&self, model: &str, pk: &str, patch: &impl Serialize) -> Result<Change> {
        self.apply_change(model, pk, Op::Update, Some(to_object(patch)?))
    }

    /// Deletes a row.
    pub fn delete(&self, model: &str, pk: &str) -> Result<Change> {
        self.apply_change(model, pk, Op::Delete, None)
    }

    /// A row as the app sees it, typed; `None` when absent or deleted.
    pub fn get<T: DeserializeOwned>(&self, model: &str, pk: &str) -> Result<Option<T>> {
        let row = self.store.transaction(|t| t.row(model, pk))?;
        row.local.visible().map(|fields| decode(model, pk, fields)).transpose()
    }

    /// Every live row of a model, typed, by pk.
    pub fn list<T: DeserializeOwned>(&self, model: &str) -> Result<Vec<(String, T)>> {
        let rows = self.store.transaction(|t| t.rows(model))?;
        rows.into_iter()
            .filter_map(|(pk, row)| row.local.visible().map(|fields| (pk, fields)))
            .map(|(pk, fields)| Ok((pk.clone(), decode(model, &pk, fields)?)))
            .collect()
    }

    /// How many changes wait in the outbox.
    pub fn pending(&self) -> Result<usize> {
        self.store.transaction(|t| t.outbox_len())
    }
}

pub(crate) fn decode<T: DeserializeOwned>(model: &str, pk: &str, fields: Map<String, Value>) -> Result<T> {
    serde_json::from_value(Value::Object(fields)).map_err(|error| Error::Decode { model: model.into(), pk: pk.into(), problem: error.to_string() })
}
