//! Typed local data: a [`Collection`] of a [`Model`], local transactions over several rows
//! ([`LocalTransaction`]), model versions and their migration, and async access to the store.

use std::marker::PhantomData;
use std::sync::Arc;

use serde_json::{Map, Value};
use sync_ext_protocol::{Change, HlcClock, Op};

use crate::error::{Error, Result};
use crate::local::{decode, to_object};
use crate::model::{Key, Model};
use crate::query::Query;
use crate::store::{LocalRow, Transaction};
use crate::{Remote, SyncClient};

/// Where the version of a model that last opened the store is kept (`model_version:<name>`).
const META_MODEL_VERSION: &str = "model_version:";

/// Rows read from the store: those that decoded, by key, and those that did not, as (pk, error) (a
/// row written by a newer or older version of the app, a NULL where the type has no `Option`, a pk
/// that is not one of the model's keys). A row that fails to decode never fails the read.
#[derive(Debug)]
pub struct Listed<T: Model> {
    /// The rows that decoded, with their keys, in the order asked for.
    pub rows: Vec<(T::Key, T)>,
    /// The rows that did not, with their wire pk and the error ([`Error::Decode`]).
    pub failed: Vec<(String, Error)>,
}

impl<T: Model> Listed<T> {
    /// Decodes the visible local state of rows of `T`.
    fn decode(found: impl IntoIterator<Item = (String, LocalRow)>) -> Self {
        let mut listed = Listed { rows: Vec::new(), failed: Vec::new() };
        for (pk, row) in found {
            let Some(fields) = row.local.visible() else { continue };
            let decoded = T::Key::from_pk(&pk)
                .ok_or_else(|| Error::Decode { model: T::NAME.into(), pk: pk.clone(), problem: format!("the pk is not a key of {}", std::any::type_name::<T::Key>()) })
                .and_then(|key| Ok((key, decode(T::NAME, &pk, fields)?)));
            match decoded {
                Ok(row) => listed.rows.push(row),
                Err(error) => listed.failed.push((pk, error)),
            }
        }
        listed
    }
}

/// The rows of one [`Model`], typed: see [`SyncClient::collection`].
pub struct Collection<'c, R, T> {
    client: &'c SyncClient<R>,
    model: PhantomData<fn() -> T>,
}

impl<R: Remote, T: Model> Collection<'_, R, T> {
    /// A row as the app sees it; `None` when absent or deleted. A row that does not decode is
    /// [`Error::Decode`].
    pub fn get(&self, key: &T::Key) -> Result<Option<T>> {
        let pk = key.to_pk();
        let row = self.client.store.transaction(|t| t.row(T::NAME, &pk))?;
        row.local.visible().map(|fields| decode(T::NAME, &pk, fields)).transpose()
    }

    /// Inserts a row under its key ([`Model::key`]).
    pub fn insert(&self, row: &T) -> Result<Change> {
        self.client.transaction(|tx| tx.insert(row))
    }

    /// Updates the fields the patch carries.
    pub fn update(&self, key: &T::Key, patch: &T::Patch) -> Result<Change> {
        self.client.transaction(|tx| tx.update::<T>(key, patch))
    }

    /// Deletes a row.
    pub fn delete(&self, key: &T::Key) -> Result<Change> {
        self.client.transaction(|tx| tx.delete::<T>(key))
    }

    /// Every live row, in pk order (the wire pk's text order).
    pub fn list(&self) -> Result<Listed<T>> {
        self.query(&Query::new())
    }

    /// The live rows the query selects, in its order (see [`Query`]).
    pub fn query(&self, query: &Query) -> Result<Listed<T>> {
        query.validate()?;
        Ok(Listed::decode(self.client.store.transaction(|t| t.query(T::NAME, query))?))
    }
}

/// Several local writes committed together: into the store and the outbox at once, or (when the
/// body returns an error) not at all. See [`SyncClient::transaction`].
pub struct LocalTransaction<'t, R> {
    client: &'t SyncClient<R>,
    store: &'t mut dyn Transaction,
    clock: &'t mut HlcClock,
    /// The rows written, for the change event sent after the commit.
    rows: Vec<(String, String)>,
}

impl<R: Remote> LocalTransaction<'_, R> {
    /// Records a change of any model (the untyped form of the writes below).
    pub fn apply_change(&mut self, model: &str, pk: &str, op: Op, value: Option<Map<String, Value>>) -> Result<Change> {
        let change = self.client.record(self.store, self.clock, model, pk, op, value)?;
        self.rows.push((model.to_owned(), pk.to_owned()));
        Ok(change)
    }

    /// Inserts a row under its key.
    pub fn insert<T: Model>(&mut self, row: &T) -> Result<Change> {
        self.check_version::<T>()?;
        self.apply_change(T::NAME, &row.key().to_pk(), Op::Insert, Some(to_object(row)?))
    }

    /// Updates the fields the patch carries.
    pub fn update<T: Model>(&mut self, key: &T::Key, patch: &T::Patch) -> Result<Change> {
        self.check_version::<T>()?;
        self.apply_change(T::NAME, &key.to_pk(), Op::Update, Some(to_object(patch)?))
    }

    /// Deletes a row.
    pub fn delete<T: Model>(&mut self, key: &T::Key) -> Result<Change> {
        self.check_version::<T>()?;
        self.apply_change(T::NAME, &key.to_pk(), Op::Delete, None)
    }

    /// A row as the app sees it, the transaction's own writes included.
    pub fn get<T: Model>(&mut self, key: &T::Key) -> Result<Option<T>> {
        let pk = key.to_pk();
        self.store.row(T::NAME, &pk)?.local.visible().map(|fields| decode(T::NAME, &pk, fields)).transpose()
    }

    /// Migrates the stored rows of `T` when the store was last opened with an older
    /// [`Model::VERSION`], and records this one; refuses a store opened by a newer one.
    fn check_version<T: Model>(&mut self) -> Result<()> {
        let key = format!("{META_MODEL_VERSION}{}", T::NAME);
        let stored = self.store.meta(&key)?.and_then(|text| text.parse::<u32>().ok());
        match stored {
            Some(stored) if stored == T::VERSION => return Ok(()),
            Some(stored) if stored > T::VERSION => return Err(Error::ModelVersion { model: T::NAME.into(), stored, this: T::VERSION }),
            Some(stored) => self.migrate::<T>(stored)?,
            None => {}
        }
        self.store.set_meta(&key, &T::VERSION.to_string())
    }

    /// Writes every live row that [`Model::migrate`] changes back as an update of what differs (a
    /// field the migrated row leaves out is written as null).
    fn migrate<T: Model>(&mut self, from_version: u32) -> Result<()> {
        let mut migrated = 0;
        for (pk, row) in self.store.rows(T::NAME)? {
            let Some(fields) = row.local.visible() else { continue };
            let Some(upgraded) = T::migrate(from_version, &fields) else { continue };
            let mut patch: Map<String, Value> = upgraded.iter().filter(|(name, value)| fields.get(*name) != Some(*value)).map(|(name, value)| (name.clone(), value.clone())).collect();
            patch.extend(fields.keys().filter(|name| !upgraded.contains_key(*name)).map(|name| (name.clone(), Value::Null)));
            if !patch.is_empty() {
                self.apply_change(T::NAME, &pk, Op::Update, Some(patch))?;
                migrated += 1;
            }
        }
        tracing::info!(model = T::NAME, from_version, to_version = T::VERSION, migrated, "migrated the stored rows of a model");
        Ok(())
    }
}

impl<R: Remote> SyncClient<R> {
    /// The rows of model `T`, typed. The first time a store meets a model's new
    /// [`Model::VERSION`], its stored rows are migrated ([`Model::migrate`]) in one local
    /// transaction; a store last opened with a newer version is [`Error::ModelVersion`].
    pub fn collection<T: Model>(&self) -> Result<Collection<'_, R, T>> {
        self.transaction(|tx| tx.check_version::<T>())?;
        Ok(Collection { client: self, model: PhantomData })
    }

    /// Runs several local writes as one: they are stamped, merged and appended to the outbox in one
    /// local transaction, so they all happen (and all sync) or, when `body` returns an error, none
    /// does. One [`crate::RowsChanged`] lists every row written.
    ///
    /// ```no_run
    /// # use sync_ext_client::{protocol::Op, PgRemote, SyncClient};
    /// # fn example(client: &SyncClient<PgRemote>) -> sync_ext_client::Result<()> {
    /// // Both deletes sync, or neither is made.
    /// client.transaction(|tx| {
    ///     tx.apply_change("todo", "42", Op::Delete, None)?;
    ///     tx.apply_change("todo", "43", Op::Delete, None)
    /// })?;
    /// # Ok(()) }
    /// ```
    pub fn transaction<T>(&self, body: impl FnOnce(&mut LocalTransaction<'_, R>) -> Result<T>) -> Result<T> {
        self.write(|store, clock| {
            let mut tx = LocalTransaction { client: self, store, clock, rows: Vec::new() };
            let value = body(&mut tx)?;
            Ok((value, tx.rows))
        })
    }
}

impl<R: Remote + 'static> SyncClient<R> {
    /// Runs local work (reads, writes, queries, transactions) on tokio's blocking threads, so that a
    /// SQLite transaction never holds up the async runtime: `client.run_blocking(|client|
    /// client.collection::<Todo>()?.list()).await`. The store's calls themselves are synchronous;
    /// call them directly outside async code.
    pub async fn run_blocking<T: Send + 'static>(self: &Arc<Self>, work: impl FnOnce(&SyncClient<R>) -> Result<T> + Send + 'static) -> Result<T> {
        let client = self.clone();
        tokio::task::spawn_blocking(move || work(&client)).await.map_err(|error| Error::store(format!("local work did not finish: {error}")))?
    }
}
