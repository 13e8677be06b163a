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
use sync_ext_protocol::digest::{row_state_digest, to_wire};
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
    /// The local replica differed from the server (the digest of its confirmed rows did not match the
    /// one the server sent) and was repaired by a reset; unsent changes were kept on top.
    pub repaired: bool,
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
    /// The last server digest the confirmed rows were found to match (kept in memory only), so that a
    /// sync that pulled nothing and got the same digest back need not recompute it.
    verified: Mutex<Option<u64>>,
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
            verified: Mutex::new(None),
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

/// The digest of the confirmed rows of a store: the server's rows as this replica holds them, without
/// its unsent changes (see [`protocol::digest`]). Reads every row: O(rows).
fn confirmed_digest(t: &mut dyn Transaction) -> Result<u64> {
    let mut digest = 0u64;
    t.for_each_confirmed(&mut |model, pk, confirmed| {
        digest = digest.wrapping_add(row_state_digest(model, pk, confirmed));
        Ok(())
    })?;
    Ok(digest)
}

/// A digest as the server sends it (16 hex digits), as a number.
fn parse_digest(wire: &str) -> Result<u64> {
    match u64::from_str_radix(wire, 16) {
        Ok(digest) if wire.len() == 16 && wire.bytes().all(|byte| byte.is_ascii_hexdigit()) => Ok(digest),
        _ => Err(Error::Remote(format!("unexpected pull response: the digest {wire:?} is not 16 hex digits"))),
    }
}

/// What the pages of one pull ended with.
struct Pulled {
    /// The digest the last page carried, if any.
    digest: Option<String>,
    /// Whether some page could have changed the confirmed rows (it held changes, or was a reset).
    changed: bool,
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
    ///
    /// Then the replica checks itself: when the last page of the pull carries the server's digest of
    /// the tenant's visible rows (servers that keep one send it on the page that ends at the tenant's
    /// last seq; a lagging standby and older servers send none, and then nothing is checked), the
    /// digest of the confirmed rows (the server's rows as this replica holds them, unsent changes left
    /// out) is compared with it. If they differ, the local data was altered or lost behind the client's
    /// back: a warning is logged and the confirmed rows are pulled again from scratch, by a reset from
    /// the primary ([`Remote::pull_primary`]), with the outbox untouched and its changes kept on top
    /// of the fresh rows, and [`SyncReport::repaired`] is set. The repaired rows are checked once more
    /// against the digest of the reset; if they still differ the sync fails with
    /// [`Error::DigestMismatch`] (the next sync checks, and repairs, again).
    ///
    /// Cost: the check reads and decodes every row of the local store, O(rows), inside one local
    /// transaction (local writes wait for it), and a repair pulls every row of the tenant. The check is
    /// skipped when the sync pulled nothing and the server's digest is the one this client last
    /// verified (remembered in memory, so the first sync of a process checks whenever a digest comes).
    pub async fn sync(&self) -> Result<SyncReport> {
        let _syncing = self.syncing.lock().await;
        let mut report = SyncReport::default();
        self.push_outbox(&mut report).await?;
        let pulled = self.pull_all(&mut report).await?;
        self.restore_rejected_rows(&report.rejected)?;
        if let Some(callback) = &self.on_rejected {
            report.rejected.iter().for_each(callback);
        }
        self.check_digest(pulled, &mut report).await?;
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

    async fn pull_all(&self, report: &mut SyncReport) -> Result<Pulled> {
        let cursor = self.store.transaction(read_cursor)?;
        self.pull_pages(cursor, false, report).await
    }

    /// Pulls and applies pages from `cursor` until the server has nothing more. For a `repair` the
    /// pages come from [`Remote::pull_primary`] and must be reset pages: a page that is not is refused
    /// before anything is applied.
    async fn pull_pages(&self, mut cursor: i64, repair: bool, report: &mut SyncReport) -> Result<Pulled> {
        let mut changed = false;
        loop {
            let page = if repair {
                let page = self.remote.pull_primary(&self.tenant, cursor, self.pull_page).await?;
                if !page.reset {
                    return Err(Error::Remote(format!(
                        "a repair asked for a reset (since {cursor}) and the server answered without one: pull_primary must reach the primary"
                    )));
                }
                page
            } else {
                self.remote.pull(&self.tenant, cursor, self.pull_page).await?
            };
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
            changed |= page.reset || !page.changes.is_empty();
            cursor = page.cursor;
            if !page.has_more {
                report.cursor = cursor;
                return Ok(Pulled { digest: page.digest, changed });
            }
        }
    }

    fn verified(&self) -> Option<u64> {
        *self.verified.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn set_verified(&self, digest: Option<u64>) {
        *self.verified.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = digest;
    }

    /// Checks the confirmed rows against the digest the pull ended with, and repairs them once with a
    /// reset when they differ (see [`SyncClient::sync`]).
    async fn check_digest(&self, pulled: Pulled, report: &mut SyncReport) -> Result<()> {
        let Some(server) = pulled.digest else { return Ok(()) };
        let expected = parse_digest(&server)?;
        if !pulled.changed && self.verified() == Some(expected) {
            return Ok(());
        }
        let local = self.store.transaction(confirmed_digest)?;
        if local == expected {
            self.set_verified(Some(local));
            return Ok(());
        }
        tracing::warn!(
            tenant = %self.tenant,
            server = %server,
            local = %to_wire(local),
            "the local replica differs from the server's rows (digest mismatch): repairing it with a reset"
        );
        self.set_verified(None);
        let repair = self.pull_pages(i64::MAX, true, report).await?;
        report.repaired = true;
        let Some(server) = repair.digest else {
            tracing::warn!(tenant = %self.tenant, "the server sent no digest with the repair: the repaired replica is not checked");
            return Ok(());
        };
        let expected = parse_digest(&server)?;
        let local = self.store.transaction(confirmed_digest)?;
        if local != expected {
            return Err(Error::DigestMismatch { server, local: to_wire(local) });
        }
        self.set_verified(Some(local));
        Ok(())
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Weak};

    use serde_json::json;
    use sync_ext_protocol::digest::digest_of;
    use sync_ext_protocol::wire::{ChangeResult, PullResponse, PulledChange, PushResponse};
    use sync_ext_protocol::{RowState, StoredRow};

    use super::*;

    type Hook = Box<dyn FnOnce() + Send>;

    /// A server in memory: a log, the merged rows, and pages as `sync_pull` serves them (a reset for a
    /// negative cursor or, on the primary, one beyond the log), with the digest of the visible rows on
    /// the page that ends at the last seq.
    #[derive(Default)]
    struct Server {
        log: Vec<PulledChange>,
        rows: BTreeMap<(String, String), (i64, RowState)>,
        /// Whether pages carry digests (servers before digests send none).
        digests: bool,
        /// Added to every digest sent: a server no replica can match.
        skew: u64,
        /// Every pull: its `since`, and whether a standby answered it.
        pulls: Vec<(i64, bool)>,
        /// Run once when a pull asks for a cursor beyond the log (a repair), as the app writing meanwhile.
        on_repair: Option<Hook>,
    }

    impl Server {
        fn last_seq(&self) -> i64 {
            self.log.len() as i64
        }

        fn digest(&self) -> u64 {
            let visible: Vec<_> = self.rows.iter().filter_map(|((model, pk), (_, row))| row.visible().map(|value| (model, pk, value))).collect();
            digest_of(visible.iter().map(|(model, pk, value)| (model.as_str(), pk.as_str(), value)))
        }

        fn visible(&self, model: &str) -> BTreeMap<String, Map<String, Value>> {
            self.rows.iter().filter(|((m, _), _)| m == model).filter_map(|((_, pk), (_, row))| row.visible().map(|value| (pk.clone(), value))).collect()
        }

        fn push(&mut self, changes: &[Change]) -> PushResponse {
            let mut results = Vec::new();
            for change in changes {
                let seq = self.last_seq() + 1;
                let (row_seq, row) = self.rows.entry((change.model.clone(), change.pk.clone())).or_default();
                let won = row.apply(change);
                let status = if won.anything() {
                    *row_seq = seq;
                    let value = (change.op != Op::Delete).then_some(won.fields);
                    let Change { op_id, model, pk, op, hlc, actor, .. } = change.clone();
                    self.log.push(PulledChange { seq, op_id, model, pk, op, hlc, actor, value, field_stamps: None, deleted_hlc: None });
                    Status::Applied { seq }
                } else {
                    Status::Superseded
                };
                results.push(ChangeResult { op_id: change.op_id, status });
            }
            PushResponse { cursor: self.last_seq(), results, limits: None }
        }

        fn pull(&mut self, since: i64, max: i32, standby: bool) -> PullResponse {
            self.pulls.push((since, standby));
            let (last, max) = (self.last_seq(), max as usize);
            if standby && since > last {
                return PullResponse { changes: Vec::new(), cursor: since, has_more: false, reset: false, digest: None };
            }
            let reset = since < 0 || since > last;
            let (changes, has_more) = if reset {
                let after = if since < 0 { -since } else { 0 };
                let mut rows: Vec<_> = self.rows.iter().filter(|(_, (seq, _))| *seq > after).collect();
                rows.sort_by_key(|(_, (seq, _))| *seq);
                let has_more = rows.len() > max;
                let changes = rows
                    .into_iter()
                    .take(max)
                    .map(|((model, pk), (seq, row))| {
                        let stored = StoredRow::from_state(row).expect("a written row");
                        PulledChange {
                            seq: *seq,
                            op_id: stored.stamp.op_id,
                            model: model.clone(),
                            pk: pk.clone(),
                            op: if stored.deleted { Op::Delete } else { Op::Insert },
                            hlc: stored.stamp.hlc,
                            actor: stored.stamp.actor,
                            value: (!stored.deleted).then_some(stored.value),
                            field_stamps: Some(stored.field_stamps),
                            deleted_hlc: stored.deleted_hlc,
                        }
                    })
                    .collect();
                (changes, has_more)
            } else {
                let after: Vec<_> = self.log.iter().filter(|change| change.seq > since).cloned().collect();
                (after.iter().take(max).cloned().collect::<Vec<_>>(), after.len() > max)
            };
            let last_kept = changes.last().map(|change: &PulledChange| change.seq);
            let cursor = match (reset, has_more) {
                (false, _) => last_kept.unwrap_or(since),
                (true, true) => -last_kept.expect("a page with more after it"),
                (true, false) => last,
            };
            let digest = (!has_more && self.digests).then(|| to_wire(self.digest().wrapping_add(self.skew)));
            PullResponse { changes, cursor, has_more, reset, digest }
        }
    }

    /// A connection to the [`Server`]: to its primary, or to a hot standby that has replayed it all.
    #[derive(Clone)]
    struct Fake {
        server: Arc<Mutex<Server>>,
        standby: bool,
    }

    impl Remote for Fake {
        async fn push(&self, _tenant: &str, changes: &[Change]) -> Result<PushResponse> {
            assert!(!self.standby, "pushes go to the primary");
            Ok(self.server.lock().unwrap().push(changes))
        }

        async fn pull(&self, _tenant: &str, since: i64, max_changes: i32) -> Result<PullResponse> {
            let (page, hook) = {
                let mut server = self.server.lock().unwrap();
                let hook = if since > server.last_seq() { server.on_repair.take() } else { None };
                (server.pull(since, max_changes, self.standby), hook)
            };
            if let Some(hook) = hook {
                hook();
            }
            Ok(page)
        }
    }

    fn server(digests: bool) -> Arc<Mutex<Server>> {
        Arc::new(Mutex::new(Server { digests, ..Server::default() }))
    }

    fn primary(server: &Arc<Mutex<Server>>) -> Fake {
        Fake { server: server.clone(), standby: false }
    }

    fn client<R: Remote>(actor: &str, store: LocalStore, remote: R) -> SyncClient<R> {
        SyncClientBuilder::<R>::new().tenant("acme").actor(actor).local(store).remote(remote).pull_page(2).build().unwrap()
    }

    fn object(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap()
    }

    fn rows<R: Remote>(client: &SyncClient<R>) -> BTreeMap<String, Map<String, Value>> {
        client.list::<Map<String, Value>>("todo").unwrap().into_iter().collect()
    }

    fn temp_db() -> std::path::PathBuf {
        std::env::temp_dir().join(format!("sync_ext_client_digest_{}.db", Uuid::new_v4()))
    }

    /// Alters the stored rows behind the client's back, as a damaged or hand-edited file would: the
    /// title of row 1 changes (in both halves), row 2 is lost, row 9 appears.
    fn corrupt<R: Remote>(client: &SyncClient<R>) {
        client
            .store
            .transaction(|t| {
                let mut row = t.row("todo", "1")?;
                for state in [&mut row.confirmed, &mut row.local] {
                    state.fields.get_mut("title").expect("row 1 has a title").value = json!("corrupted");
                }
                t.put_row("todo", "1", &row)?;
                t.put_row("todo", "2", &LocalRow::default())?;
                let mut phantom = RowState::default();
                phantom.apply(&Change {
                    op_id: Uuid::new_v4(),
                    model: "todo".into(),
                    pk: "9".into(),
                    op: Op::Insert,
                    hlc: "2026-01-01T00:00:00.000Z-0000".parse().unwrap(),
                    actor: "nobody".into(),
                    value: Some(object(json!({"title": "phantom"}))),
                });
                t.put_row("todo", "9", &LocalRow { confirmed: phantom.clone(), local: phantom })
            })
            .unwrap();
    }

    async fn seed<R: Remote>(client: &SyncClient<R>) {
        for n in 1..=5 {
            client.insert("todo", &n.to_string(), &json!({"title": format!("row {n}"), "n": n})).unwrap();
        }
        client.update("todo", "1", &json!({"done": true})).unwrap();
        client.delete("todo", "4").unwrap();
        client.sync().await.unwrap();
    }

    #[tokio::test]
    async fn the_client_digest_is_the_protocol_digest_of_its_confirmed_rows() {
        let path = temp_db();
        for store in [LocalStore::memory(), LocalStore::sqlite(&path).unwrap()] {
            let server = server(true);
            let device = client("device", store, primary(&server));
            seed(&device).await;
            device.update("todo", "3", &json!({"title": "unsent"})).unwrap();
            device.insert("todo", "6", &json!({"title": "unsent too"})).unwrap();
            device.delete("todo", "5").unwrap();

            let confirmed: Vec<(String, Map<String, Value>)> = device
                .store
                .transaction(|t| Ok(t.rows("todo")?.into_iter().filter_map(|(pk, row)| row.confirmed.visible().map(|value| (pk, value))).collect()))
                .unwrap();
            let expected = digest_of(confirmed.iter().map(|(pk, value)| ("todo", pk.as_str(), value)));
            let computed = device.store.transaction(confirmed_digest).unwrap();
            assert_eq!(computed, expected, "the client's digest is digest_of over its confirmed visible rows");
            assert_eq!(computed, server.lock().unwrap().digest(), "and the server's digest of the same rows");
            assert_eq!(confirmed.len(), 4, "the deleted row counts nothing");
            let local: Vec<(String, Map<String, Value>)> = rows(&device).into_iter().collect();
            assert_ne!(computed, digest_of(local.iter().map(|(pk, value)| ("todo", pk.as_str(), value))), "unsent changes are left out");
        }
        std::fs::remove_file(&path).ok();
    }

    #[tokio::test]
    async fn a_replica_altered_behind_the_client_is_repaired_by_a_reset_that_keeps_unsent_changes() {
        let path = temp_db();
        let server = server(true);
        let device = Arc::new(client("device", LocalStore::sqlite(&path).unwrap(), primary(&server)));
        seed(&*device).await;
        let other = client("other", LocalStore::memory(), primary(&server));
        other.sync().await.unwrap();

        corrupt(&*device);
        other.update("todo", "3", &json!({"n": 30})).unwrap();
        other.sync().await.unwrap();
        // The app writes while the repair runs: the change must stay in the outbox, on top of the reset.
        let writer: Weak<SyncClient<Fake>> = Arc::downgrade(&device);
        server.lock().unwrap().on_repair = Some(Box::new(move || {
            writer.upgrade().unwrap().update("todo", "5", &json!({"title": "written during the repair"})).unwrap();
        }));
        let report = device.sync().await.unwrap();
        assert!(report.repaired, "{report:?}");
        assert!(server.lock().unwrap().pulls.iter().any(|(since, _)| *since == i64::MAX), "the repair asked for a reset from beyond the log");
        assert_eq!(device.pending().unwrap(), 1, "the change made during the repair is still unsent");
        let mut expected = server.lock().unwrap().visible("todo");
        expected.get_mut("5").unwrap().insert("title".into(), json!("written during the repair"));
        assert_eq!(rows(&*device), expected, "the server's rows, with the unsent change on top");
        assert_eq!(report.cursor, server.lock().unwrap().last_seq());

        let report = device.sync().await.unwrap();
        assert!(!report.repaired);
        assert_eq!((report.pushed, device.pending().unwrap()), (1, 0));
        assert_eq!(rows(&*device), server.lock().unwrap().visible("todo"));
        assert_eq!(rows(&*device)["5"]["title"], "written during the repair");
        drop(device);
        std::fs::remove_file(&path).ok();
    }

    #[tokio::test]
    async fn the_check_is_skipped_when_nothing_was_pulled_and_the_digest_was_verified() {
        let server = server(true);
        let device = client("device", LocalStore::memory(), primary(&server));
        seed(&device).await;
        corrupt(&device);
        let pulls = server.lock().unwrap().pulls.len();
        let report = device.sync().await.unwrap();
        assert!(!report.repaired && report.pulled == 0, "nothing pulled, same digest: not recomputed, so not seen");
        assert_eq!(server.lock().unwrap().pulls.len(), pulls + 1);

        let other = client("other", LocalStore::memory(), primary(&server));
        other.insert("todo", "7", &json!({"title": "new"})).unwrap();
        other.sync().await.unwrap();
        let report = device.sync().await.unwrap();
        assert!(report.repaired, "a pull brings a new digest: checked, and repaired");
        assert_eq!(rows(&device), server.lock().unwrap().visible("todo"));
    }

    #[tokio::test]
    async fn a_mismatch_that_outlives_the_repair_is_an_error_after_one_repair() {
        let server = server(true);
        let device = client("device", LocalStore::memory(), primary(&server));
        seed(&device).await;
        let other = client("other", LocalStore::memory(), primary(&server));
        other.insert("todo", "7", &json!({"title": "new"})).unwrap();
        other.sync().await.unwrap();
        server.lock().unwrap().skew = 1;
        let error = device.sync().await.unwrap_err();
        let expected = to_wire(server.lock().unwrap().digest().wrapping_add(1));
        assert!(matches!(&error, Error::DigestMismatch { server, local } if *server == expected && *local == to_wire(parse_digest(server).unwrap().wrapping_sub(1))), "{error}");
        let repairs = server.lock().unwrap().pulls.iter().filter(|(since, _)| *since == i64::MAX).count();
        assert_eq!(repairs, 1, "one repair, no loop");
        assert_eq!(rows(&device), server.lock().unwrap().visible("todo"));
    }

    #[tokio::test]
    async fn without_a_digest_nothing_is_checked() {
        let server = server(false);
        let device = client("device", LocalStore::memory(), primary(&server));
        seed(&device).await;
        corrupt(&device);
        let other = client("other", LocalStore::memory(), primary(&server));
        other.insert("todo", "7", &json!({"title": "new"})).unwrap();
        other.sync().await.unwrap();
        let report = device.sync().await.unwrap();
        assert!(!report.repaired);
        assert!(server.lock().unwrap().pulls.iter().all(|(since, _)| *since != i64::MAX));
        assert_eq!(rows(&device)["1"]["title"], "corrupted");
    }

    #[tokio::test]
    async fn a_read_replica_repairs_from_the_primary_and_a_standby_alone_cannot() {
        let server = server(true);
        let remote = ReadReplica { primary: primary(&server), replica: Fake { server: server.clone(), standby: true } };
        let device = client("device", LocalStore::memory(), remote);
        seed(&device).await;
        corrupt(&device);
        let other = client("other", LocalStore::memory(), primary(&server));
        other.insert("todo", "7", &json!({"title": "new"})).unwrap();
        other.sync().await.unwrap();
        let report = device.sync().await.unwrap();
        assert!(report.repaired);
        let repairs: Vec<_> = server.lock().unwrap().pulls.iter().filter(|(since, _)| *since == i64::MAX).copied().collect();
        assert_eq!(repairs, [(i64::MAX, false)], "the repair went to the primary");
        assert_eq!(rows(&device), server.lock().unwrap().visible("todo"));

        // A remote whose every pull reaches a standby gets no reset: nothing is applied, the cursor stays.
        let standby_only = client("standby-only", LocalStore::memory(), Fake { server: server.clone(), standby: true });
        standby_only.sync().await.unwrap();
        corrupt(&standby_only);
        other.insert("todo", "8", &json!({"title": "newer"})).unwrap();
        other.sync().await.unwrap();
        let error = standby_only.sync().await.unwrap_err();
        assert!(matches!(&error, Error::Remote(message) if message.contains("without one")), "{error}");
        assert_eq!(standby_only.store.transaction(read_cursor).unwrap(), server.lock().unwrap().last_seq(), "the cursor did not move past the log");
        assert_eq!(rows(&standby_only)["1"]["title"], "corrupted", "nothing was applied");
    }
}
