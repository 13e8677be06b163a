//! The server side of sync, seen from the client: `sync_push` and `sync_pull` over some connection.

use std::future::Future;

use serde_json::Value;
use sync_ext_protocol::{Change, PullResponse, PushResponse};
use tokio::sync::{mpsc, Mutex};
use tokio_postgres::AsyncMessage;

use crate::error::{Error, Result};

/// A connection to a database with sync_ext. Implement it for another driver or a pool; the client
/// needs only these two calls.
pub trait Remote: Send + Sync {
    /// Calls `sync_push(tenant, changes)`.
    fn push(&self, tenant: &str, changes: &[Change]) -> impl Future<Output = Result<PushResponse>> + Send;
    /// Calls `sync_pull(tenant, since, max_changes)`.
    fn pull(&self, tenant: &str, since: i64, max_changes: i32) -> impl Future<Output = Result<PullResponse>> + Send;
    /// Calls `sync_pull(tenant, since, max_changes)` on the primary, where pushes go. The client pulls
    /// this way only to repair its replica (see [`crate::SyncClient::sync`]): a reset asked for with a
    /// cursor beyond the log, which a primary answers with the current rows and a hot standby with an
    /// empty page. By default the same as [`Remote::pull`]; a remote that pulls from standbys overrides it.
    fn pull_primary(&self, tenant: &str, since: i64, max_changes: i32) -> impl Future<Output = Result<PullResponse>> + Send {
        self.pull(tenant, since, max_changes)
    }
}

/// How changes and pulls travel: JSON (`sync_push` / `sync_pull`) or MessagePack with named fields
/// (`sync_push_msgpack` / `sync_pull_msgpack`, smaller on the wire). Same structures either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Encoding {
    #[default]
    Json,
    MsgPack,
}

/// A [`Remote`] over tokio-postgres. It connects on first use and reconnects after the connection
/// drops, so a client can be built while offline.
pub struct PgRemote {
    url: String,
    encoding: Encoding,
    client: Mutex<Option<tokio_postgres::Client>>,
}

fn remote_error(error: tokio_postgres::Error) -> Error {
    match error.as_db_error() {
        Some(db) => Error::Remote(format!("{} ({})", db.message(), db.code().code())),
        None => Error::Remote(error.to_string()),
    }
}

impl PgRemote {
    /// A remote for a libpq-style connection string or URL (`postgres://user@host/db`).
    pub fn new(url: impl Into<String>) -> Self {
        PgRemote { url: url.into(), encoding: Encoding::Json, client: Mutex::new(None) }
    }

    /// Uses another encoding on the wire.
    pub fn encoding(mut self, encoding: Encoding) -> Self {
        self.encoding = encoding;
        self
    }

    /// The connection string this remote connects with.
    pub fn url(&self) -> &str {
        &self.url
    }

    async fn call<T: tokio_postgres::types::FromSqlOwned>(&self, sql: &str, params: &[&(dyn tokio_postgres::types::ToSql + Sync)]) -> Result<T> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(tokio_postgres::Client::is_closed) {
            *guard = Some(connect(&self.url).await?.0);
        }
        let client = guard.as_ref().expect("connected above");
        match client.query_one(sql, params).await {
            Ok(row) => Ok(row.get(0)),
            Err(error) => {
                if client.is_closed() {
                    *guard = None;
                }
                Err(remote_error(error))
            }
        }
    }
}

/// A [`Remote`] that pushes to a primary and pulls from one of its hot standbys, so pulls scale out
/// with read replicas. A standby that lags answers "nothing new yet" (never a reset) for a cursor it
/// has not reached. Notifications do not reach standbys: set [`crate::LiveOptions::listen_url`] to the primary.
/// The pulls of a repair (a replica whose digest differs from the server's) go to the primary.
pub struct ReadReplica<P, R> {
    /// Where pushes go.
    pub primary: P,
    /// Where pulls go.
    pub replica: R,
}

impl<P: Remote, R: Remote> Remote for ReadReplica<P, R> {
    async fn push(&self, tenant: &str, changes: &[Change]) -> Result<PushResponse> {
        self.primary.push(tenant, changes).await
    }

    async fn pull(&self, tenant: &str, since: i64, max_changes: i32) -> Result<PullResponse> {
        self.replica.pull(tenant, since, max_changes).await
    }

    async fn pull_primary(&self, tenant: &str, since: i64, max_changes: i32) -> Result<PullResponse> {
        self.primary.pull_primary(tenant, since, max_changes).await
    }
}

/// Opens a tokio-postgres connection and drives it on the current runtime. The payloads of the
/// notifications it receives are forwarded to the returned channel (dropping it is fine).
pub(crate) async fn connect(url: &str) -> Result<(tokio_postgres::Client, mpsc::UnboundedReceiver<String>)> {
    #[cfg(feature = "rustls")]
    let (client, mut connection) = {
        let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
        tokio_postgres::connect(url, tokio_postgres_rustls::MakeRustlsConnect::new(config)).await.map_err(remote_error)?
    };
    #[cfg(not(feature = "rustls"))]
    let (client, mut connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.map_err(remote_error)?;
    let (sender, receiver) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(notification))) => {
                    let _ = sender.send(notification.payload().to_owned());
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => {
                    tracing::debug!(%error, "sync_ext connection closed");
                    break;
                }
                None => break,
            }
        }
    });
    Ok((client, receiver))
}

fn unexpected(what: &str, error: impl std::fmt::Display) -> Error {
    Error::Remote(format!("unexpected {what} response: {error}"))
}

impl Remote for PgRemote {
    async fn push(&self, tenant: &str, changes: &[Change]) -> Result<PushResponse> {
        match self.encoding {
            Encoding::Json => {
                let body = serde_json::to_value(changes).expect("changes serialize");
                let response: Value = self.call("SELECT sync_push($1, $2)", &[&tenant, &body]).await?;
                serde_json::from_value(response).map_err(|error| unexpected("push", error))
            }
            Encoding::MsgPack => {
                let body = sync_ext_protocol::msgpack::encode(&changes).expect("changes encode");
                let response: Vec<u8> = self.call("SELECT sync_push_msgpack($1, $2)", &[&tenant, &body]).await?;
                sync_ext_protocol::msgpack::decode(&response).map_err(|error| unexpected("push", error))
            }
        }
    }

    async fn pull(&self, tenant: &str, since: i64, max_changes: i32) -> Result<PullResponse> {
        match self.encoding {
            Encoding::Json => {
                let response: Value = self.call("SELECT sync_pull($1, $2, $3)", &[&tenant, &since, &max_changes]).await?;
                serde_json::from_value(response).map_err(|error| unexpected("pull", error))
            }
            Encoding::MsgPack => {
                let response: Vec<u8> = self.call("SELECT sync_pull_msgpack($1, $2, $3)", &[&tenant, &since, &max_changes]).await?;
                sync_ext_protocol::msgpack::decode(&response).map_err(|error| unexpected("pull", error))
            }
        }
    }
}
