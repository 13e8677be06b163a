//! Errors the extension raises, each with its SQLSTATE.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::PgSqlErrorCode;
use sync_ext_protocol::{WireError, WireErrorKind};

/// Every error a sync_ext function can raise.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// Malformed input: 22023 (invalid_parameter_value) or 22P02 (invalid_text_representation).
    #[error(transparent)]
    Wire(#[from] WireError),
    /// An argument out of its range (22023).
    #[error("{argument}: {problem}")]
    InvalidArgument { argument: &'static str, problem: String },
    /// A type with no lossless portable form (0A000).
    #[error("type {type_name} has no portable JSON form")]
    UnsupportedType { type_name: String },
    /// A table column of a type with no lossless portable form (0A000).
    #[error("column \"{column}\" has type {type_name}, which has no portable JSON form")]
    UnsupportedColumn { column: String, type_name: String },
    /// A portable value that does not decode as the requested type (22P02).
    #[error("invalid portable value for type {type_name}: {problem}")]
    InvalidPortable { type_name: String, problem: String },
    /// A captured row whose tenant column is null or empty (23502).
    #[error("a row of {table} has no tenant: column \"{column}\" must name it")]
    MissingTenant { table: String, column: String },
    /// A captured row with a null key column (23502).
    #[error("a row of model {model} has a null primary key column")]
    MissingKey { model: String },
    /// A model name or table registered already (42710).
    #[error("model {model} or table {table} is registered already")]
    AlreadyRegistered { model: String, table: String },
    /// No model by that name (42704).
    #[error("no model {model} is registered")]
    UnknownModel { model: String },
    /// A tenant counter row that does not decode: edited by hand (XX001).
    #[error("sync_ext.tenants row {tenant} is corrupt")]
    CorruptTenant { tenant: String },
    /// The role may not access the tenant (42501).
    #[error("permission denied for tenant {tenant}: role {role} has no grant for it (see sync_grant_tenant)")]
    Forbidden { role: String, tenant: String },
    /// The role may pull only some scope instances of the tenant, and asked for the whole tenant (42501).
    #[error("permission denied for tenant {tenant}: role {role} may pull only the scope instances granted to it: pass scopes (see sync_grant_scope)")]
    ScopesRequired { role: String, tenant: String },
    /// The role may not pull a scope instance it named (42501).
    #[error("permission denied for scope instance {instance} of tenant {tenant}: role {role} has no grant for it (see sync_grant_scope)")]
    ForbiddenInstance { role: String, tenant: String, instance: String },
    /// No such scope definition (42704).
    #[error("no scope {scope} is defined for model {model}")]
    UnknownScope { scope: String, model: String },
    /// A write sent to a hot standby (25006).
    #[error("{function} writes, and this server is a read-only hot standby: send it to the primary")]
    ReadOnlyStandby { function: &'static str },
    /// The extension is not installed in this database (55000).
    #[error("sync_ext is not installed in this database")]
    NotInstalled,
    /// The extension's SQL objects are older than its library (55000).
    #[error("sync_ext's SQL objects are at version {schema} and its library at {library}: run ALTER EXTENSION sync_ext UPDATE")]
    OutdatedSchema { schema: String, library: &'static str },
    /// A MessagePack body that does not decode (22P02).
    #[error("{argument}: not valid MessagePack: {problem}")]
    InvalidMessagePack { argument: &'static str, problem: String },
    /// A stored row that does not decode: the sync tables were edited by hand (XX001).
    #[error("sync_ext.snapshots row ({model}, {id}) is corrupt: {problem}")]
    CorruptSnapshot { model: String, id: String, problem: String },
    /// A push body over the `max_push_bytes` setting (54000).
    #[error("{argument}: the body is {size} bytes, over max_push_bytes ({max})")]
    BodyTooLarge { argument: &'static str, size: usize, max: i32 },
    /// A bound table Citus cannot serve as its pushes run: not distributed by its tenant column, co-located
    /// with the sync tables (0A000).
    #[error("{table}: {problem}")]
    NotDistributable { table: String, problem: String },
    /// An SPI failure (XX000).
    #[error("internal SPI error: {0}")]
    Spi(#[from] pgrx::spi::Error),
}

impl SyncError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        match self {
            SyncError::Wire(WireError { kind: WireErrorKind::InvalidText, .. }) => {
                PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION
            }
            SyncError::BodyTooLarge { .. } => PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            SyncError::Wire(_) | SyncError::InvalidArgument { .. } => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            SyncError::UnsupportedType { .. } | SyncError::UnsupportedColumn { .. } => {
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED
            }
            SyncError::InvalidPortable { .. } => PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION,
            SyncError::MissingTenant { .. } | SyncError::MissingKey { .. } => PgSqlErrorCode::ERRCODE_NOT_NULL_VIOLATION,
            SyncError::Forbidden { .. } | SyncError::ScopesRequired { .. } | SyncError::ForbiddenInstance { .. } => {
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE
            }
            SyncError::NotInstalled | SyncError::OutdatedSchema { .. } => PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            SyncError::ReadOnlyStandby { .. } => PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            SyncError::InvalidMessagePack { .. } => PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION,
            SyncError::AlreadyRegistered { .. } => PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            SyncError::UnknownModel { .. } | SyncError::UnknownScope { .. } => PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            SyncError::CorruptSnapshot { .. } | SyncError::CorruptTenant { .. } => PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
            SyncError::NotDistributable { .. } => PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            SyncError::Spi(_) => PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        }
    }
}

impl From<SyncError> for ErrorReport {
    fn from(error: SyncError) -> Self {
        ErrorReport::new(error.sqlstate(), error.to_string(), "sync_ext")
    }
}

/// The result type of the extension's SQL functions.
pub type SyncResult<T> = Result<T, SyncError>;
