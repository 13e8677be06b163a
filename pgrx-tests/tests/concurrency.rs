//! The cursor never misses a change, and tenants never wait for each other, over real connections.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

use postgres::{Client, NoTls};
use serde_json::json;
use sync_ext_pgrx_tests::{change, hlc_ago, pull, pull_all, push, Cluster};
use sync_ext_protocol::{Op, Status};
use uuid::Uuid;

const PUSHERS: usize = 4;
const BATCHES: usize = 100;
const PER_BATCH: usize = 5;
const ROWS: usize = 40;

/// One pusher: `BATCHES` batches of updates to shared rows, with hlcs interleaved across pushers so
/// that both applied and superseded outcomes occur. Returns the op_ids applied, with their seqs.
fn run_pusher(url: &str, pusher: usize) -> (BTreeMap<Uuid, i64>, usize) {
    let mut client = Client::connect(url, NoTls).expect("pusher connects");
    let mut applied = BTreeMap::new();
    let mut superseded = 0;
    for batch in 0..BATCHES {
        let changes: Vec<_> = (0..PER_BATCH)
            .map(|i| {
                let step = (batch * PER_BATCH + i) as i64;
                let row = (pusher * 13 + step as usize * 7) % ROWS;
                let hlc = hlc_ago(120_000 - step * 40 + (pusher as i64 * 17) % 40, pusher as u16);
                change(Op::Update, "todo", &row.to_string(), hlc, &format!("device-{pusher}"), json!({"step": step, "by": pusher}))
            })
            .collect();
        let response = push(&mut client, "acme", &changes).expect("push succeeds");
        for result in response.results {
            match result.status {
                Status::Applied { seq } => {
                    applied.insert(result.op_id, seq);
                }
                Status::Superseded => superseded += 1,
                other => panic!("unexpected outcome {other:?}"),
            }
        }
    }
    (applied, superseded)
}

#[test]
fn concurrent_pushes_are_pulled_exactly_once_with_gap_free_seqs_in_order() {
    let cluster = Cluster::start();
    let url = cluster.create_database("sync");
    let finished = Arc::new(AtomicUsize::new(0));
    let pushers: Vec<_> = (0..PUSHERS)
        .map(|pusher| {
            let (url, finished) = (url.clone(), finished.clone());
            thread::spawn(move || {
                let outcome = run_pusher(&url, pusher);
                finished.fetch_add(1, Ordering::SeqCst);
                outcome
            })
        })
        .collect();

    let mut puller = Client::connect(&url, NoTls).expect("puller connects");
    let mut pulled: BTreeMap<i64, Uuid> = BTreeMap::new();
    let mut cursor = 0;
    let mut polls = 0;
    loop {
        let all_done = finished.load(Ordering::SeqCst) == PUSHERS;
        let page = pull(&mut puller, "acme", cursor, 50).expect("pull succeeds");
        for pulled_change in &page.changes {
            assert_eq!(pulled_change.seq, cursor + 1, "seqs arrive gap-free and in order");
            cursor = pulled_change.seq;
            assert!(pulled.insert(pulled_change.seq, pulled_change.op_id).is_none(), "seq {} seen twice", pulled_change.seq);
        }
        assert_eq!(page.cursor, cursor);
        polls += 1;
        if all_done && !page.has_more {
            break;
        }
    }

    let mut applied = BTreeMap::new();
    let mut superseded = 0;
    for pusher in pushers {
        let (ops, skipped) = pusher.join().expect("pusher finishes");
        applied.extend(ops);
        superseded += skipped;
    }
    let total = applied.len();
    assert_eq!(total + superseded, PUSHERS * BATCHES * PER_BATCH, "every change is applied or superseded");
    assert!(superseded > 0 && total > ROWS, "the workload had contention: {total} applied, {superseded} superseded");
    assert_eq!(pulled.keys().copied().collect::<Vec<_>>(), (1..=total as i64).collect::<Vec<_>>(), "seqs are exactly 1..=N");
    let by_op: BTreeMap<Uuid, i64> = pulled.iter().map(|(seq, op_id)| (*op_id, *seq)).collect();
    assert_eq!(by_op, applied, "the puller saw exactly the applied changes, each at the seq its push reported");
    assert!(polls > 1, "the puller ran while pushes were in flight");
    let caught_up = pull_all(&mut puller, "acme", 0, 1000).expect("pull succeeds");
    assert_eq!(caught_up.cursor, total as i64);
}

#[test]
fn a_push_to_one_tenant_never_waits_for_another_tenants_open_push() {
    let cluster = Cluster::start();
    cluster.create_database("sync");
    let row = |pk: &str| vec![change(Op::Insert, "todo", pk, hlc_ago(1_000, 0), "device", json!({"title": pk}))];

    let mut holder = cluster.connect("sync");
    holder.batch_execute("BEGIN").unwrap();
    push(&mut holder, "tenant-a", &row("held")).expect("push inside an open transaction");

    let mut other = cluster.connect("sync");
    other.batch_execute("SET statement_timeout = '5s'").unwrap();
    let response = push(&mut other, "tenant-b", &row("free")).expect("tenant B does not wait for tenant A");
    assert_eq!(response.cursor, 1);
    assert!(pull(&mut other, "tenant-a", 0, 10).unwrap().changes.is_empty(), "uncommitted changes are not pulled");

    let mut blocked = cluster.connect("sync");
    blocked.batch_execute("SET lock_timeout = '300ms'").unwrap();
    let error = push(&mut blocked, "tenant-a", &row("queued")).expect_err("tenant A's second push waits for the first");
    assert_eq!(error.code().map(|code| code.code()), Some("55P03"), "{error}");

    holder.batch_execute("COMMIT").unwrap();
    assert_eq!(push(&mut blocked, "tenant-a", &row("queued")).unwrap().cursor, 2, "after the commit it goes through");
    let seqs: BTreeSet<i64> = pull_all(&mut other, "tenant-a", 0, 10).unwrap().changes.iter().map(|c| c.seq).collect();
    assert_eq!(seqs, BTreeSet::from([1, 2]));
}
