//! What a client is doing and what changed, for an app to show: the sync status (a
//! [`tokio::sync::watch`] value, see [`crate::SyncClient::status`]) and change events (a
//! [`tokio::sync::broadcast`] channel, see [`crate::SyncClient::changes`]).

use std::time::SystemTime;

use crate::error::{Error, ErrorClass};

/// The state of a client's sync, as the app shows it. Every field is kept up to date by syncs
/// (explicit or live), local writes and outbox operations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncStatus {
    /// What the client is doing now.
    pub activity: Activity,
    /// Whether the last call to the server got an answer (false until one does, and after a
    /// connection failure or timeout).
    pub connected: bool,
    /// When a sync last completed.
    pub last_synced_at: Option<SystemTime>,
    /// Changes waiting in the outbox.
    pub pending: usize,
    /// Rejections recorded and not yet drained by the app (see [`crate::SyncClient::rejections`]).
    pub rejections: usize,
    /// The error of the last sync, if it failed (cleared by a sync that succeeds).
    pub last_error: Option<StatusError>,
    /// Whether a live loop runs, and whether the server can wake it.
    pub live: LiveState,
}

impl Default for SyncStatus {
    fn default() -> Self {
        SyncStatus { activity: Activity::Idle, connected: false, last_synced_at: None, pending: 0, rejections: 0, last_error: None, live: LiveState::Off }
    }
}

/// What the client is doing now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Activity {
    /// Not syncing.
    Idle,
    /// Pushing the outbox: `sent` changes answered so far, of `total` pending when the push began.
    Uploading { sent: usize, total: usize },
    /// Pulling: `received` changes (or rows, during a reset) applied so far in this sync; `reset` while
    /// the server's current rows are being paged in (a new replica, a compacted cursor, a repair).
    Downloading { received: usize, reset: bool },
}

/// An error as the status shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusError {
    /// The error's message, with its causes.
    pub message: String,
    /// Transient (being retried) or permanent (a person must act; the live loop stopped retrying).
    pub class: ErrorClass,
    /// The server's SQLSTATE, when the server raised it.
    pub sqlstate: Option<String>,
}

impl From<&Error> for StatusError {
    fn from(error: &Error) -> Self {
        let mut message = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            message.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        StatusError { message, class: error.class(), sqlstate: error.sqlstate().map(str::to_owned) }
    }
}

/// Whether a live loop runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LiveState {
    /// No live loop runs.
    Off,
    /// A live loop runs: it syncs on its timer and on wake-ups, when they are available.
    Running {
        /// Whether the server can wake it.
        wakeups: Wakeups,
        /// It stopped retrying after a permanent error (in [`SyncStatus::last_error`]) and syncs again
        /// only when asked ([`crate::LiveHandle::sync_now`]) or woken by the server.
        halted: bool,
    },
}

/// Whether the server can wake the live loop when another device pushes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wakeups {
    /// A direct connection LISTENs: a push by another device is pulled within moments.
    Listening,
    /// No wake-ups: the loop syncs on its timer only. `reason` says why (no LISTEN connection
    /// configured, as behind a transaction-mode pooler, or it is connecting or failed).
    Unavailable { reason: String },
}

/// Why rows changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Origin {
    /// A local write ([`crate::SyncClient::insert`] and friends).
    Local,
    /// Changes pulled from the server.
    Pull,
    /// The server's current rows replaced the local ones (a reset or a repair).
    Reset,
    /// A change was rejected (or discarded from the outbox): its row went back to the server's version.
    Restore,
    /// Everything local was cleared ([`crate::SyncClient::clear`]).
    Clear,
    /// The replica let go of rows outside its scopes: after an unsubscribe ([`crate::SyncClient::unsubscribe`],
    /// or a store opened with fewer scopes than it held; the app sees only their unsent changes, if
    /// any), or once the changes it made to such rows were sent.
    OutOfScope,
}

/// Rows that changed in one local transaction, sent after it commits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowsChanged {
    /// Why.
    pub origin: Origin,
    /// The rows, as (model, pk), each once, in order; empty when `all` is set.
    pub rows: Vec<(String, String)>,
    /// Any row may have changed (a reset, a clear): reload everything shown.
    pub all: bool,
}

impl RowsChanged {
    /// Whether rows of `model` may have changed.
    pub fn touches(&self, model: &str) -> bool {
        self.all || self.rows.iter().any(|(changed, _)| changed == model)
    }
}
