//! The local-first client of sync_ext.
//!
//! An app reads and writes a local store that works offline; [`SyncClient::sync`] pushes the
//! changes made meanwhile and pulls everyone else's, through the `sync_push` / `sync_pull` SQL
//! functions over an ordinary Postgres connection: no sidecar server, no replication slot. Both
//! sides merge with the same rule (the `sync_ext_protocol` crate), so every replica ends with the
//! same rows.
//!
//! ```no_run
//! use serde::{Deserialize, Serialize};
//! use sync_ext_client::{LocalStore, PgRemote, SyncClient};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Todo {
//!     title: String,
//!     done: bool,
//!     #[serde(with = "sync_ext_client::portable::decimal")]
//!     priority: rust_decimal::Decimal,
//! }
//!
//! # async fn example() -> sync_ext_client::Result<()> {
//! let client = SyncClient::builder()
//!     .tenant("acme")
//!     .actor("device-a")
//!     .local(LocalStore::sqlite("app.db")?)
//!     .remote(PgRemote::new("postgres://app@db.example.com/app"))
//!     .build()?;
//!
//! // Writes succeed offline: they land in the local store and its outbox at once.
//! let todo = Todo { title: "buy milk".into(), done: false, priority: "3.50".parse().unwrap() };
//! client.insert("todo", "42", &todo)?;
//! client.update("todo", "42", &serde_json::json!({"done": true}))?;
//! let read: Option<Todo> = client.get("todo", "42")?;
//!
//! // When the network is there: push the outbox, pull the rest, converge.
//! let report = client.sync().await?;
//! for rejected in &report.rejected {
//!     eprintln!("the server refused {} {}: {}", rejected.change.model, rejected.change.pk, rejected.reason);
//! }
//!
//! // Or keep it in sync in the background: woken by NOTIFY, with a timer as a fallback.
//! let client = std::sync::Arc::new(client);
//! let live = client.clone().live(Default::default());
//! live.stop().await;
//! # Ok(()) }
//! ```

mod error;
mod live;
pub mod portable;
mod remote;
mod store;

use std::collections::BTreeSet;
use std::sync::Mutex;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};
use sync_ext_protocol::hlc::wall_clock_millis;
use sync_ext_protocol::wire::PushLimits;
use sync_ext_protocol::{change::validate_name, validate_tenant, Change, Hlc, HlcClock, Op, Status};
use uuid::Uuid;

pub use error::{Error, Result};
pub use live::{LiveHandle, LiveOptions};
pub use remote::{Encoding, PgRemote, ReadReplica, Remote};
pub use store::{LocalRow, LocalStore, Transaction};
pub use sync_ext_protocol as protocol;

const META_CLOCK: &str = "hlc";
const META_CURSOR: &str = "cursor";
const META_TENANT: &str = "tenant";
/// Set while a reset is being paged in.
const META_RESETTING: &str = "resetting";

/// A change the server refused; it left the outbox and its row went back to the server's version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub change: Change,
    pub reason: String,
}

/// What one [`SyncClient::sync`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Changes sent (each acknowledged or rejected).
    pub pushed: usize,
    /// Changes pulled from the server and merged.
    pub pulled: usize,
    /// Changes the server refused.
    pub rejected: Vec<Rejection>,
    /// The pull cursor after the sync.
    pub cursor: i64,
}

type RejectionCallback = Box<dyn Fn(&Rejection) + Send + Sync>;

/// A replica of one tenant's data: a local store, an outbox, an HLC clock, and a remote to sync with.
pub struct SyncClient<R> {
    tenant: String,
    actor: String,
    store: LocalStore,
    remote: R,
    push_batch: usize,
    pull_page: i32,
    on_rejected: Option<RejectionCallback>,
    /// Serializes syncs of this client (the live loop and explicit calls).
    syncing: tokio::sync::Mutex<()>,
    /// Serializes local writes (each takes the clock).
    writing: Mutex<()>,
    /// The server's push limits, as its last push response told them.
    limits: Mutex<Option<PushLimits>>,
}

/// Builds a [`SyncClient`]; tenant, actor, local store and remote are required.
pub struct SyncClientBuilder<R> {
    tenant: Option<String>,
    actor: Option<String>,
    store: Option<LocalStore>,
    remote: Option<R>,
    push_batch: usize,
    pull_page: i32,
    on_rejected: Option<RejectionCallback>,
}

impl SyncClient<PgRemote> {
    /// Starts building a client.
    pub fn builder() -> SyncClientBuilder<PgRemote> {
        SyncClientBuilder::new()
    }
}

impl<R: Remote> SyncClientBuilder<R> {
    /// A builder with the default batch sizes (500 changes per push, 1000 per pull page).
    pub fn new() -> Self {
        SyncClientBuilder { tenant: None, actor: None, store: None, remote: None, push_batch: 500, pull_page: 1000, on_rejected: None }
    }

    /// The tenant this replica belongs to.
    pub fn tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = Some(tenant.into());
        self
    }

    /// This device's name, recorded on every change it makes (and used to break HLC ties).
    pub fn actor(mut self, actor: impl Into<String>) -> Self {
        self.actor = Some(actor.into());
        self
    }

    /// Where rows, outbox, clock and cursor live.
    pub fn local(mut self, store: LocalStore) -> Self {
        self.store = Some(store);
        self
    }

    /// The server to sync with; any [`Remote`].
    pub fn remote<T: Remote>(self, remote: T) -> SyncClientBuilder<T> {
        SyncClientBuilder {
            tenant: self.tenant,
            actor: self.actor,
            store: self.store,
            remote: Some(remote),
            push_batch: self.push_batch,
            pull_page: self.pull_page,
            on_rejected: self.on_rejected,
        }
    }

    /// How many changes one push carries (at most the server's `max_push_changes` setting).
    pub fn push_batch(mut self, changes: usize) -> Self {
        self.push_batch = changes.max(1);
        self
    }

    /// How many changes one pull page asks for.
    pub fn pull_page(mut self, changes: i32) -> Self {
        self.pull_page = changes.max(1);
        self
    }

    /// Called for every change the server rejects (also listed in [`SyncReport::rejected`]).
    pub fn on_rejected(mut self, callback: impl Fn(&Rejection) + Send + Sync + 'static) -> Self {
        self.on_rejected = Some(Box::new(callback));
        self
    }

    /// Builds the client. A store first used with another tenant is refused.
    pub fn build(self) -> Result<SyncClient<R>> {
        let tenant = self.tenant.ok_or(Error::Builder("tenant"))?;
        let actor = self.actor.ok_or(Error::Builder("actor"))?;
        validate_tenant(&tenant)?;
        validate_name("actor", &actor)?;
        let store = self.store.ok_or(Error::Builder("local"))?;
        let remote = self.remote.ok_or(Error::Builder("remote"))?;
        store.transaction(|t| match t.meta(META_TENANT)? {
            Some(owner) if owner != tenant => Err(Error::Store(format!("this local store holds tenant {owner}, not {tenant}"))),
            Some(_) => Ok(()),
            None => t.set_meta(META_TENANT, &tenant),
        })?;
        Ok(SyncClient {
            tenant,
            actor,
            store,
            remote,
            push_batch: self.push_batch,
            pull_page: self.pull_page,
            on_rejected: self.on_rejected,
            syncing: tokio::sync::Mutex::new(()),
            writing: Mutex::new(()),
            limits: Mutex::new(None),
        })
    }
}

impl<R: Remote> Default for SyncClientBuilder<R> {
    fn default() -> Self {
        Self::new()
    }
}

fn to_object(value: &impl Serialize) -> Result<Map<String, Value>> {
    match serde_json::to_value(value).map_err(|error| Error::InvalidChange(error.to_string()))? {
        Value::Object(fields) => Ok(fields),
        other => Err(Error::InvalidChange(format!("a row or patch must serialize to a JSON object, not {other}"))),
    }
}

fn read_clock(t: &mut dyn Transaction) -> Result<HlcClock> {
    let last = t.meta(META_CLOCK)?.map(|text| text.parse::<Hlc>().map_err(|error| Error::Store(error.to_string()))).transpose()?;
    Ok(HlcClock::resume(last))
}

fn write_clock(t: &mut dyn Transaction, clock: &HlcClock) -> Result<()> {
    match clock.last() {
        Some(last) => t.set_meta(META_CLOCK, &last.to_string()),
        None => Ok(()),
    }
}

fn read_cursor(t: &mut dyn Transaction) -> Result<i64> {
    Ok(t.meta(META_CURSOR)?.and_then(|text| text.parse().ok()).unwrap_or(0))
}

impl<R: Remote> SyncClient<R> {
    /// The tenant this replica belongs to.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// Records a change locally, at once and offline: stamps it with the clock, merges it into the
    /// row the app sees and appends it to the outbox, in one local transaction. A change the server
    /// would refuse as `value_too_large` (once a push has told its limits) or `invalid_text` (a NUL
    /// character) is refused here, with [`Error::Unstorable`], and changes nothing.
    pub fn apply_change(&self, model: &str, pk: &str, op: Op, value: Option<Map<String, Value>>) -> Result<Change> {
        validate_name("model", model)?;
        validate_name("pk", pk)?;
        if op != Op::Delete && value.is_none() {
            return Err(Error::InvalidChange(format!("an {} needs a value", op.as_str())));
        }
        let _writing = self.writing.lock().map_err(|_| Error::Store("a previous write panicked".into()))?;
        self.store.transaction(|t| {
            let mut clock = read_clock(t)?;
            let change = Change {
                op_id: Uuid::new_v4(),
                model: model.to_owned(),
                pk: pk.to_owned(),
                op,
                hlc: clock.tick(wall_clock_millis()),
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
            write_clock(t, &clock)?;
            Ok(change)
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
        self.store.transaction(|t| Ok(t.outbox(usize::MAX)?.len()))
    }

    /// Pushes the outbox in batches, then pulls until the server has nothing more, then puts rows
    /// whose changes were rejected back to the server's version (plus any changes still unsent).
    /// If the server cannot be reached the error is returned and local state is as it was; a sync
    /// interrupted at any point converges on the next one (re-sent changes come back `duplicate`).
    pub async fn sync(&self) -> Result<SyncReport> {
        let _syncing = self.syncing.lock().await;
        let mut report = SyncReport::default();
        self.push_outbox(&mut report).await?;
        self.pull_all(&mut report).await?;
        self.restore_rejected_rows(&report.rejected)?;
        if let Some(callback) = &self.on_rejected {
            report.rejected.iter().for_each(callback);
        }
        Ok(report)
    }

    /// The server's push limits, once a push response has told them.
    pub fn limits(&self) -> Option<PushLimits> {
        *self.limits.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn push_outbox(&self, report: &mut SyncReport) -> Result<()> {
        loop {
            let server_max = self.limits().map_or(usize::MAX, |limits| usize::try_from(limits.max_push_changes).unwrap_or(1));
            let batch = self.store.transaction(|t| t.outbox(self.push_batch.min(server_max).max(1)))?;
            if batch.is_empty() {
                return Ok(());
            }
            let response = self.remote.push(&self.tenant, &batch).await?;
            if response.results.len() != batch.len() {
                return Err(Error::Remote(format!("{} results for {} changes", response.results.len(), batch.len())));
            }
            if let Some(limits) = response.limits {
                *self.limits.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(limits);
            }
            self.store.transaction(|t| {
                for (change, result) in batch.iter().zip(&response.results) {
                    t.dequeue(change.op_id)?;
                    if let Status::Rejected { reason } = &result.status {
                        report.rejected.push(Rejection { change: change.clone(), reason: reason.clone() });
                    }
                }
                Ok(())
            })?;
            report.pushed += batch.len();
        }
    }

    async fn pull_all(&self, report: &mut SyncReport) -> Result<()> {
        let mut cursor = self.store.transaction(read_cursor)?;
        loop {
            let page = self.remote.pull(&self.tenant, cursor, self.pull_page).await?;
            self.store.transaction(|t| {
                let mut clock = read_clock(t)?;
                if page.reset {
                    apply_reset_page(t, &page)?;
                } else {
                    for pulled in &page.changes {
                        let change = pulled.to_change();
                        let mut row = t.row(&change.model, &change.pk)?;
                        row.confirmed.apply(&change);
                        row.local.apply(&change);
                        t.put_row(&change.model, &change.pk, &row)?;
                    }
                }
                for pulled in &page.changes {
                    clock.observe(pulled.hlc);
                }
                write_clock(t, &clock)?;
                t.set_meta(META_CURSOR, &page.cursor.to_string())
            })?;
            report.pulled += page.changes.len();
            cursor = page.cursor;
            if !page.has_more {
                report.cursor = cursor;
                return Ok(());
            }
        }
    }

    fn restore_rejected_rows(&self, rejected: &[Rejection]) -> Result<()> {
        if rejected.is_empty() {
            return Ok(());
        }
        let rows: BTreeSet<(&str, &str)> = rejected.iter().map(|r| (r.change.model.as_str(), r.change.pk.as_str())).collect();
        self.store.transaction(|t| {
            let unsent = t.outbox(usize::MAX)?;
            for (model, pk) in &rows {
                let mut row = t.row(model, pk)?;
                row.local = row.confirmed.clone();
                for change in unsent.iter().filter(|change| change.model == *model && change.pk == *pk) {
                    row.local.apply(change);
                }
                t.put_row(model, pk, &row)?;
            }
            Ok(())
        })
    }
}

/// Applies a page of a reset: on its first page every confirmed row is forgotten (the app keeps seeing
/// its unsent changes); each row sent becomes the confirmed state, with unsent changes merged on top.
fn apply_reset_page(t: &mut dyn Transaction, page: &protocol::PullResponse) -> Result<()> {
    let unsent = t.outbox(usize::MAX)?;
    if t.meta(META_RESETTING)?.is_none() {
        t.clear_rows()?;
        for change in &unsent {
            let mut row = t.row(&change.model, &change.pk)?;
            row.local.apply(change);
            t.put_row(&change.model, &change.pk, &row)?;
        }
        t.set_meta(META_RESETTING, "1")?;
    }
    for pulled in &page.changes {
        let confirmed = pulled.to_row_state().map_err(|problem| Error::Remote(format!("a reset row does not decode: {problem}")))?;
        let mut local = confirmed.clone();
        for change in unsent.iter().filter(|change| change.model == pulled.model && change.pk == pulled.pk) {
            local.apply(change);
        }
        t.put_row(&pulled.model, &pulled.pk, &LocalRow { confirmed, local })?;
    }
    if !page.has_more {
        t.delete_meta(META_RESETTING)?;
    }
    Ok(())
}

fn decode<T: DeserializeOwned>(model: &str, pk: &str, fields: Map<String, Value>) -> Result<T> {
    serde_json::from_value(Value::Object(fields)).map_err(|error| Error::Decode { model: model.into(), pk: pk.into(), problem: error.to_string() })
}
