//! Helpers for the in-database tests: build changes, call the SQL functions, capture SQLSTATEs.

use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Value};

/// A change with op_id `00000000-0000-4000-8000-<n>`, model `todo`, at `2026-01-01T00:00:<hlc>`.
pub fn change(n: u32, pk: &str, op: &str, hlc: &str, actor: &str, value: Value) -> Value {
    let mut change = json!({
        "op_id": format!("00000000-0000-4000-8000-{n:012}"),
        "model": "todo", "pk": pk, "op": op,
        "hlc": format!("2026-01-01T00:00:{hlc}Z-0000"), "actor": actor,
    });
    if !value.is_null() {
        change["value"] = value;
    }
    change
}

/// Calls `sync_push` through SQL.
pub fn push(tenant: &str, changes: Value) -> Value {
    Spi::get_one_with_args::<JsonB>("SELECT sync_push($1, $2)", &[tenant.into(), JsonB(changes).into()])
        .expect("sync_push succeeds")
        .expect("sync_push returns a body")
        .0
}

/// Calls `sync_pull` through SQL.
pub fn pull(tenant: &str, since: i64, max_changes: i32) -> Value {
    Spi::get_one_with_args::<JsonB>("SELECT sync_pull($1, $2, $3)", &[tenant.into(), since.into(), max_changes.into()])
        .expect("sync_pull succeeds")
        .expect("sync_pull returns a body")
        .0
}

/// The statuses of a push's results, in order.
pub fn statuses(response: &Value) -> Vec<String> {
    response["results"].as_array().unwrap().iter().map(|r| r["status"].as_str().unwrap().to_owned()).collect()
}

/// Runs `sql` in a subtransaction and returns `"SQLSTATE: message"` of the error it raises, or `"no error"`.
pub fn error_of(sql: &str) -> String {
    Spi::run(
        "CREATE OR REPLACE FUNCTION pg_temp.error_of(statement text) RETURNS text LANGUAGE plpgsql AS $$
         BEGIN EXECUTE statement; RETURN 'no error';
         EXCEPTION WHEN OTHERS THEN RETURN SQLSTATE || ': ' || SQLERRM; END $$",
    )
    .unwrap();
    Spi::get_one_with_args::<String>("SELECT pg_temp.error_of($1)", &[sql.into()]).unwrap().unwrap()
}

/// A fingerprint of everything the sync tables hold, to prove a call changed nothing.
pub fn fingerprint() -> String {
    Spi::get_one::<String>(
        "SELECT concat_ws('|',
            (SELECT string_agg(t::text, ',' ORDER BY tenant_id) FROM sync_ext.tenants t),
            (SELECT string_agg(o::text, ',' ORDER BY tenant_id, seq) FROM sync_ext.op_log o),
            (SELECT string_agg(s::text, ',' ORDER BY tenant_id, model, id) FROM sync_ext.snapshots s))",
    )
    .unwrap()
    .unwrap_or_default()
}

/// The visible value and deleted flag of one snapshot row.
pub fn snapshot(tenant: &str, pk: &str) -> (Value, bool) {
    let (value, deleted) = Spi::get_two_with_args::<JsonB, bool>(
        "SELECT value, deleted FROM sync_ext.snapshots WHERE tenant_id = $1 AND model = 'todo' AND id = $2",
        &[tenant.into(), pk.into()],
    )
    .unwrap();
    (value.expect("snapshot row exists").0, deleted.unwrap())
}

/// Calls `sync_pull` with `scopes` through SQL.
pub fn pull_scoped(tenant: &str, since: i64, max_changes: i32, scopes: &[&str]) -> Value {
    let scopes: Vec<String> = scopes.iter().map(|instance| instance.to_string()).collect();
    Spi::get_one_with_args::<JsonB>("SELECT sync_pull($1, $2, $3, $4)", &[tenant.into(), since.into(), max_changes.into(), scopes.into()])
        .expect("sync_pull succeeds")
        .expect("sync_pull returns a body")
        .0
}
