//! Partial sync through the client against a real server. A workspace: `project` rows are tenant-wide,
//! `task` rows are in `project:<project_id>` and `owner:<owner>`. Devices holding some instances hold
//! exactly the server's rows of those instances (and every project) after each sync, while rows move
//! between projects, instances are subscribed to and unsubscribed from at runtime under a live loop,
//! stores are reopened with other scopes, random histories run against random scope sets, and a login
//! granted some instances only writes outside them.
//!
//! The property test runs 16 cases; `SYNC_EXT_SCOPE_CASES=<n>` runs more, `SYNC_EXT_SEED=<seed>` replays
//! a failing run (the seed is printed with the failure).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::collection::{btree_set, vec};
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::{json, Map, Value};
use sync_ext_client::protocol::scope::{ScopeDefinition, Scopes, TENANT_WIDE};
use sync_ext_client::protocol::wire::REASON_OUT_OF_SCOPE;
use sync_ext_client::{Encoding, LiveOptions, LocalStore, Op, Origin, PgRemote, Rejection, SyncClient, SyncReport};
use sync_ext_pgrx_tests::{execute, off_runtime, server_rows, sync_cluster, Cluster};

type Row = Map<String, Value>;
/// Rows of both models, by (model, pk).
type Rows = BTreeMap<(String, String), Row>;
type Device = SyncClient<PgRemote>;

const MODELS: [&str; 2] = ["project", "task"];

/// Defines the workspace's scopes and returns them as the protocol computes membership.
fn define_workspace(cluster: &Cluster) -> Scopes {
    execute(cluster, "SELECT sync_define_scope('project', 'task', 'project_id'); SELECT sync_define_scope('owner', 'task', 'owner');");
    let definitions: Value = off_runtime(|| cluster.connect("sync").query_one("SELECT sync_scopes()", &[]).unwrap().get(0));
    Scopes::new(serde_json::from_value::<Vec<ScopeDefinition>>(definitions).expect("scope definitions"))
}

fn device(url: &str, tenant: &str, actor: &str, store: LocalStore, scopes: Option<&[&str]>) -> Device {
    let builder = SyncClient::builder().tenant(tenant).actor(actor).local(store).remote(PgRemote::new(url)).pull_page(7);
    let builder = match scopes {
        Some(scopes) => builder.scopes(scopes.iter().copied()),
        None => builder,
    };
    builder.build().expect("a device")
}

/// The rows a device shows, of both models.
fn held(device: &Device) -> Rows {
    MODELS.iter().flat_map(|model| device.list::<Row>(model).unwrap().into_iter().map(move |(pk, row)| ((model.to_string(), pk), row))).collect()
}

/// The server's visible rows that are in one of `instances` or tenant-wide (all of them for `None`).
fn expected(cluster: &Cluster, tenant: &str, scopes: &Scopes, instances: Option<&BTreeSet<String>>) -> Rows {
    let wanted = instances.map(|instances| instances.iter().cloned().chain([TENANT_WIDE.to_owned()]).collect::<BTreeSet<String>>());
    MODELS
        .iter()
        .flat_map(|model| server_rows(cluster, tenant, model).into_iter().map(move |(pk, row)| ((model.to_string(), pk), row)))
        .filter(|((model, _), row)| wanted.as_ref().is_none_or(|wanted| !scopes.instances(model, row).is_disjoint(wanted)))
        .collect()
}

fn instances(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|name| name.to_string()).collect()
}


/// Syncs a device and checks it: no repair was needed (its digests matched), nothing is left unsent,
/// and it shows the server's rows of its instances.
async fn sync_and_check(cluster: &Cluster, tenant: &str, scopes: &Scopes, device: &Device, instances: Option<&[&str]>) -> SyncReport {
    let report = device.sync().await.expect("the sync succeeds");
    check(cluster, tenant, scopes, device, instances, &report);
    report
}

fn check(cluster: &Cluster, tenant: &str, scopes: &Scopes, device: &Device, instances: Option<&[&str]>, report: &SyncReport) {
    assert!(!report.repaired, "the digests matched: {report:?}");
    assert_eq!(device.pending().unwrap(), 0);
    let instances = instances.map(self::instances);
    assert_eq!(held(device), expected(cluster, tenant, scopes, instances.as_ref()), "a device holding {instances:?}");
}

/// Waits (at most 10 s) until `done` holds.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "not within 10 s: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_hold_the_rows_of_their_projects_as_rows_move_between_them() {
    let (cluster, url) = sync_cluster();
    let scopes = define_workspace(&cluster);
    let admin = device(&url, "acme", "admin", LocalStore::memory(), None);
    let one = device(&url, "acme", "one", LocalStore::memory(), Some(&["project:1"]));
    let two = device(&url, "acme", "two", LocalStore::memory(), Some(&["project:2"]));
    let both = SyncClient::builder()
        .tenant("acme")
        .actor("both")
        .local(LocalStore::memory())
        .remote(PgRemote::new(&url).encoding(Encoding::MsgPack))
        .scopes(["project:2", "project:1"])
        .build()
        .unwrap();
    let devices: [(&Device, Option<&[&str]>); 4] =
        [(&admin, None), (&one, Some(&["project:1"])), (&two, Some(&["project:2"])), (&both, Some(&["project:1", "project:2"]))];
    let sync_all = || async {
        for (device, instances) in devices {
            sync_and_check(&cluster, "acme", &scopes, device, instances).await;
        }
    };

    for (pk, name) in [("1", "Apollo"), ("2", "Gemini"), ("3", "Mercury")] {
        admin.insert("project", pk, &json!({"name": name})).unwrap();
    }
    admin.insert("task", "t1", &json!({"project_id": 1, "owner": "ann", "title": "design"})).unwrap();
    admin.insert("task", "t2", &json!({"project_id": 2, "title": "build"})).unwrap();
    admin.insert("task", "t3", &json!({"project_id": 3, "title": "ship"})).unwrap();
    admin.insert("task", "t4", &json!({"project_id": 1, "title": "test"})).unwrap();
    sync_all().await;
    assert_eq!(one.list::<Row>("task").unwrap().into_iter().map(|(pk, _)| pk).collect::<Vec<_>>(), ["t1", "t4"]);
    assert_eq!(one.list::<Row>("project").unwrap().len(), 3, "projects are tenant-wide");

    // t1 moves from project 1 to project 2: a leave for one, the whole row for two.
    let mut events = one.changes();
    admin.update("task", "t1", &json!({"project_id": 2})).unwrap();
    admin.sync().await.unwrap();
    sync_all().await;
    assert!(one.get::<Row>("task", "t1").unwrap().is_none());
    let left: Vec<_> = std::iter::from_fn(|| events.try_recv().ok()).collect();
    assert!(left.iter().any(|event| event.origin == Origin::Pull && event.rows.contains(&("task".into(), "t1".into()))), "the leave is reported: {left:?}");
    assert_eq!(Value::Object(two.get::<Row>("task", "t1").unwrap().unwrap()), json!({"project_id": 2, "owner": "ann", "title": "design"}), "moved in whole");

    // one moves t4 out of its own instance, after another edit of it, in one push.
    one.update("task", "t4", &json!({"title": "test more"})).unwrap();
    one.update("task", "t4", &json!({"project_id": 2})).unwrap();
    sync_all().await;
    assert!(one.get::<Row>("task", "t4").unwrap().is_none());
    assert_eq!(two.get::<Row>("task", "t4").unwrap().unwrap()["title"], "test more");

    // t3 moves into project 1 with an edit; t1 moves to no project at all; a delete in project 2.
    admin.update("task", "t3", &json!({"project_id": 1, "title": "ship it"})).unwrap();
    admin.update("task", "t1", &json!({"project_id": null})).unwrap();
    admin.sync().await.unwrap();
    two.delete("task", "t2").unwrap();
    sync_all().await;
    assert_eq!(one.get::<Row>("task", "t3").unwrap().unwrap()["title"], "ship it");
    assert!(two.get::<Row>("task", "t1").unwrap().is_none() && admin.get::<Row>("task", "t1").unwrap().is_some());

    // A task one writes into project 3, which it does not hold: sent, then let go.
    one.insert("task", "t5", &json!({"project_id": 3, "title": "elsewhere"})).unwrap();
    sync_all().await;
    assert!(one.get::<Row>("task", "t5").unwrap().is_none());
    assert_eq!(server_rows(&cluster, "acme", "task")["t5"]["title"], "elsewhere");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_and_unsubscribe_at_runtime_under_a_live_loop_and_a_reopened_store_moves_to_its_scopes() {
    let (cluster, url) = sync_cluster();
    let scopes = define_workspace(&cluster);
    let admin = Arc::new(device(&url, "acme", "admin", LocalStore::memory(), None));
    for project in 1..=3 {
        admin.insert("project", &project.to_string(), &json!({"name": format!("project {project}")})).unwrap();
        for n in 0..10 {
            admin.insert("task", &format!("t{project}-{n}"), &json!({"project_id": project, "n": n})).unwrap();
        }
    }
    admin.sync().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("phone.db");
    let phone = Arc::new(device(&url, "acme", "phone", LocalStore::sqlite(&path).unwrap(), Some(&["project:1"])));
    let live = phone.clone().live(LiveOptions { listen_url: Some(url.clone()), interval: Duration::from_millis(50), ..LiveOptions::default() });
    let project_one = expected(&cluster, "acme", &scopes, Some(&instances(&["project:1"])));
    eventually("the live loop pulls project 1", || held(&phone) == project_one).await;

    // Another device edits tasks of every project and moves them between projects while the phone
    // subscribes to project 2.
    let writer = admin.clone();
    let writes = tokio::spawn(async move {
        for i in 0..40 {
            let task = format!("t{}-{}", 1 + i % 3, i % 10);
            let edit = if i % 2 == 0 { json!({"n": 100 + i}) } else { json!({"project_id": 1 + (i / 2) % 3}) };
            writer.update("task", &task, &edit).unwrap();
            writer.sync().await.unwrap();
        }
    });
    let report = phone.subscribe(["project:2"]).await.unwrap();
    assert!(!report.repaired, "{report:?}");
    writes.await.unwrap();
    sync_and_check(&cluster, "acme", &scopes, &phone, Some(&["project:1", "project:2"])).await;
    assert_eq!(phone.scopes().unwrap(), Some(instances(&["project:1", "project:2"])));
    live.stop().await;

    // An unsent change to a row of project 1, then unsubscribing from it: the rows go, the change stays.
    let in_project_one = server_rows(&cluster, "acme", "task").into_iter().find(|(_, row)| row["project_id"] == 1).map(|(pk, _)| pk).unwrap();
    phone.update("task", &in_project_one, &json!({"title": "unsent"})).unwrap();
    phone.unsubscribe(["project:1"]).await.unwrap();
    assert_eq!(phone.pending().unwrap(), 1, "the outbox is untouched");
    let mut project_two = expected(&cluster, "acme", &scopes, Some(&instances(&["project:2"])));
    project_two.insert(("task".into(), in_project_one.clone()), json!({"title": "unsent"}).as_object().cloned().unwrap());
    assert_eq!(held(&phone), project_two, "project 1's rows are dropped; the unsent change shows on nothing");
    sync_and_check(&cluster, "acme", &scopes, &phone, Some(&["project:2"])).await;
    assert_eq!(server_rows(&cluster, "acme", "task")[&in_project_one]["title"], "unsent", "the change was sent");
    drop(phone);

    // The file reopened with other scopes moves to them on its next sync.
    let reopened = device(&url, "acme", "phone", LocalStore::sqlite(&path).unwrap(), Some(&["project:3", "project:2"]));
    assert_eq!(reopened.scopes().unwrap(), Some(instances(&["project:2", "project:3"])));
    sync_and_check(&cluster, "acme", &scopes, &reopened, Some(&["project:2", "project:3"])).await;
    drop(reopened);
    let whole = device(&url, "acme", "phone", LocalStore::sqlite(&path).unwrap(), None);
    sync_and_check(&cluster, "acme", &scopes, &whole, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_granted_some_instances_syncs_them_and_its_writes_outside_come_back_as_rejections() {
    let (cluster, url) = sync_cluster();
    let scopes = define_workspace(&cluster);
    execute(
        &cluster,
        "CREATE ROLE ann_phone LOGIN;
         SELECT sync_grant_scope('ann_phone', 'acme', 'project:1');
         SELECT sync_grant_scope('ann_phone', 'acme', 'owner:ann');",
    );
    let admin = device(&url, "acme", "admin", LocalStore::memory(), None);
    admin.insert("project", "1", &json!({"name": "Apollo"})).unwrap();
    admin.insert("task", "t1", &json!({"project_id": 1, "title": "design"})).unwrap();
    admin.insert("task", "t2", &json!({"project_id": 2, "title": "build"})).unwrap();
    admin.insert("task", "t3", &json!({"project_id": 2, "owner": "ann", "title": "review"})).unwrap();
    admin.sync().await.unwrap();
    let ann_url = format!("host=127.0.0.1 port={} user=ann_phone dbname=sync", cluster.port());

    let whole = device(&ann_url, "acme", "ann", LocalStore::memory(), None);
    let error = whole.sync().await.unwrap_err();
    assert_eq!((error.sqlstate(), error.is_transient()), (Some("42501"), false), "the whole tenant is not granted: {error}");
    let greedy = device(&ann_url, "acme", "ann", LocalStore::memory(), Some(&["project:2"]));
    assert_eq!(greedy.sync().await.unwrap_err().sqlstate(), Some("42501"), "nor is project 2");

    let seen: Arc<Mutex<Vec<Rejection>>> = Arc::default();
    let callback = seen.clone();
    let phone = SyncClient::builder()
        .tenant("acme")
        .actor("ann")
        .local(LocalStore::memory())
        .remote(PgRemote::new(&ann_url))
        .scopes(["project:1", "owner:ann"])
        .on_rejected(move |rejection| callback.lock().unwrap().push(rejection.clone()))
        .build()
        .unwrap();
    let granted: &[&str] = &["project:1", "owner:ann"];
    sync_and_check(&cluster, "acme", &scopes, &phone, Some(granted)).await;
    assert_eq!(phone.list::<Row>("task").unwrap().len(), 2, "t1 (project 1) and t3 (ann's)");

    phone.update("task", "t1", &json!({"title": "design, by ann"})).unwrap();
    let moved_out = phone.update("task", "t1", &json!({"project_id": 2})).unwrap();
    let elsewhere = phone.insert("task", "t9", &json!({"project_id": 2, "title": "not hers"})).unwrap();
    phone.update("task", "t3", &json!({"title": "reviewed"})).unwrap();
    phone.update("project", "1", &json!({"name": "Apollo 11"})).unwrap();
    let report = sync_and_check(&cluster, "acme", &scopes, &phone, Some(granted)).await;
    let refused: Vec<(uuid::Uuid, &str)> = report.rejected.iter().map(|rejection| (rejection.change.op_id, rejection.code())).collect();
    assert_eq!(refused, [(moved_out.op_id, REASON_OUT_OF_SCOPE), (elsewhere.op_id, REASON_OUT_OF_SCOPE)]);
    assert_eq!(seen.lock().unwrap().iter().map(|rejection| rejection.change.op_id).collect::<Vec<_>>(), [moved_out.op_id, elsewhere.op_id], "each reached on_rejected");
    let tasks = server_rows(&cluster, "acme", "task");
    assert_eq!(Value::Object(tasks["t1"].clone()), json!({"project_id": 1, "title": "design, by ann"}), "the write inside went through, the move out did not");
    assert!(!tasks.contains_key("t9"));
    assert_eq!(tasks["t3"]["title"], "reviewed");
    assert_eq!(server_rows(&cluster, "acme", "project")["1"]["name"], "Apollo 11", "tenant-wide models stay writable");
    assert_eq!(phone.take_rejections().unwrap().len(), 2);
}

/// The instances random scope sets are drawn from.
const INSTANCES: [&str; 5] = ["project:1", "project:2", "project:3", "owner:ann", "owner:bob"];
/// Devices 0 to 2 hold scopes; device 3 holds the whole tenant.
const DEVICES: usize = 4;

#[derive(Clone, Debug)]
enum Step {
    Write { device: usize, model: &'static str, pk: u8, op: Op, fields: Vec<(&'static str, Value)> },
    Sync { device: usize },
    Subscribe { device: usize, instance: &'static str },
    Unsubscribe { device: usize, instance: &'static str },
}

fn field() -> impl Strategy<Value = (&'static str, Value)> {
    prop_oneof![
        prop_oneof![Just(Value::Null), (1..=3i32).prop_map(Value::from)].prop_map(|value| ("project_id", value)),
        prop_oneof![Just(Value::Null), Just(json!("ann")), Just(json!("bob"))].prop_map(|value| ("owner", value)),
        any::<u8>().prop_map(|n| ("title", json!(n))),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let op = prop_oneof![3 => Just(Op::Insert), 3 => Just(Op::Update), 1 => Just(Op::Delete)];
    prop_oneof![
        6 => (0..DEVICES, prop_oneof![4 => Just("task"), 1 => Just("project")], 0..4u8, op, vec(field(), 1..3))
            .prop_map(|(device, model, pk, op, fields)| Step::Write { device, model, pk, op, fields }),
        4 => (0..DEVICES).prop_map(|device| Step::Sync { device }),
        1 => (0..DEVICES - 1, select(&INSTANCES[..])).prop_map(|(device, instance)| Step::Subscribe { device, instance }),
        1 => (0..DEVICES - 1, select(&INSTANCES[..])).prop_map(|(device, instance)| Step::Unsubscribe { device, instance }),
    ]
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|value| value.parse().unwrap_or_else(|_| panic!("{name} is a number")))
}

#[test]
fn scoped_devices_hold_the_servers_rows_of_their_instances_after_every_sync() {
    let (cluster, url) = off_runtime(|| {
        let cluster = Cluster::start();
        let url = cluster.create_database("sync");
        (cluster, url)
    });
    let scopes = define_workspace(&cluster);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let seed = env_number("SYNC_EXT_SEED").unwrap_or_else(|| std::process::id().into());
    let cases = env_number("SYNC_EXT_SCOPE_CASES").unwrap_or(16) as u32;
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let config = Config { cases, failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes));
    let case = std::cell::Cell::new(0);
    let scope_sets = [(); DEVICES - 1].map(|_| btree_set(select(&INSTANCES[..]), 0..=3));
    let outcome = runner.run(&(scope_sets, vec(step(), 1..40)), |(scope_sets, steps)| {
        case.set(case.get() + 1);
        let tenant = format!("case-{}", case.get());
        let mut holding: Vec<Option<BTreeSet<String>>> = scope_sets.iter().map(|set| Some(set.iter().map(|instance| instance.to_string()).collect())).collect();
        holding.push(None);
        let devices: Vec<Device> = holding
            .iter()
            .enumerate()
            .map(|(index, held)| {
                let scopes: Option<Vec<&str>> = held.as_ref().map(|held| held.iter().map(String::as_str).collect());
                device(&url, &tenant, &format!("device-{index}"), LocalStore::memory(), scopes.as_deref())
            })
            .collect();
        runtime.block_on(async {
            let check = |index: usize, report: SyncReport, holding: &Option<BTreeSet<String>>| -> Result<(), TestCaseError> {
                prop_assert!(!report.repaired, "device {} needed a repair: {:?}", index, report);
                prop_assert_eq!(devices[index].pending().unwrap(), 0);
                prop_assert_eq!(held(&devices[index]), expected(&cluster, &tenant, &scopes, holding.as_ref()), "device {} holding {:?}", index, holding);
                Ok(())
            };
            for step in &steps {
                match step {
                    Step::Write { device, model, pk, op, fields } => {
                        let value = (*op != Op::Delete).then(|| fields.iter().map(|(name, value)| (name.to_string(), value.clone())).collect());
                        devices[*device].apply_change(model, &pk.to_string(), *op, value).unwrap();
                    }
                    Step::Sync { device } => check(*device, devices[*device].sync().await.unwrap(), &holding[*device])?,
                    Step::Subscribe { device, instance } => {
                        let report = devices[*device].subscribe([*instance]).await.unwrap();
                        holding[*device].as_mut().expect("a scoped device").insert(instance.to_string());
                        check(*device, report, &holding[*device])?;
                    }
                    Step::Unsubscribe { device, instance } => {
                        devices[*device].unsubscribe([*instance]).await.unwrap();
                        holding[*device].as_mut().expect("a scoped device").remove(*instance);
                        check(*device, devices[*device].sync().await.unwrap(), &holding[*device])?;
                    }
                }
            }
            for (index, device) in devices.iter().enumerate() {
                check(index, device.sync().await.unwrap(), &holding[index])?;
            }
            Ok(())
        })
    });
    if let Err(failure) = outcome {
        panic!("{failure}\nreplay with SYNC_EXT_SEED={seed}");
    }
}
