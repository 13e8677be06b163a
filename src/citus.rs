//! Whether the sync tables are distributed by Citus, and what the engine does differently then.
//!
//! On a distributed install (see the README's Citus section, `sync_distribute()`), every node runs the
//! same engine: a call delegated to the node holding its tenant runs there, a call inside a
//! multi-statement transaction runs on the coordinator and Citus routes each statement. Three things
//! change, all decided here:
//! - statements are planned for their arguments (Citus cannot route a generic plan of a statement that
//!   joins or writes several tables by a parameter; see [`crate::plans`]);
//! - a batch is written one table per statement, each routed to the tenant's node, instead of one
//!   statement over all of them (which Citus would fan out to every node and commit in two phases);
//! - pushes never send NOTIFY themselves (a transaction that ran NOTIFY cannot be prepared, and Citus
//!   prepares every transaction that wrote on two nodes); the notifier sends wake-ups to every node.

use std::cell::Cell;

use pgrx::prelude::*;

use crate::errors::SyncResult;
use crate::kept;

thread_local! {
    /// Whether `sync_ext.op_log` is distributed, and the kept generation that was read in.
    static KEPT: Cell<Option<(u64, bool)>> = const { Cell::new(None) };
}

/// Whether the sync tables are distributed by Citus (kept per backend until the log's relation is
/// invalidated, which distributing or undistributing it does).
pub fn distributed() -> bool {
    let generation = kept::generation();
    if let Some((kept_in, distributed)) = KEPT.get() {
        if kept_in == generation {
            return distributed;
        }
    }
    // SAFETY: catalog cache lookups by name.
    let (op_log, metadata) = unsafe {
        let schema = pg_sys::get_namespace_oid(c"sync_ext".as_ptr(), true);
        let op_log = if schema == pg_sys::InvalidOid { pg_sys::InvalidOid } else { pg_sys::get_relname_relid(c"op_log".as_ptr(), schema) };
        (op_log, pg_sys::get_relname_relid(c"pg_dist_partition".as_ptr(), pg_sys::PG_CATALOG_NAMESPACE.into()))
    };
    if op_log == pg_sys::InvalidOid || metadata == pg_sys::InvalidOid {
        return false;
    }
    kept::watch(op_log);
    let generation = kept::generation();
    let distributed = Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT FROM pg_catalog.pg_dist_partition WHERE logicalrelid OPERATOR(pg_catalog.=) $1)",
        &[op_log.into()],
    )
    .ok()
    .flatten()
    .unwrap_or(false);
    if kept::generation() == generation {
        KEPT.set(Some((generation, distributed)));
    }
    distributed
}

/// The distributed table `relation` is a shard of (its name is the table's followed by `_<shard id>`), on
/// a distributed install; `None` for any other relation.
pub fn table_of_shard(relation: pg_sys::Oid) -> SyncResult<Option<pg_sys::Oid>> {
    if !distributed() {
        return Ok(None);
    }
    Ok(Spi::get_one_with_args::<pg_sys::Oid>(
        "SELECT s.logicalrelid::pg_catalog.oid FROM pg_catalog.pg_class AS c, pg_catalog.pg_dist_shard AS s
          WHERE c.oid OPERATOR(pg_catalog.=) $1
            AND s.shardid OPERATOR(pg_catalog.=) pg_catalog.substring(c.relname::pg_catalog.text, '_([0-9]+)$')::pg_catalog.int8
            AND c.relname::pg_catalog.text OPERATOR(pg_catalog.=)
                pg_catalog.concat((SELECT t.relname FROM pg_catalog.pg_class AS t WHERE t.oid OPERATOR(pg_catalog.=) s.logicalrelid), '_', s.shardid)",
        &[relation.into()],
    )?)
}
