//! The client crate against a real Postgres with sync_ext: convergence, interrupted syncs,
//! rejections, offline writes, live wake-ups, and random interleavings of three replicas.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Map, Value};
use sync_ext_client::protocol::{Change, Op, PullResponse, PushResponse};
use sync_ext_client::{Error, LiveOptions, LocalStore, PgRemote, Remote, RemoteFuture, SyncClient};
use sync_ext_pgrx_tests::{execute, off_runtime, server_rows, sync_cluster, Cluster};

type Row = Map<String, Value>;

fn client<R: Remote>(tenant: &str, actor: &str, store: LocalStore, remote: R) -> SyncClient<R> {
    SyncClient::builder().tenant(tenant).actor(actor).local(store).remote(remote).build().expect("client builds")
}

fn rows(client: &SyncClient<impl Remote>, model: &str) -> BTreeMap<String, Row> {
    client.list::<Row>(model).expect("local rows").into_iter().collect()
}

/// A single bigint from a query on the `sync` database.
fn count(cluster: &Cluster, sql: &str) -> i64 {
    off_runtime(|| cluster.connect("sync").query_one(sql, &[]).expect("query runs").get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_converge_after_concurrent_offline_edits() {
    let (cluster, url) = sync_cluster();
    let dir = tempfile::tempdir().unwrap();
    let phone = client("acme", "phone", LocalStore::sqlite(dir.path().join("phone.db")).unwrap(), PgRemote::new(&url));
    let laptop = client("acme", "laptop", LocalStore::memory(), PgRemote::new(&url));

    phone.insert("todo", "1", &json!({"title": "milk", "done": false, "note": ""})).unwrap();
    phone.sync().await.unwrap();
    laptop.sync().await.unwrap();
    assert_eq!(rows(&laptop, "todo")["1"]["title"], "milk");

    // Offline on both: different fields of row 1, the same field of row 1, a new row, a delete.
    phone.update("todo", "1", &json!({"title": "oat milk", "note": "from the phone"})).unwrap();
    laptop.insert("todo", "2", &json!({"title": "eggs"})).unwrap();
    laptop.update("todo", "1", &json!({"done": true, "note": "from the laptop"})).unwrap();
    phone.delete("todo", "2").unwrap();
    assert_eq!(rows(&phone, "todo")["1"]["done"], false, "local reads see local writes only");

    phone.sync().await.unwrap();
    laptop.sync().await.unwrap();
    phone.sync().await.unwrap();
    let expected = server_rows(&cluster, "acme", "todo");
    assert_eq!(rows(&phone, "todo"), expected);
    assert_eq!(rows(&laptop, "todo"), expected);
    assert_eq!(
        Value::Object(expected["1"].clone()),
        json!({"title": "oat milk", "done": true, "note": "from the laptop"}),
        "both offline edits kept; the later write of `note` wins"
    );
    assert!(!expected.contains_key("2"), "the phone's delete came after the laptop's insert, so it wins everywhere");
}

/// A remote whose next push reaches the server but whose answer is lost, as when the connection
/// drops between the commit and the acknowledgement.
struct LosesNextAck {
    inner: PgRemote,
    lose: AtomicBool,
}

impl Remote for LosesNextAck {
    fn push<'a>(&'a self, tenant: &'a str, changes: &'a [Change]) -> RemoteFuture<'a, PushResponse> {
        Box::pin(async move {
            let response = self.inner.push(tenant, changes).await?;
            if self.lose.swap(false, Ordering::SeqCst) {
                return Err(Error::connection("connection reset before the acknowledgement", None));
            }
            Ok(response)
        })
    }

    fn pull<'a>(&'a self, tenant: &'a str, since: i64, max_changes: i32, scopes: Option<&'a [String]>) -> RemoteFuture<'a, PullResponse> {
        self.inner.pull(tenant, since, max_changes, scopes)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_interrupted_between_push_and_ack_loses_and_doubles_nothing() {
    let (cluster, url) = sync_cluster();
    let remote = LosesNextAck { inner: PgRemote::new(&url), lose: AtomicBool::new(true) };
    let phone = client("acme", "phone", LocalStore::memory(), remote);
    for n in 0..5 {
        phone.insert("todo", &n.to_string(), &json!({"n": n})).unwrap();
    }
    assert!(matches!(phone.sync().await, Err(Error::Connection { .. })));
    assert_eq!(phone.pending().unwrap(), 5, "unacknowledged changes stay in the outbox");
    let report = phone.sync().await.unwrap();
    assert_eq!((report.pushed, report.rejected.len(), phone.pending().unwrap()), (5, 0, 0));
    let logged = count(&cluster, "SELECT count(DISTINCT op_id) FROM sync_ext.op_log");
    let total = count(&cluster, "SELECT count(*) FROM sync_ext.op_log");
    assert_eq!((logged, total), (5, 5), "each change logged exactly once");
    assert_eq!(rows(&phone, "todo"), server_rows(&cluster, "acme", "todo"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_change_is_surfaced_and_its_row_restored() {
    let (cluster, url) = sync_cluster();
    execute(
        &cluster,
        "CREATE TABLE todos (id int PRIMARY KEY, tenant_id text NOT NULL, title text NOT NULL, priority numeric(4,2));
         SELECT sync_register_model('todo', 'todos', tenant_column => 'tenant_id');",
    );
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    let phone = SyncClient::builder()
        .tenant("acme")
        .actor("phone")
        .local(LocalStore::memory())
        .remote(PgRemote::new(&url))
        .on_rejected(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
        })
        .build()
        .unwrap();
    phone.insert("todo", "1", &json!({"title": "milk", "priority": "3.5"})).unwrap();
    phone.sync().await.unwrap();
    assert_eq!(rows(&phone, "todo")["1"]["priority"], "3.50", "the server's form comes back");

    phone.update("todo", "1", &json!({"priority": "abc", "title": "oat milk"})).unwrap();
    phone.update("todo", "1", &json!({"title": "soy milk"})).unwrap();
    assert_eq!(rows(&phone, "todo")["1"]["priority"], "abc");
    let report = phone.sync().await.unwrap();
    assert_eq!(report.rejected.len(), 1);
    assert!(report.rejected[0].reason.contains("\"priority\""), "{}", report.rejected[0].reason);
    assert_eq!(seen.load(Ordering::SeqCst), 1, "the callback ran");
    assert_eq!(phone.pending().unwrap(), 0, "a rejected change leaves the outbox: it cannot stall sync");
    assert_eq!(Value::Object(rows(&phone, "todo")["1"].clone()), json!({"id": 1, "title": "soy milk", "priority": "3.50"}));
    assert_eq!(rows(&phone, "todo"), server_rows(&cluster, "acme", "todo"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_leaves_local_writes_intact_until_it_is_back() {
    let (cluster, url) = sync_cluster();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("offline.db");
    {
        let offline = client("acme", "phone", LocalStore::sqlite(&path).unwrap(), PgRemote::new("host=127.0.0.1 port=1 user=postgres connect_timeout=2"));
        offline.insert("todo", "1", &json!({"title": "written offline"})).unwrap();
        let error = offline.sync().await.unwrap_err();
        assert!(matches!(error, Error::Connection { .. }) && error.is_transient(), "{error}");
        assert_eq!(offline.pending().unwrap(), 1);
        assert_eq!(rows(&offline, "todo")["1"]["title"], "written offline");
    }
    let reopened = client("acme", "phone", LocalStore::sqlite(&path).unwrap(), PgRemote::new(&url));
    assert_eq!(reopened.pending().unwrap(), 1, "the outbox survived the restart");
    reopened.sync().await.unwrap();
    assert_eq!(reopened.pending().unwrap(), 0);
    assert_eq!(server_rows(&cluster, "acme", "todo")["1"]["title"], "written offline");
    let other_tenant = SyncClient::builder().tenant("globex").actor("phone").local(LocalStore::sqlite(&path).unwrap()).remote(PgRemote::new(&url)).build();
    assert!(matches!(other_tenant, Err(Error::Config { .. })), "a store is bound to its tenant");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_wakes_a_live_client_within_a_second_of_another_push() {
    let (_cluster, url) = sync_cluster();
    let writer = client("acme", "writer", LocalStore::memory(), PgRemote::new(&url));
    let reader = Arc::new(client("acme", "reader", LocalStore::memory(), PgRemote::new(&url)));
    let options = LiveOptions { listen_url: Some(url.clone()), interval: Duration::from_secs(60), ..LiveOptions::default() };
    let live = reader.clone().live(options);
    tokio::time::sleep(Duration::from_millis(500)).await;

    writer.insert("todo", "1", &json!({"title": "ping"})).unwrap();
    let pushed = Instant::now();
    writer.sync().await.unwrap();
    while reader.get::<Row>("todo", "1").unwrap().is_none() {
        assert!(pushed.elapsed() < Duration::from_secs(1), "not woken within a second");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let waited = pushed.elapsed();
    live.stop().await;
    println!("live client saw the push {waited:?} after it started");
}

/// One step of the random schedule: a client writes, or syncs.
#[derive(Clone, Debug)]
enum Step {
    Write { client: usize, op: Op, pk: u8, field: &'static str, value: i32 },
    Sync { client: usize },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..3usize, prop_oneof![Just(Op::Insert), Just(Op::Update), Just(Op::Delete)], 0..3u8, prop_oneof![Just("a"), Just("b")], any::<i32>())
            .prop_map(|(client, op, pk, field, value)| Step::Write { client, op, pk, field, value }),
        1 => (0..3usize).prop_map(|client| Step::Sync { client }),
    ]
}

#[test]
fn three_replicas_under_random_edits_and_syncs_end_identical_to_the_server() {
    let cluster = Cluster::start();
    let url = cluster.create_database("sync");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let case = AtomicUsize::new(0);
    let mut runner = TestRunner::new(Config { cases: 24, ..Config::default() });
    runner
        .run(&proptest::collection::vec(step(), 1..40), |steps| {
            let tenant = format!("case-{}", case.fetch_add(1, Ordering::SeqCst));
            let replicas: Vec<_> = (0..3).map(|i| client(&tenant, &format!("device-{i}"), LocalStore::memory(), PgRemote::new(&url))).collect();
            runtime.block_on(async {
                for step in &steps {
                    match step {
                        Step::Write { client, op, pk, field, value } => {
                            let value = (*op != Op::Delete).then(|| json!({*field: value}).as_object().cloned().unwrap());
                            replicas[*client].apply_change("todo", &pk.to_string(), *op, value).unwrap();
                        }
                        Step::Sync { client } => {
                            replicas[*client].sync().await.unwrap();
                        }
                    }
                }
                for replica in replicas.iter().chain(replicas.iter()) {
                    replica.sync().await.unwrap();
                }
            });
            let expected = server_rows(&cluster, &tenant, "todo");
            for replica in &replicas {
                prop_assert_eq!(rows(replica, "todo"), expected.clone());
            }
            Ok(())
        })
        .expect("replicas converge");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_converge_across_compaction_even_one_that_slept_past_the_horizon() {
    let (cluster, url) = sync_cluster();
    let replica = |actor: &str| client("acme", actor, LocalStore::memory(), PgRemote::new(&url));
    let (a, b, sleeper) = (replica("a"), replica("b"), replica("sleeper"));
    let kept_insert = a.insert("todo", "kept", &json!({"title": "kept", "n": 1})).unwrap();
    a.insert("todo", "doomed", &json!({"title": "doomed"})).unwrap();
    a.insert("todo", "gone", &json!({"title": "gone"})).unwrap();
    a.sync().await.unwrap();
    sleeper.sync().await.unwrap();
    a.delete("todo", "gone").unwrap();
    a.sync().await.unwrap();
    sleeper.sync().await.unwrap();
    assert!(!rows(&sleeper, "todo").contains_key("gone"), "the sleeper holds gone's tombstone");

    // Offline, the sleeper edits a row that is deleted later elsewhere, and a row others keep editing.
    sleeper.update("todo", "doomed", &json!({"title": "edited before its delete"})).unwrap();
    sleeper.update("todo", "kept", &json!({"n": 2})).unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    b.sync().await.unwrap();
    b.delete("todo", "doomed").unwrap();
    b.update("todo", "kept", &json!({"n": 3})).unwrap();
    b.sync().await.unwrap();
    a.sync().await.unwrap();
    let compacted: Value = off_runtime(|| cluster.connect("sync").query_one("SELECT sync_compact('acme', '0 seconds')", &[]).unwrap().get(0));
    assert!(compacted["tombstones"].as_i64().unwrap() >= 2, "the tombstones of gone and doomed were compacted: {compacted}");

    // Its log gone, re-sending a compacted change changes nothing, whatever its payload.
    let fingerprint = || count(&cluster, "SELECT sum(hashtext(s::text)) FROM sync_ext.snapshots AS s") + count(&cluster, "SELECT max(seq) FROM sync_ext.op_log");
    let before = fingerprint();
    let mut conflicting = kept_insert.clone();
    conflicting.value = Some(json!({"title": "another payload"}).as_object().cloned().unwrap());
    let resent = off_runtime(|| sync_ext_pgrx_tests::push(&mut cluster.connect("sync"), "acme", &[kept_insert, conflicting]).unwrap());
    assert!(
        resent.results.iter().all(|result| result.status == sync_ext_client::protocol::Status::Rejected { reason: "stale".into() }),
        "{resent:?}"
    );
    let report = sleeper.sync().await.unwrap();
    let reasons: Vec<&str> = report.rejected.iter().map(|rejection| rejection.reason.as_str()).collect();
    assert_eq!(reasons, ["stale", "stale"], "both offline edits were made before the compaction horizon");
    assert_eq!(fingerprint(), before, "the stale changes changed nothing on the server");

    let fresh = replica("fresh");
    fresh.sync().await.unwrap();
    for replica in [&a, &b] {
        replica.sync().await.unwrap();
    }
    let server = server_rows(&cluster, "acme", "todo");
    assert_eq!(server.keys().collect::<Vec<_>>(), ["kept"]);
    for (name, replica) in [("a", &a), ("b", &b), ("sleeper", &sleeper), ("fresh", &fresh)] {
        assert_eq!(rows(replica, "todo"), server, "replica {name} holds the server's rows");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_the_server_cannot_store_is_refused_locally_and_never_stalls_the_outbox() {
    let (_cluster, url) = sync_cluster();
    let device = client("acme", "device", LocalStore::memory(), PgRemote::new(&url));
    let nul = device.insert("todo", "1", &json!({"title": "a\u{0}b"})).unwrap_err();
    assert!(matches!(&nul, Error::Unstorable(reason) if reason.starts_with("invalid_text: change.value.title")), "{nul}");
    assert_eq!(device.pending().unwrap(), 0, "nothing was recorded");

    // Before the first push the client does not know the server's limits: the server refuses the change
    // alone, the rest goes through, and from then on the client refuses such values itself.
    let big = json!({"title": "x".repeat(2 * 1024 * 1024)});
    device.insert("todo", "2", &big).unwrap();
    device.insert("todo", "3", &json!({"title": "small"})).unwrap();
    let report = device.sync().await.unwrap();
    let reasons: Vec<&str> = report.rejected.iter().map(|rejection| rejection.reason.as_str()).collect();
    assert_eq!(reasons, ["value_too_large: changes[0].value is over 1048576 bytes (max_value_bytes)"]);
    assert_eq!(rows(&device, "todo").keys().collect::<Vec<_>>(), ["3"], "the refused row is gone, the good one synced");
    assert_eq!(device.limits().map(|limits| limits.max_value_bytes), Some(1_048_576));
    let refused = device.update("todo", "3", &big).unwrap_err();
    assert!(matches!(&refused, Error::Unstorable(reason) if reason.starts_with("value_too_large: change.value is over 1048576 bytes")), "{refused}");
    assert_eq!(device.pending().unwrap(), 0);
}

type Hook = Box<dyn FnOnce() + Send>;

/// A remote that runs a hook (once) when the client asks for a reset from beyond the log, as its
/// repair of a replica that differs from the server does: the app writing while the repair runs.
struct DuringRepair {
    inner: PgRemote,
    hook: Arc<std::sync::Mutex<Option<Hook>>>,
}

impl Remote for DuringRepair {
    fn push<'a>(&'a self, tenant: &'a str, changes: &'a [Change]) -> RemoteFuture<'a, PushResponse> {
        self.inner.push(tenant, changes)
    }

    fn pull<'a>(&'a self, tenant: &'a str, since: i64, max_changes: i32, scopes: Option<&'a [String]>) -> RemoteFuture<'a, PullResponse> {
        Box::pin(async move {
            let page = self.inner.pull(tenant, since, max_changes, scopes).await?;
            let hook = if since == i64::MAX { self.hook.lock().unwrap().take() } else { None };
            if let Some(hook) = hook {
                hook();
            }
            Ok(page)
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_altered_behind_the_client_is_caught_by_the_digest_and_repaired() {
    let (cluster, url) = sync_cluster();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("phone.db");
    let hook: Arc<std::sync::Mutex<Option<Hook>>> = Arc::default();
    let remote = DuringRepair { inner: PgRemote::new(&url), hook: hook.clone() };
    let phone = Arc::new(SyncClient::builder().tenant("acme").actor("phone").local(LocalStore::sqlite(&path).unwrap()).remote(remote).pull_page(2).build().unwrap());
    let laptop = client("acme", "laptop", LocalStore::memory(), PgRemote::new(&url));
    for n in 1..=4 {
        phone.insert("todo", &n.to_string(), &json!({"title": format!("todo {n}"), "n": n})).unwrap();
    }
    phone.sync().await.unwrap();
    laptop.insert("todo", "from-laptop", &json!({"title": "eggs"})).unwrap();
    laptop.delete("todo", "4").unwrap();
    laptop.sync().await.unwrap();
    let report = phone.sync().await.unwrap();
    assert!(!report.repaired, "an intact replica matches the server's digest");
    assert_eq!(rows(&*phone, "todo"), server_rows(&cluster, "acme", "todo"));

    // An unsent change, then the file is altered behind the client: through another connection to it,
    // row 1's title changes (what the server confirmed and what the app sees), row 2 is lost, a row
    // the server never had appears.
    phone.update("todo", "3", &json!({"title": "unsent, made before the damage"})).unwrap();
    let damaged = LocalStore::sqlite(&path).unwrap();
    damaged
        .transaction(|t| {
            let mut row = t.row("todo", "1")?;
            for state in [&mut row.confirmed, &mut row.local] {
                state.fields.get_mut("title").expect("row 1 has a title").value = json!("damaged");
            }
            t.put_row("todo", "1", &row)?;
            t.put_row("todo", "2", &sync_ext_client::LocalRow::default())?;
            let phantom = t.row("todo", "from-laptop")?;
            t.put_row("todo", "phantom", &phantom)
        })
        .unwrap();
    drop(damaged);
    assert_eq!(rows(&*phone, "todo")["1"]["title"], "damaged");
    assert!(!rows(&*phone, "todo").contains_key("2"));
    assert_eq!(phone.pending().unwrap(), 1, "the damage left the outbox alone");

    // The next sync pushes the unsent change, finds the digest differs, and repairs by a reset; a
    // change the app makes while the repair runs stays unsent, on top of the repaired rows.
    let writer = Arc::downgrade(&phone);
    *hook.lock().unwrap() = Some(Box::new(move || {
        writer.upgrade().expect("the client is alive").insert("todo", "5", &json!({"title": "written during the repair"})).unwrap();
    }));
    let report = phone.sync().await.unwrap();
    assert!(report.repaired, "the damaged replica was repaired: {report:?}");
    assert_eq!(report.pushed, 1);
    assert!(hook.lock().unwrap().is_none(), "the repair asked for a reset from beyond the log");
    let server = server_rows(&cluster, "acme", "todo");
    assert_eq!(server["3"]["title"], "unsent, made before the damage", "the change made before the damage reached the server");
    assert_eq!(server["1"]["title"], "todo 1");
    assert!(server.contains_key("2") && !server.contains_key("phantom") && !server.contains_key("5"));
    assert_eq!(phone.pending().unwrap(), 1, "the change made during the repair is still pending");
    let mut expected = server.clone();
    expected.insert("5".into(), json!({"title": "written during the repair"}).as_object().cloned().unwrap());
    assert_eq!(rows(&*phone, "todo"), expected, "the server's rows, with the unsent change on top");

    let report = phone.sync().await.unwrap();
    assert!(!report.repaired, "a repaired replica matches the digest: {report:?}");
    assert_eq!((report.pushed, phone.pending().unwrap()), (1, 0), "the pending change synced");
    let server = server_rows(&cluster, "acme", "todo");
    assert_eq!(server["5"]["title"], "written during the repair");
    assert_eq!(rows(&*phone, "todo"), server);
    laptop.sync().await.unwrap();
    assert_eq!(rows(&laptop, "todo"), server, "the repair changed nothing for other replicas");
}
