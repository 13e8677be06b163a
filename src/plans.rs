//! Statements parsed and planned once per backend and kept for its lifetime (`SPI_keepplan`).
//!
//! A push or a pull runs a handful of fixed statements; parsing and planning them on every call cost
//! more than running them for small batches. Postgres re-plans a kept statement by itself when what it
//! depends on changes (an `ALTER EXTENSION UPDATE`, a dropped index, another role for row security).
//!
//! They run with generic plans forced: left to choose, Postgres keeps planning the statements that
//! take arrays anew for every small batch (a custom plan that knows the array's length looks cheaper),
//! and the generic plans (index lookups per element) are the right ones at every batch size.
//!
//! On a distributed install (see [`crate::citus`]) Postgres chooses instead for the statements Citus routes:
//! Citus routes a statement by the values of its arguments, and makes the generic plans it cannot route look
//! too costly to be chosen. Statements on a tenant's local shards are plain tables' and planned as above.
//!
//! And they are planned without parallel workers: each touches one tenant's few rows, and a generic plan
//! cannot tell a tenant from the whole table, so it would start workers on every call (a pull's reset
//! branch, never run outside resets, cost a few milliseconds per page in starting them).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use pgrx::datum::DatumWithOid;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiResult, SpiTupleTable};
use pgrx::{pg_sys, PgOid};

thread_local! {
    static KEPT: RefCell<HashMap<String, Rc<OwnedPreparedStatement>>> = RefCell::new(HashMap::new());
}

/// The most statements kept. The engine's own are a fixed handful; bound-table writes add one per table
/// and set of columns written, which clients choose, so past this many they are all planned again.
const KEPT_STATEMENTS: usize = 1_000;

/// The kept plan of `sql` (on a tenant's local shards, see [`crate::citus::Placement`]), prepared on first
/// use for the types of `args`.
fn kept(client: &SpiClient<'_>, sql: &str, args: &[DatumWithOid<'_>]) -> SpiResult<Rc<OwnedPreparedStatement>> {
    let sql = crate::citus::local_sql(sql);
    let sql = sql.as_ref();
    if let Some(plan) = KEPT.with_borrow(|kept| kept.get(sql).cloned()) {
        return Ok(plan);
    }
    let types: Vec<PgOid> = args.iter().map(|arg| PgOid::from(arg.oid())).collect();
    let plan = Rc::new(client.prepare(sql, &types)?.keep());
    KEPT.with_borrow_mut(|kept| {
        if kept.len() >= KEPT_STATEMENTS {
            kept.clear();
        }
        kept.insert(sql.to_owned(), plan.clone())
    });
    Ok(plan)
}

/// Runs a read-only statement through its kept plan.
pub fn select<'conn>(client: &SpiClient<'conn>, sql: &str, limit: Option<i64>, args: &[DatumWithOid<'_>]) -> SpiResult<SpiTupleTable<'conn>> {
    let plan = kept(client, sql, args)?;
    with_generic_plans(|| client.select(&*plan, limit, args))
}

/// Runs a statement that writes through its kept plan.
pub fn update<'conn>(client: &mut SpiClient<'conn>, sql: &str, limit: Option<i64>, args: &[DatumWithOid<'_>]) -> SpiResult<SpiTupleTable<'conn>> {
    let plan = kept(client, sql, args)?;
    with_generic_plans(|| client.update(&*plan, limit, args))
}

/// Runs a statement that writes an application's table through its kept plan, planned as the session
/// plans (its `plan_cache_mode` also governs the table's triggers, which run inside).
pub fn update_as_session<'conn>(client: &mut SpiClient<'conn>, sql: &str, args: &[DatumWithOid<'_>]) -> SpiResult<SpiTupleTable<'conn>> {
    let plan = kept(client, sql, args)?;
    client.update(&*plan, None, args)
}

/// Runs `execute` with `plan_cache_mode` forced to generic plans (left to Postgres on a distributed
/// install) and no parallel workers, restoring both afterwards (also when an error unwinds through here).
fn with_generic_plans<T>(execute: impl FnOnce() -> T) -> T {
    struct Restore {
        plan_cache_mode: std::ffi::c_int,
        parallel_workers: std::ffi::c_int,
    }
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: plain globals of the backend, read by the planner; restoring the caller's values.
            unsafe {
                pg_sys::plan_cache_mode = self.plan_cache_mode;
                pg_sys::max_parallel_workers_per_gather = self.parallel_workers;
            }
        }
    }
    let mode = if crate::citus::routed() { pg_sys::PlanCacheMode::PLAN_CACHE_MODE_AUTO } else { pg_sys::PlanCacheMode::PLAN_CACHE_MODE_FORCE_GENERIC_PLAN };
    // SAFETY: as above; the backend is single-threaded.
    let _restore = unsafe {
        let restore = Restore { plan_cache_mode: pg_sys::plan_cache_mode, parallel_workers: pg_sys::max_parallel_workers_per_gather };
        pg_sys::plan_cache_mode = mode as std::ffi::c_int;
        pg_sys::max_parallel_workers_per_gather = 0;
        restore
    };
    execute()
}
