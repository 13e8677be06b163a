//! A push that applied something wakes listeners once it commits, and only then.

use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, Notification};
use serde_json::json;
use sync_ext_pgrx_tests::{change, hlc_ago, push, Cluster};
use sync_ext_protocol::Op;

/// The next notification within `timeout`, if any.
fn next_notification(listener: &mut Client, timeout: Duration) -> Option<Notification> {
    listener.notifications().timeout_iter(timeout).next().expect("the connection is healthy")
}

#[test]
fn listeners_are_notified_after_commit_and_not_for_pushes_that_change_nothing() {
    let cluster = Cluster::start();
    cluster.create_database("sync");
    let mut listener = cluster.connect("sync");
    listener.batch_execute("LISTEN sync_ext").unwrap();
    let mut pusher = cluster.connect("sync");
    let changes = vec![change(Op::Insert, "todo", "1", hlc_ago(1_000, 0), "device", json!({"title": "milk"}))];

    pusher.batch_execute("BEGIN").unwrap();
    push(&mut pusher, "acme", &changes).unwrap();
    let early = next_notification(&mut listener, Duration::from_millis(300));
    assert!(early.is_none(), "no notification before commit");
    pusher.batch_execute("COMMIT").unwrap();

    let note = next_notification(&mut listener, Duration::from_secs(1)).expect("notified within a second");
    assert_eq!((note.channel(), note.payload()), ("sync_ext", "acme"));

    let again = push(&mut pusher, "acme", &changes).unwrap();
    assert!(again.results.iter().all(|result| result.status.is_acknowledged()));
    let quiet = next_notification(&mut listener, Duration::from_millis(300));
    assert!(quiet.is_none(), "a duplicate push notifies nobody");
}

/// The process id of the database's notifier, if one runs.
fn notifier_pid(client: &mut Client) -> Option<i32> {
    client
        .query_opt("SELECT pid FROM pg_stat_activity WHERE backend_type = 'sync_ext notifier' AND datname = current_database()", &[])
        .unwrap()
        .map(|row| row.get(0))
}

/// Waits up to `limit` for `check` to hold.
fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    check()
}

/// One insert into `tenant`, `n` making its key unique.
fn one_insert(tenant: &str, n: usize) -> Vec<sync_ext_protocol::Change> {
    vec![change(Op::Insert, "todo", &format!("{tenant}-{n}"), hlc_ago(1_000, n as u16), "device", json!({"n": n}))]
}

/// Collects the tenants named by notifications until every one of `expected` was seen or `limit` passed,
/// and returns them with the process ids that sent them.
fn collect_notifications(listener: &mut Client, expected: &std::collections::BTreeSet<String>, limit: Duration) -> (std::collections::BTreeSet<String>, std::collections::BTreeSet<i32>) {
    let (mut seen, mut senders) = (std::collections::BTreeSet::new(), std::collections::BTreeSet::new());
    let deadline = std::time::Instant::now() + limit;
    while !expected.is_subset(&seen) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let Some(note) = next_notification(listener, left.max(Duration::from_millis(1))) else { break };
        seen.insert(note.payload().to_owned());
        senders.insert(note.process_id());
    }
    (seen, senders)
}

#[test]
fn concurrent_pushes_to_many_tenants_wake_listeners_through_the_notifier() {
    let cluster = Cluster::start();
    let url = cluster.create_database("sync");
    let mut listener = cluster.connect("sync");
    listener.batch_execute("LISTEN sync_ext").unwrap();

    // The first push finds no notifier: it notifies itself and starts one.
    let mut first = cluster.connect("sync");
    push(&mut first, "warm-up", &one_insert("warm-up", 0)).unwrap();
    assert!(next_notification(&mut listener, Duration::from_secs(2)).is_some(), "the first push notifies");
    assert!(eventually(Duration::from_secs(5), || notifier_pid(&mut first).is_some()), "a notifier started");
    let notifier = notifier_pid(&mut first).unwrap();

    let tenants: std::collections::BTreeSet<String> = (0..8).map(|n| format!("tenant-{n}")).collect();
    let pushers: Vec<_> = tenants
        .iter()
        .cloned()
        .map(|tenant| {
            let url = url.clone();
            std::thread::spawn(move || {
                let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
                for n in 0..25 {
                    push(&mut client, &tenant, &one_insert(&tenant, n)).unwrap();
                }
                client.query_one("SELECT pg_backend_pid()", &[]).unwrap().get::<_, i32>(0)
            })
        })
        .collect();
    let pusher_pids: std::collections::BTreeSet<i32> = pushers.into_iter().map(|pusher| pusher.join().unwrap()).collect();

    let (seen, senders) = collect_notifications(&mut listener, &tenants, Duration::from_secs(5));
    assert!(tenants.is_subset(&seen), "every tenant's listeners were woken: {seen:?}");
    assert!(senders.contains(&notifier), "the notifier sent wake-ups: {senders:?}");
    assert!(senders.is_disjoint(&pusher_pids), "pushes that found the notifier did not notify themselves: {senders:?}");
    let pending: i64 = first.query_one("SELECT count(*) FROM sync_ext.wakeups", &[]).unwrap().get(0);
    assert_eq!(pending, 0, "no wake-up is left behind");
}

#[test]
fn a_terminated_or_idle_notifier_is_replaced_and_no_wake_up_is_lost() {
    let cluster = Cluster::start();
    cluster.create_database("sync");
    let mut listener = cluster.connect("sync");
    listener.batch_execute("LISTEN sync_ext").unwrap();
    let mut pusher = cluster.connect("sync");
    let mut admin = cluster.connect("sync");

    push(&mut pusher, "acme", &one_insert("acme", 0)).unwrap();
    assert!(eventually(Duration::from_secs(5), || notifier_pid(&mut admin).is_some()), "a notifier started");
    let first = notifier_pid(&mut admin).unwrap();
    admin.query_one("SELECT pg_terminate_backend($1)", &[&first]).unwrap();
    assert!(eventually(Duration::from_secs(5), || notifier_pid(&mut admin).is_none()), "the notifier was terminated");

    // Every push after that still reaches the listener, whether it notifies itself or a new notifier
    // does (a backend tries to start one at most once a second).
    for n in 1..=40 {
        while next_notification(&mut listener, Duration::from_millis(1)).is_some() {}
        push(&mut pusher, "acme", &one_insert("acme", n)).unwrap();
        let note = next_notification(&mut listener, Duration::from_secs(3));
        assert_eq!(note.map(|note| note.payload().to_owned()).as_deref(), Some("acme"), "push {n} woke the listener");
        std::thread::sleep(Duration::from_millis(50));
    }
    let second = notifier_pid(&mut admin).expect("a new notifier runs");
    assert_ne!(first, second);

    // Idle, it exits (so an idle database holds no extra connection); the next push starts another.
    assert!(eventually(Duration::from_secs(10), || notifier_pid(&mut admin).is_none()), "an idle notifier exits");
    push(&mut pusher, "acme", &one_insert("acme", 100)).unwrap();
    assert!(next_notification(&mut listener, Duration::from_secs(3)).is_some(), "the push after it woke the listener");
    let pending: i64 = admin.query_one("SELECT count(*) FROM sync_ext.wakeups", &[]).unwrap().get(0);
    assert!(eventually(Duration::from_secs(3), || admin.query_one("SELECT count(*) FROM sync_ext.wakeups", &[]).unwrap().get::<_, i64>(0) == 0), "no wake-up left behind ({pending} pending)");
}

#[test]
fn without_a_worker_slot_pushes_notify_themselves() {
    let cluster = Cluster::start_with(&["max_worker_processes = 0"]);
    cluster.create_database("sync");
    let mut listener = cluster.connect("sync");
    listener.batch_execute("LISTEN sync_ext").unwrap();
    let mut pusher = cluster.connect("sync");
    let pid: i32 = pusher.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    for n in 0..5 {
        push(&mut pusher, "acme", &one_insert("acme", n)).unwrap();
        let note = next_notification(&mut listener, Duration::from_secs(2)).expect("notified");
        assert_eq!((note.payload(), note.process_id()), ("acme", pid), "the push notified itself");
    }
    assert_eq!(notifier_pid(&mut pusher), None);
}
