//! The local-first client of sync_ext.
//!
//! An app reads and writes a local store that works offline; [`SyncClient::sync`] pushes the
//! changes made meanwhile and pulls everyone else's, through the `sync_push` / `sync_pull` SQL
//! functions over an ordinary Postgres connection: no sidecar server, no replication slot. Both
//! sides merge with the same rule (the `sync_ext_protocol` crate), so every replica ends with the
//! same rows.
//!
//! Local data is typed through [`Model`]s: [`SyncClient::collection`] reads and writes one model's rows
//! under typed keys (composite ones formatted as the server formats a bound table's pk), with indexed
//! local [`Query`]s; [`SyncClient::transaction`] commits several writes at once.
//!
//! A replica can hold part of a tenant, the rows of some scope instances (partial sync):
//! [`SyncClientBuilder::scopes`], [`SyncClient::subscribe`] and [`SyncClient::unsubscribe`].
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

mod builder;
mod client;
mod clock;
mod collection;
mod digest;
mod error;
mod live;
mod local;
mod model;
mod outbox;
mod query;
pub mod portable;
mod remote;
mod scopes;
mod status;
mod store;
mod sync;
#[cfg(test)]
mod tests;

pub use builder::SyncClientBuilder;
pub use client::SyncClient;
pub use collection::{Collection, Listed, LocalTransaction};
pub use error::{sqlstate_is_transient, BoxError, Error, ErrorClass, Result};
pub use live::{LiveHandle, LiveOptions};
pub use model::{Key, KeyPart, Model};
pub use outbox::{PendingChange, Rejection, REASON_REFUSED};
pub use query::{Cmp, Query};
pub use remote::{CredentialsHook, Encoding, PgRemote, ReadReplica, Remote, RemoteFuture, DEFAULT_CONNECT_TIMEOUT, DEFAULT_STATEMENT_TIMEOUT};
pub use status::{Activity, LiveState, Origin, RowsChanged, StatusError, SyncStatus, Wakeups};
pub use store::{LocalRow, LocalStore, Transaction};
pub use sync::{SyncReport, DEFAULT_SYNC_TIMEOUT};
pub use sync_ext_protocol as protocol;
/// The kind of a change (insert, update, delete), for [`SyncClient::apply_change`] and transactions.
pub use sync_ext_protocol::Op;
/// The driver [`PgRemote`] uses, for [`PgRemote::from_config`].
pub use tokio_postgres;
