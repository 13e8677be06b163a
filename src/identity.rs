//! Under which identity the engine works: the one place that switches it.
//!
//! The SQL functions run with the caller's rights. Work on the sync tables runs in [`as_engine`]: as the
//! extension's owner, inside a *security-restricted operation* (as Postgres runs maintenance commands),
//! with `search_path` pinned to `pg_catalog, pg_temp`. So nothing the caller controls is resolved there:
//! not a function, operator, type or table of a schema it owns, nor anything in its temporary schema
//! (Postgres never looks up functions and operators in `pg_temp` implicitly, and tables there come after
//! `pg_catalog`). The engine's own objects are always named with their schema, `sync_ext.`.
//!
//! Everything that can run code of the application's choosing runs with the caller's rights instead,
//! outside [`as_engine`]: writes to bound tables (their privileges, row-level security, triggers,
//! defaults and domain checks apply as for the caller's own SQL) and decoding values of their column types.

use pgrx::prelude::*;

use crate::errors::{SyncError, SyncResult};

/// The search path the engine works with.
const ENGINE_SEARCH_PATH: &std::ffi::CStr = c"pg_catalog, pg_temp";

/// Who is working inside [`as_engine`].
pub struct Engine {
    /// The role that called the SQL function (the current user when [`as_engine`] was entered).
    pub caller: pg_sys::Oid,
    /// The extension's owner, whose rights the engine works with.
    pub owner: pg_sys::Oid,
    /// The version of the extension's SQL objects (`ALTER EXTENSION sync_ext UPDATE` brings them to
    /// the library's).
    pub schema_version: String,
}

impl Engine {
    /// Fails with 55000 unless the extension's SQL objects are those of this library.
    pub fn require_current_schema(&self) -> SyncResult<()> {
        let library = env!("CARGO_PKG_VERSION");
        if self.schema_version != library {
            return Err(SyncError::OutdatedSchema { schema: self.schema_version.clone(), library });
        }
        Ok(())
    }
}

/// Puts back the identity, security context and settings that were in force before [`as_engine`]
/// (when it returns, and while an error unwinds through it).
struct Restore {
    user: pg_sys::Oid,
    context: i32,
    guc_nest_level: i32,
}

impl Drop for Restore {
    fn drop(&mut self) {
        // SAFETY: pops exactly the settings pushed after `guc_nest_level` was taken, and puts back the
        // identity saved before switching, as fmgr does for SECURITY DEFINER functions.
        unsafe {
            pg_sys::AtEOXact_GUC(true, self.guc_nest_level);
            pg_sys::SetUserIdAndSecContext(self.user, self.context);
        }
    }
}

/// Runs `work` as the extension's owner in a security-restricted operation with a pinned search path.
pub fn as_engine<T>(work: impl FnOnce(&Engine) -> SyncResult<T>) -> SyncResult<T> {
    let (mut user, mut context) = (pg_sys::InvalidOid, 0);
    // SAFETY: saves the identity and enters the restricted context with the search path pinned, before
    // anything is resolved by name; `Restore` undoes both.
    let _restore = unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        let restore = Restore { user, context, guc_nest_level: pg_sys::NewGUCNestLevel() };
        pg_sys::SetUserIdAndSecContext(user, context | pg_sys::SECURITY_RESTRICTED_OPERATION as i32);
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            ENGINE_SEARCH_PATH.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
        restore
    };
    let (owner, schema_version) = extension_owner()?;
    // SAFETY: as above; the restricted flag stays on, and the user is the owner until `Restore`.
    unsafe {
        pg_sys::SetUserIdAndSecContext(
            owner,
            context | (pg_sys::SECURITY_RESTRICTED_OPERATION | pg_sys::SECURITY_LOCAL_USERID_CHANGE) as i32,
        )
    };
    work(&Engine { caller: user, owner, schema_version })
}

/// The owner of the sync_ext extension (a superuser: the extension needs one to be created) and the
/// version of its SQL objects. Only called with the search path pinned, so the lookup cannot be redirected.
fn extension_owner() -> SyncResult<(pg_sys::Oid, String)> {
    Spi::connect(|client| {
        let found =
            crate::plans::select(client, "SELECT extowner, extversion FROM pg_catalog.pg_extension WHERE extname = 'sync_ext'", Some(1), &[])?;
        if found.is_empty() {
            return Err(SyncError::NotInstalled);
        }
        match found.first().get_two::<pg_sys::Oid, String>()? {
            (Some(owner), Some(version)) => Ok((owner, version)),
            _ => Err(SyncError::NotInstalled),
        }
    })
}
