//! Faults: a backend killed mid-push, a server restarted under syncing clients, a bad change in a
//! large batch. Nothing acknowledged is lost, nothing is applied half, nothing is doubled.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use postgres::{Client, NoTls};
use serde_json::{json, Map, Value};
use sync_ext_client::{LocalStore, PgRemote, SyncClient};
use sync_ext_pgrx_tests::{change, hlc_ago, push, Cluster};
use sync_ext_protocol::{Change, Op, Status};

type Row = Map<String, Value>;

/// Waits until the cluster serves queries again (after crash recovery or a restart: a connection made
/// while the postmaster is still resetting is closed under it).
fn reconnect(url: &str) -> Client {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match Client::connect(url, NoTls).and_then(|mut client| client.simple_query("SELECT 1").map(|_| client)) {
            Ok(client) => return client,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(error) => panic!("the server did not come back: {error}"),
        }
    }
}

fn count(client: &mut Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).unwrap().get(0)
}

#[test]
fn a_backend_killed_mid_push_leaves_nothing_partial_and_the_re_push_applies_once() {
    let cluster = Cluster::start();
    let url = cluster.create_database("sync");
    let mut setup = Client::connect(&url, NoTls).unwrap();
    setup
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, tenant_id text NOT NULL, body text);
             CREATE FUNCTION slow_down() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.001); RETURN NEW; END $$;
             CREATE TRIGGER slow_down BEFORE INSERT ON items FOR EACH ROW EXECUTE FUNCTION slow_down();
             SELECT sync_register_model('item', 'items', tenant_column => 'tenant_id');",
        )
        .unwrap();
    let batch: Vec<Change> = (0..2_000).map(|n| change(Op::Insert, "item", &n.to_string(), hlc_ago(60_000, 0), "device", json!({"body": "x".repeat(100)}))).collect();

    let mut victim = Client::connect(&url, NoTls).unwrap();
    let pid: i32 = victim.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let pushing = {
        let batch = batch.clone();
        std::thread::spawn(move || push(&mut victim, "acme", &batch).map(|_| ()))
    };
    let started = Instant::now();
    while count(&mut setup, "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT sync_push%' AND state = 'active'") == 0 {
        assert!(started.elapsed() < Duration::from_secs(10), "the push did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(500));
    let killed = Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    assert!(killed.success());
    assert!(pushing.join().unwrap().is_err(), "the killed push reports an error to its client");
    // The postmaster notices the crash and resets every backend; let it begin before reconnecting.
    std::thread::sleep(Duration::from_millis(300));
    let mut client = reconnect(&url);
    assert_eq!(count(&mut client, "SELECT count(*) FROM items"), 0, "no row of the killed push survived");
    assert_eq!(count(&mut client, "SELECT count(*) FROM sync_ext.op_log"), 0);
    assert_eq!(count(&mut client, "SELECT count(*) FROM sync_ext.snapshots"), 0);

    let first = push(&mut client, "acme", &batch).unwrap();
    assert!(first.results.iter().all(|r| matches!(r.status, Status::Applied { .. })));
    let again = push(&mut client, "acme", &batch).unwrap();
    assert!(again.results.iter().all(|r| matches!(r.status, Status::Duplicate { .. })), "a second re-push changes nothing");
    assert_eq!(count(&mut client, "SELECT count(*) FROM items"), 2_000);
    assert_eq!(count(&mut client, "SELECT count(DISTINCT op_id) FROM sync_ext.op_log"), 2_000);
    assert_eq!(count(&mut client, "SELECT max(seq) FROM sync_ext.op_log"), 2_000, "seqs are gap-free after the crash");
}

#[test]
fn clients_syncing_through_a_server_restart_converge_and_lose_no_write() {
    let cluster = Cluster::start();
    let url = cluster.create_database("sync");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let device = |name: &str| SyncClient::builder().tenant("acme").actor(name).local(LocalStore::memory()).remote(PgRemote::new(&url)).build().unwrap();
    let (phone, laptop) = (device("phone"), device("laptop"));
    let mut failures = 0;
    std::thread::scope(|scope| {
        let restarter = scope.spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            cluster.restart();
        });
        runtime.block_on(async {
            for round in 0..40 {
                phone.insert("todo", &format!("p{round}"), &json!({"round": round})).unwrap();
                laptop.insert("todo", &format!("l{round}"), &json!({"round": round})).unwrap();
                laptop.update("todo", "shared", &json!({"last": format!("laptop {round}")})).unwrap();
                for client in [&phone, &laptop] {
                    if client.sync().await.is_err() {
                        failures += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        restarter.join().unwrap();
    });
    assert!(failures > 0, "syncs failed while the server was down");
    runtime.block_on(async {
        for client in [&phone, &laptop, &phone] {
            let deadline = Instant::now() + Duration::from_secs(30);
            while let Err(error) = client.sync().await {
                assert!(Instant::now() < deadline, "sync did not recover: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let rows = |client: &SyncClient<PgRemote>| -> BTreeMap<String, Row> { client.list::<Row>("todo").unwrap().into_iter().collect() };
    assert_eq!(rows(&phone), rows(&laptop), "the replicas converge");
    assert_eq!(rows(&phone).len(), 81, "every write of both devices survived: 40 + 40 rows and the shared one");
    assert_eq!((phone.pending().unwrap(), laptop.pending().unwrap()), (0, 0));
    let mut sql = Client::connect(&url, NoTls).unwrap();
    assert_eq!(count(&mut sql, "SELECT count(*) FROM sync_ext.snapshots WHERE NOT deleted"), 81);
}

#[test]
fn a_rejected_change_in_the_middle_of_a_large_push_does_not_stop_the_rest() {
    let cluster = Cluster::start();
    cluster.create_database("sync");
    let mut client = cluster.connect("sync");
    let mut batch: Vec<Change> = (0..1_000).map(|n| change(Op::Insert, "todo", &n.to_string(), hlc_ago(1_000, 0), "device", json!({"n": n}))).collect();
    batch[500].hlc = hlc_ago(-3_600_000, 0);
    let response = push(&mut client, "acme", &batch).unwrap();
    let rejected: Vec<usize> = response.results.iter().enumerate().filter(|(_, r)| !matches!(r.status, Status::Applied { .. })).map(|(i, _)| i).collect();
    assert_eq!(rejected, [500]);
    assert!(matches!(&response.results[500].status, Status::Rejected { reason } if reason == "clock_skew"));
    assert_eq!(response.cursor, 999);
}
