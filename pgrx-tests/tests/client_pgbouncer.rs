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

/// Devices holding one project each, through the pooler: each writes tasks into its project and moves one
/// into the next project; after the syncs every device holds exactly the server's tasks of its project,
/// its instance digests match, and a subscription made through the pooler bootstraps only the new instance.
#[test]
fn scoped_devices_through_pgbouncer_hold_their_instances_rows_as_rows_move() {
    const PROJECTS: usize = 3;
    let cluster = Cluster::start();
    cluster.create_database("sync");
    cluster.connect("sync").batch_execute("SELECT sync_define_scope('project', 'task', 'project_id')").unwrap();
    let bouncer = cluster.start_pgbouncer();
    let pooled = bouncer.connection_string("sync");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let devices: Vec<(usize, SyncClient<PgRemote>)> = (0..2 * PROJECTS)
        .map(|n| {
            let project = n % PROJECTS;
            let builder = SyncClient::builder().tenant("acme").actor(format!("device-{n}")).local(LocalStore::memory()).remote(PgRemote::new(&pooled));
            (project, builder.scopes([format!("project:{project}")]).pull_page(3).build().unwrap())
        })
        .collect();
    let tasks = |client: &SyncClient<PgRemote>| -> BTreeMap<String, Row> { client.list::<Row>("task").expect("local rows").into_iter().collect() };
    let server_tasks = |project: usize| -> BTreeMap<String, Row> {
        sync_ext_pgrx_tests::server_rows(&cluster, "acme", "task").into_iter().filter(|(_, row)| row["project_id"] == json!(project)).collect()
    };
    runtime.block_on(async {
        for (n, (project, device)) in devices.iter().enumerate() {
            for i in 0..3 {
                device.insert("task", &format!("{n}-{i}"), &json!({"project_id": project, "title": format!("task {i} of device {n}")})).unwrap();
            }
            device.sync().await.unwrap();
        }
        for (n, (project, device)) in devices.iter().enumerate() {
            device.update("task", &format!("{n}-0"), &json!({"project_id": (project + 1) % PROJECTS})).unwrap();
            device.sync().await.unwrap();
        }
        for (project, device) in devices.iter().chain(devices.iter()) {
            let report = device.sync().await.unwrap();
            assert!(!report.repaired, "project {project}: the instance digests matched");
        }
        for (n, (project, device)) in devices.iter().enumerate() {
            let expected = server_tasks(*project);
            assert_eq!(expected.len(), 6, "project {project}: 2 devices x 3 tasks, one moved out, one moved in");
            assert_eq!(tasks(device), expected, "device {n} holds its project's tasks");
            assert_eq!(device.pending().unwrap(), 0);
        }
        let (_, first) = &devices[0];
        first.subscribe(["project:1"]).await.unwrap();
        let mut both = server_tasks(0);
        both.extend(server_tasks(1));
        assert_eq!(tasks(first), both, "a subscription through the pooler adds the new instance's rows");
    });
    let server_connections = bouncer.log().matches("new connection to server").count();
    assert!((1..=5).contains(&server_connections), "the devices shared the pool's server connections: {server_connections}");
}
