//! The benchmark: sync_ext's push and pull against the same work done by plain SQL on the same schema,
//! in one run on a throwaway cluster. Prints the tables and writes them to the file named by the first
//! argument (`BENCHMARKS.md` by default). Run it through `scripts/bench.sh` (release build).

use std::error::Error;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};
use postgres::{Client, NoTls, Statement};
use serde_json::json;
use sync_ext_pgrx_tests::Cluster;
use sync_ext_protocol::hlc::wall_clock_millis;
use sync_ext_protocol::Hlc;
use uuid::Uuid;

/// Settings of the benchmark cluster. fsync is off (as in every test cluster) so that the figures
/// measure the engine's work rather than this machine's disk; with fsync on, small batches of both
/// contenders wait on the same commit flush.
const SERVER_SETTINGS: &[&str] = &["shared_buffers = '1GB'", "max_wal_size = '4GB'", "checkpoint_timeout = '30min'"];

/// How many times each workload runs, alternating the contenders; the median counts.
const REPETITIONS: usize = 3;

/// The plain-SQL push: one statement per batch that numbers the changes from the tenant's counter,
/// appends them to the op log and upserts the snapshots with whole-row last-writer-wins.
const PLAIN_PUSH: &str = "
WITH input AS (
    SELECT c.* FROM ROWS FROM (jsonb_to_recordset($2::jsonb)
               AS (op_id uuid, model text, pk text, op text, hlc text, actor text, value jsonb))
           WITH ORDINALITY AS c(op_id, model, pk, op, hlc, actor, value, ord)),
tenant AS (
    UPDATE sync_ext.tenants
       SET last_seq = last_seq + (SELECT count(*) FROM input),
           last_hlc = greatest(last_hlc, (SELECT max(hlc) FROM input)), last_push_at = now()
     WHERE tenant_id = $1
 RETURNING last_seq - (SELECT count(*) FROM input) AS base),
numbered AS (SELECT (SELECT base FROM tenant) + ord AS seq, * FROM input),
logged AS (
    INSERT INTO sync_ext.op_log (tenant_id, seq, op_id, model, pk, op, actor, hlc, updated_at, payload, payload_hash)
    SELECT $1, seq, op_id, model, pk, op, actor, hlc, left(hlc, 23)::timestamp AT TIME ZONE 'UTC', value,
           sha256(convert_to(coalesce(value::text, ''), 'UTF8'))
      FROM numbered
        ON CONFLICT (tenant_id, op_id) DO NOTHING),
latest AS (SELECT DISTINCT ON (model, pk) * FROM numbered ORDER BY model, pk, hlc DESC)
INSERT INTO sync_ext.snapshots AS s (tenant_id, model, id, value, hlc, actor, op_id, deleted, seq)
SELECT $1, model, pk, coalesce(value, '{}'), hlc, actor, op_id, op = 'delete', seq FROM latest
    ON CONFLICT (tenant_id, model, id) DO UPDATE
   SET value = s.value || excluded.value, hlc = excluded.hlc, actor = excluded.actor, op_id = excluded.op_id,
       deleted = excluded.deleted, seq = excluded.seq
 WHERE excluded.hlc > s.hlc";

/// The plain-SQL pull: a page of the log in seq order as a JSON array.
const PLAIN_PULL: &str = "
SELECT coalesce(jsonb_agg(to_jsonb(c) ORDER BY c.seq), '[]')
  FROM (SELECT seq, op_id, model, pk, op, hlc, actor, payload AS value
          FROM sync_ext.op_log WHERE tenant_id = $1 AND seq > $2 ORDER BY seq LIMIT $3::int) AS c";

const OUR_PUSH: &str = "SELECT sync_push($1, $2)";
const OUR_PULL_JSON: &str = "SELECT sync_pull($1, $2, $3)";
const OUR_PULL_MSGPACK: &str = "SELECT sync_pull_msgpack($1, $2, $3)";

/// A jsonb parameter sent as already-encoded bytes, so both contenders get identical input at no client cost.
#[derive(Debug)]
struct JsonbBody(Vec<u8>);

impl JsonbBody {
    fn new(value: &serde_json::Value) -> Self {
        let mut bytes = vec![1]; // the jsonb binary format: a version byte, then the text
        serde_json::to_writer(&mut bytes, value).expect("JSON serializes");
        JsonbBody(bytes)
    }
}

impl ToSql for JsonbBody {
    fn to_sql(&self, _: &Type, out: &mut postgres::types::private::BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        out.extend_from_slice(&self.0);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB
    }

    to_sql_checked!();
}

/// A result received in full but not decoded: its size on the wire.
struct WireBytes(usize);

impl<'a> FromSql<'a> for WireBytes {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn Error + Sync + Send>> {
        Ok(WireBytes(raw.len()))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// Stamps increasing by one per change, starting six hours ago (inside any clock-skew limit).
struct Stamps(AtomicU64);

impl Stamps {
    fn next(&self) -> String {
        let n = self.0.fetch_add(1, Ordering::Relaxed);
        let start = wall_clock_millis() - 6 * 3_600_000;
        Hlc::new(start + (n / 1000) as i64, (n % 1000) as u16).expect("a valid HLC").to_string()
    }
}

/// Which kind of change a push workload sends.
#[derive(Clone, Copy, PartialEq)]
enum Write {
    Insert,
    Update,
}

/// Batches of `batch` changes to rows `0..rows` of model `todo`.
fn batches(stamps: &Stamps, write: Write, rows: usize, batch: usize) -> Vec<JsonbBody> {
    (0..rows)
        .collect::<Vec<_>>()
        .chunks(batch)
        .map(|chunk| {
            let changes: Vec<serde_json::Value> = chunk
                .iter()
                .map(|&n| {
                    let (op, value) = match write {
                        Write::Insert => ("insert", json!({"title": format!("todo {n}"), "done": false, "priority": n % 5,
                                                          "tags": ["home", "errand"], "note": "pick up before 5pm"})),
                        Write::Update => ("update", json!({"done": true, "priority": (n + 1) % 5})),
                    };
                    json!({"op_id": Uuid::new_v4(), "model": "todo", "pk": format!("row-{n}"), "op": op,
                           "hlc": stamps.next(), "actor": "bench", "value": value})
                })
                .collect();
            JsonbBody::new(&serde_json::Value::from(changes))
        })
        .collect()
}

/// The contenders.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Contender {
    SyncExt,
    PlainSql,
}

impl Contender {
    fn push_sql(self) -> &'static str {
        match self {
            Contender::SyncExt => OUR_PUSH,
            Contender::PlainSql => PLAIN_PUSH,
        }
    }
}

fn connect(url: &str) -> Client {
    Client::connect(url, NoTls).unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
}

/// Creates the tenant's counter row (the plain-SQL push expects it, as a real schema would).
fn create_tenant(client: &mut Client, tenant: &str) {
    client.execute("INSERT INTO sync_ext.tenants (tenant_id) VALUES ($1) ON CONFLICT DO NOTHING", &[&tenant]).unwrap();
}

/// Pushes every batch in order over one connection and returns the elapsed time.
fn push_all(client: &mut Client, statement: &Statement, tenant: &str, bodies: &[JsonbBody]) -> Duration {
    let started = Instant::now();
    for body in bodies {
        client.query(statement, &[&tenant, body]).expect("a push");
    }
    started.elapsed()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// One line of the push table.
struct PushResult {
    workload: String,
    ours: f64,
    plain: f64,
}

/// A push workload: `rows` inserts (then, for updates, `rows` updates of them) in batches of `batch`, over
/// `connections` connections each with its own tenant. Returns changes/s for each contender.
fn push_workload(url: &str, stamps: &Stamps, write: Write, batch: usize, rows: usize, connections: usize, label: &str) -> PushResult {
    let mut rates = [Vec::new(), Vec::new()];
    for repetition in 0..REPETITIONS {
        for (slot, contender) in [Contender::SyncExt, Contender::PlainSql].into_iter().enumerate() {
            let tenants: Vec<String> = (0..connections).map(|c| format!("{label}-{contender:?}-{repetition}-{c}")).collect();
            let barrier = Arc::new(Barrier::new(connections + 1));
            let workers: Vec<_> = tenants
                .iter()
                .map(|tenant| {
                    let mut client = connect(url);
                    create_tenant(&mut client, tenant);
                    let statement = client.prepare(contender.push_sql()).unwrap();
                    if write == Write::Update {
                        let inserts = batches(stamps, Write::Insert, rows, 1000);
                        push_all(&mut client, &statement, tenant, &inserts);
                    }
                    let bodies = batches(stamps, write, rows, batch);
                    let (tenant, barrier) = (tenant.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        push_all(&mut client, &statement, &tenant, &bodies)
                    })
                })
                .collect();
            barrier.wait();
            let started = Instant::now();
            for worker in workers {
                worker.join().expect("a push worker");
            }
            rates[slot].push((rows * connections) as f64 / started.elapsed().as_secs_f64());
        }
    }
    let [ours, plain] = rates;
    PushResult { workload: label.to_owned(), ours: median(ours), plain: median(plain) }
}

/// A pull strategy: the statement and what it is called in the tables.
struct PullKind {
    name: &'static str,
    sql: &'static str,
}

const PULL_KINDS: [PullKind; 3] = [
    PullKind { name: "sync_ext, JSON", sql: OUR_PULL_JSON },
    PullKind { name: "sync_ext, MessagePack", sql: OUR_PULL_MSGPACK },
    PullKind { name: "plain SQL, JSON", sql: PLAIN_PULL },
];

/// Pages through `changes` changes of `tenant` from seq 0, `page` at a time; returns (elapsed, bytes).
fn pull_through(client: &mut Client, statement: &Statement, tenant: &str, changes: i64, page: i32) -> (Duration, usize) {
    let (started, mut bytes, mut cursor) = (Instant::now(), 0, 0_i64);
    while cursor < changes {
        bytes += client.query_one(statement, &[&tenant, &cursor, &page]).expect("a pull").get::<_, WireBytes>(0).0;
        cursor += i64::from(page);
    }
    (started.elapsed(), bytes)
}

/// Fills `tenant` directly with plain inserts until its log holds `total` changes (a realistic history
/// for the scale runs, written far faster than through pushes).
fn fill_history(client: &mut Client, tenant: &str, total: i64) {
    create_tenant(client, tenant);
    let from: i64 = client.query_one("SELECT last_seq FROM sync_ext.tenants WHERE tenant_id = $1", &[&tenant]).unwrap().get(0);
    if from >= total {
        return;
    }
    client
        .batch_execute(&format!(
            "BEGIN;
             INSERT INTO sync_ext.op_log (tenant_id, seq, op_id, model, pk, op, actor, hlc, updated_at, payload, payload_hash)
             SELECT '{tenant}', n, gen_random_uuid(), 'todo', 'old-' || n, 'insert', 'history',
                    to_char(timestamp '2026-01-01' + n * interval '1 ms', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') || '-0000',
                    now(), jsonb_build_object('title', 'todo ' || n, 'done', false, 'priority', n % 5,
                                              'tags', '[\"home\", \"errand\"]'::jsonb, 'note', 'pick up before 5pm'),
                    sha256(n::text::bytea)
               FROM generate_series({first}, {total}) AS n;
             INSERT INTO sync_ext.snapshots (tenant_id, model, id, value, hlc, actor, op_id, deleted, seq)
             SELECT tenant_id, model, pk, payload, hlc, actor, op_id, false, seq
               FROM sync_ext.op_log WHERE tenant_id = '{tenant}' AND seq >= {first};
             UPDATE sync_ext.tenants SET last_seq = {total}, last_hlc = (SELECT max(hlc) FROM sync_ext.op_log WHERE tenant_id = '{tenant}')
              WHERE tenant_id = '{tenant}';
             COMMIT;",
            first = from + 1
        ))
        .expect("filling the history");
    settle(client);
}

/// Vacuums, analyzes and checkpoints, so that a measurement does not share the machine with the
/// background work the previous one left behind.
fn settle(client: &mut Client) {
    client.batch_execute("VACUUM ANALYZE").expect("VACUUM ANALYZE");
    client.batch_execute("CHECKPOINT").expect("CHECKPOINT");
}

/// One line of the scale table: milliseconds per push batch and per pull page at a log size.
struct ScaleResult {
    log_rows: i64,
    push_ms: [f64; 2],
    pull_ms: [f64; 2],
}

const SCALE_BATCHES: usize = 30;
const SCALE_BATCH: usize = 100;
const SCALE_PAGES: usize = 30;
const PAGE: i32 = 1000;

/// Push and pull times per batch with the tenant's log at `log_rows`.
fn scale_point(client: &mut Client, stamps: &Stamps, log_rows: i64) -> ScaleResult {
    fill_history(client, "scale", log_rows);
    let push_statements = [client.prepare(OUR_PUSH).unwrap(), client.prepare(PLAIN_PUSH).unwrap()];
    let pull_statements = [client.prepare(OUR_PULL_JSON).unwrap(), client.prepare(PLAIN_PULL).unwrap()];
    let (mut push_ms, mut pull_ms) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    for repetition in 0..REPETITIONS {
        for slot in 0..2 {
            let bodies = batches(stamps, Write::Insert, SCALE_BATCHES * SCALE_BATCH, SCALE_BATCH);
            let elapsed = push_all(client, &push_statements[slot], "scale", &bodies);
            push_ms[slot].push(elapsed.as_secs_f64() * 1000.0 / SCALE_BATCHES as f64);
            let started = Instant::now();
            for page in 0..SCALE_PAGES {
                // Pages spread over the whole history, the same ones for both contenders.
                let since = (log_rows - i64::from(PAGE)) * (page * REPETITIONS + repetition) as i64 / (SCALE_PAGES * REPETITIONS) as i64;
                client.query_one(&pull_statements[slot], &[&"scale", &since, &PAGE]).expect("a pull").get::<_, WireBytes>(0);
            }
            pull_ms[slot].push(started.elapsed().as_secs_f64() * 1000.0 / SCALE_PAGES as f64);
        }
    }
    let [push_ours, push_plain] = push_ms;
    let [pull_ours, pull_plain] = pull_ms;
    ScaleResult { log_rows, push_ms: [median(push_ours), median(push_plain)], pull_ms: [median(pull_ours), median(pull_plain)] }
}

/// A backend's memory, in kB, from /proc (`RssAnon`: its private memory; `VmHWM`: its peak resident set).
fn backend_memory(pid: i32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// One line of the memory table.
struct MemoryResult {
    kind: &'static str,
    before_kb: u64,
    peak_kb: u64,
    changes_per_second: f64,
}

/// Pulls all `changes` of `tenant` on a fresh connection while sampling the backend's private memory.
fn pull_with_memory(url: &str, kind: &PullKind, tenant: &str, changes: i64) -> Option<MemoryResult> {
    let mut client = connect(url);
    let pid: i32 = client.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let statement = client.prepare(kind.sql).unwrap();
    let before_kb = backend_memory(pid, "RssAnon:")?;
    let (done, peak) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(before_kb)));
    let sampler = {
        let (done, peak) = (done.clone(), peak.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Some(kb) = backend_memory(pid, "RssAnon:") {
                    peak.fetch_max(kb, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let (elapsed, _) = pull_through(&mut client, &statement, tenant, changes, PAGE);
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    Some(MemoryResult { kind: kind.name, before_kb, peak_kb: peak.load(Ordering::Relaxed), changes_per_second: changes as f64 / elapsed.as_secs_f64() })
}

/// What the machine and the server are.
fn machine_description(client: &mut Client) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo.lines().find(|line| line.starts_with("model name")).and_then(|line| line.split(':').nth(1)).unwrap_or("unknown").trim();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_gib = meminfo.lines().next().and_then(|line| line.split_whitespace().nth(1)).and_then(|kb| kb.parse::<f64>().ok()).unwrap_or(0.0) / 1048576.0;
    let version: String = client.query_one("SHOW server_version", &[]).unwrap().get(0);
    let extension: String = client.query_one("SELECT extversion FROM pg_extension WHERE extname = 'sync_ext'", &[]).unwrap().get(0);
    format!(
        "- CPU: {cpu}, {cores} cores available; memory {memory_gib:.0} GiB\n- PostgreSQL {version}, sync_ext {extension} (release build); \
         cluster settings: fsync = off, {}\n- client and server on the same machine, over loopback TCP",
        SERVER_SETTINGS.join(", ")
    )
}

fn ratio(ours: f64, plain: f64) -> String {
    format!("{:.0}%", 100.0 * ours / plain)
}

/// The push table.
fn push_section(url: &str, stamps: &Stamps) -> String {
    eprintln!("[bench] push workloads");
    push_workload(url, stamps, Write::Insert, 100, 2000, 1, "warm-up");
    let mut report = format!("## Push\n\nChanges per second, each workload run {REPETITIONS} times alternating the contenders (median).\n\n");
    report.push_str("| workload | sync_ext | plain SQL | ratio |\n|---|---:|---:|---:|\n");
    for (write, batch, rows, connections) in [
        (Write::Insert, 1, 2_000, 1),
        (Write::Insert, 100, 20_000, 1),
        (Write::Insert, 1000, 50_000, 1),
        (Write::Update, 1, 2_000, 1),
        (Write::Update, 100, 20_000, 1),
        (Write::Update, 1000, 50_000, 1),
        (Write::Insert, 1, 1_000, 4),
        (Write::Insert, 100, 10_000, 4),
        (Write::Insert, 1000, 25_000, 4),
        (Write::Update, 1000, 25_000, 4),
    ] {
        let kind = if write == Write::Insert { "inserts" } else { "updates" };
        let tenants = if connections == 1 { "1 tenant".to_owned() } else { format!("{connections} tenants × {connections} connections") };
        let label = format!("{kind}, batch {batch}, {tenants}");
        let result = push_workload(url, stamps, write, batch, rows, connections, &label);
        eprintln!("[bench]   {label}: {:.0} vs {:.0} changes/s", result.ours, result.plain);
        writeln!(report, "| {} | {:.0} | {:.0} | {} |", result.workload, result.ours, result.plain, ratio(result.ours, result.plain)).unwrap();
    }
    settle(&mut connect(url));
    report
}

/// The pull table: paging through a tenant's log in each encoding.
fn pull_section(url: &str, stamps: &Stamps) -> String {
    eprintln!("[bench] pull workloads");
    const PULLED: i64 = 100_000;
    let mut client = connect(url);
    create_tenant(&mut client, "pull");
    let push_statement = client.prepare(OUR_PUSH).unwrap();
    push_all(&mut client, &push_statement, "pull", &batches(stamps, Write::Insert, PULLED as usize, 1000));
    settle(&mut client);
    let pull_statements: Vec<Statement> = PULL_KINDS.iter().map(|kind| client.prepare(kind.sql).unwrap()).collect();
    let mut rates = vec![Vec::new(); PULL_KINDS.len()];
    let mut bytes = vec![0; PULL_KINDS.len()];
    for _ in 0..REPETITIONS {
        for (slot, statement) in pull_statements.iter().enumerate() {
            let (elapsed, received) = pull_through(&mut client, statement, "pull", PULLED, PAGE);
            rates[slot].push(PULLED as f64 / elapsed.as_secs_f64());
            bytes[slot] = received;
        }
    }
    let rates: Vec<f64> = rates.into_iter().map(median).collect();
    let plain_rate = rates[PULL_KINDS.len() - 1];
    let mut report = format!("## Pull\n\nPaging through {PULLED} changes with `max_changes` {PAGE}; ratio against the plain-SQL JSON pull.\n\n");
    report.push_str("| pull | changes/s | ratio | bytes/change on the wire |\n|---|---:|---:|---:|\n");
    for (slot, kind) in PULL_KINDS.iter().enumerate() {
        let per_change = bytes[slot] as f64 / PULLED as f64;
        eprintln!("[bench]   {}: {:.0} changes/s", kind.name, rates[slot]);
        writeln!(report, "| {} | {:.0} | {} | {per_change:.0} |", kind.name, rates[slot], ratio(rates[slot], plain_rate)).unwrap();
    }
    report
}

/// The scale table: per-batch times as the log grows to a million rows.
fn scale_section(url: &str, stamps: &Stamps) -> String {
    eprintln!("[bench] scale");
    let mut client = connect(url);
    let mut report = format!(
        "## Scale\n\nMilliseconds per push of {SCALE_BATCH} inserts and per pull of a {PAGE}-change page (pages spread over the \
         whole history), with the tenant's op_log at each size.\n\n"
    );
    report.push_str("| op_log rows | push, sync_ext | push, plain SQL | ratio | pull, sync_ext | pull, plain SQL | ratio |\n");
    report.push_str("|---:|---:|---:|---:|---:|---:|---:|\n");
    for log_rows in [10_000, 100_000, MEMORY_HISTORY] {
        let point = scale_point(&mut client, stamps, log_rows);
        eprintln!("[bench]   {log_rows} rows: push {:.2} vs {:.2} ms, pull {:.2} vs {:.2} ms", point.push_ms[0], point.push_ms[1], point.pull_ms[0], point.pull_ms[1]);
        writeln!(
            report,
            "| {} | {:.2} | {:.2} | {} | {:.2} | {:.2} | {} |",
            point.log_rows,
            point.push_ms[0],
            point.push_ms[1],
            ratio(point.push_ms[1], point.push_ms[0]),
            point.pull_ms[0],
            point.pull_ms[1],
            ratio(point.pull_ms[1], point.pull_ms[0])
        )
        .unwrap();
    }
    report
}

/// How long the tenant's history is for the memory table (and the last scale point).
const MEMORY_HISTORY: i64 = 1_000_000;

/// The memory table: a backend's private memory while it serves a whole million-change history.
fn memory_section(url: &str) -> String {
    eprintln!("[bench] memory");
    let mut client = connect(url);
    fill_history(&mut client, "scale", MEMORY_HISTORY);
    let history: i64 = client.query_one("SELECT last_seq FROM sync_ext.tenants WHERE tenant_id = 'scale'", &[]).unwrap().get(0);
    let mut report = format!(
        "## Memory\n\nThe backend's private memory (`RssAnon`, sampled every 2 ms) while one connection pulls all {history} changes of a \
         tenant, {PAGE} at a time.\n\n"
    );
    report.push_str("| pull | before | peak | changes/s |\n|---|---:|---:|---:|\n");
    for kind in &PULL_KINDS {
        match pull_with_memory(url, kind, "scale", history) {
            Some(memory) => {
                eprintln!("[bench]   {}: peak {} kB", memory.kind, memory.peak_kb);
                let mib = |kb: u64| kb as f64 / 1024.0;
                writeln!(report, "| {} | {:.1} MiB | {:.1} MiB | {:.0} |", memory.kind, mib(memory.before_kb), mib(memory.peak_kb), memory.changes_per_second)
            }
            None => writeln!(report, "| {} | n/a (cannot read the backend's /proc status) | | |", kind.name),
        }
        .unwrap();
    }
    report
}

/// Whether a section runs: all of them, or those `SYNC_EXT_BENCH_ONLY` names (`push,pull,scale,memory`),
/// to profile one part without waiting for the rest.
fn wanted(section: &str) -> bool {
    std::env::var("SYNC_EXT_BENCH_ONLY").map_or(true, |only| only.split(',').any(|name| name.trim() == section))
}

fn main() {
    let output = std::env::args().nth(1).unwrap_or_else(|| "BENCHMARKS.md".into());
    let started = Instant::now();
    let cluster = Cluster::start_with(SERVER_SETTINGS);
    let stamps = Stamps(AtomicU64::new(0));
    let (push_url, pull_url, scale_url) = (cluster.create_database("push"), cluster.create_database("pull"), cluster.create_database("scale"));
    let machine = machine_description(&mut connect(&push_url));
    let mut sections = Vec::new();
    if wanted("push") {
        sections.push(push_section(&push_url, &stamps));
    }
    if wanted("pull") {
        sections.push(pull_section(&pull_url, &stamps));
    }
    if wanted("scale") {
        sections.push(scale_section(&scale_url, &stamps));
    }
    if wanted("memory") {
        sections.push(memory_section(&scale_url));
    }
    let document = format!(
        "# Benchmarks\n\nWritten by `bash scripts/bench.sh` in {:.0} s. sync_ext against the same work done by plain SQL on the same \
         schema in the same run: the plain-SQL push is one statement per batch (`jsonb_to_recordset`, `INSERT ... ON CONFLICT` into \
         op_log and snapshots, whole-row last-writer-wins); the plain-SQL pull is `SELECT ... ORDER BY seq LIMIT` with `to_jsonb`. \
         Ratios are sync_ext's rate over plain SQL's (above 100%: sync_ext is faster).\n\n{machine}\n\n{}",
        started.elapsed().as_secs_f64(),
        sections.join("\n")
    );
    std::fs::write(&output, &document).unwrap_or_else(|e| panic!("writing {output}: {e}"));
    println!("{document}");
}
