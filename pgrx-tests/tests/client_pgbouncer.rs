//! The client crate through PgBouncer in transaction mode: every call is one unnamed statement, so
//! twenty clients sharing a handful of server connections push and pull without a lost or doubled
//! change, and LISTEN goes to a direct connection.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};
use sync_ext_client::{LiveOptions, LiveState, LocalStore, PgRemote, SyncClient, Wakeups};
use sync_ext_pgrx_tests::Cluster;

type Row = Map<String, Value>;

const CLIENTS: usize = 20;
const ROUNDS: usize = 3;

fn rows(client: &SyncClient<PgRemote>) -> BTreeMap<String, Row> {
    client.list::<Row>("todo").expect("local rows").into_iter().collect()
}

#[test]
fn twenty_clients_through_pgbouncer_in_transaction_mode_all_arrive_and_converge() {
    let cluster = Cluster::start();
    let direct = cluster.create_database("sync");
    let bouncer = cluster.start_pgbouncer();
    let pooled = bouncer.connection_string("sync");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let device = |name: String| {
        Arc::new(SyncClient::builder().tenant("acme").actor(name).local(LocalStore::memory()).remote(PgRemote::new(&pooled)).build().unwrap())
    };
    let clients: Vec<_> = (0..CLIENTS).map(|n| device(format!("device-{n:02}"))).collect();
    let watcher = device("watcher".into());
    let polling = device("polling".into());

    runtime.block_on(async {
        // One live client listens on a direct connection (a transaction-mode pooler cannot hold a
        // LISTEN); another has none, and its status says wake-ups are unavailable.
        let watching = watcher.clone().live(LiveOptions { listen_url: Some(direct.clone()), ..LiveOptions::default() });
        let polled = polling.clone().live(LiveOptions::default());
        let tasks: Vec<_> = clients
            .iter()
            .enumerate()
            .map(|(n, client)| {
                let client = client.clone();
                tokio::spawn(async move {
                    for round in 0..ROUNDS {
                        client.insert("todo", &format!("{n:02}-{round}"), &json!({"by": n, "round": round})).unwrap();
                        client.update("todo", "shared", &json!({format!("field-{n:02}"): round})).unwrap();
                        client.sync().await.unwrap_or_else(|error| panic!("client {n} round {round}: {error}"));
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("a client task");
        }
        for client in clients.iter().chain(clients.iter()) {
            client.sync().await.unwrap();
        }

        let expected = rows(&clients[0]);
        assert_eq!(expected.len(), CLIENTS * ROUNDS + 1, "every insert arrived");
        assert_eq!(expected["shared"].len(), CLIENTS, "every client's field of the shared row arrived");
        assert!(expected["shared"].values().all(|value| *value == json!(ROUNDS - 1)), "each field holds its client's last write");
        for (n, client) in clients.iter().enumerate() {
            assert_eq!(rows(client), expected, "client {n} converged");
            assert_eq!(client.pending().unwrap(), 0);
        }

        let status = watcher.status();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while rows(&watcher) != expected {
            assert!(tokio::time::Instant::now() < deadline, "the listening client did not catch up within 30 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(matches!(&status.borrow().live, LiveState::Running { wakeups: Wakeups::Listening, halted: false }), "{:?}", status.borrow().live);
        assert!(
            matches!(&polling.status().borrow().live, LiveState::Running { wakeups: Wakeups::Unavailable { .. }, .. }),
            "{:?}",
            polling.status().borrow().live
        );
        watching.stop().await;
        polled.stop().await;
    });

    let logged: i64 = cluster.connect("sync").query_one("SELECT count(*) FROM sync_ext.op_log", &[]).unwrap().get(0);
    let distinct: i64 = cluster.connect("sync").query_one("SELECT count(DISTINCT op_id) FROM sync_ext.op_log", &[]).unwrap().get(0);
    assert_eq!(logged, distinct, "no change logged twice");
    let server_connections = bouncer.log().matches("new connection to server").count();
    assert!((1..=5).contains(&server_connections), "{} clients shared at most the pool's 5 server connections: {server_connections}", CLIENTS + 2);
}
