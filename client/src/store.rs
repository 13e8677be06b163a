//! The local store: rows, the outbox of unsent changes, the HLC and the pull cursor, each updated
//! in one transaction with the others, so a crash at any point loses and duplicates nothing.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sync_ext_protocol::{Change, RowState, StoredRow};
use uuid::Uuid;

use crate::error::{Error, Result};

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
    let stored: StoredConfirmed = serde_json::from_str(text).map_err(|error| Error::Store(format!("a stored row does not decode: {error}")))?;
    stored.confirmed.map(StoredRow::into_state).transpose().map_err(Error::Store).map(Option::unwrap_or_default)
}

impl LocalRow {
    fn encode(&self) -> String {
        let stored = StoredLocalRow { confirmed: StoredRow::from_state(&self.confirmed), local: StoredRow::from_state(&self.local) };
        serde_json::to_string(&stored).expect("rows serialize")
    }

    fn decode(text: &str) -> Result<Self> {
        let stored: StoredLocalRow = serde_json::from_str(text).map_err(|error| Error::Store(format!("a stored row does not decode: {error}")))?;
        let state = |row: Option<StoredRow>| row.map(StoredRow::into_state).transpose().map_err(Error::Store).map(Option::unwrap_or_default);
        Ok(LocalRow { confirmed: state(stored.confirmed)?, local: state(stored.local)? })
    }
}

/// Reads and writes inside one local transaction.
pub trait Transaction {
    /// A row's states (both empty for a row never seen).
    fn row(&mut self, model: &str, pk: &str) -> Result<LocalRow>;
    fn put_row(&mut self, model: &str, pk: &str, row: &LocalRow) -> Result<()>;
    /// Forgets every row (a reset reloads them).
    fn clear_rows(&mut self) -> Result<()>;
    /// Every row of a model, by pk.
    fn rows(&mut self, model: &str) -> Result<BTreeMap<String, LocalRow>>;
    /// Visits the confirmed state of every row of every model, one at a time, in no particular order
    /// (the rows are streamed, not collected; their local state is not decoded).
    fn for_each_confirmed(&mut self, visit: &mut dyn FnMut(&str, &str, &RowState) -> Result<()>) -> Result<()>;
    /// The oldest `limit` unsent changes, oldest first.
    fn outbox(&mut self, limit: usize) -> Result<Vec<Change>>;
    fn enqueue(&mut self, change: &Change) -> Result<()>;
    fn dequeue(&mut self, op_id: Uuid) -> Result<()>;
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
    outbox: Vec<Change>,
    meta: BTreeMap<String, String>,
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
                let mut connection = connection.lock().map_err(|_| Error::Store("a previous transaction panicked".into()))?;
                let transaction = connection.transaction()?;
                let mut wrapped = SqliteTransaction(transaction);
                let value = body(&mut wrapped)?;
                wrapped.0.commit()?;
                Ok(value)
            }
            Backend::Memory(state) => {
                let mut state = state.lock().map_err(|_| Error::Store("a previous transaction panicked".into()))?;
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
    serde_json::from_str(text).map_err(|error| Error::Store(format!("an outbox change does not decode: {error}")))
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

    fn for_each_confirmed(&mut self, visit: &mut dyn FnMut(&str, &str, &RowState) -> Result<()>) -> Result<()> {
        let mut statement = self.0.prepare_cached("SELECT model, pk, state FROM rows")?;
        let mut rows = statement.query([])?;
        while let Some(row) = rows.next()? {
            let (model, pk, state) = (row.get::<_, String>(0)?, row.get::<_, String>(1)?, row.get::<_, String>(2)?);
            visit(&model, &pk, &decode_confirmed(&state)?)?;
        }
        Ok(())
    }

    fn outbox(&mut self, limit: usize) -> Result<Vec<Change>> {
        let mut statement = self.0.prepare_cached("SELECT change FROM outbox ORDER BY position LIMIT ?1")?;
        let changes = statement.query_map([limit as i64], |row| row.get::<_, String>(0))?;
        changes.map(|text| decode_change(&text?)).collect()
    }

    fn enqueue(&mut self, change: &Change) -> Result<()> {
        let text = serde_json::to_string(change).expect("changes serialize");
        self.0.prepare_cached("INSERT INTO outbox (op_id, change) VALUES (?1, ?2)")?.execute((change.op_id.to_string(), text))?;
        Ok(())
    }

    fn dequeue(&mut self, op_id: Uuid) -> Result<()> {
        self.0.prepare_cached("DELETE FROM outbox WHERE op_id = ?1")?.execute([op_id.to_string()])?;
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

    fn clear_rows(&mut self) -> Result<()> {
        self.rows.clear();
        Ok(())
    }

    fn rows(&mut self, model: &str) -> Result<BTreeMap<String, LocalRow>> {
        Ok(self.rows.iter().filter(|((m, _), _)| m == model).map(|((_, pk), row)| (pk.clone(), row.clone())).collect())
    }

    fn for_each_confirmed(&mut self, visit: &mut dyn FnMut(&str, &str, &RowState) -> Result<()>) -> Result<()> {
        self.rows.iter().try_for_each(|((model, pk), row)| visit(model, pk, &row.confirmed))
    }

    fn outbox(&mut self, limit: usize) -> Result<Vec<Change>> {
        Ok(self.outbox.iter().take(limit).cloned().collect())
    }

    fn enqueue(&mut self, change: &Change) -> Result<()> {
        self.outbox.push(change.clone());
        Ok(())
    }

    fn dequeue(&mut self, op_id: Uuid) -> Result<()> {
        self.outbox.retain(|change| change.op_id != op_id);
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
