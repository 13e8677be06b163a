//! The local store: rows, the outbox of unsent changes, the HLC and the pull cursor, each updated
//! in one transaction with the others, so a crash at any point loses and duplicates nothing.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Map;
use sync_ext_protocol::{Change, RowState, StoredRow};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::outbox::{PendingChange, Rejection};
use crate::query::Query;

/// A row as the client keeps it: what the server confirmed (the merge of pulled changes), and what the
/// app sees (that plus the changes still in the outbox).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalRow {
    pub confirmed: RowState,
    pub local: RowState,
}

#[derive(Serialize, Deserialize)]
struct StoredLocalRow {
    confirmed: Option<StoredRow>,
    local: Option<StoredRow>,
}

/// The confirmed half of a stored row alone (the local half is skipped, not decoded).
#[derive(Deserialize)]
struct StoredConfirmed {
    confirmed: Option<StoredRow>,
}

fn decode_confirmed(text: &str) -> Result<RowState> {
    let stored: StoredConfirmed = serde_json::from_str(text).map_err(|error| Error::store(format!("a stored row does not decode: {error}")))?;
    stored.confirmed.map(StoredRow::into_state).transpose().map_err(Error::store).map(Option::unwrap_or_default)
}

impl LocalRow {
    fn encode(&self) -> String {
        let stored = StoredLocalRow { confirmed: StoredRow::from_state(&self.confirmed), local: StoredRow::from_state(&self.local) };
        serde_json::to_string(&stored).expect("rows serialize")
    }

    fn decode(text: &str) -> Result<Self> {
        let stored: StoredLocalRow = serde_json::from_str(text).map_err(|error| Error::store(format!("a stored row does not decode: {error}")))?;
        let state = |row: Option<StoredRow>| row.map(StoredRow::into_state).transpose().map_err(Error::store).map(Option::unwrap_or_default);
        Ok(LocalRow { confirmed: state(stored.confirmed)?, local: state(stored.local)? })
    }
}

/// Reads and writes inside one local transaction.
pub trait Transaction {
    /// A row's states (both empty for a row never seen).
    fn row(&mut self, model: &str, pk: &str) -> Result<LocalRow>;
    fn put_row(&mut self, model: &str, pk: &str, row: &LocalRow) -> Result<()>;
    /// Forgets a row.
    fn delete_row(&mut self, model: &str, pk: &str) -> Result<()>;
    /// The rows of which the server confirmed nothing (only local changes, or none), as (model, pk).
    fn unconfirmed(&mut self) -> Result<Vec<(String, String)>>;
    /// Forgets every row (a reset reloads them).
    fn clear_rows(&mut self) -> Result<()>;
    /// Every row of a model, by pk.
    fn rows(&mut self, model: &str) -> Result<BTreeMap<String, LocalRow>>;
    /// The rows of a model whose local state is visible and passes the query's filters, in its order,
    /// at most its limit (a valid query: see [`Query`]).
    fn query(&mut self, model: &str, query: &Query) -> Result<Vec<(String, LocalRow)>>;
    /// Visits the confirmed state of every row of every model, one at a time, in no particular order
    /// (the rows are streamed, not collected; their local state is not decoded).
    fn for_each_confirmed(&mut self, visit: &mut dyn FnMut(&str, &str, &RowState) -> Result<()>) -> Result<()>;
    /// The oldest `limit` unsent changes, oldest first.
    fn outbox(&mut self, limit: usize) -> Result<Vec<PendingChange>>;
    /// How many changes are unsent.
    fn outbox_len(&mut self) -> Result<usize>;
    /// Appends a change to the outbox.
    fn enqueue(&mut self, change: &Change) -> Result<()>;
    /// Removes a change from the outbox; whether it was there.
    fn dequeue(&mut self, op_id: Uuid) -> Result<bool>;
    /// Counts a failed attempt to push an unsent change, and keeps the error.
    fn note_failure(&mut self, op_id: Uuid, error: &str) -> Result<()>;
    /// Records a change the server refused, with its reason; returns the record with its id.
    fn record_rejection(&mut self, change: &Change, reason: &str, at: SystemTime) -> Result<Rejection>;
    /// The recorded rejections, oldest first.
    fn rejections(&mut self) -> Result<Vec<Rejection>>;
    /// Removes a recorded rejection and returns it, if it was there.
    fn remove_rejection(&mut self, id: i64) -> Result<Option<Rejection>>;
    /// Forgets everything: rows, outbox, rejections and metadata.
    fn clear_all(&mut self) -> Result<()>;
    fn meta(&mut self, key: &str) -> Result<Option<String>>;
    fn set_meta(&mut self, key: &str, value: &str) -> Result<()>;
    fn delete_meta(&mut self, key: &str) -> Result<()>;
}

/// Where a client keeps its data: an embedded SQLite file (the default) or memory (for tests).
pub struct LocalStore(Backend);

enum Backend {
    Sqlite(Mutex<rusqlite::Connection>),
    Memory(Mutex<MemoryState>),
}

#[derive(Clone, Default)]
struct MemoryState {
    rows: BTreeMap<(String, String), LocalRow>,
    outbox: Vec<PendingChange>,
    rejections: Vec<Rejection>,
    /// The id of the last rejection recorded (ids are never reused).
    last_rejection: i64,
    meta: BTreeMap<String, String>,
}

/// The version of the SQLite schema this code writes (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 1;

fn to_millis(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |since| i64::try_from(since.as_millis()).unwrap_or(i64::MAX))
}

fn from_millis(millis: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(millis).unwrap_or(0))
}

impl LocalStore {
    /// A store in a SQLite file, created if missing. Writes are durable when they return (WAL, full sync).
    pub fn sqlite(path: impl AsRef<Path>) -> Result<Self> {
        let connection = rusqlite::Connection::open(path)?;
        connection.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS rows (model TEXT NOT NULL, pk TEXT NOT NULL, state TEXT NOT NULL, PRIMARY KEY (model, pk));
             CREATE TABLE IF NOT EXISTS outbox (position INTEGER PRIMARY KEY AUTOINCREMENT, op_id TEXT NOT NULL UNIQUE, change TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
        )?;
        let version: i64 = connection.query_row("PRAGMA user_version", [], |row| row.get(0))?;
        if version < 1 {
            // Version 1: outbox bookkeeping, and the rejections the app has not drained yet.
            connection.execute_batch(
                "BEGIN;
                 ALTER TABLE outbox ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
                 ALTER TABLE outbox ADD COLUMN last_error TEXT;
                 CREATE TABLE rejections (id INTEGER PRIMARY KEY AUTOINCREMENT, change TEXT NOT NULL, reason TEXT NOT NULL, rejected_at INTEGER NOT NULL);
                 PRAGMA user_version = 1;
                 COMMIT;",
            )?;
        } else if version > SCHEMA_VERSION {
            return Err(Error::store(format!("the local store is at schema version {version}, newer than this client ({SCHEMA_VERSION})")));
        }
        Ok(LocalStore(Backend::Sqlite(Mutex::new(connection))))
    }

    /// A store in memory, gone with the process.
    pub fn memory() -> Self {
        LocalStore(Backend::Memory(Mutex::new(MemoryState::default())))
    }

    /// Runs `body` in one transaction: all its writes happen, or (on error) none.
    pub fn transaction<T>(&self, body: impl FnOnce(&mut dyn Transaction) -> Result<T>) -> Result<T> {
        match &self.0 {
            Backend::Sqlite(connection) => {
                let mut connection = connection.lock().map_err(|_| Error::store("a previous transaction panicked"))?;
                let transaction = connection.transaction()?;
                let mut wrapped = SqliteTransaction(transaction);
                let value = body(&mut wrapped)?;
                wrapped.0.commit()?;
                Ok(value)
            }
            Backend::Memory(state) => {
                let mut state = state.lock().map_err(|_| Error::store("a previous transaction panicked"))?;
                let mut draft = state.clone();
                let value = body(&mut draft)?;
                *state = draft;
                Ok(value)
            }
        }
    }
}

struct SqliteTransaction<'c>(rusqlite::Transaction<'c>);

fn decode_change(text: &str) -> Result<Change> {
    serde_json::from_str(text).map_err(|error| Error::store(format!("a stored change does not decode: {error}")))
}

fn encode_change(change: &Change) -> String {
    serde_json::to_string(change).expect("changes serialize")
}

/// The SQL of a field of the row the app sees (a query field: letters, digits and `_`).
fn field_sql(field: &str) -> String {
    format!("json_extract(state, '$.local.value.{field}')")
}

/// The SQL of a query over the rows of `model`, and its parameters.
fn query_sql(model: &str, query: &Query) -> (String, Vec<rusqlite::types::Value>) {
    let mut sql = "SELECT pk, state FROM rows WHERE model = ?1 AND json_extract(state, '$.local.deleted') = 0".to_owned();
    let mut values = vec![rusqlite::types::Value::Text(model.to_owned())];
    for (field, cmp, value) in &query.filters {
        match value {
            serde_json::Value::Null => sql.push_str(&format!(" AND {} IS NULL", field_sql(field))),
            _ => {
                values.push(sql_value(value));
                sql.push_str(&format!(" AND {} {} ?{}", field_sql(field), cmp.sql(), values.len()));
            }
        }
    }
    match &query.order {
        Some((field, descending)) => {
            let direction = if *descending { "DESC" } else { "ASC" };
            sql.push_str(&format!(" ORDER BY {} {direction}, pk {direction}", field_sql(field)));
        }
        None => sql.push_str(" ORDER BY pk"),
    }
    if let Some(limit) = query.limit {
        sql.push_str(&format!(" LIMIT {}", i64::try_from(limit).unwrap_or(i64::MAX)));
    }
    (sql, values)
}

/// A JSON scalar as the SQL value `json_extract` returns for it.
fn sql_value(value: &serde_json::Value) -> rusqlite::types::Value {
    use rusqlite::types::Value as Sql;
    match value {
        serde_json::Value::Bool(flag) => Sql::Integer(i64::from(*flag)),
        serde_json::Value::Number(number) => number.as_i64().map_or_else(|| Sql::Real(number.as_f64().unwrap_or(f64::NAN)), Sql::Integer),
        serde_json::Value::String(text) => Sql::Text(text.clone()),
        other => Sql::Text(other.to_string()),
    }
}

/// A rejection from its columns: id, change, reason, rejected_at.
fn read_rejection(row: &rusqlite::Row<'_>) -> Result<Rejection> {
    Ok(Rejection { id: row.get(0)?, change: decode_change(&row.get::<_, String>(1)?)?, reason: row.get(2)?, rejected_at: from_millis(row.get(3)?) })
}

impl Transaction for SqliteTransaction<'_> {
    fn row(&mut self, model: &str, pk: &str) -> Result<LocalRow> {
        let mut statement = self.0.prepare_cached("SELECT state FROM rows WHERE model = ?1 AND pk = ?2")?;
        let mut found = statement.query_map((model, pk), |row| row.get::<_, String>(0))?;
        match found.next() {
            Some(text) => LocalRow::decode(&text?),
            None => Ok(LocalRow::default()),
        }
    }

    fn put_row(&mut self, model: &str, pk: &str, row: &LocalRow) -> Result<()> {
        self.0
            .prepare_cached("INSERT INTO rows (model, pk, state) VALUES (?1, ?2, ?3) ON CONFLICT (model, pk) DO UPDATE SET state = excluded.state")?
            .execute((model, pk, row.encode()))?;
        Ok(())
    }

    fn delete_row(&mut self, model: &str, pk: &str) -> Result<()> {
        self.0.prepare_cached("DELETE FROM rows WHERE model = ?1 AND pk = ?2")?.execute((model, pk))?;
        Ok(())
    }

    fn unconfirmed(&mut self) -> Result<Vec<(String, String)>> {
        let mut statement = self.0.prepare_cached("SELECT model, pk FROM rows WHERE json_extract(state, '$.confirmed') IS NULL")?;
        let rows = statement.query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn clear_rows(&mut self) -> Result<()> {
        self.0.execute("DELETE FROM rows", [])?;
        Ok(())
    }

    fn rows(&mut self, model: &str) -> Result<BTreeMap<String, LocalRow>> {
        let mut statement = self.0.prepare_cached("SELECT pk, state FROM rows WHERE model = ?1")?;
        let rows = statement.query_map([model], |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?)))?;
        rows.map(|row| {
            let (pk, state) = row?;
            Ok((pk, LocalRow::decode(&state)?))
        })
        .collect()
    }

    fn query(&mut self, model: &str, query: &Query) -> Result<Vec<(String, LocalRow)>> {
        let fields = query.filters.iter().map(|(field, _, _)| field).chain(query.order.iter().map(|(field, _)| field));
        for field in fields {
            // The expression of the index and of the query must be the same text for SQLite to use it.
            self.0.execute(&format!("CREATE INDEX IF NOT EXISTS rows_by_{field} ON rows (model, {}, pk)", field_sql(field)), [])?;
        }
        let (sql, values) = query_sql(model, query);
        let mut statement = self.0.prepare_cached(&sql)?;
        let rows = statement.query_map(rusqlite::params_from_iter(values), |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?)))?;
        rows.map(|row| {
            let (pk, state) = row?;
            Ok((pk, LocalRow::decode(&state)?))
        })
        .collect()
    }

    fn for_each_confirmed(&mut self, visit: &mut dyn FnMut(&str, &str, &RowState) -> Result<()>) -> Result<()> {
        let mut statement = self.0.prepare_cached("SELECT model, pk, state FROM rows")?;
        let mut rows = statement.query([])?;
        while let Some(row) = rows.next()? {
            let (model, pk, state) = (row.get::<_, String>(0)?, row.get::<_, String>(1)?, row.get::<_, String>(2)?);
            visit(&model, &pk, &decode_confirmed(&state)?)?;
        }
        Ok(())
    }

    fn outbox(&mut self, limit: usize) -> Result<Vec<PendingChange>> {
        let mut statement = self.0.prepare_cached("SELECT change, attempts, last_error FROM outbox ORDER BY position LIMIT ?1")?;
        let mut rows = statement.query([i64::try_from(limit).unwrap_or(i64::MAX)])?;
        let mut pending = Vec::new();
        while let Some(row) = rows.next()? {
            pending.push(PendingChange { change: decode_change(&row.get::<_, String>(0)?)?, attempts: row.get(1)?, last_error: row.get(2)? });
        }
        Ok(pending)
    }

    fn outbox_len(&mut self) -> Result<usize> {
        let count: i64 = self.0.prepare_cached("SELECT count(*) FROM outbox")?.query_row([], |row| row.get(0))?;
        Ok(usize::try_from(count).unwrap_or(0))
    }

    fn enqueue(&mut self, change: &Change) -> Result<()> {
        self.0.prepare_cached("INSERT INTO outbox (op_id, change) VALUES (?1, ?2)")?.execute((change.op_id.to_string(), encode_change(change)))?;
        Ok(())
    }

    fn dequeue(&mut self, op_id: Uuid) -> Result<bool> {
        Ok(self.0.prepare_cached("DELETE FROM outbox WHERE op_id = ?1")?.execute([op_id.to_string()])? > 0)
    }

    fn note_failure(&mut self, op_id: Uuid, error: &str) -> Result<()> {
        self.0.prepare_cached("UPDATE outbox SET attempts = attempts + 1, last_error = ?2 WHERE op_id = ?1")?.execute((op_id.to_string(), error))?;
        Ok(())
    }

    fn record_rejection(&mut self, change: &Change, reason: &str, at: SystemTime) -> Result<Rejection> {
        self.0
            .prepare_cached("INSERT INTO rejections (change, reason, rejected_at) VALUES (?1, ?2, ?3)")?
            .execute((encode_change(change), reason, to_millis(at)))?;
        Ok(Rejection { id: self.0.last_insert_rowid(), change: change.clone(), reason: reason.to_owned(), rejected_at: from_millis(to_millis(at)) })
    }

    fn rejections(&mut self) -> Result<Vec<Rejection>> {
        let mut statement = self.0.prepare_cached("SELECT id, change, reason, rejected_at FROM rejections ORDER BY id")?;
        let mut rows = statement.query([])?;
        let mut rejections = Vec::new();
        while let Some(row) = rows.next()? {
            rejections.push(read_rejection(row)?);
        }
        Ok(rejections)
    }

    fn remove_rejection(&mut self, id: i64) -> Result<Option<Rejection>> {
        let mut statement = self.0.prepare_cached("DELETE FROM rejections WHERE id = ?1 RETURNING id, change, reason, rejected_at")?;
        let mut rows = statement.query([id])?;
        rows.next()?.map(read_rejection).transpose()
    }

    fn clear_all(&mut self) -> Result<()> {
        self.0.execute_batch("DELETE FROM rows; DELETE FROM outbox; DELETE FROM rejections; DELETE FROM meta;")?;
        Ok(())
    }

    fn meta(&mut self, key: &str) -> Result<Option<String>> {
        let mut statement = self.0.prepare_cached("SELECT value FROM meta WHERE key = ?1")?;
        let mut found = statement.query_map([key], |row| row.get::<_, String>(0))?;
        Ok(found.next().transpose()?)
    }

    fn set_meta(&mut self, key: &str, value: &str) -> Result<()> {
        self.0
            .prepare_cached("INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value")?
            .execute((key, value))?;
        Ok(())
    }

    fn delete_meta(&mut self, key: &str) -> Result<()> {
        self.0.prepare_cached("DELETE FROM meta WHERE key = ?1")?.execute([key])?;
        Ok(())
    }
}

impl Transaction for MemoryState {
    fn row(&mut self, model: &str, pk: &str) -> Result<LocalRow> {
        Ok(self.rows.get(&(model.to_owned(), pk.to_owned())).cloned().unwrap_or_default())
    }

    fn put_row(&mut self, model: &str, pk: &str, row: &LocalRow) -> Result<()> {
        self.rows.insert((model.to_owned(), pk.to_owned()), row.clone());
        Ok(())
    }

    fn delete_row(&mut self, model: &str, pk: &str) -> Result<()> {
        self.rows.remove(&(model.to_owned(), pk.to_owned()));
        Ok(())
    }

    fn unconfirmed(&mut self) -> Result<Vec<(String, String)>> {
        Ok(self.rows.iter().filter(|(_, row)| row.confirmed.existence.is_none()).map(|(key, _)| key.clone()).collect())
    }

    fn clear_rows(&mut self) -> Result<()> {
        self.rows.clear();
        Ok(())
    }

    fn rows(&mut self, model: &str) -> Result<BTreeMap<String, LocalRow>> {
        Ok(self.rows.iter().filter(|((m, _), _)| m == model).map(|((_, pk), row)| (pk.clone(), row.clone())).collect())
    }

    fn query(&mut self, model: &str, query: &Query) -> Result<Vec<(String, LocalRow)>> {
        let mut found: Vec<(String, LocalRow, Map<String, serde_json::Value>)> = self
            .rows
            .iter()
            .filter(|((m, _), _)| m == model)
            .filter_map(|((_, pk), row)| row.local.visible().filter(|fields| query.matches(fields)).map(|fields| (pk.clone(), row.clone(), fields)))
            .collect();
        found.sort_by(|(left_pk, _, left), (right_pk, _, right)| query.compare((left_pk, left), (right_pk, right)));
        Ok(found.into_iter().take(query.limit.unwrap_or(usize::MAX)).map(|(pk, row, _)| (pk, row)).collect())
    }

    fn for_each_confirmed(&mut self, visit: &mut dyn FnMut(&str, &str, &RowState) -> Result<()>) -> Result<()> {
        self.rows.iter().try_for_each(|((model, pk), row)| visit(model, pk, &row.confirmed))
    }

    fn outbox(&mut self, limit: usize) -> Result<Vec<PendingChange>> {
        Ok(self.outbox.iter().take(limit).cloned().collect())
    }

    fn outbox_len(&mut self) -> Result<usize> {
        Ok(self.outbox.len())
    }

    fn enqueue(&mut self, change: &Change) -> Result<()> {
        self.outbox.push(PendingChange { change: change.clone(), attempts: 0, last_error: None });
        Ok(())
    }

    fn dequeue(&mut self, op_id: Uuid) -> Result<bool> {
        let before = self.outbox.len();
        self.outbox.retain(|pending| pending.change.op_id != op_id);
        Ok(self.outbox.len() < before)
    }

    fn note_failure(&mut self, op_id: Uuid, error: &str) -> Result<()> {
        for pending in self.outbox.iter_mut().filter(|pending| pending.change.op_id == op_id) {
            pending.attempts += 1;
            pending.last_error = Some(error.to_owned());
        }
        Ok(())
    }

    fn record_rejection(&mut self, change: &Change, reason: &str, at: SystemTime) -> Result<Rejection> {
        self.last_rejection += 1;
        let rejection = Rejection { id: self.last_rejection, change: change.clone(), reason: reason.to_owned(), rejected_at: from_millis(to_millis(at)) };
        self.rejections.push(rejection.clone());
        Ok(rejection)
    }

    fn rejections(&mut self) -> Result<Vec<Rejection>> {
        Ok(self.rejections.clone())
    }

    fn remove_rejection(&mut self, id: i64) -> Result<Option<Rejection>> {
        let found = self.rejections.iter().position(|rejection| rejection.id == id);
        Ok(found.map(|index| self.rejections.remove(index)))
    }

    fn clear_all(&mut self) -> Result<()> {
        *self = MemoryState { last_rejection: self.last_rejection, ..MemoryState::default() };
        Ok(())
    }

    fn meta(&mut self, key: &str) -> Result<Option<String>> {
        Ok(self.meta.get(key).cloned())
    }

    fn set_meta(&mut self, key: &str, value: &str) -> Result<()> {
        self.meta.insert(key.to_owned(), value.to_owned());
        Ok(())
    }

    fn delete_meta(&mut self, key: &str) -> Result<()> {
        self.meta.remove(key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::Cmp;

    /// What SQLite plans for a query, after the store created its indexes.
    fn plan(query: &Query) -> String {
        let path = std::env::temp_dir().join(format!("sync_ext_client_plan_{}.db", Uuid::new_v4()));
        let store = LocalStore::sqlite(&path).unwrap();
        store.transaction(|t| t.query("todo", query).map(drop)).unwrap();
        let Backend::Sqlite(connection) = &store.0 else { unreachable!("a SQLite store") };
        let connection = connection.lock().unwrap();
        let (sql, values) = query_sql("todo", query);
        let mut statement = connection.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let steps: Vec<String> = statement.query_map(rusqlite::params_from_iter(values), |row| row.get::<_, String>(3)).unwrap().map(|step| step.unwrap()).collect();
        drop(statement);
        drop(connection);
        drop(store);
        std::fs::remove_file(&path).ok();
        steps.join("; ")
    }

    #[test]
    fn a_filter_and_an_order_are_served_by_an_expression_index_created_on_demand() {
        let filtered = plan(&Query::new().filter("done", Cmp::Eq, false));
        assert!(filtered.contains("USING INDEX rows_by_done (model=? AND <expr>=?)"), "{filtered}");
        let ordered = plan(&Query::new().order_by("due"));
        assert!(ordered.contains("USING INDEX rows_by_due (model=?)") && !ordered.contains("TEMP B-TREE"), "read in index order: {ordered}");
        let ranged = plan(&Query::new().filter("due", Cmp::Gt, "2026").order_by_desc("due").limit(5));
        assert!(ranged.contains("USING INDEX rows_by_due (model=? AND <expr>>?)") && !ranged.contains("TEMP B-TREE"), "{ranged}");
    }
}
