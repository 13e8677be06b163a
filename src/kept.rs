//! What the engine keeps per backend between calls (grants, settings, model descriptions), and when it
//! must forget it.
//!
//! Whatever is kept is stamped with the [`generation`] it was read in and is stale once the generation
//! moves on. It moves on when the relation cache invalidates a *watched* relation (or every relation):
//! `sync_ext.grants`, `sync_ext.settings`, `sync_ext.models` and the scope tables (their statement triggers send an
//! invalidation at commit, to other backends, and at once to this one) and every bound table (`ALTER
//! TABLE` sends one). Invalidations arrive in the middle of catalog lookups, so the callback only reads
//! the watched set and bumps a counter.

use std::cell::{Cell, RefCell};
use std::convert::Infallible;

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

thread_local! {
    /// Bumped by every invalidation of a watched relation (or of every relation).
    static GENERATION: Cell<u64> = const { Cell::new(0) };
    /// The relations whose invalidation makes what is kept stale.
    static WATCHED: RefCell<Vec<pg_sys::Oid>> = const { RefCell::new(Vec::new()) };
}

/// The current generation: what was read in an older one is stale.
pub fn generation() -> u64 {
    GENERATION.get()
}

/// Watches `relation` (from now on; call it before reading what depends on it, so that a change
/// committed while reading is noticed).
pub fn watch(relation: pg_sys::Oid) {
    WATCHED.with_borrow_mut(|watched| {
        if relation != pg_sys::InvalidOid && !watched.contains(&relation) {
            watched.push(relation);
        }
    });
}

/// Watches the sync table `name` (`grants`, `settings`, `models`), looked up in the catalog caches.
pub fn watch_sync_table(name: &std::ffi::CStr) {
    // SAFETY: catalog cache lookups by name.
    let oid = unsafe {
        let schema = pg_sys::get_namespace_oid(c"sync_ext".as_ptr(), true);
        if schema == pg_sys::InvalidOid { pg_sys::InvalidOid } else { pg_sys::get_relname_relid(name.as_ptr(), schema) }
    };
    watch(oid);
}

/// Registers [`forget_on_invalidation`] with the relation cache (once per backend, from `_PG_init`).
pub fn register_invalidation_callback() {
    // SAFETY: a callback with the signature Postgres expects, registered once per backend.
    unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(forget_on_invalidation), pg_sys::Datum::from(0)) };
}

/// Moves the generation on when a watched relation (or every relation) is invalidated, and forgets
/// what was watched (whoever reads next watches again).
#[pg_guard]
unsafe extern "C-unwind" fn forget_on_invalidation(_argument: pg_sys::Datum, relation: pg_sys::Oid) {
    let watched = relation == pg_sys::InvalidOid || WATCHED.with(|watched| watched.try_borrow().map_or(true, |watched| watched.contains(&relation)));
    if watched {
        GENERATION.set(GENERATION.get() + 1);
    }
}

/// The trigger of `sync_ext.grants`, `sync_ext.settings`, `sync_ext.models`, `sync_ext.scopes` and
/// `sync_ext.scope_grants`: tells every backend that what it kept of them is stale (a relation cache
/// invalidation, sent at commit). On a Citus node it fires on the node's copy of the table (a shard of a
/// reference table), so the table itself, which backends watch, is invalidated too.
#[pg_trigger(sql = false)]
fn access_changed<'a>(trigger: &'a PgTrigger<'a>) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, Infallible> {
    let relation = trigger.relid().expect("a trigger has a table");
    // SAFETY: queues an invalidation of an existing relation.
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(relation) };
    match crate::citus::table_of_shard(relation) {
        // SAFETY: as above.
        Ok(Some(table)) => unsafe { pg_sys::CacheInvalidateRelcacheByRelid(table) },
        Ok(None) => {}
        Err(error) => ErrorReport::from(error).report(PgLogLevel::ERROR),
    }
    Ok(None)
}
