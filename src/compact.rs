//! `sync_compact`: bounding the op log of a tenant.

use pgrx::datum::Interval;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::JsonB;
use sync_ext_protocol::validate_tenant;

use crate::auth::authorize;
use crate::identity::as_engine;
use crate::errors::SyncResult;
use crate::storage;

/// Removes, in one statement, the log entries older than `keep` that a newer entry of the same row
/// supersedes (a row's latest entry is the seq its snapshot records), and the tombstones (deleted rows
/// with their whole history) older than `keep`; then raises the tenant's horizon to the greatest seq
/// removed. Clients whose cursor is at or above the horizon continue as before; clients below it get a
/// reset. Runs under the tenant's lock, so pushes wait for it and pulls see it all or not at all.
#[pg_extern(volatile, parallel_unsafe)]
fn sync_compact(tenant: &str, keep: default!(Interval, "'7 days'")) -> Result<JsonB, ErrorReport> {
    Ok(JsonB(compact(tenant, keep)?))
}

fn compact(tenant: &str, keep: Interval) -> SyncResult<serde_json::Value> {
    validate_tenant(tenant)?;
    as_engine(|engine| {
        authorize(engine, tenant)?;
        storage::require_primary("sync_compact")?;
        Spi::connect_mut(|client| {
            storage::lock_tenant(client, tenant, storage::Lock::Counters)?;
            // One table per statement, each kept to the tenant's rows (so that Citus runs each on the
            // tenant's node); the tenant's lock makes them one step for pushes and pulls.
            let superseded = removed(client, tenant, &keep, SUPERSEDED)?;
            let tombstones = removed(client, tenant, &keep, TOMBSTONE_HISTORY)?;
            let dropped = client.update(DROPPED_TOMBSTONES, None, &[tenant.into()])?.first().get_one::<i64>()?.unwrap_or(0);
            client.update(UNLOGGED_INDEX_ENTRIES, None, &[tenant.into()])?;
            if !crate::citus::distributed() {
                client.update(RENOTED_LOG_ROWS, None, &[tenant.into()])?;
            }
            let horizon = client
                .update(
                    "UPDATE sync_ext.tenants SET horizon = greatest(horizon, $2), horizon_hlc = greatest(horizon_hlc, $3 COLLATE \"C\")
                      WHERE tenant_id = $1 RETURNING horizon",
                    None,
                    &[tenant.into(), superseded.last_seq.max(tombstones.last_seq).into(), superseded.last_hlc.max(tombstones.last_hlc).into()],
                )?
                .first()
                .get_one::<i64>()?
                .unwrap_or(0);
            Ok(serde_json::json!({"removed": superseded.count, "tombstones": dropped, "horizon": horizon}))
        })
    })
}

/// What one statement of compaction removed from the log.
struct Removed {
    count: i64,
    last_seq: Option<i64>,
    last_hlc: Option<String>,
}

/// Runs a `DELETE ... RETURNING o.seq, o.hlc` of log entries (`$1` the tenant, `$2` the keep) and sums it up.
fn removed(client: &mut pgrx::spi::SpiClient<'_>, tenant: &str, keep: &Interval, delete: &str) -> SyncResult<Removed> {
    let summary = client.update(&format!("WITH removed AS ({delete}) SELECT count(*), max(seq), max(hlc) FROM removed"), None, &[tenant.into(), (*keep).into()])?;
    let row = summary.first();
    Ok(Removed { count: row.get::<i64>(1)?.unwrap_or(0), last_seq: row.get(2)?, last_hlc: row.get(3)? })
}

/// The log entries older than the keep that a newer entry of the same row supersedes (a row's latest
/// entry is the seq its snapshot records).
const SUPERSEDED: &str = "
DELETE FROM sync_ext.op_log AS o USING sync_ext.snapshots AS s
 WHERE o.tenant_id = $1 AND s.tenant_id = $1 AND s.model = o.model AND s.id = o.pk
   AND o.seq < s.seq AND o.logged_at <= now() - $2
RETURNING o.seq, o.hlc";

/// The whole history of the rows deleted longer ago than the keep (tombstones whose latest entry is older).
const TOMBSTONE_HISTORY: &str = "
DELETE FROM sync_ext.op_log AS o USING sync_ext.snapshots AS s
 WHERE o.tenant_id = $1 AND s.tenant_id = $1 AND s.deleted AND s.model = o.model AND s.id = o.pk
   AND EXISTS (SELECT FROM sync_ext.op_log AS latest
                WHERE latest.tenant_id = $1 AND latest.seq = s.seq AND latest.logged_at <= now() - $2)
RETURNING o.seq, o.hlc";

/// The tombstones whose history [`TOMBSTONE_HISTORY`] removed (every snapshot's latest entry is in the log
/// until then). Counts them.
const DROPPED_TOMBSTONES: &str = "
WITH dropped AS (
    DELETE FROM sync_ext.snapshots AS s
     WHERE s.tenant_id = $1 AND s.deleted
       AND NOT EXISTS (SELECT FROM sync_ext.op_log AS o WHERE o.tenant_id = $1 AND o.seq = s.seq)
    RETURNING 1)
SELECT count(*) FROM dropped";

/// The scope index entries of the log entries removed above (a row's current entry stays, so scoped
/// resets still find every row).
const UNLOGGED_INDEX_ENTRIES: &str = "
DELETE FROM sync_ext.scope_log AS l
 WHERE l.tenant_id = $1
   AND NOT EXISTS (SELECT FROM sync_ext.op_log AS o WHERE o.tenant_id = $1 AND o.seq = l.seq)";

/// The index entries whose log row is no longer where they say (op_log was rewritten: VACUUM FULL,
/// CLUSTER, a restore) or that say nothing (a rebuild wrote them) learn where it is, so that scoped
/// pulls read it directly again (on a distributed install pulls look rows up by their key, and the
/// entries are left as they are).
const RENOTED_LOG_ROWS: &str = "
UPDATE sync_ext.scope_log AS l SET log_tid = o.ctid
  FROM sync_ext.op_log AS o
 WHERE l.tenant_id = $1 AND o.tenant_id = $1 AND o.seq = l.seq AND l.log_tid IS DISTINCT FROM o.ctid";

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use std::collections::BTreeMap;

    use pgrx::prelude::*;
    use serde_json::{json, Map, Value};
    use sync_ext_protocol::{PullResponse, RowState};

    use crate::testing::{change, fingerprint, pull, push};

    /// What a client holds after following pulls from `since` to the end, resets included.
    fn follow(tenant: &str, rows: &mut BTreeMap<(String, String), RowState>, mut cursor: i64, page: i32) -> (i64, usize) {
        let mut resets = 0;
        loop {
            let response: PullResponse = serde_json::from_value(pull(tenant, cursor, page)).unwrap();
            if response.reset {
                if cursor >= 0 {
                    rows.clear();
                }
                resets += 1;
            }
            for pulled in &response.changes {
                let key = (pulled.model.clone(), pulled.pk.clone());
                if response.reset {
                    rows.insert(key, pulled.to_row_state().unwrap());
                } else {
                    rows.entry(key).or_default().apply(&pulled.to_change());
                }
            }
            cursor = response.cursor;
            if !response.has_more {
                return (cursor, resets);
            }
        }
    }

    fn visible(rows: &BTreeMap<(String, String), RowState>) -> BTreeMap<String, Option<Map<String, Value>>> {
        rows.iter().filter_map(|((_, pk), row)| row.visible().map(|v| (pk.clone(), Some(v)))).collect()
    }

    fn server_rows(tenant: &str) -> BTreeMap<String, Option<Map<String, Value>>> {
        let rows = Spi::get_one_with_args::<pgrx::JsonB>(
            "SELECT coalesce(jsonb_object_agg(id, value), '{}') FROM sync_ext.snapshots WHERE tenant_id = $1 AND NOT deleted",
            &[tenant.into()],
        )
        .unwrap()
        .unwrap()
        .0;
        rows.as_object().unwrap().iter().map(|(pk, value)| (pk.clone(), value.as_object().cloned())).collect()
    }

    #[pg_test]
    fn compaction_drops_superseded_entries_and_old_tombstones_and_raises_the_horizon() {
        push("t", json!([
            change(1, "1", "insert", "00.000", "a", json!({"title": "milk", "done": false})),
            change(2, "1", "update", "01.000", "a", json!({"done": true})),
            change(3, "1", "update", "02.000", "a", json!({"title": "oat milk"})),
            change(4, "2", "insert", "00.000", "a", json!({"title": "eggs"})),
            change(5, "2", "delete", "03.000", "a", Value::Null),
            change(6, "3", "insert", "00.000", "a", json!({"title": "bread"})),
        ]));
        let kept = Spi::get_one::<pgrx::JsonB>("SELECT sync_compact('t')").unwrap().unwrap().0;
        assert_eq!(kept, json!({"removed": 0, "tombstones": 0, "horizon": 0}), "everything is younger than 7 days");
        let compacted = Spi::get_one::<pgrx::JsonB>("SELECT sync_compact('t', '0 seconds')").unwrap().unwrap().0;
        assert_eq!(compacted, json!({"removed": 3, "tombstones": 1, "horizon": 5}), "seqs 1, 2 and 4 were superseded; row 2 was a tombstone");
        let left: Vec<i64> = Spi::get_one::<Vec<i64>>("SELECT array_agg(seq ORDER BY seq) FROM sync_ext.op_log").unwrap().unwrap();
        assert_eq!(left, [3, 6], "row 1's latest entry and row 3 stay; row 2 and its history are gone");
        let stats = Spi::get_one::<pgrx::JsonB>("SELECT to_jsonb(s) - 'last_push_at' FROM sync_ext.tenant_stats AS s").unwrap().unwrap().0;
        assert_eq!(stats, json!({"tenant_id": "t", "last_seq": 6, "op_log_rows": 2, "snapshot_rows": 2, "tombstones": 0, "horizon": 5, "scope_instances": 0}));

        let mut in_sync_client = BTreeMap::new();
        assert_eq!(follow("t", &mut in_sync_client, 0, 100).1, 1, "a new client is bootstrapped by a reset");
        assert_eq!(visible(&in_sync_client), server_rows("t"));
        assert_eq!(pull("t", 5, 100)["changes"].as_array().unwrap().len(), 1, "a cursor at the horizon continues from the log");
        assert_eq!(pull("t", 4, 100)["reset"], true, "a cursor below the horizon is reset");
        assert_eq!(pull("t", 7, 100)["reset"], true, "a cursor beyond the last seq (a restore) is reset");
    }

    #[pg_test]
    fn changes_at_or_before_the_compaction_horizon_are_stale_and_change_nothing() {
        let edit = change(2, "1", "update", "01.000", "a", json!({"done": true}));
        let first = change(1, "1", "insert", "00.000", "a", json!({"title": "milk"}));
        push("t", json!([first.clone(), edit.clone(), change(3, "2", "insert", "00.000", "a", json!({"title": "eggs"})),
                         change(4, "2", "delete", "02.000", "a", Value::Null)]));
        let compacted = Spi::get_one::<pgrx::JsonB>("SELECT sync_compact('t', '0 seconds')").unwrap().unwrap().0;
        assert_eq!(compacted, json!({"removed": 2, "tombstones": 1, "horizon": 4}));
        let before = fingerprint();
        let mut other_payload = first.clone();
        other_payload["value"] = json!({"title": "beer"});
        let resends = push("t", json!([first, other_payload, change(5, "2", "update", "01.000", "b", json!({"title": "old edit"})), edit]));
        let outcomes: Vec<Value> = resends["results"].as_array().unwrap().iter().map(|r| r["reason"].clone()).collect();
        assert_eq!(outcomes, [json!("stale"), json!("stale"), json!("stale"), Value::Null], "compacted: stale whatever the payload");
        assert_eq!(resends["results"][3]["status"], "duplicate", "a change still in the log is remembered");
        assert_eq!(fingerprint(), before, "nothing changed");
        let later = push("t", json!([change(6, "2", "insert", "02.001", "b", json!({"title": "new eggs"}))]));
        assert_eq!(later["results"][0]["status"], "applied", "a change after the horizon applies");
    }

    #[pg_test]
    fn reset_pages_miss_and_double_nothing_while_pushes_go_on_between_them() {
        let batch: Vec<Value> = (1..=7).map(|n| change(n, &n.to_string(), "insert", "00.000", "a", json!({"n": n, "tag": "x"}))).collect();
        push("t", Value::from(batch));
        push("t", json!([change(8, "1", "update", "01.000", "b", json!({"n": 100}))]));
        Spi::run("SELECT sync_compact('t', '0 seconds')").unwrap();

        let mut client = BTreeMap::new();
        let first: PullResponse = serde_json::from_value(pull("t", 0, 3)).unwrap();
        assert!(first.reset && first.has_more && first.cursor < 0, "a paged reset continues from a negative cursor");
        for pulled in &first.changes {
            client.insert((pulled.model.clone(), pulled.pk.clone()), pulled.to_row_state().unwrap());
        }
        // Between pages: a row already sent changes, a row not yet sent changes, a new row appears, one is deleted.
        let sent = first.changes[0].pk.clone();
        push("t", json!([
            change(9, &sent, "update", "02.000", "c", json!({"tag": "sent, then changed"})),
            change(10, "7", "update", "02.000", "c", json!({"tag": "changed before it was sent"})),
            change(11, "8", "insert", "02.000", "c", json!({"n": 8})),
            change(12, "2", "delete", "02.000", "c", Value::Null),
        ]));
        let (cursor, _) = follow("t", &mut client, first.cursor, 3);
        assert_eq!(visible(&client), server_rows("t"), "the reset ends with the server's rows");
        assert_eq!(cursor, 12, "and at the tenant's last seq");
        push("t", json!([change(13, "3", "update", "03.000", "d", json!({"tag": "after the reset"}))]));
        follow("t", &mut client, cursor, 3);
        assert_eq!(visible(&client), server_rows("t"), "ordinary pulls continue from there");
        assert_eq!(client[&("todo".to_owned(), "1".to_owned())].visible().unwrap()["n"], 100, "field registers came with the rows");
    }
}
