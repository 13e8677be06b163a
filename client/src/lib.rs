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
//! match client.sync().await {
//!     Ok(report) => println!("pushed {}, pulled {}", report.pushed, report.pulled),
//!     Err(error) if error.is_transient() => println!("offline, retry later: {error}"),
//!     Err(error) => eprintln!("a person must act: {error} (SQLSTATE {:?})", error.sqlstate()),
//! }
//! // Changes the server refused stay listed until the app drains them, even across a crash.
//! for rejected in client.take_rejections()? {
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
mod outbox;
pub mod portable;
mod remote;
mod status;
mod store;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};
use sync_ext_protocol::digest::{row_state_digest, to_wire};
use sync_ext_protocol::hlc::wall_clock_millis;
use sync_ext_protocol::wire::{PushLimits, REASON_CLOCK_SKEW};
use sync_ext_protocol::{change::validate_name, validate_tenant, Change, Hlc, HlcClock, Op, Status};
use tokio::sync::{broadcast, watch};
use uuid::Uuid;

pub use error::{sqlstate_is_transient, BoxError, Error, ErrorClass, Result};
pub use live::{LiveHandle, LiveOptions};
pub use outbox::{PendingChange, Rejection, REASON_REFUSED};
pub use remote::{Encoding, PgRemote, ReadReplica, Remote, RemoteFuture, DEFAULT_CONNECT_TIMEOUT, DEFAULT_STATEMENT_TIMEOUT};
pub use status::{Activity, LiveState, Origin, RowsChanged, StatusError, SyncStatus, Wakeups};
pub use store::{LocalRow, LocalStore, Transaction};
pub use sync_ext_protocol as protocol;
/// The driver [`PgRemote`] uses, for [`PgRemote::from_config`].
pub use tokio_postgres;

const META_CLOCK: &str = "hlc";
const META_CURSOR: &str = "cursor";
const META_TENANT: &str = "tenant";
/// Set while a reset is being paged in.
const META_RESETTING: &str = "resetting";
/// Milliseconds added to the device's wall clock to stamp changes (set after a `clock_skew` rejection).
const META_CLOCK_OFFSET: &str = "clock_offset";
/// Set when a change was rejected `clock_skew` and the clock is not re-based yet.
const META_CLOCK_SKEWED: &str = "clock_skewed";
/// The greatest stamp the server is known to hold (pulled, or acknowledged to this client).
const META_SERVER_HLC: &str = "server_hlc";

/// How long one [`SyncClient::sync`] may take by default.
pub const DEFAULT_SYNC_TIMEOUT: Duration = Duration::from_secs(300);

/// What one [`SyncClient::sync`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Changes sent (each acknowledged or rejected).
    pub pushed: usize,
    /// Changes pulled from the server and merged.
    pub pulled: usize,
    /// Changes refused in this sync (also recorded: see [`SyncClient::rejections`]).
    pub rejected: Vec<Rejection>,
    /// The pull cursor after the sync.
    pub cursor: i64,
    /// The local replica differed from the server (the digest of its confirmed rows did not match the
    /// one the server sent) and was repaired by a reset; unsent changes were kept on top.
    pub repaired: bool,
}

type RejectionCallback = Box<dyn Fn(&Rejection) + Send + Sync>;
type WallClock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// A replica of one tenant's data: a local store, an outbox, an HLC clock, and a remote to sync with.
pub struct SyncClient<R> {
    tenant: String,
    actor: String,
    store: LocalStore,
    remote: R,
    push_batch: usize,
    pull_page: i32,
    sync_timeout: Duration,
    on_rejected: Option<RejectionCallback>,
    /// The device's wall clock, in milliseconds since the Unix epoch.
    wall_clock: WallClock,
    /// Milliseconds added to the wall clock to stamp changes (the server's time minus the device's,
    /// once a `clock_skew` rejection made the client measure it; kept in the store).
    clock_offset: AtomicI64,
    /// Serializes syncs of this client (the live loop and explicit calls).
    syncing: tokio::sync::Mutex<()>,
    /// Serializes local writes (each takes the clock).
    writing: Mutex<()>,
    /// The server's push limits, as its last push response told them.
    limits: Mutex<Option<PushLimits>>,
    /// The last server digest the confirmed rows were found to match (kept in memory only), so that a
    /// sync that pulled nothing and got the same digest back need not recompute it.
    verified: Mutex<Option<u64>>,
    status: watch::Sender<SyncStatus>,
    events: broadcast::Sender<RowsChanged>,
}

/// Builds a [`SyncClient`]; tenant, actor, local store and remote are required.
pub struct SyncClientBuilder<R> {
    tenant: Option<String>,
    actor: Option<String>,
    store: Option<LocalStore>,
    remote: Option<R>,
    push_batch: usize,
    pull_page: i32,
    sync_timeout: Duration,
    on_rejected: Option<RejectionCallback>,
    wall_clock: WallClock,
}

impl SyncClient<PgRemote> {
    /// Starts building a client.
    pub fn builder() -> SyncClientBuilder<PgRemote> {
        SyncClientBuilder::new()
    }
}

impl<R: Remote> SyncClientBuilder<R> {
    /// A builder with the defaults: 500 changes per push, 1000 per pull page, a sync timeout of
    /// [`DEFAULT_SYNC_TIMEOUT`], the system clock.
    pub fn new() -> Self {
        SyncClientBuilder {
            tenant: None,
            actor: None,
            store: None,
            remote: None,
            push_batch: 500,
            pull_page: 1000,
            sync_timeout: DEFAULT_SYNC_TIMEOUT,
            on_rejected: None,
            wall_clock: Arc::new(wall_clock_millis),
        }
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
            sync_timeout: self.sync_timeout,
            on_rejected: self.on_rejected,
            wall_clock: self.wall_clock,
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

    /// How long one [`SyncClient::sync`] may take before it gives up with [`Error::Timeout`]
    /// ([`DEFAULT_SYNC_TIMEOUT`] by default). What it did until then is kept: a reset goes on from
    /// its last page on the next sync.
    pub fn sync_timeout(mut self, timeout: Duration) -> Self {
        self.sync_timeout = timeout;
        self
    }

    /// Called once for every change the server rejects, right after the local transaction that
    /// removed it from the outbox, restored its row and recorded it. The record stays in
    /// [`SyncClient::rejections`] until the app drains it, so a rejection whose callback a crash
    /// prevented is still there after a restart.
    pub fn on_rejected(mut self, callback: impl Fn(&Rejection) + Send + Sync + 'static) -> Self {
        self.on_rejected = Some(Box::new(callback));
        self
    }

    /// The device's wall clock, in milliseconds since the Unix epoch (the system clock by default).
    pub fn wall_clock(mut self, clock: impl Fn() -> i64 + Send + Sync + 'static) -> Self {
        self.wall_clock = Arc::new(clock);
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
        let (offset, pending, rejections) = store.transaction(|t| {
            match t.meta(META_TENANT)? {
                Some(owner) if owner != tenant => return Err(Error::store(format!("this local store holds tenant {owner}, not {tenant}"))),
                Some(_) => {}
                None => t.set_meta(META_TENANT, &tenant)?,
            }
            Ok((read_offset(t)?, t.outbox_len()?, t.rejections()?.len()))
        })?;
        let (status, _) = watch::channel(SyncStatus { pending, rejections, ..SyncStatus::default() });
        Ok(SyncClient {
            tenant,
            actor,
            store,
            remote,
            push_batch: self.push_batch,
            pull_page: self.pull_page,
            sync_timeout: self.sync_timeout,
            on_rejected: self.on_rejected,
            wall_clock: self.wall_clock,
            clock_offset: AtomicI64::new(offset),
            syncing: tokio::sync::Mutex::new(()),
            writing: Mutex::new(()),
            limits: Mutex::new(None),
            verified: Mutex::new(None),
            status,
            events: broadcast::channel(256).0,
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

fn read_hlc(t: &mut dyn Transaction, key: &str) -> Result<Option<Hlc>> {
    t.meta(key)?.map(|text| text.parse::<Hlc>().map_err(|error| Error::store(error.to_string()))).transpose()
}

fn read_clock(t: &mut dyn Transaction) -> Result<HlcClock> {
    Ok(HlcClock::resume(read_hlc(t, META_CLOCK)?))
}

fn write_clock(t: &mut dyn Transaction, clock: &HlcClock) -> Result<()> {
    match clock.last() {
        Some(last) => t.set_meta(META_CLOCK, &last.to_string()),
        None => Ok(()),
    }
}

/// Moves the greatest stamp the server is known to hold past `seen`.
fn observe_server_stamp(t: &mut dyn Transaction, seen: impl IntoIterator<Item = Hlc>) -> Result<()> {
    let known = read_hlc(t, META_SERVER_HLC)?;
    match seen.into_iter().max().filter(|seen| known.is_none_or(|known| *seen > known)) {
        Some(greater) => t.set_meta(META_SERVER_HLC, &greater.to_string()),
        None => Ok(()),
    }
}

fn read_offset(t: &mut dyn Transaction) -> Result<i64> {
    Ok(t.meta(META_CLOCK_OFFSET)?.and_then(|text| text.parse().ok()).unwrap_or(0))
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
        _ => Err(Error::Protocol(format!("pull response: the digest {wire:?} is not 16 hex digits"))),
    }
}

/// Puts rows back to what the server confirmed, with `also` (changes the server acknowledged that a
/// pull has not brought back yet) and the changes still unsent merged on top: after a rejection or a
/// discard, the row shows no trace of the change that left the outbox.
fn restore_rows(t: &mut dyn Transaction, rows: &BTreeSet<(String, String)>, also: &[&Change]) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let unsent = t.outbox(usize::MAX)?;
    for (model, pk) in rows {
        let mut row = t.row(model, pk)?;
        row.local = row.confirmed.clone();
        let unsent = unsent.iter().map(|pending| &pending.change);
        for change in also.iter().copied().chain(unsent).filter(|change| change.model == *model && change.pk == *pk) {
            row.local.apply(change);
        }
        t.put_row(model, pk, &row)?;
    }
    Ok(())
}

/// What the pages of one pull ended with.
struct Pulled {
    /// The digest the last page carried, if any.
    digest: Option<String>,
    /// Whether some page could have changed the confirmed rows (it held changes, or was a reset).
    changed: bool,
}

/// Sets the client's activity back to idle when a sync ends, also when its future is dropped.
struct IdleOnDrop<'a>(&'a watch::Sender<SyncStatus>);

impl Drop for IdleOnDrop<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|status| status.activity = Activity::Idle);
    }
}

impl<R: Remote> SyncClient<R> {
    /// The tenant this replica belongs to.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// The sync status, to show or to wait on (`changed().await`).
    pub fn status(&self) -> watch::Receiver<SyncStatus> {
        self.status.subscribe()
    }

    /// Change events: one [`RowsChanged`] per local transaction that changed rows (a write, a pulled
    /// page, a rejection), sent after it commits, so an app re-reads what it shows when
    /// [`RowsChanged::touches`] its model. A receiver that falls more than 256 events behind gets
    /// `RecvError::Lagged` and should reload everything it shows.
    pub fn subscribe(&self) -> broadcast::Receiver<RowsChanged> {
        self.events.subscribe()
    }

    fn emit(&self, origin: Origin, rows: Vec<(String, String)>, all: bool) {
        if all || !rows.is_empty() {
            let _ = self.events.send(RowsChanged { origin, rows, all });
        }
    }

    /// Updates the status's counts after a local transaction that changed them.
    fn counted(&self, pending: usize, rejections: usize) {
        self.status.send_modify(|status| {
            status.pending = pending;
            status.rejections = rejections;
        });
    }

    /// The time to stamp a change with: the device's wall clock, corrected by the measured offset.
    fn now(&self) -> i64 {
        (self.wall_clock)() + self.clock_offset.load(Ordering::Relaxed)
    }

    /// Runs `body` with the clock in one local transaction (serialized with other local writes), then
    /// sends the status and the event for the rows `body` returns.
    fn write<T>(&self, body: impl FnOnce(&mut dyn Transaction, &mut HlcClock) -> Result<(T, Vec<(String, String)>)>) -> Result<T> {
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
    fn record(&self, t: &mut dyn Transaction, clock: &mut HlcClock, model: &str, pk: &str, op: Op, value: Option<Map<String, Value>>) -> Result<Change> {
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

    /// Pushes the outbox in batches, then pulls until the server has nothing more.
    ///
    /// A change the server rejects leaves the outbox, its row goes back to the server's version (plus
    /// any changes still unsent) and it is recorded in [`SyncClient::rejections`], all in one local
    /// transaction per pushed batch, before anything else happens: a sync that fails, times out or is
    /// cancelled afterwards, or a crash, cannot lose it. A batch the server refuses as a whole as
    /// invalid input or too large (SQLSTATE 22xxx, 54000) is split until the change responsible is
    /// alone, and that change is rejected with reason [`REASON_REFUSED`]: a change the server will never
    /// accept cannot hold up the ones behind it. After a `clock_skew` rejection the client measures
    /// the server's clock ([`Remote::server_time`]) and from then on stamps changes with the device's
    /// clock corrected by the difference.
    ///
    /// If the server cannot be reached the error is returned and local state is as it was; a sync
    /// interrupted at any point converges on the next one (re-sent changes come back `duplicate`).
    /// The whole sync gives up with [`Error::Timeout`] after the builder's `sync_timeout`.
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
        let _idle = IdleOnDrop(&self.status);
        let outcome = match tokio::time::timeout(self.sync_timeout, self.run_sync()).await {
            Ok(outcome) => outcome,
            Err(_) => Err(Error::Timeout { what: "sync", after: self.sync_timeout }),
        };
        self.status.send_modify(|status| match &outcome {
            Ok(_) => {
                status.connected = true;
                status.last_synced_at = Some(SystemTime::now());
                status.last_error = None;
            }
            Err(error) => {
                if matches!(error, Error::Connection { .. } | Error::Timeout { .. } | Error::Config { .. }) {
                    status.connected = false;
                }
                status.last_error = Some(error.into());
            }
        });
        outcome
    }

    async fn run_sync(&self) -> Result<SyncReport> {
        let mut report = SyncReport::default();
        let (skewed, offset) = self.store.transaction(|t| Ok((t.meta(META_CLOCK_SKEWED)?.is_some(), read_offset(t)?)))?;
        if skewed || offset != 0 {
            self.align_clock(skewed).await?;
        }
        self.push_outbox(&mut report).await?;
        if self.store.transaction(|t| t.meta(META_CLOCK_SKEWED))?.is_some() {
            self.align_clock(true).await?;
        }
        let pulled = self.pull_all(&mut report).await?;
        self.check_digest(pulled, &mut report).await?;
        Ok(report)
    }

    /// The server's push limits, once a push response has told them.
    pub fn limits(&self) -> Option<PushLimits> {
        *self.limits.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Measures the device's clock against the server's ([`Remote::server_time`], or else the greatest
    /// stamp the server is known to hold) and keeps the difference as the offset of future stamps.
    /// With `rebase` (after a `clock_skew` rejection) the HLC, which the wrong wall clock carried
    /// ahead, restarts from the greatest stamp the server holds.
    async fn align_clock(&self, rebase: bool) -> Result<()> {
        let server_now = self.remote.server_time().await?;
        let device_now = (self.wall_clock)();
        let offset = self.store.transaction(|t| {
            let server_stamp = read_hlc(t, META_SERVER_HLC)?;
            let offset = match server_now.or(server_stamp.filter(|_| rebase).map(|stamp| stamp.millis())) {
                Some(server) => server - device_now,
                None => read_offset(t)?,
            };
            t.set_meta(META_CLOCK_OFFSET, &offset.to_string())?;
            if rebase {
                match server_stamp {
                    Some(stamp) => t.set_meta(META_CLOCK, &stamp.to_string())?,
                    None => t.delete_meta(META_CLOCK)?,
                }
                t.delete_meta(META_CLOCK_SKEWED)?;
            }
            Ok(offset)
        })?;
        let previous = self.clock_offset.swap(offset, Ordering::Relaxed);
        if rebase || previous != offset {
            tracing::warn!(tenant = %self.tenant, offset_ms = offset, rebase, "the device clock differs from the server's: stamping changes with the corrected time");
        }
        Ok(())
    }

    async fn push_outbox(&self, report: &mut SyncReport) -> Result<()> {
        let total = self.status.borrow().pending;
        let mut sent = 0;
        loop {
            self.status.send_modify(|status| status.activity = Activity::Uploading { sent, total: total.max(sent) });
            let server_max = self.limits().map_or(usize::MAX, |limits| usize::try_from(limits.max_push_changes).unwrap_or(1));
            let batch: Vec<Change> = self.store.transaction(|t| t.outbox(self.push_batch.min(server_max).max(1)))?.into_iter().map(|pending| pending.change).collect();
            if batch.is_empty() {
                return Ok(());
            }
            self.push_batch(&batch, report).await?;
            sent += batch.len();
        }
    }

    /// Pushes one batch and settles its results. A batch the server refuses as a whole as invalid input
    /// is split in halves, in order, until the change responsible is alone; that change is rejected.
    async fn push_batch(&self, batch: &[Change], report: &mut SyncReport) -> Result<()> {
        let mut parts = vec![batch];
        while let Some(part) = parts.pop() {
            match self.remote.push(&self.tenant, part).await {
                Ok(response) => {
                    if response.results.len() != part.len() {
                        return Err(Error::Protocol(format!("push response: {} results for {} changes", response.results.len(), part.len())));
                    }
                    if let Some(limits) = response.limits {
                        *self.limits.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(limits);
                    }
                    let statuses: Vec<Status> = response.results.into_iter().map(|result| result.status).collect();
                    self.settle(part, &statuses, report)?;
                }
                Err(error) if error.refuses_input() && part.len() > 1 => {
                    let (first, second) = part.split_at(part.len() / 2);
                    parts.extend([second, first]);
                }
                Err(error) if error.refuses_input() => {
                    tracing::warn!(op_id = %part[0].op_id, %error, "the server refuses this change alone: rejecting it");
                    let reason = format!("{REASON_REFUSED}: {}: {}", error.sqlstate().unwrap_or_default(), error_message(&error));
                    self.settle(part, &[Status::Rejected { reason }], report)?;
                }
                Err(error) => {
                    let text = error.to_string();
                    self.store.transaction(|t| part.iter().try_for_each(|change| t.note_failure(change.op_id, &text)))?;
                    return Err(error);
                }
            }
        }
        Ok(())
    }

    /// Settles pushed changes in one local transaction: each leaves the outbox; a rejected one is
    /// recorded and its row restored; then the callback runs for each rejection.
    fn settle(&self, changes: &[Change], statuses: &[Status], report: &mut SyncReport) -> Result<()> {
        let now = SystemTime::now();
        let (recorded, pending, rejections) = self.store.transaction(|t| {
            let mut recorded = Vec::new();
            for (change, status) in changes.iter().zip(statuses) {
                t.dequeue(change.op_id)?;
                if let Status::Rejected { reason } = status {
                    recorded.push(t.record_rejection(change, reason, now)?);
                    if reason == REASON_CLOCK_SKEW {
                        t.set_meta(META_CLOCK_SKEWED, "1")?;
                    }
                }
            }
            let acknowledged: Vec<&Change> = changes.iter().zip(statuses).filter(|(_, status)| status.is_acknowledged()).map(|(change, _)| change).collect();
            observe_server_stamp(t, acknowledged.iter().map(|change| change.hlc))?;
            let rows = recorded.iter().map(|rejection: &Rejection| (rejection.change.model.clone(), rejection.change.pk.clone())).collect();
            restore_rows(t, &rows, &acknowledged)?;
            Ok((recorded, t.outbox_len()?, t.rejections()?.len()))
        })?;
        self.counted(pending, rejections);
        report.pushed += changes.len();
        self.emit(Origin::Restore, recorded.iter().map(|rejection| (rejection.change.model.clone(), rejection.change.pk.clone())).collect(), false);
        for rejection in &recorded {
            tracing::info!(op_id = %rejection.change.op_id, model = %rejection.change.model, pk = %rejection.change.pk, reason = %rejection.reason, "the server rejected a change");
            if let Some(callback) = &self.on_rejected {
                callback(rejection);
            }
        }
        report.rejected.extend(recorded);
        Ok(())
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
        let mut received = 0;
        loop {
            self.status.send_modify(|status| status.activity = Activity::Downloading { received, reset: repair || cursor < 0 });
            let page = if repair {
                let page = self.remote.pull_primary(&self.tenant, cursor, self.pull_page).await?;
                if !page.reset {
                    return Err(Error::Protocol(format!(
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
                observe_server_stamp(t, page.changes.iter().map(|pulled| pulled.hlc))?;
                write_clock(t, &clock)?;
                t.set_meta(META_CURSOR, &page.cursor.to_string())
            })?;
            let rows = page.changes.iter().map(|pulled| (pulled.model.clone(), pulled.pk.clone())).collect();
            self.emit(if page.reset { Origin::Reset } else { Origin::Pull }, rows, page.reset);
            received += page.changes.len();
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
}

/// An error's own message, without the client's prefix: the server's message for a server error.
fn error_message(error: &Error) -> String {
    match error {
        Error::Server { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// Applies a page of a reset: on its first page every confirmed row is forgotten (the app keeps seeing
/// its unsent changes); each row sent becomes the confirmed state, with unsent changes merged on top.
fn apply_reset_page(t: &mut dyn Transaction, page: &protocol::PullResponse) -> Result<()> {
    let unsent: Vec<Change> = t.outbox(usize::MAX)?.into_iter().map(|pending| pending.change).collect();
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
        let confirmed = pulled.to_row_state().map_err(|problem| Error::Protocol(format!("a reset row does not decode: {problem}")))?;
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
        /// Pushes fail with this SQLSTATE.
        fail_pushes: Option<&'static str>,
        /// Pulls fail with this SQLSTATE.
        fail_pulls: Option<&'static str>,
        /// Pulls never answer.
        hang_pulls: bool,
        /// Changes stamped more than 5 minutes past the system clock are rejected `clock_skew`, and the
        /// remote tells the server time.
        server_clock: bool,
    }

    /// Whether a change writes a field of this name.
    fn writes(change: &Change, field: &str) -> bool {
        change.value.as_ref().is_some_and(|value| value.contains_key(field))
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

        /// A push as sync_push answers it; a change writing `forbidden` is rejected, one writing `poison`
        /// makes the whole call fail with 22023.
        fn push(&mut self, changes: &[Change]) -> Result<PushResponse> {
            if let Some(code) = self.fail_pushes {
                return Err(Error::server(code, "the push failed", None));
            }
            if let Some(at) = changes.iter().position(|change| writes(change, "poison")) {
                return Err(Error::server("22023", format!("changes[{at}].value.poison: not accepted"), None));
            }
            let mut results = Vec::new();
            for change in changes {
                let refusal = if writes(change, "forbidden") {
                    Some("permission_denied: may not write forbidden".to_owned())
                } else if self.server_clock && change.hlc.millis() > wall_clock_millis() + 300_000 {
                    Some(REASON_CLOCK_SKEW.to_owned())
                } else {
                    None
                };
                if let Some(reason) = refusal {
                    results.push(ChangeResult { op_id: change.op_id, status: Status::Rejected { reason } });
                    continue;
                }
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
            Ok(PushResponse { cursor: self.last_seq(), results, limits: None })
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
        fn push<'a>(&'a self, _tenant: &'a str, changes: &'a [Change]) -> RemoteFuture<'a, PushResponse> {
            assert!(!self.standby, "pushes go to the primary");
            let response = self.server.lock().unwrap().push(changes);
            Box::pin(async move { response })
        }

        fn pull<'a>(&'a self, _tenant: &'a str, since: i64, max_changes: i32) -> RemoteFuture<'a, PullResponse> {
            let (page, hook) = {
                let mut server = self.server.lock().unwrap();
                if server.hang_pulls {
                    server.pulls.push((since, self.standby));
                    return Box::pin(std::future::pending());
                }
                if let Some(code) = server.fail_pulls {
                    server.pulls.push((since, self.standby));
                    return Box::pin(async move { Err(Error::server(code, "the pull failed", None)) });
                }
                let hook = if since > server.last_seq() { server.on_repair.take() } else { None };
                (server.pull(since, max_changes, self.standby), hook)
            };
            if let Some(hook) = hook {
                hook();
            }
            Box::pin(async move { Ok(page) })
        }

        fn server_time(&self) -> RemoteFuture<'_, Option<i64>> {
            let now = self.server.lock().unwrap().server_clock.then(wall_clock_millis);
            Box::pin(async move { Ok(now) })
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
        assert!(matches!(&error, Error::Protocol(message) if message.contains("without one")), "{error}");
        assert_eq!(standby_only.store.transaction(read_cursor).unwrap(), server.lock().unwrap().last_seq(), "the cursor did not move past the log");
        assert_eq!(rows(&standby_only)["1"]["title"], "corrupted", "nothing was applied");
    }

    fn sqlite_client(actor: &str, path: &std::path::Path, server: &Arc<Mutex<Server>>, seen: &Arc<Mutex<Vec<i64>>>) -> SyncClient<Fake> {
        let seen = seen.clone();
        SyncClientBuilder::<Fake>::new()
            .tenant("acme")
            .actor(actor)
            .local(LocalStore::sqlite(path).unwrap())
            .remote(primary(server))
            .on_rejected(move |rejection| seen.lock().unwrap().push(rejection.id))
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn a_rejection_is_recorded_with_its_row_restored_before_the_pull_and_survives_a_crash() {
        let path = temp_db();
        let server = server(false);
        let seen: Arc<Mutex<Vec<i64>>> = Arc::default();
        {
            let device = sqlite_client("device", &path, &server, &seen);
            device.insert("todo", "1", &json!({"title": "ok"})).unwrap();
            device.sync().await.unwrap();
            device.update("todo", "1", &json!({"title": "refused", "forbidden": true})).unwrap();
            device.update("todo", "1", &json!({"note": "accepted in the same batch"})).unwrap();
            server.lock().unwrap().fail_pulls = Some("08006");
            let error = device.sync().await.unwrap_err();
            assert!(error.is_transient() && error.sqlstate() == Some("08006"), "{error}");
            assert_eq!(device.pending().unwrap(), 0);
            assert_eq!(Value::Object(rows(&device)["1"].clone()), json!({"title": "ok", "note": "accepted in the same batch"}), "restored without waiting for the pull");
            assert_eq!(seen.lock().unwrap().len(), 1, "the callback ran once");
            let status = device.status().borrow().clone();
            assert_eq!((status.rejections, status.pending, status.activity), (1, 0, Activity::Idle));
            assert_eq!(status.last_error.map(|error| (error.class, error.sqlstate)), Some((ErrorClass::Transient, Some("08006".into()))));
        }
        // The process ends here without another sync: the rejection is in the file.
        let reopened = sqlite_client("device", &path, &server, &seen);
        assert_eq!(reopened.status().borrow().rejections, 1);
        let rejections = reopened.take_rejections().unwrap();
        assert_eq!(rejections.len(), 1);
        assert_eq!((rejections[0].code(), rejections[0].id), ("permission_denied", seen.lock().unwrap()[0]));
        assert_eq!(rejections[0].change.value.as_ref().unwrap()["title"], "refused");
        assert!(reopened.take_rejections().unwrap().is_empty(), "drained once");
        server.lock().unwrap().fail_pulls = None;
        let report = reopened.sync().await.unwrap();
        assert!(report.rejected.is_empty());
        assert_eq!(rows(&reopened), server.lock().unwrap().visible("todo"));
        assert_eq!(seen.lock().unwrap().len(), 1, "no callback again");
        drop(reopened);
        std::fs::remove_file(&path).ok();
    }

    #[tokio::test]
    async fn a_change_refused_as_a_whole_call_is_isolated_and_cannot_block_the_rest() {
        let server = server(false);
        let device = client("device", LocalStore::memory(), primary(&server));
        for n in 0..7 {
            let value = if n == 4 { json!({"poison": n}) } else { json!({"n": n}) };
            device.insert("todo", &n.to_string(), &value).unwrap();
        }
        let report = device.sync().await.unwrap();
        assert_eq!(report.pushed, 7);
        let reasons: Vec<&str> = report.rejected.iter().map(|rejection| rejection.reason.as_str()).collect();
        assert_eq!(reasons, ["refused: 22023: changes[0].value.poison: not accepted"], "the change alone was refused");
        assert_eq!(report.rejected[0].change.pk, "4");
        assert_eq!(device.pending().unwrap(), 0);
        let on_server = server.lock().unwrap().visible("todo");
        assert_eq!(on_server.keys().collect::<Vec<_>>(), ["0", "1", "2", "3", "5", "6"]);
        assert_eq!(rows(&device), on_server);
        let order: Vec<i64> = server.lock().unwrap().log.iter().map(|change| change.pk.parse().unwrap()).collect();
        assert_eq!(order, [0, 1, 2, 3, 5, 6], "the rest went in outbox order");
    }

    #[tokio::test]
    async fn the_outbox_lists_failures_and_a_pending_change_can_be_discarded() {
        let server = server(false);
        let device = client("device", LocalStore::memory(), primary(&server));
        device.insert("todo", "1", &json!({"title": "first"})).unwrap();
        let edit = device.update("todo", "1", &json!({"title": "second"})).unwrap();
        device.insert("todo", "2", &json!({"title": "other"})).unwrap();
        server.lock().unwrap().fail_pushes = Some("57P01");
        assert_eq!(device.sync().await.unwrap_err().sqlstate(), Some("57P01"));
        let outbox = device.outbox().unwrap();
        assert_eq!(outbox.len(), 3);
        assert!(outbox.iter().all(|pending| pending.attempts == 1 && pending.last_error.as_deref().is_some_and(|error| error.contains("57P01"))), "{outbox:?}");

        let mut events = device.subscribe();
        assert_eq!(device.discard(edit.op_id).unwrap(), edit);
        assert_eq!(rows(&device)["1"]["title"], "first", "the row shows the other unsent change only");
        assert!(events.try_recv().unwrap().touches("todo"));
        assert!(matches!(device.discard(edit.op_id), Err(Error::NotFound(_))));
        assert_eq!(device.status().borrow().pending, 2);

        server.lock().unwrap().fail_pushes = None;
        device.sync().await.unwrap();
        assert_eq!(server.lock().unwrap().visible("todo")["1"]["title"], "first", "the discarded change was never sent");
        assert_eq!(rows(&device), server.lock().unwrap().visible("todo"));
    }

    #[tokio::test]
    async fn a_rejected_change_can_be_retried_as_a_new_change() {
        let server = server(false);
        let device = client("device", LocalStore::memory(), primary(&server));
        let refused = device.insert("todo", "1", &json!({"title": "x", "forbidden": 1})).unwrap();
        let report = device.sync().await.unwrap();
        assert_eq!(report.rejected.len(), 1);
        assert!(rows(&device).is_empty());
        let id = device.rejections().unwrap()[0].id;
        let retried = device.retry_rejection(id).unwrap();
        assert_ne!(retried.op_id, refused.op_id);
        assert!(retried.hlc > refused.hlc);
        assert!(device.rejections().unwrap().is_empty());
        assert!(matches!(device.retry_rejection(id), Err(Error::NotFound(_))));
        assert_eq!(device.pending().unwrap(), 1);
        assert_eq!(rows(&device)["1"]["title"], "x");
    }

    #[tokio::test]
    async fn a_device_clock_an_hour_ahead_is_rebased_on_the_server_clock() {
        let path = temp_db();
        let server = server(false);
        server.lock().unwrap().server_clock = true;
        let hour = 3_600_000;
        let ahead = |path: &std::path::Path| {
            SyncClientBuilder::<Fake>::new()
                .tenant("acme")
                .actor("ahead")
                .local(LocalStore::sqlite(path).unwrap())
                .remote(primary(&server))
                .wall_clock(move || wall_clock_millis() + hour)
                .build()
                .unwrap()
        };
        let device = ahead(&path);
        device.insert("todo", "1", &json!({"title": "stamped an hour ahead"})).unwrap();
        let report = device.sync().await.unwrap();
        assert_eq!(report.rejected.iter().map(Rejection::code).collect::<Vec<_>>(), [REASON_CLOCK_SKEW]);

        let later = device.insert("todo", "2", &json!({"title": "after the rebase"})).unwrap();
        assert!((later.hlc.millis() - wall_clock_millis()).abs() < 60_000, "stamped with the server's time: {}", later.hlc);
        let retried = device.retry_rejection(report.rejected[0].id).unwrap();
        let report = device.sync().await.unwrap();
        assert!(report.rejected.is_empty(), "{report:?}");
        assert!(retried.hlc > later.hlc);
        assert_eq!(server.lock().unwrap().visible("todo").len(), 2);

        drop(device);
        let reopened = ahead(&path);
        let after_restart = reopened.insert("todo", "3", &json!({"title": "after a restart"})).unwrap();
        assert!(after_restart.hlc.millis() < wall_clock_millis() + 60_000, "the offset is kept: {}", after_restart.hlc);
        assert!(reopened.sync().await.unwrap().rejected.is_empty());
        drop(reopened);
        std::fs::remove_file(&path).ok();
    }

    #[tokio::test]
    async fn status_and_events_follow_writes_syncs_and_errors() {
        let server = server(true);
        let device = client("device", LocalStore::memory(), primary(&server));
        let other = client("other", LocalStore::memory(), primary(&server));
        let mut events = device.subscribe();
        let status = device.status();
        device.insert("todo", "1", &json!({"title": "mine"})).unwrap();
        assert_eq!(events.try_recv().unwrap(), RowsChanged { origin: Origin::Local, rows: vec![("todo".into(), "1".into())], all: false });
        assert_eq!((status.borrow().pending, status.borrow().connected, status.borrow().last_synced_at), (1, false, None));

        other.insert("note", "a", &json!({"body": "theirs"})).unwrap();
        other.sync().await.unwrap();
        device.sync().await.unwrap();
        let pulled: Vec<RowsChanged> = std::iter::from_fn(|| events.try_recv().ok()).collect();
        assert!(pulled.iter().any(|event| event.origin == Origin::Pull && event.touches("note") && !event.touches("other")), "{pulled:?}");
        let now = status.borrow().clone();
        assert!(now.connected && now.last_synced_at.is_some() && now.last_error.is_none() && now.pending == 0, "{now:?}");
        assert_eq!(now.activity, Activity::Idle);

        server.lock().unwrap().fail_pulls = Some("42501");
        let error = device.sync().await.unwrap_err();
        assert!(!error.is_transient());
        let failed = status.borrow().last_error.clone().unwrap();
        assert_eq!((failed.class, failed.sqlstate.as_deref()), (ErrorClass::Permanent, Some("42501")));
        assert!(failed.message.contains("the pull failed"), "{}", failed.message);
    }

    #[tokio::test]
    async fn a_client_syncs_through_a_remote_trait_object() {
        let server = server(true);
        let remote: Arc<dyn Remote> = Arc::new(primary(&server));
        let device: SyncClient<Arc<dyn Remote>> = client("device", LocalStore::memory(), remote);
        device.insert("todo", "1", &json!({"title": "through dyn Remote"})).unwrap();
        device.sync().await.unwrap();
        assert_eq!(server.lock().unwrap().visible("todo")["1"]["title"], "through dyn Remote");
    }

    /// Waits (at most a generous 10 s) until `done` holds.
    async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(tokio::time::Instant::now() < deadline, "not within 10 s: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn dropping_the_live_handle_ends_the_loop() {
        let server = server(false);
        let device = Arc::new(client("device", LocalStore::memory(), primary(&server)));
        let live = device.clone().live(LiveOptions { interval: Duration::from_millis(5), ..LiveOptions::default() });
        eventually("the loop syncs", || server.lock().unwrap().pulls.len() >= 3).await;
        drop(live);
        eventually("the loop lets go of the client", || Arc::strong_count(&device) == 1).await;
        let pulls = server.lock().unwrap().pulls.len();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(server.lock().unwrap().pulls.len(), pulls, "no sync after the loop ended");
        assert_eq!(device.status().borrow().live, LiveState::Off);
    }

    #[tokio::test]
    async fn stop_returns_while_a_call_never_answers() {
        let server = server(false);
        server.lock().unwrap().hang_pulls = true;
        let device = Arc::new(client("device", LocalStore::memory(), primary(&server)));
        let live = device.clone().live(LiveOptions::default());
        eventually("the pull hangs", || !server.lock().unwrap().pulls.is_empty()).await;
        assert!(matches!(device.status().borrow().activity, Activity::Downloading { .. }));
        tokio::time::timeout(Duration::from_secs(10), live.stop()).await.expect("stop returns");
        assert_eq!(device.status().borrow().activity, Activity::Idle, "the abandoned sync left the status idle");
        assert_eq!(Arc::strong_count(&device), 1);
    }

    #[tokio::test]
    async fn a_permanent_error_halts_the_live_loop_until_sync_now() {
        let server = server(false);
        server.lock().unwrap().fail_pulls = Some("42501");
        let device = Arc::new(client("device", LocalStore::memory(), primary(&server)));
        let status = device.status();
        let live = device.clone().live(LiveOptions { interval: Duration::from_millis(5), ..LiveOptions::default() });
        eventually("the loop halts", || matches!(status.borrow().live, LiveState::Running { halted: true, .. })).await;
        assert_eq!(status.borrow().last_error.as_ref().map(|error| error.class), Some(ErrorClass::Permanent));
        let wakeups = match &status.borrow().live {
            LiveState::Running { wakeups: Wakeups::Unavailable { reason }, .. } => reason.clone(),
            other => panic!("{other:?}"),
        };
        assert!(wakeups.contains("listen_url"), "{wakeups}");
        let pulls = server.lock().unwrap().pulls.len();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(server.lock().unwrap().pulls.len(), pulls, "no retries after a permanent error");

        server.lock().unwrap().fail_pulls = None;
        live.sync_now();
        eventually("the loop syncs again", || status.borrow().last_error.is_none() && status.borrow().last_synced_at.is_some()).await;
        assert!(matches!(status.borrow().live, LiveState::Running { halted: false, .. }));
        live.stop().await;
    }
}
