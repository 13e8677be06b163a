//! The client itself: a replica of one tenant's data, with its status and change events.

use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sync_ext_protocol::wire::PushLimits;
use tokio::sync::{broadcast, watch};

use crate::digest::ServerDigest;
use crate::outbox::Rejection;
use crate::status::{Origin, RowsChanged, SyncStatus};
use crate::error::Result;
use crate::store::{LocalStore, Transaction};
use crate::Remote;

/// The store's tenant: a store holds one tenant's data.
pub(crate) const META_TENANT: &str = "tenant";

pub(crate) type RejectionCallback = Box<dyn Fn(&Rejection) + Send + Sync>;
pub(crate) type WallClock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// A replica of one tenant's data: a local store, an outbox, an HLC clock, and a remote to sync with.
pub struct SyncClient<R> {
    pub(crate) tenant: String,
    pub(crate) actor: String,
    pub(crate) store: LocalStore,
    pub(crate) remote: R,
    pub(crate) push_batch: usize,
    pub(crate) pull_page: i32,
    pub(crate) sync_timeout: Duration,
    pub(crate) on_rejected: Option<RejectionCallback>,
    /// The device's wall clock, in milliseconds since the Unix epoch.
    pub(crate) wall_clock: WallClock,
    /// Milliseconds added to the wall clock to stamp changes (the server's time minus the device's,
    /// once a `clock_skew` rejection made the client measure it; kept in the store).
    pub(crate) clock_offset: AtomicI64,
    /// Serializes syncs of this client (the live loop and explicit calls).
    pub(crate) syncing: tokio::sync::Mutex<()>,
    /// Serializes local writes (each takes the clock).
    pub(crate) writing: Mutex<()>,
    /// The server's push limits, as its last push response told them.
    pub(crate) limits: Mutex<Option<PushLimits>>,
    /// The last server digest the confirmed rows were found to match (kept in memory only), so that a
    /// sync that pulled nothing and got the same digest back need not recompute it.
    pub(crate) verified: Mutex<Option<ServerDigest>>,
    pub(crate) status: watch::Sender<SyncStatus>,
    pub(crate) events: broadcast::Sender<RowsChanged>,
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
    pub fn changes(&self) -> broadcast::Receiver<RowsChanged> {
        self.events.subscribe()
    }

    pub(crate) fn emit(&self, origin: Origin, mut rows: Vec<(String, String)>, all: bool) {
        rows.sort_unstable();
        rows.dedup();
        if all || !rows.is_empty() {
            let _ = self.events.send(RowsChanged { origin, rows, all });
        }
    }

    /// Notes in the status that the server answered (a call succeeded).
    pub(crate) fn reached_server(&self) {
        self.status.send_if_modified(|status| !std::mem::replace(&mut status.connected, true));
    }

    /// Updates the status's counts after a local transaction that changed them.
    pub(crate) fn counted(&self, pending: usize, rejections: usize) {
        self.status.send_modify(|status| {
            status.pending = pending;
            status.rejections = rejections;
        });
    }


    /// Runs a local transaction for the sync's async code: on a multi-threaded tokio runtime through
    /// `block_in_place`, so the runtime moves its other tasks to another worker while SQLite works (the
    /// digest check reads every row); elsewhere directly.
    pub(crate) fn in_place<T>(&self, body: impl FnOnce(&mut dyn Transaction) -> Result<T>) -> Result<T> {
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) if runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(|| self.store.transaction(body)),
            _ => self.store.transaction(body),
        }
    }

    /// The server's push limits, once a push response has told them.
    pub fn limits(&self) -> Option<PushLimits> {
        *self.limits.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
