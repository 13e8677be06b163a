//! The cursor never misses a change, and tenants never wait for each other, over real connections.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

use postgres::{Client, NoTls};
use serde_json::json;
use sync_ext_pgrx_tests::{change, hlc_ago, pull, pull_all, pull_scoped, push, server_rows, Cluster};
use sync_ext_protocol::wire::REASON_STALE;
use sync_ext_protocol::{Op, RowState, Status};
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

/// The scope instances of the moving-rows test, and the devices pulling them: two hold two instances each,
/// two hold one each of the first device's.
const PROJECTS: usize = 4;
const DEVICES: [&[&str]; 4] = [&["project:0", "project:1"], &["project:0"], &["project:1"], &["project:2", "project:3"]];

/// A pusher of the moving-rows test: batches of changes to shared rows that mostly move them to another
/// project (or to none), sometimes delete or recreate them, with hlcs interleaved across pushers. While
/// the log is compacted, a change stamped at or before the compacted entries may be refused `stale`.
fn run_moving_pusher(url: &str, pusher: usize, compacting: bool) {
    let mut client = Client::connect(url, NoTls).expect("pusher connects");
    for batch in 0..BATCHES {
        let changes: Vec<_> = (0..PER_BATCH)
            .map(|i| {
                let step = batch * PER_BATCH + i;
                // A small deterministic mix of rows, projects and kinds of change per pusher and step.
                let mix = (step * 2_654_435_761 + pusher * 40_503) % 1_000_003;
                let row = (pusher * 13 + step * 7) % ROWS;
                let hlc = hlc_ago(120_000 - step as i64 * 40 + (pusher as i64 * 17) % 40, pusher as u16);
                let project = if mix % 6 == 5 { json!(null) } else { json!(mix % PROJECTS) };
                let (op, value) = match mix % 10 {
                    0 => (Op::Delete, json!({})),
                    1 => (Op::Insert, json!({"project": project, "step": step, "by": pusher, "title": format!("row {row}")})),
                    _ => (Op::Update, json!({"project": project, "step": step, "by": pusher})),
                };
                change(op, "task", &row.to_string(), hlc, &format!("device-{pusher}"), value)
            })
            .collect();
        let response = push(&mut client, "acme", &changes).expect("push succeeds");
        let refused_stale = |status: &Status| compacting && *status == Status::Rejected { reason: REASON_STALE.into() };
        assert!(
            response.results.iter().all(|result| result.status.is_acknowledged() || refused_stale(&result.status)),
            "every change is acknowledged: {:?}",
            response.results
        );
    }
}

/// A scoped device of the moving-rows test: its rows as it merged them, and the seqs it was given.
#[derive(Default)]
struct ScopedDevice {
    rows: BTreeMap<String, RowState>,
    cursor: i64,
    seen: BTreeSet<i64>,
    /// The resets it was given after its first pull.
    resets: usize,
    /// The `leave` changes it was given outside resets (rows moving out of its instances).
    leaves: usize,
}

impl ScopedDevice {
    /// Pulls one page of `instances` and applies it as a replica must (`PulledChange::apply_to`).
    /// Returns whether the server has more.
    fn sync_page(&mut self, client: &mut Client, instances: &[&str]) -> bool {
        let page = pull_scoped(client, "acme", self.cursor, 7, instances).expect("scoped pull succeeds");
        if page.reset && self.cursor > 0 {
            // The log below the cursor was compacted: the device starts over from the rows the reset sends.
            self.resets += 1;
            self.rows.clear();
            self.seen.clear();
        }
        for pulled in &page.changes {
            if !page.reset {
                assert!(pulled.seq > self.cursor, "seq {} arrives after the cursor {}", pulled.seq, self.cursor);
                assert!(self.seen.insert(pulled.seq), "seq {} delivered twice to {instances:?}", pulled.seq);
                self.leaves += usize::from(pulled.op == Op::Leave);
            }
            if let Some(state) = pulled.apply_to(self.rows.remove(&pulled.pk)).expect("a whole row decodes") {
                self.rows.insert(pulled.pk.clone(), state);
            }
        }
        assert!(page.cursor >= self.cursor || page.cursor < 0, "the cursor never goes back");
        self.cursor = page.cursor;
        page.has_more
    }

    /// The rows it shows.
    fn visible(&self) -> BTreeMap<String, serde_json::Map<String, serde_json::Value>> {
        self.rows.iter().filter_map(|(pk, state)| state.visible().map(|row| (pk.clone(), row))).collect()
    }
}

#[test]
fn scoped_devices_pulling_while_rows_move_between_scopes_hold_exactly_their_instances_rows() {
    let devices = scoped_devices_pulling_while_rows_move(false);
    assert!(devices.iter().all(|device| device.resets == 0), "only the first pull is a reset");
}

#[test]
fn scoped_devices_reset_by_compactions_while_rows_move_still_hold_exactly_their_instances_rows() {
    let devices = scoped_devices_pulling_while_rows_move(true);
    assert!(devices.iter().map(|device| device.resets).sum::<usize>() > 0, "compactions overtook the devices' cursors");
}

/// Pushers move rows between projects while the scoped [`DEVICES`] pull (and, when `compacting`, the log
/// is compacted over and over); afterwards each device holds exactly the server's rows of its instances.
fn scoped_devices_pulling_while_rows_move(compacting: bool) -> Vec<ScopedDevice> {
    let cluster = Cluster::start();
    let url = cluster.create_database("sync");
    cluster.connect("sync").batch_execute("SELECT sync_define_scope('project', 'task', 'project')").unwrap();
    let finished = Arc::new(AtomicUsize::new(0));
    let pushers: Vec<_> = (0..PUSHERS)
        .map(|pusher| {
            let (url, finished) = (url.clone(), finished.clone());
            thread::spawn(move || {
                run_moving_pusher(&url, pusher, compacting);
                finished.fetch_add(1, Ordering::SeqCst);
            })
        })
        .collect();
    let pullers: Vec<_> = DEVICES
        .iter()
        .map(|&instances| {
            let (url, finished) = (url.clone(), finished.clone());
            thread::spawn(move || {
                let mut client = Client::connect(&url, NoTls).expect("device connects");
                let mut device = ScopedDevice::default();
                let mut pulls = 0;
                loop {
                    let all_done = finished.load(Ordering::SeqCst) == PUSHERS;
                    let has_more = device.sync_page(&mut client, instances);
                    pulls += 1;
                    if compacting && !all_done {
                        // Slower than the pushers, so that compactions overtake its cursor.
                        thread::sleep(std::time::Duration::from_millis(30));
                    }
                    if all_done && !has_more {
                        break;
                    }
                }
                assert!(pulls > 10, "the device pulled while the pushers ran ({pulls} pulls)");
                device
            })
        })
        .collect();
    // Entries logged more than 300 ms ago are compacted, so compactions keep raising the horizon over the
    // cursors of devices behind it (and the pushers' stamps, 40 ms apart per change, run far ahead of
    // the compacted ones').
    let compactor = compacting.then(|| {
        let (url, finished) = (url.clone(), finished.clone());
        thread::spawn(move || {
            let mut client = Client::connect(&url, NoTls).expect("compactor connects");
            let mut removing = 0;
            while finished.load(Ordering::SeqCst) < PUSHERS {
                let compacted: serde_json::Value = client.query_one("SELECT sync_compact('acme', '300 milliseconds')", &[]).expect("compaction succeeds").get(0);
                removing += usize::from(compacted["removed"].as_i64() > Some(0));
                thread::sleep(std::time::Duration::from_millis(20));
            }
            removing
        })
    });
    for pusher in pushers {
        pusher.join().expect("pusher finishes");
    }
    if let Some(compactor) = compactor {
        assert!(compactor.join().expect("compactor finishes") > 0, "compactions removed entries while the devices pulled");
    }
    let devices: Vec<ScopedDevice> = pullers.into_iter().map(|puller| puller.join().expect("device finishes")).collect();

    let server = server_rows(&cluster, "acme", "task");
    let in_instances = |instances: &[&str]| -> BTreeMap<_, _> {
        server
            .iter()
            .filter(|(_, row)| row.get("project").and_then(serde_json::Value::as_u64).is_some_and(|p| instances.contains(&format!("project:{p}").as_str())))
            .map(|(pk, row)| (pk.clone(), row.clone()))
            .collect()
    };
    // (While compactions keep resetting the devices, rows may reach them by resets alone.)
    let left: usize = devices.iter().map(|device| device.leaves).sum();
    assert!(compacting || left > 50, "rows moved out of the devices' instances while they pulled ({left} leaves)");
    for (device, instances) in devices.iter().zip(DEVICES) {
        assert!(!device.visible().is_empty(), "{instances:?} holds rows");
        assert_eq!(device.visible(), in_instances(instances), "{instances:?} holds exactly the server's rows of its instances");
    }
    let mut separately = devices[1].visible();
    separately.extend(devices[2].visible());
    assert_eq!(separately, devices[0].visible(), "pulling project:0 and project:1 apart gives the rows of pulling them together");
    devices
}
