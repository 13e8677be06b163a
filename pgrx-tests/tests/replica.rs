//! Pulls scale out to hot standbys: push to the primary, pull from a streaming replica.

use std::time::{Duration, Instant};

use postgres::error::SqlState;
use postgres::Client;
use serde_json::{json, Map, Value};
use sync_ext_client::protocol::Op;
use sync_ext_client::{LocalStore, PgRemote, ReadReplica, SyncClient};
use sync_ext_pgrx_tests::{change, hlc_ago, pull, pull_all, push, Cluster};

/// Waits until the standby has replayed everything the primary has written so far.
fn wait_for_replay(primary: &mut Client, standby: &mut Client) {
    let target: String = primary.query_one("SELECT pg_current_wal_lsn()::text", &[]).unwrap().get(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let caught_up: bool = standby.query_one("SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn", &[&target]).unwrap().get(0);
        if caught_up {
            return;
        }
        assert!(Instant::now() < deadline, "the standby did not catch up");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn clients_push_to_the_primary_and_pull_the_same_from_a_standby() {
    let primary = Cluster::start();
    let primary_url = primary.create_database("sync");
    let standby = primary.start_standby();
    let standby_url = standby.connection_string("sync");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let device = |name: &str| {
        let remote = ReadReplica { primary: PgRemote::new(&primary_url), replica: PgRemote::new(&standby_url) };
        SyncClient::builder().tenant("acme").actor(name).local(LocalStore::memory()).remote(remote).build().unwrap()
    };
    let (phone, laptop) = (device("phone"), device("laptop"));
    let (mut on_primary, mut on_standby) = (primary.connect("sync"), standby.connect("sync"));
    runtime.block_on(async {
        for round in 0..20 {
            phone.insert("todo", &format!("p{round}"), &json!({"round": round})).unwrap();
            laptop.update("todo", "shared", &json!({"by": "laptop", "round": round})).unwrap();
            phone.sync().await.unwrap();
            laptop.sync().await.unwrap();
        }
    });
    wait_for_replay(&mut on_primary, &mut on_standby);
    let from_primary = pull_all(&mut on_primary, "acme", 0, 7).unwrap();
    let from_standby = pull_all(&mut on_standby, "acme", 0, 7).unwrap();
    assert_eq!(from_standby, from_primary, "once replayed, a standby serves the same pulls");
    assert_eq!(from_primary.changes.len(), 40);
    runtime.block_on(async {
        phone.sync().await.unwrap();
        laptop.sync().await.unwrap();
    });
    let rows = |client: &SyncClient<ReadReplica<PgRemote, PgRemote>>| client.list::<Map<String, Value>>("todo").unwrap();
    assert_eq!(rows(&phone), rows(&laptop), "clients pulling from the standby converge");
    assert_eq!(rows(&phone).len(), 21);

    let write = change(Op::Insert, "todo", "from-standby", hlc_ago(0, 0), "tablet", json!({"n": 1}));
    let refused = push(&mut on_standby, "acme", &[write]).expect_err("a standby is read-only");
    assert_eq!(refused.code(), Some(&SqlState::READ_ONLY_SQL_TRANSACTION), "{refused:?}");
    let message = refused.as_db_error().map(|error| error.message().to_owned()).unwrap_or_default();
    assert!(message.contains("read-only hot standby: send it to the primary"), "{message}");
}

#[test]
fn a_lagging_standby_answers_nothing_new_yet_never_a_reset() {
    let primary = Cluster::start();
    primary.create_database("sync");
    let standby = primary.start_standby();
    let (mut on_primary, mut on_standby) = (primary.connect("sync"), standby.connect("sync"));
    push(&mut on_primary, "acme", &[change(Op::Insert, "todo", "1", hlc_ago(10, 0), "phone", json!({"n": 1}))]).unwrap();
    wait_for_replay(&mut on_primary, &mut on_standby);
    on_standby.execute("SELECT pg_wal_replay_pause()", &[]).unwrap();
    push(&mut on_primary, "acme", &[change(Op::Insert, "todo", "2", hlc_ago(5, 0), "phone", json!({"n": 2}))]).unwrap();
    let ahead = pull(&mut on_primary, "acme", 0, 100).unwrap();
    assert_eq!(ahead.cursor, 2);

    let behind = pull(&mut on_standby, "acme", ahead.cursor, 100).unwrap();
    assert!(!behind.reset, "a cursor the standby has not reached is lag, not a restore");
    assert!(behind.changes.is_empty() && !behind.has_more);
    assert_eq!(behind.cursor, ahead.cursor, "the client keeps its cursor and tries again");
    assert!(pull(&mut on_primary, "acme", 99, 100).unwrap().reset, "the primary still answers a cursor past its log with a reset");

    on_standby.execute("SELECT pg_wal_replay_resume()", &[]).unwrap();
    wait_for_replay(&mut on_primary, &mut on_standby);
    assert_eq!(pull(&mut on_standby, "acme", 1, 100).unwrap(), pull(&mut on_primary, "acme", 1, 100).unwrap());
}
