//! Whether the sync tables are distributed by Citus, and what the engine does differently then.
//!
//! On a distributed install (see the README's Citus section, `sync_distribute()`), every node runs the
//! same engine: a call delegated to the node holding its tenant runs there, a call inside a
//! multi-statement transaction runs on the coordinator and Citus routes each statement.
//!
//! Where this node holds the tenant's shards (a call delegated to the tenant's node, or any call there),
//! the engine's statements name those shards instead of the distributed tables (see [`Placement`]): they
//! are plain tables, planned once and kept as on one node, with none of Citus's planning per statement.
//! Writes hold the shards' placement lock (as Citus's own writes do), so a shard move waits for them
//! and they wait for it.
//!
//! Statements that Citus routes ([`routed`]) differ in two ways, and pushes in one, all decided here:
//! - they are planned for their arguments (Citus cannot route a generic plan of a statement that joins
//!   or writes several tables by a parameter; see [`crate::plans`]);
//! - a batch is written one table per statement, each routed to the tenant's node, instead of one
//!   statement over all of them (which Citus would fan out to every node and commit in two phases);
//! - pushes never send NOTIFY themselves (a transaction that ran NOTIFY cannot be prepared, and Citus
//!   prepares every transaction that wrote on two nodes); the notifiers send wake-ups to every node.
//!
//! Capture triggers fire on shards, which [`table_of_shard`] maps back to their tables, and the upgrade
//! scripts change sync tables through [`alter_sync_table`].

use std::borrow::Cow;
use std::cell::{Cell, RefCell};

use pgrx::prelude::*;

use crate::errors::SyncResult;
use crate::kept;

thread_local! {
    /// Whether `sync_ext.op_log` is distributed, and the kept generation that was read in.
    static KEPT: Cell<Option<(u64, bool)>> = const { Cell::new(None) };
    /// The shards the engine's statements name while [`Placement::run`] runs.
    static LOCAL: RefCell<Option<LocalShards>> = const { RefCell::new(None) };
}

/// The sync tables whose shards a tenant's statements may name directly (co-located: on one node).
const SHARDED: [&str; 5] = ["sync_ext.tenants", "sync_ext.op_log", "sync_ext.snapshots", "sync_ext.scope_log", "sync_ext.scope_digests"];

/// The names of one tenant's shards of [`SHARDED`], in that order.
#[derive(Clone)]
struct LocalShards([String; 5]);

/// Where a tenant's sync state is for the engine: on this node's shards, or behind Citus (or on one
/// plain node, when nothing is distributed).
#[derive(Clone)]
pub struct Placement(Option<LocalShards>);

/// What a call does with the tenant's sync tables.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// Where `tenant`'s sync state is. A writer first takes the shards' placement lock for the rest of the
/// transaction (`lock_shard_metadata`, share mode: a shard move takes it exclusively), then looks.
pub fn placement(tenant: &str, access: Access) -> SyncResult<Placement> {
    if !distributed() {
        return Ok(Placement(None));
    }
    // Kept plans: they run on every call. The lock is taken in a statement of its own, so that the
    // placement is read after it was granted (a statement reads what was committed when it started).
    let local = Spi::connect_mut(|client| {
        let shards = if access == Access::Write {
            crate::plans::update(
                client,
                "SELECT s.shards FROM (SELECT array_agg(pg_catalog.get_shard_id_for_distribution_column(t.rel::pg_catalog.regclass, $1) ORDER BY t.n) AS shards
                                         FROM pg_catalog.unnest($2::pg_catalog.text[]) WITH ORDINALITY AS t(rel, n)) AS s,
                        LATERAL pg_catalog.lock_shard_metadata(5, s.shards)",
                Some(1),
                &[tenant.into(), SHARDED.to_vec().into()],
            )?
            .first()
            .get_one::<Vec<i64>>()?
        } else {
            None
        };
        crate::plans::select(
            client,
            "SELECT array_agg(pg_catalog.shard_name(s.logicalrelid, s.shardid) ORDER BY t.n)
               FROM pg_catalog.unnest(coalesce($3::pg_catalog.int8[],
                        ARRAY(SELECT pg_catalog.get_shard_id_for_distribution_column(r::pg_catalog.regclass, $1)
                                FROM pg_catalog.unnest($2::pg_catalog.text[]) WITH ORDINALITY AS n(r, i) ORDER BY i)))
                    WITH ORDINALITY AS t(shardid, n)
               JOIN pg_catalog.pg_dist_shard AS s ON s.shardid OPERATOR(pg_catalog.=) t.shardid
              WHERE EXISTS (SELECT FROM pg_catalog.pg_dist_placement AS p
                             WHERE p.shardid OPERATOR(pg_catalog.=) t.shardid
                               AND p.groupid OPERATOR(pg_catalog.=) (SELECT groupid FROM pg_catalog.pg_dist_local_group))",
            Some(1),
            &[tenant.into(), SHARDED.to_vec().into(), shards.into()],
        )?
        .first()
        .get_one::<Vec<String>>()
    })?
    .unwrap_or_default();
    Ok(Placement(<[String; 5]>::try_from(local).ok().map(LocalShards)))
}

impl Placement {
    /// Runs `work` with the engine's statements on the tenant's shards, when this node holds them.
    pub fn run<T>(&self, work: impl FnOnce() -> T) -> T {
        struct Restore(Option<LocalShards>);
        impl Drop for Restore {
            fn drop(&mut self) {
                LOCAL.set(self.0.take());
            }
        }
        let _restore = Restore(LOCAL.replace(self.0.clone()));
        work()
    }
}

/// Whether the engine's statements go through Citus: the sync tables are distributed and the statement is
/// not on local shards (see [`Placement`]).
pub fn routed() -> bool {
    distributed() && LOCAL.with_borrow(Option::is_none)
}

/// `sql` naming the local shards for the sync tables while [`Placement::run`] runs on them.
pub fn local_sql(sql: &str) -> Cow<'_, str> {
    LOCAL.with_borrow(|local| match local {
        Some(LocalShards(shards)) => {
            Cow::Owned(SHARDED.iter().zip(shards).fold(sql.to_owned(), |sql, (table, shard)| sql.replace(table, shard)))
        }
        None => Cow::Borrowed(sql),
    })
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
    if op_log == pg_sys::InvalidOid {
        return false; // not installed (yet): nothing to keep
    }
    kept::watch(op_log);
    let generation = kept::generation();
    // Without Citus's catalog nothing is distributed; distributing the log later invalidates it.
    let distributed = metadata != pg_sys::InvalidOid
        && Spi::get_one_with_args::<bool>(
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

/// The distributed table `relation` is a shard of (its name is the table's followed by `_<shard id>`, in
/// the table's schema), on a distributed install; `None` for any other relation. Read from the catalog
/// caches and `pg_dist_shard` (Citus hides shards from queries of `pg_class` in client sessions).
pub fn table_of_shard(relation: pg_sys::Oid) -> SyncResult<Option<pg_sys::Oid>> {
    if !distributed() {
        return Ok(None);
    }
    let Some(name) = relation_name(relation) else { return Ok(None) };
    let Some((table, shard)) = name.rsplit_once('_').and_then(|(table, id)| Some((table.to_owned(), id.parse::<i64>().ok()?))) else {
        return Ok(None);
    };
    let logical = Spi::connect(|client| {
        let rows = client.select("SELECT logicalrelid::pg_catalog.oid FROM pg_catalog.pg_dist_shard WHERE shardid OPERATOR(pg_catalog.=) $1", Some(1), &[shard.into()])?;
        if rows.is_empty() {
            return Ok::<_, pgrx::spi::Error>(None);
        }
        rows.first().get_one::<pg_sys::Oid>()
    })?;
    // SAFETY: catalog cache lookups by oid.
    let same_schema = |table: pg_sys::Oid| unsafe { pg_sys::get_rel_namespace(table) == pg_sys::get_rel_namespace(relation) };
    Ok(logical.filter(|&logical| relation_name(logical).as_deref() == Some(table.as_str()) && same_schema(logical)))
}

/// A relation's name, from the catalog caches.
fn relation_name(relation: pg_sys::Oid) -> Option<String> {
    // SAFETY: a catalog cache lookup; NULL when there is no such relation, else a palloc'd name.
    unsafe {
        let name = pg_sys::get_rel_name(relation);
        (!name.is_null()).then(|| std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned())
    }
}

/// The upgrade scripts' way to change a sync table (`sync_ext.alter_sync_table(tbl, command, rows_only)`,
/// declared by each script for its own use and dropped at its end): runs `command` on the table and, under
/// Citus, on each of its shards this node holds, sending nothing to other nodes.
///
/// Under Citus, `ALTER EXTENSION sync_ext UPDATE` on the coordinator runs the script on every node, and
/// each node changes its own copies this way. Left to itself, Citus would send a DDL statement on a
/// distributed table to the workers as its source text (inside an extension script, the whole script),
/// and before their own copy of the script had created what the statement refers to.
///
/// In `command`, `%1$s` stands for the relation and `%2$s` for the suffix of its objects' names (`''` for
/// the table, `_<shard id>` for a shard, as Citus names a shard's indexes and constraints). A command on
/// rows (`rows_only`) skips a distributed table itself, which holds none.
#[pg_extern(sql = false)]
fn alter_sync_table(tbl: pg_sys::Oid, command: &str, rows_only: bool) -> Result<(), pgrx::pg_sys::panic::ErrorReport> {
    Ok(alter_here(tbl, command, rows_only)?)
}

fn alter_here(tbl: pg_sys::Oid, command: &str, rows_only: bool) -> SyncResult<()> {
    let name = Spi::get_one_with_args::<String>("SELECT $1::pg_catalog.regclass::pg_catalog.text", &[tbl.into()])?.unwrap_or_default();
    let on = |relation: &str, suffix: &str| Spi::run(&command.replace("%1$s", relation).replace("%2$s", suffix));
    // SAFETY: a catalog cache lookup by name.
    if unsafe { pg_sys::get_relname_relid(c"pg_dist_partition".as_ptr(), pg_sys::PG_CATALOG_NAMESPACE.into()) } == pg_sys::InvalidOid {
        return Ok(on(&name, "")?);
    }
    let propagation = Spi::get_one::<String>("SELECT pg_catalog.set_config('citus.enable_ddl_propagation', 'off', true)")?;
    let distributed = Spi::get_one_with_args::<bool>("SELECT EXISTS (SELECT FROM pg_catalog.pg_dist_partition WHERE logicalrelid = $1)", &[tbl.into()])?;
    if !rows_only || distributed != Some(true) {
        on(&name, "")?;
    }
    let shards: Vec<(String, i64)> = Spi::connect(|client| {
        client
            .select(
                "SELECT pg_catalog.shard_name(s.logicalrelid, s.shardid), s.shardid
                   FROM pg_catalog.pg_dist_shard AS s JOIN pg_catalog.pg_dist_placement AS p USING (shardid)
                  WHERE s.logicalrelid = $1 AND p.groupid = (SELECT groupid FROM pg_catalog.pg_dist_local_group)",
                None,
                &[tbl.into()],
            )?
            .map(|row| Ok((row.get::<String>(1)?.unwrap_or_default(), row.get::<i64>(2)?.unwrap_or_default())))
            .collect::<Result<_, pgrx::spi::Error>>()
    })?;
    for (shard, id) in shards {
        on(&shard, &format!("_{id}"))?;
    }
    Spi::get_one_with_args::<String>("SELECT pg_catalog.set_config('citus.enable_ddl_propagation', $1, true)", &[propagation.unwrap_or_else(|| "on".into()).into()])?;
    Ok(())
}
