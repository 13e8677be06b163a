//! The statements a push keeps for its backend's life are planned right for every tenant: in a database of
//! many small tenants and one big one, analyzed, a long-lived connection's lookups of a batch's op_ids and
//! rows go by the batch's keys through the indexes, never through a tenant's whole range. Checked on the
//! plans the engine really runs (auto_explain logs them), by shape, not by time.

use postgres::Client;
use serde_json::json;
use sync_ext_pgrx_tests::{change, hlc_ago, push, Cluster};
use sync_ext_protocol::Op;

/// 20,000 tenants of two rows and one tenant, `big`, of 100,000 rows, as pushes would have left them.
const SKEWED_TENANTS: &str = "
    INSERT INTO sync_ext.tenants (tenant_id, last_seq, last_hlc)
    SELECT 'small-' || n, 2, '2026-01-01T00:00:00.000Z-0000' FROM generate_series(1, 20000) AS n
    UNION ALL SELECT 'big', 100000, '2026-01-01T00:00:00.000Z-0000';
    INSERT INTO sync_ext.op_log (tenant_id, seq, op_id, model, pk, op, actor, hlc, updated_at, payload, payload_hash)
    SELECT tenant_id, seq, gen_random_uuid(), 'todo', seq::text, 'insert', 'a', '2026-01-01T00:00:00.000Z-0000', now(), '{}', '\\x00'
      FROM (SELECT 'small-' || n AS tenant_id, s AS seq FROM generate_series(1, 20000) AS n, generate_series(1, 2) AS s
            UNION ALL SELECT 'big', s FROM generate_series(1, 100000) AS s) AS rows;
    INSERT INTO sync_ext.snapshots (tenant_id, model, id, value, hlc, actor, op_id, deleted, deleted_hlc, field_stamps, seq)
    SELECT tenant_id, model, pk, '{}', hlc, actor, op_id, false, NULL, '{}', seq FROM sync_ext.op_log WHERE tenant_id <> 'warm-up';
    ANALYZE sync_ext.tenants, sync_ext.op_log, sync_ext.snapshots;";

/// The plans auto_explain logged since `from` bytes into the server log.
fn logged_plans(cluster: &Cluster, from: u64) -> String {
    let log = std::fs::read(cluster.path("server.log")).expect("the server log");
    String::from_utf8_lossy(&log[from as usize..]).into_owned()
}

fn log_size(cluster: &Cluster) -> u64 {
    std::fs::metadata(cluster.path("server.log")).map(|meta| meta.len()).unwrap_or(0)
}

#[test]
fn a_long_lived_connection_looks_up_a_big_tenants_batch_by_its_keys() {
    let cluster = Cluster::start_with(&["shared_preload_libraries = 'auto_explain'"]);
    cluster.create_database("sync");
    let mut admin = cluster.connect("sync");
    // The connection starts on the empty database and lives on, as a pooled connection does.
    let mut device: Client = cluster.connect("sync");
    push(&mut device, "warm-up", &[change(Op::Insert, "todo", "1", hlc_ago(1_000, 0), "a", json!({"n": 1}))]).unwrap();
    admin.batch_execute(SKEWED_TENANTS).unwrap();

    log_every_plan(&mut device);
    let from = log_size(&cluster);
    let batch = [change(Op::Update, "todo", "50000", hlc_ago(500, 0), "a", json!({"n": 2})), change(Op::Insert, "todo", "new", hlc_ago(500, 1), "a", json!({"n": 3}))];
    let response = push(&mut device, "big", &batch).unwrap();
    assert_eq!(response.cursor, 100_002, "both changes applied");
    device.batch_execute("RESET auto_explain.log_min_duration").unwrap();
    let plans = logged_plans(&cluster, from);

    let op_log_lookup = plan_of(&plans, "SELECT o.op_id, o.seq, o.payload_hash");
    assert!(op_log_lookup.contains("Index Cond: ((tenant_id = $1) AND (op_id = k.op_id))"), "op_ids are looked up key by key:\n{op_log_lookup}");
    let row_lookup = plan_of(&plans, "s.deleted_hlc, s.field_stamps");
    assert!(
        row_lookup.contains("Index Cond: ((tenant_id = $1) AND (model = k.model) AND (id = k.id))"),
        "rows are looked up key by key:\n{row_lookup}"
    );
    for plan in [op_log_lookup, row_lookup] {
        assert!(!plan.contains("Hash Join") && !plan.contains("Bitmap"), "never a scan of the tenant's range:\n{plan}");
    }
}

#[test]
fn a_connection_that_started_on_empty_tables_looks_rows_up_by_their_keys_as_they_grow() {
    let cluster = Cluster::start_with(&["shared_preload_libraries = 'auto_explain'", "autovacuum = off"]);
    cluster.create_database("sync");
    // One connection from the empty database on, and no ANALYZE: its kept plans were made on empty tables.
    let mut device: Client = cluster.connect("sync");
    let batch = |round: usize| -> Vec<_> {
        (0..1000).map(|n| change(Op::Insert, "todo", &format!("{round}-{n}"), hlc_ago(10_000, n as u16), "a", json!({"n": n}))).collect()
    };
    for round in 0..5 {
        push(&mut device, "grown", &batch(round)).unwrap();
    }
    log_every_plan(&mut device);
    let from = log_size(&cluster);
    assert_eq!(push(&mut device, "grown", &batch(5)).unwrap().cursor, 6000);
    device.batch_execute("RESET auto_explain.log_min_duration").unwrap();
    let plans = logged_plans(&cluster, from);
    let row_lookup = plan_of(&plans, "s.deleted_hlc, s.field_stamps");
    assert!(row_lookup.contains("snapshots_pkey"), "rows are looked up through the primary key:\n{row_lookup}");
    assert!(!row_lookup.contains("Filter: ((model = k.model)"), "never a scan of the tenant's rows:\n{row_lookup}");
    let op_log_lookup = plan_of(&plans, "SELECT o.op_id, o.seq, o.payload_hash");
    assert!(op_log_lookup.contains("Index Cond: ((tenant_id = $1) AND (op_id = k.op_id))"), "op_ids are looked up key by key:\n{op_log_lookup}");
}

/// Makes auto_explain log the plan of every statement `device` runs, nested ones included.
fn log_every_plan(device: &mut Client) {
    device
        .batch_execute(
            "SET auto_explain.log_min_duration = 0; SET auto_explain.log_nested_statements = on;
             SET auto_explain.log_format = 'text'; SET client_min_messages = warning",
        )
        .unwrap();
}

/// The logged plan of the statement whose text holds `marker`.
fn plan_of<'a>(plans: &'a str, marker: &str) -> &'a str {
    let at = plans.find(marker).unwrap_or_else(|| panic!("no plan logged for a statement with {marker:?}:\n{plans}"));
    let start = plans[..at].rfind("LOG:  duration").unwrap_or(at);
    let end = plans[at..].find("LOG:  duration").map_or(plans.len(), |next| at + next);
    &plans[start..end]
}
