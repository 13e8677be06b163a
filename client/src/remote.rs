//! The server side of sync, seen from the client: `sync_push` and `sync_pull` over some connection.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sync_ext_protocol::scope::ScopeDefinition;
use sync_ext_protocol::{Change, PullResponse, PushResponse};
use tokio::sync::{mpsc, Mutex};
use tokio_postgres::types::{FromSqlOwned, ToSql, Type};
use tokio_postgres::AsyncMessage;

use crate::error::{Error, Result};

/// The future a [`Remote`] call returns: boxed, so that `dyn Remote` works.
pub type RemoteFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// A connection to a database with sync_ext. Implement it for another driver or a pool; the client
/// needs only `push` and `pull` (and `scope_definitions` for a replica with scopes). It is object
/// safe: `Arc<dyn Remote>` and `Box<dyn Remote>` are remotes too. Return [`Error::Server`] with the
/// SQLSTATE for errors the database raised and [`Error::Connection`] for everything that broke on the
/// way, so the client can tell transient failures from permanent ones.
///
/// ```
/// use sync_ext_client::protocol::{Change, PullResponse, PushResponse};
/// use sync_ext_client::{Remote, RemoteFuture};
///
/// /// Counts pushes, and forwards every call to another remote.
/// struct Counted<R> { inner: R, pushes: std::sync::atomic::AtomicUsize }
///
/// impl<R: Remote> Remote for Counted<R> {
///     fn push<'a>(&'a self, tenant: &'a str, changes: &'a [Change]) -> RemoteFuture<'a, PushResponse> {
///         self.pushes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
///         self.inner.push(tenant, changes)
///     }
///     fn pull<'a>(&'a self, tenant: &'a str, since: i64, max_changes: i32, scopes: Option<&'a [String]>) -> RemoteFuture<'a, PullResponse> {
///         Box::pin(async move { self.inner.pull(tenant, since, max_changes, scopes).await })
///     }
///     fn scope_definitions(&self) -> RemoteFuture<'_, Vec<sync_ext_client::protocol::scope::ScopeDefinition>> {
///         self.inner.scope_definitions()
///     }
/// }
/// ```
pub trait Remote: Send + Sync {
    /// Calls `sync_push(tenant, changes)`.
    fn push<'a>(&'a self, tenant: &'a str, changes: &'a [Change]) -> RemoteFuture<'a, PushResponse>;
    /// Calls `sync_pull(tenant, since, max_changes, scopes)`: `scopes` are the instances of a partial
    /// replica (`None`: the whole tenant, as a server before 0.6.0 pulls).
    fn pull<'a>(&'a self, tenant: &'a str, since: i64, max_changes: i32, scopes: Option<&'a [String]>) -> RemoteFuture<'a, PullResponse>;
    /// Calls `sync_pull(tenant, since, max_changes, scopes)` on the primary, where pushes go. The client
    /// pulls this way only to repair its replica (see [`crate::SyncClient::sync`]): a reset asked for with a
    /// cursor beyond the log, which a primary answers with the current rows and a hot standby with an
    /// empty page. By default the same as [`Remote::pull`]; a remote that pulls from standbys overrides it.
    fn pull_primary<'a>(&'a self, tenant: &'a str, since: i64, max_changes: i32, scopes: Option<&'a [String]>) -> RemoteFuture<'a, PullResponse> {
        self.pull(tenant, since, max_changes, scopes)
    }
    /// Calls `sync_scopes()`: the scope definitions, which tell the instances a row is in. Only a replica
    /// with scopes asks (to drop the rows it unsubscribed from, and to check the digests of its
    /// instances). By default an [`Error::Config`]: a remote used for partial sync implements it.
    fn scope_definitions(&self) -> RemoteFuture<'_, Vec<ScopeDefinition>> {
        Box::pin(async { Err(Error::Config { message: "this Remote does not implement scope_definitions, which a replica with scopes needs".into(), source: None }) })
    }
    /// The server's wall clock, in milliseconds since the Unix epoch, when the remote can tell; the
    /// client asks after a `clock_skew` rejection to re-base its clock. By default `None`: the client
    /// then re-bases on the greatest stamp it has pulled.
    fn server_time(&self) -> RemoteFuture<'_, Option<i64>> {
        Box::pin(async { Ok(None) })
    }
}

/// Implements [`Remote`] for a pointer to a remote by forwarding every call.
macro_rules! forward_remote {
    ($($pointer:ty),*) => {$(
        impl<R: Remote + ?Sized> Remote for $pointer {
            fn push<'a>(&'a self, tenant: &'a str, changes: &'a [Change]) -> RemoteFuture<'a, PushResponse> {
                (**self).push(tenant, changes)
            }
            fn pull<'a>(&'a self, tenant: &'a str, since: i64, max_changes: i32, scopes: Option<&'a [String]>) -> RemoteFuture<'a, PullResponse> {
                (**self).pull(tenant, since, max_changes, scopes)
            }
            fn pull_primary<'a>(&'a self, tenant: &'a str, since: i64, max_changes: i32, scopes: Option<&'a [String]>) -> RemoteFuture<'a, PullResponse> {
                (**self).pull_primary(tenant, since, max_changes, scopes)
            }
            fn scope_definitions(&self) -> RemoteFuture<'_, Vec<ScopeDefinition>> {
                (**self).scope_definitions()
            }
            fn server_time(&self) -> RemoteFuture<'_, Option<i64>> {
                (**self).server_time()
            }
        }
    )*};
}

forward_remote!(Arc<R>, Box<R>, &R);

/// How changes and pulls travel: JSON (`sync_push` / `sync_pull`) or MessagePack with named fields
/// (`sync_push_msgpack` / `sync_pull_msgpack`, smaller on the wire). Same structures either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Encoding {
    #[default]
    Json,
    MsgPack,
}

/// How long [`PgRemote`] waits to connect (TCP, TLS, startup and authentication) by default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`PgRemote`] waits for one call's answer by default.
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// A [`Remote`] over tokio-postgres. It connects on first use and reconnects after the connection
/// drops, so a client can be built while offline.
///
/// Every call is one unnamed statement with its parameter types given (`query_typed`: no named
/// prepared statement, no session state), so it works through PgBouncer in transaction mode.
/// Connecting and each call have a timeout ([`PgRemote::connect_timeout`],
/// [`PgRemote::statement_timeout`]); a call that times out or is cancelled drops its connection
/// (and asks the server to cancel the statement), and the next call connects afresh.
pub struct PgRemote {
    config: std::result::Result<tokio_postgres::Config, String>,
    credentials: Option<CredentialsHook>,
    encoding: Encoding,
    connect_timeout: Duration,
    statement_timeout: Duration,
    client: Mutex<Option<tokio_postgres::Client>>,
}

/// Called before every new connection with a copy of the configuration; connects with the one it
/// returns (e.g. with a fresh password from a token service). See [`PgRemote::credentials`].
pub type CredentialsHook = Arc<dyn Fn(tokio_postgres::Config) -> RemoteFuture<'static, tokio_postgres::Config> + Send + Sync>;

/// A driver error as a client error: the server's SQLSTATE when there is one, a missing extension
/// named as such, a connection failure otherwise.
pub(crate) fn pg_error(error: tokio_postgres::Error) -> Error {
    let Some(db) = error.as_db_error() else {
        return Error::Connection { message: error.to_string(), source: Some(Box::new(error)) };
    };
    let (code, message) = (db.code().code().to_owned(), db.message().to_owned());
    if code == "3F000" || (code == "42883" && message.contains("sync_")) {
        Error::ExtensionMissing { code, message, source: Some(Box::new(error)) }
    } else {
        Error::Server { code, message, source: Some(Box::new(error)) }
    }
}

impl PgRemote {
    /// A remote for a libpq-style connection string or URL (`postgres://user@host/db`). A string that
    /// does not parse makes every call fail with [`Error::Config`].
    pub fn new(url: impl AsRef<str>) -> Self {
        Self::with_config(url.as_ref().parse().map_err(|error: tokio_postgres::Error| error.to_string()))
    }

    /// A remote for a connection configured in code.
    pub fn from_config(config: tokio_postgres::Config) -> Self {
        Self::with_config(Ok(config))
    }

    fn with_config(config: std::result::Result<tokio_postgres::Config, String>) -> Self {
        PgRemote {
            config,
            credentials: None,
            encoding: Encoding::Json,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
            client: Mutex::new(None),
        }
    }

    /// Refreshes the credentials before every new connection (the first, and each one after a
    /// connection dropped): `refresh` gets a copy of the configuration and returns the one to connect
    /// with, e.g. with a short-lived password or token set. An error it returns fails that call.
    ///
    /// ```
    /// use sync_ext_client::{PgRemote, RemoteFuture};
    ///
    /// let remote = PgRemote::new("postgres://device@db.example.com/app").credentials(|mut config| -> RemoteFuture<'static, _> {
    ///     Box::pin(async move {
    ///         config.password("a token fetched just now"); // e.g. from an identity provider
    ///         Ok(config)
    ///     })
    /// });
    /// ```
    pub fn credentials(mut self, refresh: impl Fn(tokio_postgres::Config) -> RemoteFuture<'static, tokio_postgres::Config> + Send + Sync + 'static) -> Self {
        self.credentials = Some(Arc::new(refresh));
        self
    }

    /// Uses another encoding on the wire.
    pub fn encoding(mut self, encoding: Encoding) -> Self {
        self.encoding = encoding;
        self
    }

    /// How long to wait for a connection, handshake and authentication included (10 s by default).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long to wait for the answer to one call (30 s by default). Measured by the client, so it
    /// also holds when the server or the network stops answering.
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = timeout;
        self
    }

    async fn call<T: FromSqlOwned>(&self, sql: &str, params: &[(&(dyn ToSql + Sync), Type)]) -> Result<T> {
        let mut slot = self.client.lock().await;
        let client = match slot.take().filter(|client| !client.is_closed()) {
            Some(client) => client,
            None => {
                let config = self.config.as_ref().map_err(|message| Error::Config { message: message.clone(), source: None })?;
                match &self.credentials {
                    Some(refresh) => connect(&refresh(config.clone()).await?, self.connect_timeout).await?.0,
                    None => connect(config, self.connect_timeout).await?.0,
                }
            }
        };
        // The connection is out of its slot while the call runs: if this future is dropped (a sync
        // timeout, a stopped live loop), the connection goes with it rather than staying mid-call.
        match tokio::time::timeout(self.statement_timeout, client.query_typed_one(sql, params)).await {
            Err(_) => {
                let cancel = client.cancel_token();
                let wait = self.connect_timeout;
                tokio::spawn(async move {
                    if let Ok(Err(error)) = tokio::time::timeout(wait, cancel.cancel_query(tls())).await {
                        tracing::debug!(%error, "cancelling a timed-out statement failed");
                    }
                });
                Err(Error::Timeout { what: "statement", after: self.statement_timeout })
            }
            Ok(Err(error)) => {
                // Only an error the server answered leaves the connection usable; after any other (it
                // closed, it broke) the next call connects afresh, even if the driver has not noticed yet.
                if error.as_db_error().is_some() && !client.is_closed() {
                    *slot = Some(client);
                }
                Err(pg_error(error))
            }
            Ok(Ok(row)) => {
                *slot = Some(client);
                row.try_get(0).map_err(|error| Error::Protocol(error.to_string()))
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
    fn push<'a>(&'a self, tenant: &'a str, changes: &'a [Change]) -> RemoteFuture<'a, PushResponse> {
        self.primary.push(tenant, changes)
    }

    fn pull<'a>(&'a self, tenant: &'a str, since: i64, max_changes: i32, scopes: Option<&'a [String]>) -> RemoteFuture<'a, PullResponse> {
        self.replica.pull(tenant, since, max_changes, scopes)
    }

    fn pull_primary<'a>(&'a self, tenant: &'a str, since: i64, max_changes: i32, scopes: Option<&'a [String]>) -> RemoteFuture<'a, PullResponse> {
        self.primary.pull_primary(tenant, since, max_changes, scopes)
    }

    fn scope_definitions(&self) -> RemoteFuture<'_, Vec<ScopeDefinition>> {
        self.primary.scope_definitions()
    }

    fn server_time(&self) -> RemoteFuture<'_, Option<i64>> {
        self.primary.server_time()
    }
}

#[cfg(feature = "rustls")]
fn tls() -> tokio_postgres_rustls::MakeRustlsConnect {
    let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    tokio_postgres_rustls::MakeRustlsConnect::new(rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth())
}

#[cfg(not(feature = "rustls"))]
fn tls() -> tokio_postgres::NoTls {
    tokio_postgres::NoTls
}

/// Opens a tokio-postgres connection within `timeout` (everything up to a ready session) and drives it
/// on the current runtime. The payloads of the notifications it receives are forwarded to the
/// returned channel (dropping it is fine).
pub(crate) async fn connect(config: &tokio_postgres::Config, timeout: Duration) -> Result<(tokio_postgres::Client, mpsc::UnboundedReceiver<String>)> {
    let (client, mut connection) = tokio::time::timeout(timeout, config.connect(tls()))
        .await
        .map_err(|_| Error::Timeout { what: "connect", after: timeout })?
        .map_err(pg_error)?;
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
    Error::Protocol(format!("{what} response: {error}"))
}

impl Remote for PgRemote {
    fn push<'a>(&'a self, tenant: &'a str, changes: &'a [Change]) -> RemoteFuture<'a, PushResponse> {
        Box::pin(async move {
            match self.encoding {
                Encoding::Json => {
                    let body = serde_json::to_value(changes).expect("changes serialize");
                    let response: Value = self.call("SELECT sync_push($1, $2)", &[(&tenant, Type::TEXT), (&body, Type::JSONB)]).await?;
                    serde_json::from_value(response).map_err(|error| unexpected("push", error))
                }
                Encoding::MsgPack => {
                    let body = sync_ext_protocol::msgpack::encode(&changes).expect("changes encode");
                    let response: Vec<u8> = self.call("SELECT sync_push_msgpack($1, $2)", &[(&tenant, Type::TEXT), (&body, Type::BYTEA)]).await?;
                    sync_ext_protocol::msgpack::decode(&response).map_err(|error| unexpected("push", error))
                }
            }
        })
    }

    fn pull<'a>(&'a self, tenant: &'a str, since: i64, max_changes: i32, scopes: Option<&'a [String]>) -> RemoteFuture<'a, PullResponse> {
        Box::pin(async move {
            let mut params: Vec<(&(dyn ToSql + Sync), Type)> = vec![(&tenant, Type::TEXT), (&since, Type::INT8), (&max_changes, Type::INT4)];
            // The whole tenant is pulled without the scopes argument, which servers before 0.6.0 lack.
            let arguments = match &scopes {
                Some(scopes) => {
                    params.push((scopes, Type::TEXT_ARRAY));
                    "$1, $2, $3, $4"
                }
                None => "$1, $2, $3",
            };
            match self.encoding {
                Encoding::Json => {
                    let response: Value = self.call(&format!("SELECT sync_pull({arguments})"), &params).await?;
                    serde_json::from_value(response).map_err(|error| unexpected("pull", error))
                }
                Encoding::MsgPack => {
                    let response: Vec<u8> = self.call(&format!("SELECT sync_pull_msgpack({arguments})"), &params).await?;
                    sync_ext_protocol::msgpack::decode(&response).map_err(|error| unexpected("pull", error))
                }
            }
        })
    }

    fn scope_definitions(&self) -> RemoteFuture<'_, Vec<ScopeDefinition>> {
        Box::pin(async move {
            let definitions: Value = self.call("SELECT sync_scopes()", &[]).await?;
            serde_json::from_value(definitions).map_err(|error| unexpected("sync_scopes", error))
        })
    }

    fn server_time(&self) -> RemoteFuture<'_, Option<i64>> {
        Box::pin(async move { Ok(Some(self.call("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::int8", &[]).await?)) })
    }
}
