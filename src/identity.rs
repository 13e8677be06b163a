//! Under which identity the engine works: the one place that switches it.
//!
//! The SQL functions run with the caller's rights. Work on the sync tables runs in [`as_engine`]: as the
//! owner of the sync tables (the extension's owner), inside a *security-restricted operation* (as Postgres runs maintenance commands),
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
    /// The owner of the sync tables (the role that created the extension), whose rights the engine works with.
    pub owner: pg_sys::Oid,
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
    let owner = sync_tables_owner()?;
    let (mut user, mut context) = (pg_sys::InvalidOid, 0);
    // SAFETY: the protocol fmgr follows for SECURITY DEFINER functions with a SET clause, plus the
    // restricted flag; `Restore` undoes both when `work` returns or an error unwinds.
    let _restore = unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        let restore = Restore { user, context, guc_nest_level: pg_sys::NewGUCNestLevel() };
        let restricted = (pg_sys::SECURITY_RESTRICTED_OPERATION | pg_sys::SECURITY_LOCAL_USERID_CHANGE) as i32;
        pg_sys::SetUserIdAndSecContext(owner, context | restricted);
        set_for_engine(c"search_path", ENGINE_SEARCH_PATH);
        // Under Citus, the engine reads its reference tables (grants, settings) also where Citus runs a
        // query on a shard (row-level security of the sync tables calls `may_access` there), which Citus
        // refuses unless told: those reads never leave the node.
        if !pg_sys::GetConfigOption(NESTED_EXECUTION.as_ptr(), true, false).is_null() {
            set_for_engine(NESTED_EXECUTION, c"on");
        }
        restore
    };
    work(&Engine { caller: user, owner })
}

/// Citus's parameter that allows queries inside a query on a shard (absent without Citus).
const NESTED_EXECUTION: &std::ffi::CStr = c"citus.allow_nested_distributed_execution";

/// Sets a parameter for the engine's work (undone by [`Restore`]).
///
/// # Safety
/// Only inside [`as_engine`], after the GUC nest level it restores was taken.
unsafe fn set_for_engine(name: &std::ffi::CStr, value: &std::ffi::CStr) {
    pg_sys::set_config_option(
        name.as_ptr(),
        value.as_ptr(),
        pg_sys::GucContext::PGC_USERSET,
        pg_sys::GucSource::PGC_S_SESSION,
        pg_sys::GucAction::GUC_ACTION_SAVE,
        true,
        0,
        false,
    );
}

/// The owner of `sync_ext.tenants`: the role that created the extension (a superuser, as the extension
/// requires), read from the catalog caches.
pub fn sync_tables_owner() -> SyncResult<pg_sys::Oid> {
    // SAFETY: catalog cache lookups by name and oid; the tuple is released before returning.
    unsafe {
        let schema = pg_sys::get_namespace_oid(c"sync_ext".as_ptr(), true);
        let tenants = if schema == pg_sys::InvalidOid { pg_sys::InvalidOid } else { pg_sys::get_relname_relid(c"tenants".as_ptr(), schema) };
        if tenants == pg_sys::InvalidOid {
            return Err(SyncError::NotInstalled);
        }
        let tuple = pg_sys::SearchSysCache1(pg_sys::SysCacheIdentifier::RELOID as i32, pg_sys::Datum::from(tenants));
        if tuple.is_null() {
            return Err(SyncError::NotInstalled);
        }
        let owner = (*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_class>(tuple)).relowner;
        pg_sys::ReleaseSysCache(tuple);
        Ok(owner)
    }
}
