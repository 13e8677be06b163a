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
