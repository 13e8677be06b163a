//! Running sync_ext for real: compaction while clients push and pull, backups, upgrades.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use postgres::Client;
use serde_json::{json, Map, Value};
use sync_ext_client::{Encoding, LocalStore, PgRemote, SyncClient};
use sync_ext_pgrx_tests::{change, hlc_ago, pull, pull_all, pull_scoped, push, Cluster};
use sync_ext_protocol::Op;

type Row = Map<String, Value>;

fn server_rows(client: &mut Client, tenant: &str) -> BTreeMap<String, Row> {
    client
        .query("SELECT id, value FROM sync_ext.snapshots WHERE tenant_id = $1 AND NOT deleted", &[&tenant])
        .unwrap()
        .iter()
        .map(|row| (row.get::<_, String>(0), row.get::<_, Value>(1).as_object().cloned().unwrap()))
        .collect()
}

fn local_rows(client: &SyncClient<PgRemote>) -> BTreeMap<String, Row> {
    client.list::<Row>("todo").unwrap().into_iter().collect()
}

#[test]
fn compaction_under_concurrent_pushes_and_pulls_loses_nothing() {
    let cluster = Cluster::start();
    let url = cluster.create_database("sync");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let writer = Arc::new(SyncClient::builder().tenant("acme").actor("writer").local(LocalStore::memory()).remote(PgRemote::new(&url)).build().unwrap());
    let reader = Arc::new(
        SyncClient::builder()
            .tenant("acme")
            .actor("reader")
            .local(LocalStore::memory())
            .remote(PgRemote::new(&url).encoding(Encoding::MsgPack))
            .build()
            .unwrap(),
    );
    let done = Arc::new(AtomicBool::new(false));
    let compactions = Arc::new(AtomicUsize::new(0));
    let compactor = {
        let (url, done, compactions) = (url.clone(), done.clone(), compactions.clone());
        std::thread::spawn(move || {
            let mut client = Client::connect(&url, postgres::NoTls).unwrap();
            while !done.load(Ordering::SeqCst) {
                let result: Value = client.query_one("SELECT sync_compact('acme', '0 seconds')", &[]).unwrap().get(0);
                if result["removed"].as_i64().unwrap() + result["tombstones"].as_i64().unwrap() > 0 {
                    compactions.fetch_add(1, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(15));
            }
        })
    };
    runtime.block_on(async {
        let reading = {
            let (reader, done) = (reader.clone(), done.clone());
            tokio::spawn(async move {
                while !done.load(Ordering::SeqCst) {
                    reader.sync().await.unwrap();
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        for round in 0..60 {
            for row in 0..8 {
                let pk = ((round + row) % 20).to_string();
                match (round + row) % 7 {
                    0 => writer.delete("todo", &pk).unwrap(),
                    1 => writer.insert("todo", &pk, &json!({"title": format!("t{round}"), "n": round})).unwrap(),
                    _ => writer.update("todo", &pk, &json!({"n": round * 10 + row})).unwrap(),
                };
            }
            writer.sync().await.unwrap();
        }
        done.store(true, Ordering::SeqCst);
        reading.await.unwrap();
    });
    compactor.join().unwrap();
    let fresh = SyncClient::builder().tenant("acme").actor("new-device").local(LocalStore::memory()).remote(PgRemote::new(&url)).build().unwrap();
    runtime.block_on(async {
        writer.sync().await.unwrap();
        reader.sync().await.unwrap();
        fresh.sync().await.unwrap();
    });
    let mut sql = cluster.connect("sync");
    let expected = server_rows(&mut sql, "acme");
    let horizon: i64 = sql.query_one("SELECT horizon FROM sync_ext.tenants WHERE tenant_id = 'acme'", &[]).unwrap().get(0);
    assert!(compactions.load(Ordering::SeqCst) > 0 && horizon > 0, "compaction ran while clients synced");
    assert!(!expected.is_empty());
    assert_eq!(local_rows(&writer), expected, "the writer stayed in sync");
    assert_eq!(local_rows(&reader), expected, "the reader (MessagePack) stayed in sync");
    assert_eq!(local_rows(&fresh), expected, "a new device bootstrapped from the compacted tenant");
    let logged: i64 = sql.query_one("SELECT count(*) FROM sync_ext.op_log WHERE tenant_id = 'acme'", &[]).unwrap().get(0);
    assert!(logged < 60 * 8, "the log was compacted: {logged} entries left of {}", 60 * 8);
}

/// Everything sync_ext keeps, as text, for comparing two databases.
fn sync_state(client: &mut Client) -> Vec<String> {
    [
        "SELECT string_agg(t::text, ';' ORDER BY tenant_id) FROM sync_ext.tenants AS t",
        "SELECT string_agg(o::text, ';' ORDER BY tenant_id, seq) FROM sync_ext.op_log AS o",
        "SELECT string_agg(s::text, ';' ORDER BY tenant_id, model, id) FROM sync_ext.snapshots AS s",
        "SELECT string_agg(m.model || '=' || m.table_name::text, ';') FROM sync_ext.models AS m",
        "SELECT string_agg(g.tenant_id || '=' || g.role::text, ';') FROM sync_ext.grants AS g",
        "SELECT string_agg(t::text, ';' ORDER BY id) FROM todos AS t",
    ]
    .iter()
    .map(|sql| client.query_one(*sql, &[]).unwrap().get::<_, Option<String>>(0).unwrap_or_default())
    .collect()
}

fn populate(client: &mut Client) {
    client
        .batch_execute(
            "CREATE TABLE todos (id int PRIMARY KEY, tenant_id text NOT NULL, title text, due timestamptz);
             SELECT sync_register_model('todo', 'todos', tenant_column => 'tenant_id');
             INSERT INTO todos VALUES (1, 'acme', 'from SQL', '2026-11-24 10:00:00.5+00');",
        )
        .unwrap();
    let changes = vec![
        change(Op::Insert, "todo", "2", hlc_ago(2_000, 0), "phone", json!({"title": "pushed"})),
        change(Op::Update, "note", "n1", hlc_ago(1_000, 0), "phone", json!({"body": "untyped model"})),
    ];
    push(client, "acme", &changes).unwrap();
}

#[test]
fn pg_dump_and_pg_restore_keep_every_change_cursor_grant_and_model() {
    let cluster = Cluster::start();
    cluster.create_database("origin");
    let mut origin = cluster.connect("origin");
    populate(&mut origin);
    origin.batch_execute("CREATE ROLE app_user NOLOGIN; SELECT sync_grant_tenant('app_user', 'acme')").unwrap();
    let before = sync_state(&mut origin);

    let dump = cluster.path("origin.dump");
    cluster.run_tool("pg_dump", &["-Fc", "-f", dump.to_str().unwrap(), "origin"]);
    cluster.connect("postgres").batch_execute("CREATE DATABASE restored").unwrap();
    cluster.run_tool("pg_restore", &["-d", "restored", dump.to_str().unwrap()]);
    let mut restored = cluster.connect("restored");
    assert_eq!(sync_state(&mut restored), before, "the restored database holds the same sync state");

    let next = vec![change(Op::Update, "todo", "2", hlc_ago(500, 0), "phone", json!({"title": "after restore"}))];
    assert_eq!(push(&mut restored, "acme", &next).unwrap().cursor, 4, "seqs continue after the restored cursor");
    restored.batch_execute("UPDATE todos SET title = 'captured after restore' WHERE id = 1").unwrap();
    let pulled = pull_all(&mut restored, "acme", 4, 10).unwrap();
    assert_eq!(pulled.changes.len(), 1, "the restored table's capture triggers still work");
    let granted: bool = restored.query_one("SELECT has_table_privilege('app_user', 'sync_ext.op_log', 'SELECT')", &[]).unwrap().get(0);
    assert!(granted, "table privileges of grants are restored");
}

#[test]
fn upgrading_from_0_1_0_keeps_data_and_behaviour() {
    upgrade_keeps_data_and_behaviour("0.1.0");
}

#[test]
fn upgrading_from_0_2_0_keeps_data_and_behaviour() {
    upgrade_keeps_data_and_behaviour("0.2.0");
}

#[test]
fn upgrading_from_0_3_0_keeps_data_and_behaviour() {
    upgrade_keeps_data_and_behaviour("0.3.0");
}

#[test]
fn upgrading_from_0_4_0_keeps_data_and_behaviour() {
    upgrade_keeps_data_and_behaviour("0.4.0");
}

#[test]
fn upgrading_from_0_5_0_keeps_data_and_behaviour() {
    upgrade_keeps_data_and_behaviour("0.5.0");
}

/// A bound table and a tenant's sync state as versions 0.1.0 to 0.4.0 left them: two rows inserted by
/// plain SQL and one of them updated (seqs 1 to 3).
const OLD_VERSION_DATA: &str = r#"
    CREATE TABLE todos (id int PRIMARY KEY, tenant_id text NOT NULL, title text, due timestamptz);
    INSERT INTO todos VALUES (1, 'acme', 'from SQL', '2026-11-24 10:00:00.5+00'), (2, 'acme', 'edited', NULL);
    INSERT INTO sync_ext.models (model, table_name, tenant_column) VALUES ('todo', 'todos', 'tenant_id');
    CREATE TRIGGER sync_ext_capture_insert AFTER INSERT ON todos
        REFERENCING NEW TABLE AS sync_ext_new FOR EACH STATEMENT EXECUTE FUNCTION sync_ext.capture_insert();
    CREATE TRIGGER sync_ext_capture_update AFTER UPDATE ON todos
        REFERENCING OLD TABLE AS sync_ext_old NEW TABLE AS sync_ext_new FOR EACH STATEMENT EXECUTE FUNCTION sync_ext.capture_update();
    CREATE TRIGGER sync_ext_capture_delete AFTER DELETE ON todos
        REFERENCING OLD TABLE AS sync_ext_old FOR EACH STATEMENT EXECUTE FUNCTION sync_ext.capture_delete();
    CREATE TRIGGER sync_ext_forbid_truncate BEFORE TRUNCATE ON todos FOR EACH STATEMENT EXECUTE FUNCTION sync_ext.forbid_truncate();
    INSERT INTO sync_ext.tenants (tenant_id, last_seq, last_hlc) VALUES ('acme', 3, '2026-11-24T10:00:02.000Z-0000');
    INSERT INTO sync_ext.op_log (tenant_id, seq, op_id, model, pk, op, actor, hlc, updated_at, payload, payload_hash) VALUES
        ('acme', 1, '00000000-0000-4000-8000-000000000001', 'todo', '1', 'insert', 'server', '2026-11-24T10:00:00.000Z-0000',
         '2026-11-24 10:00:00+00', '{"id": 1, "title": "from SQL", "due": "2026-11-24T10:00:00.500000Z"}', ''),
        ('acme', 2, '00000000-0000-4000-8000-000000000002', 'todo', '2', 'insert', 'server', '2026-11-24T10:00:01.000Z-0000',
         '2026-11-24 10:00:01+00', '{"id": 2, "title": "second", "due": null}', ''),
        ('acme', 3, '00000000-0000-4000-8000-000000000003', 'todo', '2', 'update', 'server', '2026-11-24T10:00:02.000Z-0000',
         '2026-11-24 10:00:02+00', '{"title": "edited"}', '');
    INSERT INTO sync_ext.snapshots (tenant_id, model, id, value, hlc, actor, op_id, deleted, deleted_hlc, field_stamps, seq) VALUES
        ('acme', 'todo', '1', '{"id": 1, "title": "from SQL", "due": "2026-11-24T10:00:00.500000Z"}', '2026-11-24T10:00:00.000Z-0000',
         'server', '00000000-0000-4000-8000-000000000001', false, NULL, '{}', 1),
        ('acme', 'todo', '2', '{"id": 2, "title": "edited", "due": null}', '2026-11-24T10:00:02.000Z-0000',
         'server', '00000000-0000-4000-8000-000000000003', false, NULL,
         '{"id": ["2026-11-24T10:00:01.000Z-0000", "server", "00000000-0000-4000-8000-000000000002"],
           "due": ["2026-11-24T10:00:01.000Z-0000", "server", "00000000-0000-4000-8000-000000000002"]}', 3);
"#;

/// Installs released version `from`, fills it, updates to the current version and checks that the data,
/// the behaviour and the schema are those of a fresh install.
fn upgrade_keeps_data_and_behaviour(from: &str) {
    let cluster = Cluster::start();
    cluster.connect("postgres").batch_execute("CREATE DATABASE old").unwrap();
    let mut old = cluster.connect("old");
    old.batch_execute(&format!("CREATE EXTENSION sync_ext VERSION '{from}'")).unwrap();
    // What the older version had written: a bound table with its capture triggers, and a tenant's log,
    // snapshots and counters (the library that wrote them is gone; this one only updates them).
    old.batch_execute(OLD_VERSION_DATA).unwrap();
    // Between installing the new library and ALTER EXTENSION UPDATE, the sync functions and the capture
    // triggers say what to do.
    for sql in ["SELECT sync_pull('acme', 0)", "UPDATE todos SET title = 'too early' WHERE id = 1"] {
        let outdated = old.batch_execute(sql).unwrap_err();
        let outdated = outdated.as_db_error().expect("a database error");
        assert_eq!(outdated.code().code(), "55000", "{sql}");
        assert!(outdated.message().ends_with("run ALTER EXTENSION sync_ext UPDATE"), "{}", outdated.message());
    }
    if from < "0.3.0" {
        // Limits set as parameters before 0.3.0 become operator settings.
        old.batch_execute("ALTER DATABASE old SET sync_ext.max_clock_skew = '2h'").unwrap();
    } else {
        // 0.3.0 kept settings and each tenant's digest itself: the digest of the rows above, as the
        // current version computes it for the same rows.
        cluster.create_database("reference");
        let mut reference = cluster.connect("reference");
        reference.batch_execute(OLD_VERSION_DATA).unwrap();
        let digest: i64 = reference.query_one("SELECT sync_ext.tenant_digest('acme')", &[]).unwrap().get(0);
        old.batch_execute("INSERT INTO sync_ext.settings VALUES ('max_clock_skew', '7200000')").unwrap();
        old.execute("UPDATE sync_ext.tenants SET digest = $1 WHERE tenant_id = 'acme'", &[&digest]).unwrap();
    }
    let mut old = cluster.connect("old");
    // The log without logged_at, which 0.2.0 added.
    let log = |client: &mut Client| -> String {
        let sql = "SELECT string_agg((to_jsonb(o) - 'logged_at')::text, ';' ORDER BY seq) FROM sync_ext.op_log AS o";
        client.query_one(sql, &[]).unwrap().get(0)
    };
    let before = log(&mut old);

    old.batch_execute("ALTER EXTENSION sync_ext UPDATE").unwrap();
    let version: String = old.query_one("SELECT extversion FROM pg_extension WHERE extname = 'sync_ext'", &[]).unwrap().get(0);
    let current: String = old.query_one("SELECT default_version FROM pg_available_extensions WHERE name = 'sync_ext'", &[]).unwrap().get(0);
    assert_eq!(version, current);
    let carried: String = old.query_one("SELECT string_agg(name || '=' || value, ',') FROM sync_ext.settings", &[]).unwrap().get(0);
    assert_eq!(carried, "max_clock_skew=7200000");
    assert_eq!(log(&mut old), before, "every change is still there, unchanged");
    let digest_kept: bool = old.query_one("SELECT bool_and(digest = sync_ext.tenant_digest(tenant_id)) FROM sync_ext.tenants", &[]).unwrap().get(0);
    assert!(digest_kept, "the update computed the digest of every existing tenant");

    let next = vec![change(Op::Update, "todo", "2", hlc_ago(0, 0xff00), "phone", json!({"title": "after upgrade"}))];
    assert_eq!(push(&mut old, "acme", &next).unwrap().cursor, 4);
    let compacted: Value = old.query_one("SELECT sync_compact('acme', '0 seconds')", &[]).unwrap().get(0);
    assert_eq!(compacted["horizon"], 3, "the superseded entries of todo 2 (seqs 2 and 3) are compacted away");
    let bootstrap = pull_all(&mut old, "acme", 0, 2).unwrap();
    assert!(bootstrap.reset && bootstrap.cursor == 4, "new clients bootstrap by reset");
    let stats: i64 = old.query_one("SELECT op_log_rows FROM sync_ext.tenant_stats WHERE tenant_id = 'acme'", &[]).unwrap().get(0);
    assert_eq!(stats, 2);

    cluster.create_database("fresh");
    let schema = "SELECT concat_ws(E'\n',
        (SELECT string_agg(table_name || '.' || column_name || ':' || data_type, ',' ORDER BY table_name, column_name)
           FROM information_schema.columns WHERE table_schema = 'sync_ext'),
        (SELECT string_agg(format('%s %s %s %s %s %s', p.oid::regprocedure, p.prorettype::regtype, l.lanname, p.provolatile,
                                  p.proisstrict, coalesce(p.proacl::text, 'default')), ',' ORDER BY p.oid::regprocedure::text)
           FROM pg_depend AS d JOIN pg_proc AS p ON p.oid = d.objid JOIN pg_language AS l ON l.oid = p.prolang
          WHERE d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'sync_ext') AND d.classid = 'pg_proc'::regclass),
        (SELECT string_agg(tablename || ':' || policyname || ':' || qual, ',' ORDER BY tablename) FROM pg_policies WHERE schemaname = 'sync_ext'))";
    let upgraded: String = old.query_one(schema, &[]).unwrap().get(0);
    let fresh: String = cluster.connect("fresh").query_one(schema, &[]).unwrap().get(0);
    assert_eq!(upgraded, fresh, "an upgraded database has the schema, functions, privileges and policies of a fresh one");
    old.batch_execute("UPDATE todos SET title = 'captured after the upgrade' WHERE id = 1").unwrap();
    let after = pull_all(&mut old, "acme", 4, 10).unwrap();
    assert_eq!(after.changes.len(), 1, "capture triggers work after the upgrade");
    let digest: String = old.query_one("SELECT lpad(to_hex(sync_ext.tenant_digest('acme')), 16, '0')", &[]).unwrap().get(0);
    assert_eq!(after.digest, Some(digest), "the digest kept on every write equals the one computed from the rows");
}

#[test]
fn long_lived_connections_follow_grant_and_setting_changes_at_once() {
    let cluster = Cluster::start();
    cluster.create_database("sync");
    let mut admin = cluster.connect("sync");
    admin.batch_execute("CREATE ROLE device LOGIN").unwrap();
    let two = vec![
        change(Op::Insert, "todo", "1", hlc_ago(2_000, 0), "admin", json!({"title": "a"})),
        change(Op::Insert, "todo", "2", hlc_ago(1_000, 0), "admin", json!({"title": "b"})),
    ];
    push(&mut admin, "acme", &two).unwrap();
    // A connection that has already been refused, and so has read (and kept) acme's grants.
    let mut device = cluster.connect_as("sync", "device");
    let code = |result: Result<sync_ext_protocol::PullResponse, postgres::Error>| result.err().and_then(|e| e.as_db_error().map(|db| db.code().code().to_owned()));
    assert_eq!(code(pull(&mut device, "acme", 0, 1000)).as_deref(), Some("42501"));

    admin.batch_execute("SELECT sync_grant_tenant('device', 'acme')").unwrap();
    assert_eq!(pull(&mut device, "acme", 0, 1000).unwrap().changes.len(), 2, "the grant is seen by the next call");
    admin.batch_execute("BEGIN; SELECT sync_configure('max_pull_changes', '1'); ROLLBACK").unwrap();
    assert_eq!(pull(&mut device, "acme", 0, 1000).unwrap().changes.len(), 2, "a rolled back setting never applies");
    admin.batch_execute("SELECT sync_configure('max_pull_changes', '1')").unwrap();
    let capped = pull(&mut device, "acme", 0, 1000).unwrap();
    assert!(capped.changes.len() == 1 && capped.has_more, "the new setting applies to the next call");
    admin.batch_execute("SELECT sync_revoke_tenant('device', 'acme')").unwrap();
    assert_eq!(code(pull(&mut device, "acme", 0, 1000)).as_deref(), Some("42501"), "a revoked grant is gone at once");
}

/// Every scoped page of `project:0` and of `project:0`+`project:1` from every cursor, one row and 100 rows at a time.
fn scoped_pages(client: &mut Client) -> Vec<sync_ext_protocol::PullResponse> {
    let last: i64 = client.query_one("SELECT last_seq FROM sync_ext.tenants WHERE tenant_id = 'acme'", &[]).unwrap().get(0);
    let mut pages = Vec::new();
    for since in 1..=last {
        for (max, scopes) in [(1, &["project:0"][..]), (100, &["project:0", "project:1"][..])] {
            pages.push(pull_scoped(client, "acme", since, max, scopes).unwrap());
        }
    }
    pages
}

/// Where each scope index entry says its log row is, and how many of them are wrong.
fn misplaced_index_entries(client: &mut Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM sync_ext.scope_log AS l LEFT JOIN sync_ext.op_log AS o ON o.tenant_id = l.tenant_id AND o.seq = l.seq
              WHERE l.log_tid IS DISTINCT FROM o.ctid",
            &[],
        )
        .unwrap()
        .get(0)
}

#[test]
fn scoped_pulls_give_the_same_pages_after_op_log_is_rewritten_or_restored() {
    let cluster = Cluster::start();
    cluster.create_database("origin");
    let mut origin = cluster.connect("origin");
    origin.batch_execute("SELECT sync_define_scope('project', 'task', 'project')").unwrap();
    for round in 0..4_i64 {
        let changes: Vec<_> = (0..12)
            .map(|n| {
                let op = if round == 0 { Op::Insert } else { Op::Update };
                change(op, "task", &n.to_string(), hlc_ago(10_000 - round * 1_000 - n, 0), "device", json!({"project": (n + round) % 3, "round": round}))
            })
            .collect();
        push(&mut origin, "acme", &changes).unwrap();
        // Dead rows for VACUUM FULL to squeeze out, so that the log rows move.
        origin.batch_execute("SELECT sync_compact('acme', '0 seconds')").unwrap();
    }
    let before = scoped_pages(&mut origin);
    assert!(before.iter().map(|page| page.changes.len()).sum::<usize>() > 30, "the pages hold changes");
    assert_eq!(misplaced_index_entries(&mut origin), 0, "pushes note where their log rows are");

    origin.batch_execute("VACUUM FULL sync_ext.op_log").unwrap();
    assert!(misplaced_index_entries(&mut origin) > 0, "VACUUM FULL moved log rows");
    assert_eq!(scoped_pages(&mut origin), before, "after VACUUM FULL");
    origin.batch_execute("SELECT sync_compact('acme', '1 day')").unwrap();
    assert_eq!(misplaced_index_entries(&mut origin), 0, "compaction notes the new places");
    assert_eq!(scoped_pages(&mut origin), before, "after compaction");

    let dump = cluster.path("scoped.dump");
    cluster.run_tool("pg_dump", &["-Fc", "-f", dump.to_str().unwrap(), "origin"]);
    cluster.connect("postgres").batch_execute("CREATE DATABASE restored").unwrap();
    cluster.run_tool("pg_restore", &["-d", "restored", dump.to_str().unwrap()]);
    let mut restored = cluster.connect("restored");
    assert_eq!(scoped_pages(&mut restored), before, "after a restore");
}
