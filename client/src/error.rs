//! Errors of the client, each either transient (the same call may succeed later: retry with backoff)
//! or permanent (retrying changes nothing until a person acts: install the extension, grant the
//! tenant, upgrade the client).

use std::time::Duration;

use sync_ext_protocol::WireError;

/// The cause of an error, kept as its source so the chain can be walked.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything the client can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The local store failed (disk, corruption); the transaction changed nothing.
    #[error("local store: {message}")]
    Store {
        message: String,
        #[source]
        source: Option<BoxError>,
    },
    /// The server could not be reached or the connection broke (refused, reset, closed, TLS). Transient.
    #[error("connection: {message}")]
    Connection {
        message: String,
        #[source]
        source: Option<BoxError>,
    },
    /// A step took longer than its timeout (`what`: connect, statement, sync) and was abandoned; the
    /// connection it used was dropped. Transient.
    #[error("{what} timed out after {after:?}")]
    Timeout { what: &'static str, after: Duration },
    /// The server raised an error: `code` is its SQLSTATE. Transient or permanent by its class (see
    /// [`sqlstate_is_transient`]).
    #[error("server error {code}: {message}")]
    Server {
        code: String,
        message: String,
        #[source]
        source: Option<BoxError>,
    },
    /// The database has no sync_ext functions (SQLSTATE 42883 or 3F000 on calling them): the extension
    /// is not installed there, or is older than this client. Permanent.
    #[error("sync_ext is not installed in this database, or is older than this client: run CREATE EXTENSION sync_ext or ALTER EXTENSION sync_ext UPDATE ({code}: {message})")]
    ExtensionMissing {
        code: String,
        message: String,
        #[source]
        source: Option<BoxError>,
    },
    /// The connection settings do not parse. Permanent.
    #[error("invalid connection settings: {message}")]
    Config {
        message: String,
        #[source]
        source: Option<BoxError>,
    },
    /// The server answered something this client cannot read or did not expect. Permanent.
    #[error("unexpected server response: {0}")]
    Protocol(String),
    /// A value the app gave is not a valid change (e.g. not a JSON object).
    #[error("invalid change: {0}")]
    InvalidChange(String),
    /// The server would refuse this change whatever happens (`value_too_large`, `invalid_text`), so it
    /// was not recorded; the reason is the one the server would give.
    #[error("the server cannot store this change: {0}")]
    Unstorable(String),
    /// A row stored locally does not decode as the type asked for.
    #[error("row {model}/{pk} does not decode: {problem}")]
    Decode { model: String, pk: String, problem: String },
    /// The local replica's confirmed rows still differ from the server's after a repair: the digest of
    /// its rows is `local`, the server's is `server` (16 hex digits each). The repair was done once and
    /// not repeated; the local data and the outbox are kept as the repair left them. Transient: the
    /// next sync checks, and repairs, again. For a replica with scopes, `instance` names the first
    /// instance whose rows differ (`""` for the tenant-wide rows); `None` for the whole tenant.
    #[error("the local replica still differs from the server after a repair: digest {local}, the server's {server}{}", instance.as_ref().map(|instance| format!(" (instance {instance:?})")).unwrap_or_default())]
    DigestMismatch { server: String, local: String, instance: Option<String> },
    /// A local query the store cannot run (see [`crate::Query`]).
    #[error("invalid query: {0}")]
    InvalidQuery(String),
    /// The local store was last opened by a newer version of a model than this code's
    /// ([`crate::Model::VERSION`]): this app is older than the data it would write.
    #[error("model {model}: the local store holds version {stored}, newer than this code's {this}")]
    ModelVersion { model: String, stored: u32, this: u32 },
    /// No pending change or rejection has this id.
    #[error("{0} is not there")]
    NotFound(String),
    /// The builder is missing a part.
    #[error("builder: {0} is required")]
    Builder(&'static str),
}

/// Whether retrying can help.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The same call may succeed later (network, timeout, server shutdown, serialization failure).
    Transient,
    /// It will fail the same way until something changes outside the client.
    Permanent,
}

/// Whether an error with this SQLSTATE may go away by itself: connection exceptions (08), transaction
/// rollbacks such as serialization failures and deadlocks (40), insufficient resources (53), operator
/// intervention such as cancels, statement timeouts and shutdowns (57), system errors (58) and lock
/// timeouts (55P03). Every other class is permanent: invalid input (22), permission denied (42501),
/// undefined function (42883), version mismatch (55000), read-only standby (25006), authentication (28).
pub fn sqlstate_is_transient(code: &str) -> bool {
    matches!(code.get(..2), Some("08" | "40" | "53" | "57" | "58")) || code == "55P03"
}

impl Error {
    /// A connection failure of some driver (for [`crate::Remote`] implementations).
    pub fn connection(message: impl Into<String>, source: impl Into<Option<BoxError>>) -> Self {
        Error::Connection { message: message.into(), source: source.into() }
    }

    /// An error the server raised, with its SQLSTATE (for [`crate::Remote`] implementations).
    pub fn server(code: impl Into<String>, message: impl Into<String>, source: impl Into<Option<BoxError>>) -> Self {
        Error::Server { code: code.into(), message: message.into(), source: source.into() }
    }

    pub(crate) fn store(message: impl Into<String>) -> Self {
        Error::Store { message: message.into(), source: None }
    }

    /// Transient or permanent.
    pub fn class(&self) -> ErrorClass {
        let transient = match self {
            Error::Store { .. } | Error::Connection { .. } | Error::Timeout { .. } | Error::DigestMismatch { .. } => true,
            Error::Server { code, .. } => sqlstate_is_transient(code),
            _ => false,
        };
        if transient {
            ErrorClass::Transient
        } else {
            ErrorClass::Permanent
        }
    }

    /// Whether retrying the same call later may succeed.
    pub fn is_transient(&self) -> bool {
        self.class() == ErrorClass::Transient
    }

    /// The SQLSTATE the server answered with, if the error came from the server.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Error::Server { code, .. } | Error::ExtensionMissing { code, .. } => Some(code),
            _ => None,
        }
    }

    /// Whether the server refused the pushed changes themselves (invalid input, 22xxx, or a body over
    /// its size limits, 54000): a smaller batch may pass, and a single change refused so never will.
    pub(crate) fn refuses_input(&self) -> bool {
        matches!(self, Error::Server { code, .. } if code.starts_with("22") || code == "54000")
    }
}

impl From<rusqlite::Error> for Error {
    fn from(error: rusqlite::Error) -> Self {
        Error::Store { message: error.to_string(), source: Some(Box::new(error)) }
    }
}

impl From<WireError> for Error {
    fn from(error: WireError) -> Self {
        Error::InvalidChange(error.to_string())
    }
}

/// The client's result type.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_are_classified_by_whether_retrying_can_help() {
        for transient in ["08006", "08001", "40001", "40P01", "53300", "57014", "57P01", "57P03", "58030", "55P03"] {
            assert!(Error::server(transient, "x", None).is_transient(), "{transient}");
        }
        for permanent in ["42883", "3F000", "42501", "55000", "22023", "22P02", "54000", "25006", "28P01", "XX001"] {
            assert_eq!(Error::server(permanent, "x", None).class(), ErrorClass::Permanent, "{permanent}");
        }
        assert!(Error::connection("reset", None).is_transient());
        assert!(Error::Timeout { what: "statement", after: Duration::from_secs(1) }.is_transient());
        assert!(!Error::Protocol("?".into()).is_transient());
        assert_eq!(Error::server("40001", "x", None).sqlstate(), Some("40001"));
        assert_eq!(Error::connection("x", None).sqlstate(), None);
    }
}
