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
