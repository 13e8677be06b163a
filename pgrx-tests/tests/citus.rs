//! sync_ext on Citus, through the coordinator: the README's Citus section run as written on a coordinator
//! and two workers, then every sync function on tenants spread over both workers. Needs a Postgres with
//! Citus installed; run by `scripts/citus-test.sh` (the `citus` feature), not by `scripts/test.sh`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, NoTls};
use serde_json::{json, Value};
use sync_ext_pgrx_tests::readme::run_section;
use sync_ext_pgrx_tests::{change, hlc_ago, pull, pull_all, pull_scoped, push, CitusCluster};
use sync_ext_protocol::{Op, PullResponse, Status};
use uuid::Uuid;

/// Tenants spread over the workers.
const TENANTS: usize = 24;

fn tenant(n: usize) -> String {
    format!("tenant-{n:02}")
}

fn sqlstate(error: &postgres::Error) -> Option<String> {
    error.as_db_error().map(|db| db.code().code().to_owned())
}

/// The live rows of a tenant's model as its snapshots hold them (read through the coordinator).
fn server_rows(client: &mut Client, tenant: &str, model: &str) -> BTreeMap<String, Value> {
    client
        .query("SELECT id, value FROM sync_ext.snapshots WHERE tenant_id = $1 AND model = $2 AND NOT deleted", &[&tenant, &model])
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// What a device holds after following pulls from 0 (resets included): its live rows.
fn device_rows(client: &mut Client, tenant: &str, model: &str) -> BTreeMap<String, Value> {
    let all = pull_all(client, tenant, 0, 7).unwrap();
    let mut rows: BTreeMap<String, sync_ext_protocol::RowState> = BTreeMap::new();
    for pulled in all.changes.iter().filter(|pulled| pulled.model == model) {
        if let Some(state) = pulled.apply_to(rows.remove(&pulled.pk)).unwrap() {
            rows.insert(pulled.pk.clone(), state);
        }
    }
    rows.into_iter().filter_map(|(pk, row)| row.visible().map(|value| (pk, Value::Object(value)))).collect()
}

/// The README's recipe, then every sync function through the coordinator on one cluster, step by step.
#[test]
fn the_readme_recipe_distributes_sync_and_every_function_works_through_the_coordinator() {
    let cluster = CitusCluster::start(2);
    let url = cluster.coordinator.connection_string("sync");
    let mut admin = cluster.coordinator.connect("sync");
    println!("coordinator on {}, workers on {:?}", cluster.coordinator.port(), cluster.workers.iter().map(|w| w.port()).collect::<Vec<_>>());

    // The recipe.
    let ran = run_section(&mut admin, "### Citus");
    println!("recipe: {} statements ran as written:", ran.len());
    for statement in &ran {
        println!("  {}", statement.lines().next().unwrap_or_default().trim());
    }
    let distribution: Vec<(String, String)> = admin
        .query("SELECT logicalrelid::text, partmethod::text FROM pg_dist_partition ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    println!("distributed: {distribution:?}");
    for table in ["sync_ext.tenants", "sync_ext.op_log", "sync_ext.snapshots", "todos"] {
        assert!(distribution.contains(&(table.to_owned(), "h".to_owned())), "{table} is hash-distributed");
    }
    for table in ["sync_ext.grants", "sync_ext.settings", "sync_ext.models"] {
        assert!(distribution.contains(&(table.to_owned(), "n".to_owned())), "{table} is a reference table");
    }
    let functions: i64 = admin.query_one("SELECT count(*) FROM pg_dist_object WHERE classid = 'pg_proc'::regclass AND distribution_argument_index = 0", &[]).unwrap().get(0);
    assert_eq!(functions, 5, "the five sync calls are distributed by their tenant");

    // Tenants on both workers: pushes and pulls for each.
    let nodes: BTreeSet<u16> = (0..TENANTS).map(|n| cluster.node_of("sync_ext.tenants", &tenant(n))).collect();
    println!("{TENANTS} tenants on nodes {nodes:?}");
    assert_eq!(nodes, cluster.workers.iter().map(|w| w.port()).collect(), "tenants are spread over both workers");
    for n in 0..TENANTS {
        let changes: Vec<_> = (0..3)
            .map(|i| change(Op::Insert, "note", &format!("{n}-{i}"), hlc_ago(60_000 - i * 1_000, 0), "device", json!({"n": n, "i": i})))
            .collect();
        let response = push(&mut admin, &tenant(n), &changes).unwrap();
        assert_eq!(response.cursor, 3, "{}: seqs 1 to 3", tenant(n));
        let page = pull(&mut admin, &tenant(n), 0, 100).unwrap();
        assert_eq!(page.changes.iter().map(|c| c.seq).collect::<Vec<_>>(), [1, 2, 3]);
        let digest: String = admin.query_one("SELECT lpad(to_hex(sync_ext.tenant_digest($1)), 16, '0')", &[&tenant(n)]).unwrap().get(0);
        assert_eq!(page.digest, Some(digest), "the kept digest equals the one computed from the snapshots");
    }
    println!("pushes and pulls: {TENANTS} tenants, 3 changes each, gap-free seqs and digests");

    // MessagePack.
    let body = sync_ext_protocol::msgpack::encode(&vec![change(Op::Update, "note", "0-0", hlc_ago(0, 0), "device", json!({"via": "msgpack"}))]).unwrap();
    let response: Vec<u8> = admin.query_one("SELECT sync_push_msgpack($1, $2)", &[&tenant(0), &body]).unwrap().get(0);
    let response: sync_ext_protocol::PushResponse = sync_ext_protocol::msgpack::decode(&response).unwrap();
    assert_eq!(response.cursor, 4);
    let page: Vec<u8> = admin.query_one("SELECT sync_pull_msgpack($1, 3)", &[&tenant(0)]).unwrap().get(0);
    let page: PullResponse = sync_ext_protocol::msgpack::decode(&page).unwrap();
    assert_eq!(page.changes.len(), 1);
    assert_eq!(page.changes[0].value.as_ref().unwrap()["via"], "msgpack");
    println!("MessagePack: push and pull");

    concurrent_pushers_and_a_puller(&url);
    bound_table_and_capture(&cluster, &mut admin);
    compaction_and_reset(&mut admin);
    grants_for_a_device(&cluster, &mut admin);
    wakeups_reach_every_node(&cluster, &mut admin);
    a_tenant_moves_to_the_other_worker(&cluster, &mut admin);
    scoped_pulls(&cluster, &mut admin);
}

/// 4 pushers on one tenant while a puller follows it: every applied change is pulled once, in seq order,
/// with no gap.
fn concurrent_pushers_and_a_puller(url: &str) {
    const PUSHERS: usize = 4;
    const BATCHES: usize = 25;
    let done = Arc::new(AtomicBool::new(false));
    let puller = {
        let (url, done) = (url.to_owned(), done.clone());
        std::thread::spawn(move || {
            let mut client = Client::connect(&url, NoTls).unwrap();
            let (mut cursor, mut seen) = (0, Vec::new());
            loop {
                let finished = done.load(Ordering::SeqCst);
                let page = pull_all(&mut client, "busy", cursor, 13).unwrap();
                seen.extend(page.changes.iter().map(|c| (c.seq, c.op_id)));
                cursor = page.cursor;
                if finished {
                    return seen;
                }
            }
        })
    };
    let pushers: Vec<_> = (0..PUSHERS)
        .map(|pusher| {
            let url = url.to_owned();
            std::thread::spawn(move || {
                let mut client = Client::connect(&url, NoTls).unwrap();
                let mut applied = BTreeMap::new();
                for batch in 0..BATCHES {
                    let changes: Vec<_> = (0..4)
                        .map(|i| {
                            let step = (batch * 4 + i) as i64;
                            let hlc = hlc_ago(100_000 - step * 10, pusher as u16);
                            change(Op::Update, "note", &((pusher + i) % 7).to_string(), hlc, &format!("p{pusher}"), json!({"step": step}))
                        })
                        .collect();
                    for result in push(&mut client, "busy", &changes).unwrap().results {
                        if let Status::Applied { seq } = result.status {
                            applied.insert(result.op_id, seq);
                        }
                    }
                }
                applied
            })
        })
        .collect();
    let mut applied: BTreeMap<Uuid, i64> = BTreeMap::new();
    for pusher in pushers {
        applied.extend(pusher.join().unwrap());
    }
    done.store(true, Ordering::SeqCst);
    let seen = puller.join().unwrap();
    let seqs: Vec<i64> = seen.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(seqs, (1..=applied.len() as i64).collect::<Vec<_>>(), "seqs pulled once each, in order, with no gap");
    let pulled: BTreeMap<Uuid, i64> = seen.into_iter().map(|(seq, op_id)| (op_id, seq)).collect();
    assert_eq!(pulled, applied, "every applied change was pulled with the seq its push was told");
    println!("concurrency: {PUSHERS} pushers x {BATCHES} batches on one tenant, a puller alongside: {} changes, gap-free", applied.len());
}

/// Pushes into the bound table of the recipe, and plain SQL captured on the shards: single- and
/// multi-tenant statements, and a push inside a multi-statement transaction on the coordinator.
fn bound_table_and_capture(cluster: &CitusCluster, admin: &mut Client) {
    let (acme, other) = ("acme", (0..TENANTS).map(tenant).find(|t| cluster.node_of("sync_ext.tenants", t) != cluster.node_of("sync_ext.tenants", "acme")).unwrap());
    let id = |n: u32| Uuid::from_u128(0x7f1e_0000_0000_4000_8000_0000_0000_0000 + u128::from(n)).to_string();
    let inserted = push(admin, acme, &[change(Op::Insert, "todo", &id(1), hlc_ago(5_000, 0), "phone", json!({"title": "milk"}))]).unwrap();
    assert!(matches!(inserted.results[0].status, Status::Applied { .. }), "{inserted:?}");
    let title: String = admin.query_one("SELECT title FROM todos WHERE tenant_id = 'acme' AND id = $1::text::uuid", &[&id(1)]).unwrap().get(0);
    assert_eq!(title, "milk", "the pushed insert is a typed row of the distributed table");
    push(admin, &other, &[change(Op::Insert, "todo", &id(2), hlc_ago(5_000, 0), "phone", json!({"title": "bread"}))]).unwrap();

    // Plain SQL: one tenant, then both tenants (on two workers) in one statement.
    admin.batch_execute("UPDATE todos SET done = true WHERE tenant_id = 'acme'").unwrap();
    admin.batch_execute("UPDATE todos SET title = title || '!'").unwrap();
    admin.batch_execute(&format!("INSERT INTO todos (tenant_id, id, title) VALUES ('acme', '{}', 'from SQL'), ('{other}', '{}', 'from SQL too')", id(3), id(4))).unwrap();
    // A push inside a multi-statement transaction on the coordinator (not delegated), next to plain SQL.
    let mut transaction = admin.transaction().unwrap();
    let body = serde_json::to_value(vec![change(Op::Update, "todo", &id(1), hlc_ago(0, 0), "phone", json!({"title": "oat milk"}))]).unwrap();
    transaction.query_one("SELECT sync_push('acme', $1)", &[&body]).unwrap();
    transaction.execute("DELETE FROM todos WHERE tenant_id = $1 AND id = $2::text::uuid", &[&other, &id(4)]).unwrap();
    transaction.commit().unwrap();

    let log = |client: &mut Client, tenant: &str| -> Vec<(String, String, String)> {
        client
            .query("SELECT pk, op, actor FROM sync_ext.op_log WHERE tenant_id = $1 AND model = 'todo' ORDER BY seq", &[&tenant])
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1), row.get(2)))
            .collect()
    };
    let entry = |pk: String, op: &str, actor: &str| (pk, op.to_owned(), actor.to_owned());
    assert_eq!(
        log(admin, acme),
        [entry(id(1), "insert", "phone"), entry(id(1), "update", "server"), entry(id(1), "update", "server"), entry(id(3), "insert", "server"), entry(id(1), "update", "phone")],
        "each write logged once: the push, two captured statements, a captured insert, the push in a transaction (not captured again)"
    );
    assert_eq!(log(admin, &other), [entry(id(2), "insert", "phone"), entry(id(2), "update", "server"), entry(id(4), "insert", "server"), entry(id(4), "delete", "server")]);
    for tenant in [acme, other.as_str()] {
        let table: BTreeMap<String, Value> = admin
            .query("SELECT id::text, jsonb_build_object('id', id, 'title', title, 'done', done) FROM todos WHERE tenant_id = $1", &[&tenant])
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        let devices = device_rows(admin, tenant, "todo");
        let mut pulled: BTreeMap<String, Value> = BTreeMap::new();
        for (pk, value) in devices {
            let mut merged = json!({"id": pk, "done": false});
            merged.as_object_mut().unwrap().extend(value.as_object().unwrap().clone());
            pulled.insert(pk, merged);
        }
        assert_eq!(pulled, table, "{tenant}: what devices pull is what the table holds");
        assert_eq!(server_rows(admin, tenant, "todo").len(), table.len());
    }
    // Pulls inside a multi-statement transaction on the coordinator (each statement routed by Citus)
    // answer what delegated pulls answer.
    let delegated = serde_json::to_value(pull_all(admin, acme, 0, 3).unwrap().changes).unwrap();
    let mut transaction = admin.transaction().unwrap();
    let mut in_transaction = Vec::new();
    let mut cursor = 0_i64;
    loop {
        let page: Value = transaction.query_one("SELECT sync_pull('acme', $1, 3)", &[&cursor]).unwrap().get(0);
        in_transaction.extend(page["changes"].as_array().unwrap().iter().cloned());
        cursor = page["cursor"].as_i64().unwrap();
        if page["has_more"] == false {
            break;
        }
    }
    let packed: Vec<u8> = transaction.query_one("SELECT sync_pull_msgpack('acme', 0, 1000)", &[]).unwrap().get(0);
    transaction.commit().unwrap();
    assert_eq!(Value::from(in_transaction), delegated, "pages routed statement by statement equal the delegated ones");
    let packed: PullResponse = sync_ext_protocol::msgpack::decode(&packed).unwrap();
    assert_eq!(serde_json::to_value(packed.changes).unwrap(), delegated);

    // Tables Citus cannot serve as bound tables are refused at registration, saying what to do.
    admin.batch_execute("CREATE TABLE plain_notes (tenant_id text NOT NULL, id int NOT NULL, PRIMARY KEY (tenant_id, id))").unwrap();
    for (register, says) in [
        ("SELECT sync_register_model('plain_note', 'plain_notes', tenant_column => 'tenant_id')", "create_distributed_table('public.plain_notes', 'tenant_id'"),
        ("SELECT sync_register_model('acme_note', 'plain_notes', tenant => 'acme')", "a table bound to one tenant cannot be distributed by tenant"),
    ] {
        let error = admin.batch_execute(register).unwrap_err();
        let message = error.as_db_error().map(|db| db.message().to_owned()).unwrap_or_default();
        assert_eq!(sqlstate(&error).as_deref(), Some("0A000"), "{register}: {error:?}");
        assert!(message.contains(says), "{register}: {message}");
    }
    println!("bound table: pushes (delegated and in a transaction) and plain SQL on one and on two workers, each logged once; pulls in a transaction; undistributable tables refused");
}

/// Compaction through the coordinator, then a new device bootstraps by a reset equal to the server's rows.
fn compaction_and_reset(admin: &mut Client) {
    let tenant = tenant(1);
    push(admin, &tenant, &[change(Op::Delete, "note", "1-1", hlc_ago(0, 0), "device", Value::Null)]).unwrap();
    let compacted: Value = admin.query_one("SELECT sync_compact($1, '0 seconds')", &[&tenant]).unwrap().get(0);
    assert_eq!(compacted["tombstones"], 1, "{compacted}");
    assert_eq!(compacted["horizon"], 4, "{compacted}");
    let bootstrap = pull_all(admin, &tenant, 0, 1).unwrap();
    assert!(bootstrap.reset && bootstrap.cursor == 4, "a pull from 0 below the horizon is a paged reset ending at the last seq");
    assert_eq!(device_rows(admin, &tenant, "note"), server_rows(admin, &tenant, "note"));
    println!("compaction and reset: {compacted}");
}

/// A device login (not a superuser) syncs its granted tenant through the coordinator and nothing else.
fn grants_for_a_device(cluster: &CitusCluster, admin: &mut Client) {
    admin.batch_execute("CREATE ROLE device_1 LOGIN IN ROLE acme_devices").unwrap();
    let mut device = cluster.coordinator.connect_as("sync", "device_1");
    let pushed = push(&mut device, "acme", &[change(Op::Insert, "todo", &Uuid::new_v4().to_string(), hlc_ago(0, 0), "device_1", json!({"title": "mine"}))]).unwrap();
    assert!(matches!(pushed.results[0].status, Status::Applied { .. }), "{pushed:?}");
    assert!(pull(&mut device, "acme", 0, 100).is_ok());
    for call in ["SELECT sync_pull('tenant-00', 0)", "SELECT sync_pull_msgpack('tenant-00', 0)", "SELECT sync_compact('tenant-00')", "SELECT sync_distribute()"] {
        let error = device.batch_execute(call).unwrap_err();
        assert_eq!(sqlstate(&error).as_deref(), Some("42501"), "{call}: {error:?}");
    }
    let error = push(&mut device, "tenant-00", &[change(Op::Insert, "note", "x", hlc_ago(0, 0), "device_1", json!({}))]).unwrap_err();
    assert_eq!(sqlstate(&error).as_deref(), Some("42501"));
    let tenants: Vec<String> = device.query("SELECT DISTINCT tenant_id FROM sync_ext.op_log", &[]).unwrap().iter().map(|row| row.get(0)).collect();
    assert_eq!(tenants, ["acme"], "row-level security shows the device its tenant's log only");
    // The same device as an attacker: a schema of its own shadowing the names the engine reads (Citus's
    // catalog and the sync tables), temporary tables, connection options and SETs.
    admin.batch_execute("GRANT TEMPORARY ON DATABASE sync TO device_1; CREATE SCHEMA evil AUTHORIZATION device_1").unwrap();
    let mut attacker = cluster.coordinator.connect_with_options("sync", "device_1", "-c search_path=evil,public,pg_catalog -c citus.allow_nested_distributed_execution=on");
    attacker
        .batch_execute(
            "CREATE TABLE evil.pg_dist_partition (logicalrelid oid, partmethod char, colocationid int);
             CREATE TABLE evil.tenants (tenant_id text, last_seq bigint);
             CREATE TEMP TABLE op_log (tenant_id text, seq bigint);
             CREATE TEMP TABLE pg_dist_placement (shardid bigint, groupid int);
             SET citus.enable_ddl_propagation = off;",
        )
        .unwrap();
    let mine = push(&mut attacker, "acme", &[change(Op::Insert, "todo", &Uuid::new_v4().to_string(), hlc_ago(0, 0), "device_1", json!({"title": "still mine"}))]).unwrap();
    assert!(matches!(mine.results[0].status, Status::Applied { .. }), "{mine:?}");
    let page = pull_all(&mut attacker, "acme", 0, 100).unwrap();
    assert_eq!(page.changes.last().map(|c| c.seq), Some(mine.cursor), "the engine read its own tables, not the attacker's");
    for call in ["SELECT sync_pull('tenant-00', 0)", "SELECT sync_distribute()", "SELECT sync_grant_tenant('device_1', 'tenant-00')"] {
        let error = attacker.batch_execute(call).unwrap_err();
        assert_eq!(sqlstate(&error).as_deref(), Some("42501"), "{call}: {error:?}");
    }
    let shadowed: i64 = attacker.query_one("SELECT count(*) FROM evil.tenants", &[]).unwrap().get(0);
    assert_eq!(shadowed, 0, "nothing was written into the attacker's look-alike tables");
    println!("grants: a device role syncs acme and gets 42501 for another tenant through the coordinator, also with its own schema, TEMP and options");
}

/// A listener on the coordinator and one on each worker hear of pushes to tenants on either worker, made
/// when no notifier runs (each push's node starts one).
fn wakeups_reach_every_node(cluster: &CitusCluster, admin: &mut Client) {
    let mut listeners: Vec<Client> = std::iter::once(&cluster.coordinator).chain(&cluster.workers).map(|node| node.connect("sync")).collect();
    for listener in &mut listeners {
        listener.batch_execute("LISTEN sync_ext").unwrap();
    }
    // Every notifier has exited (idle): the pushes start them where they run.
    std::thread::sleep(Duration::from_secs(4));
    let woken: Vec<String> = (0..TENANTS).map(tenant).filter(|t| t != "tenant-01").take(4).collect();
    for tenant in &woken {
        push(admin, tenant, &[change(Op::Update, "note", "x", hlc_ago(0, 0), "device", json!({"wake": true}))]).unwrap();
    }
    let expected: BTreeSet<String> = woken.iter().cloned().collect();
    for (node, listener) in listeners.iter_mut().enumerate() {
        let mut heard = BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !expected.is_subset(&heard) && Instant::now() < deadline {
            let mut notifications = listener.notifications();
            let mut waiting = notifications.timeout_iter(Duration::from_millis(200));
            while let Ok(Some(notification)) = waiting.next() {
                heard.insert(notification.payload().to_owned());
            }
        }
        assert!(expected.is_subset(&heard), "node {node} heard {heard:?} of {expected:?}");
    }
    println!("wake-ups: listeners on the coordinator and both workers heard pushes to {woken:?}");
}

/// Moving a tenant's shard group to the other worker keeps its sync state: pulls before and after agree,
/// pushes made while it moves wait for it and are all kept, and seqs continue.
fn a_tenant_moves_to_the_other_worker(cluster: &CitusCluster, admin: &mut Client) {
    let from = cluster.node_of("sync_ext.tenants", "acme");
    let to = cluster.workers.iter().map(|w| w.port()).find(|&port| port != from).unwrap();
    let before = pull_all(admin, "acme", 0, 50).unwrap();
    let moving = Arc::new(AtomicBool::new(true));
    let pusher = {
        let (url, moving) = (cluster.coordinator.connection_string("sync"), moving.clone());
        std::thread::spawn(move || {
            let mut client = Client::connect(&url, NoTls).unwrap();
            let mut applied = Vec::new();
            while moving.load(Ordering::SeqCst) || applied.len() < 10 {
                let pushed = push(&mut client, "acme", &[change(Op::Insert, "note", &Uuid::new_v4().to_string(), hlc_ago(0, 0), "mover", json!({}))]).unwrap();
                applied.extend(pushed.results.iter().filter_map(|result| match result.status {
                    Status::Applied { seq } => Some(seq),
                    _ => None,
                }));
            }
            applied
        })
    };
    admin
        .execute(
            "SELECT citus_move_shard_placement(get_shard_id_for_distribution_column('sync_ext.tenants', 'acme'), '127.0.0.1', $1, '127.0.0.1', $2,
                                               shard_transfer_mode => 'block_writes')",
            &[&i32::from(from), &i32::from(to)],
        )
        .unwrap();
    moving.store(false, Ordering::SeqCst);
    let applied_while_moving = pusher.join().unwrap();
    assert_eq!(cluster.node_of("sync_ext.tenants", "acme"), to);
    assert_eq!(cluster.node_of("sync_ext.op_log", "acme"), to, "co-located shards move together");
    assert_eq!(cluster.node_of("todos", "acme"), to);
    let after = pull_all(admin, "acme", 0, 50).unwrap();
    assert_eq!(
        serde_json::to_value(&after.changes[..before.changes.len()]).unwrap(),
        serde_json::to_value(&before.changes).unwrap(),
        "the history from before the move is intact"
    );
    let later: Vec<i64> = after.changes[before.changes.len()..].iter().map(|c| c.seq).collect();
    assert_eq!(later, applied_while_moving, "every push acked during the move is there, in order, gap-free");
    assert_eq!(later, (before.cursor + 1..=after.cursor).collect::<Vec<_>>());
    let next = push(admin, "acme", &[change(Op::Update, "todo", &before.changes[0].pk, hlc_ago(0, 0), "phone", json!({"title": "moved"}))]).unwrap();
    assert_eq!(next.cursor, after.cursor + 1, "seqs continue on the new node");
    admin.batch_execute("UPDATE todos SET done = false WHERE tenant_id = 'acme'").unwrap();
    assert_eq!(device_rows(admin, "acme", "todo").len(), server_rows(admin, "acme", "todo").len());
    println!("shard move: acme from {from} to {to} with {} pushes acked during it; log, snapshots and bound rows intact, seqs continue", applied_while_moving.len());
}

/// A distributed install of 0.1.0 updated to this version: the scripts run on every node, the tables
/// added since are distributed by `sync_distribute()`, and the data and behaviour are kept.
#[test]
fn a_distributed_install_of_0_1_0_updates_to_this_version() {
    let cluster = CitusCluster::start(2);
    let mut admin = cluster.coordinator.connect("sync");
    admin
        .batch_execute(
            "CREATE EXTENSION sync_ext VERSION '0.1.0';
             SET citus.enable_unsafe_triggers = on;
             SELECT create_distributed_table('sync_ext.tenants', 'tenant_id');
             SELECT create_distributed_table('sync_ext.op_log', 'tenant_id', colocate_with => 'sync_ext.tenants');
             SELECT create_distributed_table('sync_ext.snapshots', 'tenant_id', colocate_with => 'sync_ext.tenants');
             SELECT create_reference_table('sync_ext.models');
             INSERT INTO sync_ext.tenants (tenant_id, last_seq, last_hlc) VALUES ('acme', 1, '2026-11-24T10:00:00.000Z-0000');
             INSERT INTO sync_ext.op_log (tenant_id, seq, op_id, model, pk, op, actor, hlc, updated_at, payload, payload_hash) VALUES
                 ('acme', 1, '00000000-0000-4000-8000-000000000001', 'note', '1', 'insert', 'phone', '2026-11-24T10:00:00.000Z-0000',
                  '2026-11-24 10:00:00+00', '{\"title\": \"before\"}', '');
             INSERT INTO sync_ext.snapshots (tenant_id, model, id, value, hlc, actor, op_id, deleted, deleted_hlc, field_stamps, seq) VALUES
                 ('acme', 'note', '1', '{\"title\": \"before\"}', '2026-11-24T10:00:00.000Z-0000', 'phone',
                  '00000000-0000-4000-8000-000000000001', false, NULL, '{}', 1);",
        )
        .unwrap();
    admin.batch_execute("ALTER EXTENSION sync_ext UPDATE; SELECT sync_distribute()").unwrap();
    let current: String = admin.query_one("SELECT default_version FROM pg_available_extensions WHERE name = 'sync_ext'", &[]).unwrap().get(0);
    for node in std::iter::once(&cluster.coordinator).chain(&cluster.workers) {
        let version: String = node.connect("sync").query_one("SELECT extversion FROM pg_extension WHERE extname = 'sync_ext'", &[]).unwrap().get(0);
        assert_eq!(version, current, "node {} runs the current version", node.port());
    }
    let reference: i64 = admin
        .query_one("SELECT count(*) FROM pg_dist_partition WHERE logicalrelid IN ('sync_ext.grants'::regclass, 'sync_ext.settings'::regclass) AND partmethod = 'n'", &[])
        .unwrap()
        .get(0);
    assert_eq!(reference, 2, "the tables added since 0.1.0 are distributed");
    let columns: i64 = admin
        .query_one("SELECT count(*) FROM run_command_on_shards('sync_ext.tenants', $$SELECT horizon + digest FROM %s LIMIT 1$$) WHERE success", &[])
        .unwrap()
        .get(0);
    assert!(columns > 0, "every shard of tenants has the columns added since 0.1.0");
    let pushed = push(&mut admin, "acme", &[change(Op::Update, "note", "1", hlc_ago(0, 0), "phone", json!({"title": "after"}))]).unwrap();
    assert_eq!(pushed.cursor, 2);
    let page = pull(&mut admin, "acme", 0, 10).unwrap();
    assert_eq!(page.changes.iter().map(|c| c.value.clone().unwrap()["title"].clone()).collect::<Vec<_>>(), [json!("before"), json!("after")]);
    let compacted: Value = admin.query_one("SELECT sync_compact('acme', '0 seconds')", &[]).unwrap().get(0);
    assert_eq!(compacted["horizon"], 1);
    println!("upgrade: a distributed 0.1.0 install updated to {current} on every node, new tables distributed, data kept");
}

/// Citus on one node (the coordinator holds every shard, so Citus runs shard queries in the calling
/// backend): capture of plain SQL, then a dump of the database restored into a new one and distributed
/// again as the README says, with every row and the capture triggers kept.
#[test]
fn a_single_node_cluster_captures_plain_sql_and_its_dump_restores_distributed() {
    let cluster = CitusCluster::start(0);
    let mut admin = cluster.coordinator.connect("sync");
    run_section(&mut admin, "### Citus");
    let id = |n: u32| Uuid::from_u128(0x0c6b_0000_0000_4000_8000_0000_0000_0000 + u128::from(n)).to_string();
    admin.batch_execute(&format!("INSERT INTO todos (tenant_id, id, title) VALUES ('acme', '{}', 'a'), ('globex', '{}', 'g')", id(1), id(2))).unwrap();
    admin.batch_execute("UPDATE todos SET done = true").unwrap();
    push(&mut admin, "acme", &[change(Op::Insert, "todo", &id(3), hlc_ago(0, 0), "phone", json!({"title": "pushed"}))]).unwrap();
    let logged: i64 = admin.query_one("SELECT count(*) FROM sync_ext.op_log WHERE model = 'todo'", &[]).unwrap().get(0);
    assert_eq!(logged, 5, "two captured inserts, two captured updates and a push, each logged once");
    let before = [device_rows(&mut admin, "acme", "todo"), device_rows(&mut admin, "globex", "todo")];

    let dump = cluster.coordinator.path("sync.dump");
    cluster.coordinator.run_tool("pg_dump", &["-d", "sync", "-Fc", "-f", dump.to_str().unwrap()]);
    cluster.coordinator.connect("postgres").batch_execute("CREATE DATABASE restored").unwrap();
    cluster.coordinator.run_tool("pg_restore", &["-d", "restored", dump.to_str().unwrap()]);
    let mut restored = cluster.coordinator.connect("restored");
    // One statement at a time, as psql sends them: Citus forwards some DDL as its whole query string.
    for statement in [
        "SELECT sync_distribute()",
        "SET citus.enable_unsafe_triggers = on",
        "ALTER TABLE todos DISABLE TRIGGER USER",
        "SELECT create_distributed_table('todos', 'tenant_id', colocate_with => 'sync_ext.tenants')",
        "SELECT truncate_local_data_after_distributing_table('todos')",
        "ALTER TABLE todos ENABLE TRIGGER USER",
    ] {
        restored.batch_execute(statement).unwrap_or_else(|error| panic!("{statement}: {error:?}"));
    }
    let after = [device_rows(&mut restored, "acme", "todo"), device_rows(&mut restored, "globex", "todo")];
    assert_eq!(after, before, "the restored and distributed database serves the same rows");
    restored.batch_execute("UPDATE todos SET title = 'after restore' WHERE tenant_id = 'globex'").unwrap();
    let refused = restored.batch_execute("TRUNCATE todos").unwrap_err();
    assert_eq!(sqlstate(&refused).as_deref(), Some("55000"), "the truncate guard is back");
    let globex = device_rows(&mut restored, "globex", "todo");
    assert_eq!(globex[&id(2)]["title"], "after restore", "capture works on the restored, distributed table");
    println!("single node: capture in the calling backend; pg_dump of the coordinator restored and distributed again");
}

/// A connection that synced before the tables were distributed keeps syncing after `sync_distribute()`
/// (its kept plans are planned again for the distributed tables, its tenants' rows moved to the shards,
/// their seqs continue), and devices through PgBouncer in transaction mode in front of the coordinator
/// sync many tenants.
#[test]
fn a_connection_from_before_distribution_and_a_pooler_keep_syncing() {
    let cluster = CitusCluster::start(2);
    let mut admin = cluster.coordinator.connect("sync");
    admin.batch_execute("CREATE EXTENSION sync_ext").unwrap();
    let mut long_lived = cluster.coordinator.connect("sync");
    let tenants = ["early-a", "early-b", "early-c", "early-d"];
    let write = |client: &mut Client, tenant: &str, n: i64| {
        push(client, tenant, &[change(Op::Insert, "note", &n.to_string(), hlc_ago(10_000 - n, 0), "device", json!({"n": n}))]).unwrap().cursor
    };
    for tenant in tenants {
        assert_eq!(write(&mut long_lived, tenant, 1), 1);
        assert_eq!(pull(&mut long_lived, tenant, 0, 10).unwrap().changes.len(), 1);
    }
    admin.batch_execute("SELECT sync_distribute(); ANALYZE").unwrap();
    let nodes: BTreeSet<u16> = tenants.iter().map(|tenant| cluster.node_of("sync_ext.tenants", tenant)).collect();
    assert_eq!(nodes.len(), 2, "the tenants are spread over both workers");
    for tenant in tenants {
        assert_eq!(write(&mut long_lived, tenant, 2), 2, "{tenant}: the seqs continue after distribution");
        let all = pull_all(&mut long_lived, tenant, 0, 1).unwrap();
        assert_eq!(all.changes.iter().map(|c| c.seq).collect::<Vec<_>>(), [1, 2], "{tenant}");
    }

    // Through PgBouncer (transaction mode): simple queries only, as a pooled client without named statements.
    let bouncer = cluster.coordinator.start_pgbouncer();
    let mut pooled = Client::connect(&bouncer.connection_string("sync"), NoTls).unwrap();
    for n in 0..TENANTS {
        let tenant = format!("pooled-{n}");
        let body = serde_json::to_string(&(0..=n).map(|i| change(Op::Insert, "note", &i.to_string(), hlc_ago(5_000, 0), "device", json!({"i": i}))).collect::<Vec<_>>()).unwrap();
        pooled.batch_execute(&format!("SELECT sync_push('{tenant}', '{}')", body.replace('\'', "''"))).unwrap();
        let rows = pooled.simple_query(&format!("SELECT jsonb_array_length(sync_pull('{tenant}', 0)->'changes')")).unwrap();
        let pulled = rows.iter().find_map(|message| match message {
            postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        });
        assert_eq!(pulled, Some((n + 1).to_string()), "{tenant}: tenants of sizes 1 to {TENANTS} through the pooler");
    }
    println!("a connection from before distribution syncs on; {TENANTS} tenants of sizes 1 to {TENANTS} through PgBouncer");
}

/// Scoped pulls through the coordinator, on a tenant of each worker: a reset of one instance, a row moving
/// in (whole) and one moving out (`leave`), per-instance digests equal to the kept ones, the per-scope
/// counts, and a device holding only a scope grant.
fn scoped_pulls(cluster: &CitusCluster, admin: &mut Client) {
    admin.batch_execute("SELECT sync_define_scope('project', 'task', 'project')").unwrap();
    let first = cluster.node_of("sync_ext.tenants", &tenant(0));
    let other = (1..TENANTS).find(|&n| cluster.node_of("sync_ext.tenants", &tenant(n)) != first).expect("a tenant on the other worker");
    for tenant in [tenant(0), tenant(other)] {
        let task = |pk: &str, ago: i64, value: Value| change(Op::Update, "task", pk, hlc_ago(ago, 0), "device", value);
        push(admin, &tenant, &[task("a", 9_000, json!({"project": 1, "title": "a"})), task("b", 9_000, json!({"project": 2, "title": "b"})), task("c", 9_000, json!({"title": "c"}))])
            .unwrap();
        let bootstrap = pull_scoped(admin, &tenant, 0, 100, &["project:1"]).unwrap();
        assert!(bootstrap.reset, "{tenant}: a scoped pull from 0 is a reset of the instance");
        let pks: Vec<&str> = bootstrap.changes.iter().filter(|c| c.model == "task").map(|c| c.pk.as_str()).collect();
        assert_eq!(pks, ["a"], "{tenant}: only the instance's row");
        push(admin, &tenant, &[task("b", 8_000, json!({"done": true})), task("b", 7_000, json!({"project": 1})), task("a", 7_000, json!({"project": 3}))]).unwrap();
        let next = pull_scoped(admin, &tenant, bootstrap.cursor, 100, &["project:1"]).unwrap();
        let moves: Vec<(&str, Op, bool)> = next.changes.iter().map(|c| (c.pk.as_str(), c.op, c.is_whole_row())).collect();
        assert_eq!(moves, [("b", Op::Insert, true), ("a", Op::Leave, false)], "{tenant}: b moves in whole, a leaves");
        assert_eq!(next.changes[0].value.as_ref().unwrap()["done"], true, "{tenant}: the moved-in row carries the field written before the move");
        let kept: String = admin
            .query_one("SELECT lpad(to_hex(digest), 16, '0') FROM sync_ext.scope_digests WHERE tenant_id = $1 AND instance = 'project:1'", &[&tenant])
            .unwrap()
            .get(0);
        assert_eq!(next.digests.as_ref().and_then(|d| d.get("project:1")), Some(&kept), "{tenant}: the instance's digest is the kept one");
        let counted: i64 = admin.query_one("SELECT rows FROM sync_ext.scope_stats WHERE tenant_id = $1 AND instance = 'project:1'", &[&tenant]).unwrap().get(0);
        assert_eq!(counted, 1, "{tenant}: scope_stats counts the instance's rows on the shards");
    }
    admin.batch_execute(&format!("CREATE ROLE scoped_device LOGIN; SELECT sync_grant_scope('scoped_device', '{}', 'project:1')", tenant(0))).unwrap();
    let mut device = cluster.coordinator.connect_as("sync", "scoped_device");
    let page = pull_scoped(&mut device, &tenant(0), 0, 100, &["project:1"]).expect("a granted instance");
    let rows: Vec<(&str, Op)> = page.changes.iter().filter(|c| c.model == "task").map(|c| (c.pk.as_str(), c.op)).collect();
    assert_eq!(rows, [("b", Op::Insert), ("a", Op::Leave)], "the instance's row, and a leave for the row whose last change took it out");
    for error in [pull(&mut device, &tenant(0), 0, 100).unwrap_err(), pull_scoped(&mut device, &tenant(0), 0, 100, &["project:2"]).unwrap_err()] {
        assert_eq!(sqlstate(&error).as_deref(), Some("42501"), "{error:?}");
    }
    let escape = push(&mut device, &tenant(0), &[change(Op::Update, "task", "b", hlc_ago(0, 0), "scoped_device", json!({"project": 2}))]).unwrap();
    assert!(matches!(&escape.results[0].status, Status::Rejected { reason, .. } if reason == "out_of_scope"), "{escape:?}");
    // The revocation reaches the node the device's calls already run on (whose backend kept the grants).
    admin.batch_execute(&format!("SELECT sync_revoke_scope('scoped_device', '{}', 'project:1')", tenant(0))).unwrap();
    let revoked = pull_scoped(&mut device, &tenant(0), 0, 100, &["project:1"]).unwrap_err();
    assert_eq!(sqlstate(&revoked).as_deref(), Some("42501"), "{revoked:?}");
    println!("scoped pulls: reset, move-in, leave, digests and scope_stats on both workers; a scope-only device through the coordinator, then revoked");
}
