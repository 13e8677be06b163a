//! The client's acceptance test: three replicas make hundreds of random changes with overlapping keys
//! to a free model and to a bound table (composite primary key, a CHECK constraint that rejects some
//! changes), while the network fails before a push, after the server committed (the answer lost) and
//! before a pull, replicas go offline, a replica is dropped mid-sync and reopened from its SQLite file,
//! the server's own SQL writes the table, and the log is compacted while a replica lags. In the end
//! every replica, a fresh one and the server (its pull and the table) hold the same rows, and every
//! change the server rejected reached the app exactly once.
//!
//! Seeded: `SYNC_EXT_SEED=<n>` replays a run (the seed is printed when it fails);
//! `SYNC_EXT_CONVERGENCE_OPS=<n>` sets the number of random steps (default 1200).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sync_ext_client::protocol::{Change, Op, PullResponse, PushResponse, Status};
use sync_ext_client::{Error, Key, LocalStore, Model, PgRemote, Remote, RemoteFuture, SyncClient};
use sync_ext_pgrx_tests::{off_runtime, Cluster};
use uuid::Uuid;

type Row = Map<String, Value>;

/// A row of the bound table `items` (primary key (a, b)); every field but the key may be absent.
#[derive(Debug, Serialize, Deserialize)]
struct Item {
    a: i32,
    b: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    qty: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    label: Option<String>,
}

impl Model for Item {
    const NAME: &'static str = "item";
    type Key = (i32, String);
    type Patch = Value;
    fn key(&self) -> (i32, String) {
        (self.a, self.b.clone())
    }
}

/// A network failure to inject into the next call of its kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// The push never reaches the server.
    BeforePush,
    /// The server commits the push and the answer is lost.
    AfterCommit,
    /// The push commits and its answer never comes: the sync hangs there (and is abandoned).
    HangAfterCommit,
    /// The pull never reaches the server.
    BeforePull,
}

/// A remote that fails on command, and records the rejections it delivered to its client.
struct Flaky {
    inner: PgRemote,
    fault: Mutex<Option<Fault>>,
    offline: AtomicBool,
    /// The op_ids the server rejected in an answer that reached a client (shared by all replicas).
    rejected: Arc<Mutex<BTreeSet<Uuid>>>,
}

impl Flaky {
    fn take(&self, kinds: &[Fault]) -> Option<Fault> {
        let mut fault = self.fault.lock().unwrap();
        fault.filter(|armed| kinds.contains(armed)).inspect(|_| *fault = None)
    }

    fn offline_error<T>(&self) -> Option<RemoteFuture<'_, T>> {
        self.offline.load(Ordering::SeqCst).then(|| -> RemoteFuture<'_, T> { Box::pin(async { Err(Error::connection("offline", None)) }) })
    }
}

impl Remote for Flaky {
    fn push<'a>(&'a self, tenant: &'a str, changes: &'a [Change]) -> RemoteFuture<'a, PushResponse> {
        if let Some(offline) = self.offline_error() {
            return offline;
        }
        let fault = self.take(&[Fault::BeforePush, Fault::AfterCommit, Fault::HangAfterCommit]);
        Box::pin(async move {
            if fault == Some(Fault::BeforePush) {
                return Err(Error::connection("injected: the push never left", None));
            }
            let response = self.inner.push(tenant, changes).await?;
            match fault {
                Some(Fault::AfterCommit) => return Err(Error::connection("injected: the answer was lost after the commit", None)),
                Some(Fault::HangAfterCommit) => std::future::pending::<()>().await,
                _ => {}
            }
            let rejected = response.results.iter().filter(|result| matches!(result.status, Status::Rejected { .. })).map(|result| result.op_id);
            self.rejected.lock().unwrap().extend(rejected);
            Ok(response)
        })
    }

    fn pull<'a>(&'a self, tenant: &'a str, since: i64, max_changes: i32, scopes: Option<&'a [String]>) -> RemoteFuture<'a, PullResponse> {
        if let Some(offline) = self.offline_error() {
            return offline;
        }
        if self.take(&[Fault::BeforePull]).is_some() {
            return Box::pin(async { Err(Error::connection("injected: the pull never left", None)) });
        }
        self.inner.pull(tenant, since, max_changes, scopes)
    }
}

/// splitmix64: a small seeded generator, the same sequence for the same seed everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// Prints the seed when the test fails, so the run can be replayed.
struct SeedOnFailure(u64);

impl Drop for SeedOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("client_convergence failed with SYNC_EXT_SEED={} (replay with that variable set)", self.0);
        }
    }
}

type Replica = SyncClient<Arc<Flaky>>;

/// Opens (or reopens) replica `index` on its SQLite file, with its remote and the shared callback log.
fn open(dir: &std::path::Path, index: usize, remote: &Arc<Flaky>, callbacks: &Arc<Mutex<Vec<Uuid>>>) -> Replica {
    let callbacks = callbacks.clone();
    SyncClient::builder()
        .tenant("acme")
        .actor(format!("device-{index}"))
        .local(LocalStore::sqlite(dir.join(format!("replica-{index}.db"))).unwrap())
        .remote(remote.clone())
        .push_batch(7)
        .pull_page(25)
        .on_rejected(move |rejection| callbacks.lock().unwrap().push(rejection.change.op_id))
        .build()
        .unwrap()
}

/// A row without its null fields (a table row has every column, a replica only those written).
fn without_nulls(row: &Row) -> Row {
    row.iter().filter(|(_, value)| !value.is_null()).map(|(name, value)| (name.clone(), value.clone())).collect()
}

/// A row of `items` without its key and tenant columns: a row an update created (an update of an unseen
/// or deleted row) carries no key fields in its synced value, only in the table.
fn without_key(row: &Row) -> Row {
    row.iter().filter(|(name, _)| !["a", "b", "tenant_id"].contains(&name.as_str())).map(|(name, value)| (name.clone(), value.clone())).collect()
}

fn local_rows(replica: &SyncClient<impl Remote>, model: &str) -> BTreeMap<String, Row> {
    replica.list::<Row>(model).unwrap().into_iter().map(|(pk, row)| (pk, without_nulls(&row))).collect()
}

/// The server's live rows of a model, from its snapshots.
fn server_rows(cluster: &Cluster, model: &str) -> BTreeMap<String, Row> {
    off_runtime(|| {
        let rows = cluster.connect("sync").query("SELECT id, value FROM sync_ext.snapshots WHERE tenant_id = 'acme' AND model = $1 AND NOT deleted", &[&model]).unwrap();
        rows.iter().map(|row| (row.get::<_, String>(0), without_nulls(row.get::<_, Value>(1).as_object().unwrap()))).collect()
    })
}

/// The rows of the bound table, keyed by their wire pk as the client formats it.
fn table_rows(cluster: &Cluster) -> BTreeMap<String, Row> {
    off_runtime(|| {
        let rows = cluster.connect("sync").query("SELECT sync_row_to_portable(t) FROM items AS t WHERE tenant_id = 'acme'", &[]).unwrap();
        rows.iter()
            .map(|row| {
                let fields = without_nulls(row.get::<_, Value>(0).as_object().unwrap());
                let key = (fields["a"].as_i64().unwrap() as i32, fields["b"].as_str().unwrap().to_owned());
                (key.to_pk(), without_key(&fields))
            })
            .collect()
    })
}

fn execute(cluster: &Cluster, sql: &str) {
    off_runtime(|| cluster.connect("sync").batch_execute(sql).expect("statements run"));
}

/// One random local write (or a local transaction of two) on a replica.
fn write(rng: &mut Rng, replica: &Replica, actor: usize) {
    let op = [Op::Insert, Op::Update, Op::Delete][rng.below(3) as usize];
    if rng.chance(50) {
        let pk = rng.below(8).to_string();
        let value = json!({"n": rng.below(100), "by": actor}).as_object().cloned();
        replica.apply_change("note", &pk, op, value).unwrap();
        return;
    }
    let key = (rng.below(3) as i32, ["x", "y"][rng.below(2) as usize].to_owned());
    // One change in ten breaks CHECK (qty >= 0): the server rejects it (unless newer changes supersede it).
    let qty = rng.below(11) as i32 - 1;
    let items = replica.collection::<Item>().unwrap();
    match op {
        Op::Insert if rng.chance(20) => {
            // Two rows at once, or neither.
            let other = ((key.0 + 1) % 3, key.1.clone());
            replica
                .transaction(|tx| {
                    tx.insert(&Item { a: key.0, b: key.1.clone(), qty: Some(qty.max(0)), label: Some(format!("pair-{actor}")) })?;
                    tx.insert(&Item { a: other.0, b: other.1.clone(), qty: Some(qty), label: None })
                })
                .unwrap();
        }
        Op::Insert => {
            items.insert(&Item { a: key.0, b: key.1.clone(), qty: Some(qty), label: Some(format!("by-{actor}")) }).unwrap();
        }
        Op::Update => {
            let patch = if rng.chance(50) { json!({"qty": qty}) } else { json!({"label": format!("edit-{}", rng.below(100))}) };
            items.update(&key, &patch).unwrap();
        }
        _ => {
            items.delete(&key).unwrap();
        }
    }
}

/// Syncs a replica; an injected failure or being offline is a transient error, anything else fails.
async fn sync(replica: &Replica) {
    if let Err(error) = replica.sync().await {
        assert!(error.is_transient(), "only injected, transient failures: {error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_converge_with_the_server_through_faults_reopens_and_compaction() {
    let seed = std::env::var("SYNC_EXT_SEED").ok().map(|seed| seed.parse().expect("SYNC_EXT_SEED is a number")).unwrap_or_else(|| u64::from(Uuid::new_v4().as_u128() as u32));
    let _report = SeedOnFailure(seed);
    let steps: usize = std::env::var("SYNC_EXT_CONVERGENCE_OPS").ok().map(|n| n.parse().expect("SYNC_EXT_CONVERGENCE_OPS is a number")).unwrap_or(1200);
    println!("SYNC_EXT_SEED={seed} SYNC_EXT_CONVERGENCE_OPS={steps}");
    let mut rng = Rng(seed);

    let (cluster, url) = off_runtime(|| {
        let cluster = Cluster::start();
        let url = cluster.create_database("sync");
        (cluster, url)
    });
    execute(
        &cluster,
        "CREATE TABLE items (a int, b text, tenant_id text NOT NULL, qty int CHECK (qty >= 0), label text, PRIMARY KEY (a, b));
         SELECT sync_register_model('item', 'items', tenant_column => 'tenant_id');",
    );
    let dir = tempfile::tempdir().unwrap();
    let delivered: Arc<Mutex<BTreeSet<Uuid>>> = Arc::default();
    let callbacks: Arc<Mutex<Vec<Uuid>>> = Arc::default();
    let remotes: Vec<Arc<Flaky>> = (0..3)
        .map(|_| Arc::new(Flaky { inner: PgRemote::new(&url), fault: Mutex::new(None), offline: AtomicBool::new(false), rejected: delivered.clone() }))
        .collect();
    let mut replicas: Vec<Replica> = (0..3).map(|index| open(dir.path(), index, &remotes[index], &callbacks)).collect();
    let mut drained: Vec<Uuid> = Vec::new();
    let (mut reopened, mut compacted) = (0, false);

    for step in 0..steps {
        let index = rng.below(3) as usize;
        let roll = rng.below(100);
        if roll < 70 {
            write(&mut rng, &replicas[index], index);
        } else if roll < 88 {
            if rng.chance(30) {
                let fault = [Fault::BeforePush, Fault::AfterCommit, Fault::BeforePull][rng.below(3) as usize];
                *remotes[index].fault.lock().unwrap() = Some(fault);
            }
            sync(&replicas[index]).await;
        } else if roll < 92 {
            let offline = &remotes[index].offline;
            offline.store(!offline.load(Ordering::SeqCst), Ordering::SeqCst);
        } else if roll < 94 {
            // Dropped mid-sync: the push commits, its answer never comes, the process goes away.
            write(&mut rng, &replicas[index], index);
            remotes[index].offline.store(false, Ordering::SeqCst);
            *remotes[index].fault.lock().unwrap() = Some(Fault::HangAfterCommit);
            let cut = tokio::time::timeout(Duration::from_millis(500), replicas[index].sync()).await;
            assert!(cut.is_err(), "the sync hung after the push committed and was abandoned");
            replicas.remove(index);
            replicas.insert(index, open(dir.path(), index, &remotes[index], &callbacks));
            reopened += 1;
        } else if roll < 97 {
            let a = rng.below(3);
            execute(&cluster, &format!("UPDATE items SET label = 'server-{step}' WHERE a = {a}"));
        } else {
            drained.extend(replicas[index].take_rejections().unwrap().into_iter().map(|rejection| rejection.change.op_id));
        }
        if !compacted && step >= steps / 2 {
            // Replica 2 lags: offline, it writes; the others sync; the log is compacted past its cursor.
            remotes[2].offline.store(true, Ordering::SeqCst);
            for _ in 0..5 {
                write(&mut rng, &replicas[2], 2);
            }
            remotes.iter().take(2).for_each(|remote| remote.offline.store(false, Ordering::SeqCst));
            for replica in &replicas[..2] {
                sync(replica).await;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            let result: Value = off_runtime(|| cluster.connect("sync").query_one("SELECT sync_compact('acme', '0 seconds')", &[]).unwrap().get(0));
            println!("compacted while replica 2 lags: {result}");
            compacted = true;
        }
    }

    // Back online, no faults: everyone syncs until nothing moves.
    for remote in &remotes {
        remote.offline.store(false, Ordering::SeqCst);
        *remote.fault.lock().unwrap() = None;
    }
    for _ in 0..2 {
        for replica in &replicas {
            replica.sync().await.expect("a sync without faults succeeds");
        }
    }
    let fresh = SyncClient::builder().tenant("acme").actor("fresh").local(LocalStore::memory()).remote(PgRemote::new(&url)).build().unwrap();
    fresh.sync().await.unwrap();

    for model in ["note", "item"] {
        let server = server_rows(&cluster, model);
        assert!(!server.is_empty(), "{model}: the run left rows");
        assert_eq!(local_rows(&fresh, model), server, "{model}: a fresh replica pulls the server's rows");
        for (index, replica) in replicas.iter().enumerate() {
            assert_eq!(replica.pending().unwrap(), 0);
            assert_eq!(local_rows(replica, model), server, "{model}: replica {index} holds the server's rows");
        }
    }
    let merged: BTreeMap<String, Row> = server_rows(&cluster, "item").iter().map(|(pk, row)| (pk.clone(), without_key(row))).collect();
    assert_eq!(table_rows(&cluster), merged, "the bound table holds the merged rows, under the same pks");
    // Typed: rows with their key fields decode; rows an update created lack them and are reported.
    let listed = replicas[0].collection::<Item>().unwrap().list().unwrap();
    assert_eq!(listed.rows.len() + listed.failed.len(), merged.len());
    for (key, item) in &listed.rows {
        assert_eq!(*key, item.key(), "the key read from the pk is the row's own");
    }
    for (pk, error) in &listed.failed {
        assert!(matches!(error, Error::Decode { problem, .. } if problem.contains("missing field")), "{pk}: {error}");
    }

    for replica in &replicas {
        drained.extend(replica.take_rejections().unwrap().into_iter().map(|rejection| rejection.change.op_id));
    }
    let delivered = delivered.lock().unwrap().clone();
    let callbacks = callbacks.lock().unwrap().clone();
    println!("{steps} steps: {} rejections, {reopened} replicas reopened mid-sync", delivered.len());
    assert!(!delivered.is_empty(), "the CHECK constraint rejected some changes");
    assert_eq!(callbacks.len(), delivered.len(), "one callback per rejection");
    assert_eq!(callbacks.iter().copied().collect::<BTreeSet<_>>(), delivered, "the callbacks are the server's rejections");
    assert_eq!(drained.len(), delivered.len(), "each rejection drained once");
    assert_eq!(drained.into_iter().collect::<BTreeSet<_>>(), delivered, "the drained rejections are the server's");
    assert!(compacted);
}
