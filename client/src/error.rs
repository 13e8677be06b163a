//! Errors of the client.

use sync_ext_protocol::WireError;

/// Everything the client can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The local store failed (disk, corruption); nothing was changed.
    #[error("local store: {0}")]
    Store(String),
    /// The server could not be reached or refused the call; local state is untouched.
    #[error("remote: {0}")]
    Remote(String),
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
    /// not repeated; the local data and the outbox are kept as the repair left them.
    #[error("the local replica still differs from the server after a repair: digest {local}, the server's {server}")]
    DigestMismatch { server: String, local: String },
    /// The builder is missing a part.
    #[error("builder: {0} is required")]
    Builder(&'static str),
}

impl From<rusqlite::Error> for Error {
    fn from(error: rusqlite::Error) -> Self {
        Error::Store(error.to_string())
    }
}

impl From<WireError> for Error {
    fn from(error: WireError) -> Self {
        Error::InvalidChange(error.to_string())
    }
}

/// The client's result type.
pub type Result<T> = std::result::Result<T, Error>;
