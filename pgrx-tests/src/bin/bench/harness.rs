//! What every section shares: the cluster and its databases, request bodies and stamps, the plain-SQL
//! contenders, push workloads, history fills and the pause between sections.

use std::cell::RefCell;
use std::collections::HashMap;
use std::error::Error;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};
use postgres::{Client, NoTls, Statement};
use serde_json::json;
use sync_ext_pgrx_tests::Cluster;
use sync_ext_protocol::hlc::wall_clock_millis;
use sync_ext_protocol::Hlc;
use uuid::Uuid;

use crate::targets::Target;

/// Settings of the benchmark clusters. The main cluster runs with fsync off (as every test cluster) so
/// that the figures measure the engine's work rather than this machine's disk; the concurrency section
/// starts a second, durable cluster with the same settings and fsync on.
pub const SERVER_SETTINGS: &[&str] = &["shared_buffers = '1GB'", "max_wal_size = '4GB'", "checkpoint_timeout = '30min'"];

/// How many times each workload runs, alternating the contenders; the median counts.
pub const REPETITIONS: usize = 3;

/// The plain-SQL push: one statement per batch that numbers the changes from the tenant's counter,
/// appends them to the op log and upserts the snapshots with whole-row last-writer-wins.
pub const PLAIN_PUSH: &str = "
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
pub const PLAIN_PULL: &str = "
SELECT coalesce(jsonb_agg(to_jsonb(c) ORDER BY c.seq), '[]')
  FROM (SELECT seq, op_id, model, pk, op, hlc, actor, payload AS value
          FROM sync_ext.op_log WHERE tenant_id = $1 AND seq > $2 ORDER BY seq LIMIT $3::int) AS c";

pub const OUR_PUSH: &str = "SELECT sync_push($1, $2)";
pub const OUR_PULL_JSON: &str = "SELECT sync_pull($1, $2, $3)";
pub const OUR_PULL_MSGPACK: &str = "SELECT sync_pull_msgpack($1, $2, $3)";

/// Whether this is a quick development run (`SYNC_EXT_BENCH_QUICK=1`): most sizes a tenth, so the
/// figures are not comparable with a full run.
pub fn quick() -> bool {
    std::env::var("SYNC_EXT_BENCH_QUICK").is_ok_and(|value| value == "1")
}

/// A workload size: `full`, or a tenth of it in a quick run.
pub fn size(full: usize) -> usize {
    if quick() {
        (full / 10).max(1)
    } else {
        full
    }
}

/// The benchmark's main cluster (fsync off), its databases and the stamps every push uses.
pub struct Bench {
    pub cluster: Cluster,
    pub stamps: Stamps,
    /// Connection strings of the databases created so far, by name.
    databases: RefCell<HashMap<&'static str, String>>,
}

impl Bench {
    /// Starts the main cluster.
    pub fn start() -> Bench {
        Bench { cluster: Cluster::start_with(SERVER_SETTINGS), stamps: Stamps::default(), databases: RefCell::default() }
    }

    /// The connection string of database `name`, created with sync_ext on first use (sections that
    /// share data share a database).
    pub fn database(&self, name: &'static str) -> String {
        self.databases.borrow_mut().entry(name).or_insert_with(|| self.cluster.create_database(name)).clone()
    }
}

/// What a section adds to the document: its text, and the targets it measured.
pub struct Section {
    pub report: String,
    pub targets: Vec<Target>,
}

/// A jsonb parameter sent as already-encoded bytes, so every contender gets identical input at no client cost.
#[derive(Debug)]
pub struct JsonbBody(Vec<u8>);

impl JsonbBody {
    pub fn new(value: &serde_json::Value) -> Self {
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
pub struct WireBytes(pub usize);

impl<'a> FromSql<'a> for WireBytes {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn Error + Sync + Send>> {
        Ok(WireBytes(raw.len()))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// Stamps increasing by one per change, starting six hours ago (inside any clock-skew limit, and after
/// every stamp of a filled history).
#[derive(Default)]
pub struct Stamps(AtomicU64);

impl Stamps {
    fn next(&self) -> String {
        let n = self.0.fetch_add(1, Ordering::Relaxed);
        let start = wall_clock_millis() - 6 * 3_600_000;
        Hlc::new(start + (n / 1000) as i64, (n % 1000) as u16).expect("a valid HLC").to_string()
    }
}

/// Which kind of change a push workload sends.
#[derive(Clone, Copy, PartialEq)]
pub enum Write {
    Insert,
    Update,
    Delete,
}

impl Write {
    /// The workload's name in the tables.
    pub fn name(self) -> &'static str {
        match self {
            Write::Insert => "inserts",
            Write::Update => "updates",
            Write::Delete => "deletes",
        }
    }
}

/// The row keys `{prefix}{n}` for each `n`.
pub fn keys(prefix: &str, numbers: impl IntoIterator<Item = usize>) -> Vec<String> {
    numbers.into_iter().map(|n| format!("{prefix}{n}")).collect()
}

/// Batches of `batch` changes to the rows `keys` of `model`. Inserts carry the bench's standard todo
/// (five fields), updates change two fields, deletes carry no value.
pub fn batches(stamps: &Stamps, write: Write, model: &str, keys: &[String], batch: usize) -> Vec<JsonbBody> {
    batches_of(stamps, write, model, keys, batch, |n| match write {
        Write::Insert => json!({"title": format!("todo {n}"), "done": false, "priority": n % 5,
                                "tags": ["home", "errand"], "note": "pick up before 5pm"}),
        Write::Update => json!({"done": true, "priority": (n + 1) % 5}),
        Write::Delete => serde_json::Value::Null,
    })
}

/// Batches of `batch` changes of kind `write` to the rows `keys` of `model`, each carrying the value
/// `value_of` gives for the row's position in `keys`.
pub fn batches_of(
    stamps: &Stamps,
    write: Write,
    model: &str,
    keys: &[String],
    batch: usize,
    value_of: impl Fn(usize) -> serde_json::Value,
) -> Vec<JsonbBody> {
    let op = match write {
        Write::Insert => "insert",
        Write::Update => "update",
        Write::Delete => "delete",
    };
    let changes: Vec<serde_json::Value> = keys
        .iter()
        .enumerate()
        .map(|(n, pk)| {
            json!({"op_id": Uuid::new_v4(), "model": model, "pk": pk, "op": op, "hlc": stamps.next(), "actor": "bench", "value": value_of(n)})
        })
        .collect();
    changes.chunks(batch).map(|chunk| JsonbBody::new(&serde_json::Value::from(chunk.to_vec()))).collect()
}

/// One side of a push comparison: a statement taking `(tenant, changes jsonb)`, and the model its
/// changes name.
#[derive(Clone, Copy)]
pub struct Contender {
    pub sql: &'static str,
    pub model: &'static str,
}

/// sync_push on the unbound model `todo`.
pub const SYNC_EXT: Contender = Contender { sql: OUR_PUSH, model: "todo" };

/// [`PLAIN_PUSH`] on the same changes.
pub const PLAIN_SQL: Contender = Contender { sql: PLAIN_PUSH, model: "todo" };

/// A connection to `url`.
pub fn connect(url: &str) -> Client {
    Client::connect(url, NoTls).unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
}

/// A connection to `url` as `role` (the clusters trust loopback connections).
pub fn connect_as(url: &str, role: &str) -> Client {
    let mut config: postgres::Config = url.parse().expect("a connection string");
    config.user(role).connect(NoTls).unwrap_or_else(|e| panic!("connecting to {url} as {role}: {e}"))
}

/// A name used nowhere else in this run, for tenants and key prefixes.
pub fn fresh_name() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("t{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Creates the tenant's counter row (the plain-SQL push expects it, as a real schema would).
pub fn create_tenant(client: &mut Client, tenant: &str) {
    client.execute("INSERT INTO sync_ext.tenants (tenant_id) VALUES ($1) ON CONFLICT DO NOTHING", &[&tenant]).unwrap();
}

/// Pushes every batch in order over one connection and returns the time each push took.
pub fn push_each(client: &mut Client, statement: &Statement, tenant: &str, bodies: &[JsonbBody]) -> Vec<Duration> {
    bodies
        .iter()
        .map(|body| {
            let started = Instant::now();
            client.query(statement, &[&tenant, body]).expect("a push");
            started.elapsed()
        })
        .collect()
}

/// Pushes every batch in order over one connection and returns the elapsed time.
pub fn push_all(client: &mut Client, statement: &Statement, tenant: &str, bodies: &[JsonbBody]) -> Duration {
    push_each(client, statement, tenant, bodies).into_iter().sum()
}

/// The median (the upper one of an even count).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// `n` with thousands separators (`30,000`), for the text.
pub fn grouped(n: usize) -> String {
    let digits = n.to_string();
    let mut text = String::new();
    for (position, digit) in digits.chars().enumerate() {
        if position > 0 && (digits.len() - position).is_multiple_of(3) {
            text.push(',');
        }
        text.push(digit);
    }
    text
}

/// `(batch, changes)` sizes for the text: "2,000 changes in batches of 1 and 30,000 in batches of 1,000"
/// (the changes [`size`]d as the workloads are).
pub fn batch_sizes(sizes: &[(usize, usize)]) -> String {
    let parts: Vec<String> = sizes
        .iter()
        .enumerate()
        .map(|(n, (batch, changes))| format!("{}{} in batches of {}", grouped(size(*changes)), if n == 0 { " changes" } else { "" }, grouped(*batch)))
        .collect();
    match parts.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// `ours` over `baseline` as a percentage, for the tables.
pub fn percent(ours: f64, baseline: f64) -> String {
    format!("{:.0}%", 100.0 * ours / baseline)
}

/// How the connections of a push workload share tenants.
#[derive(Clone, Copy, PartialEq)]
pub enum Tenancy {
    /// Each connection pushes to a tenant of its own.
    OwnTenant,
    /// Every connection pushes to the same tenant (different rows).
    SharedTenant,
}

/// A push workload: each of `connections` connections writes `rows` rows of its own (updates and
/// deletes first insert them, untimed) in batches of `batch`, all connections at once.
pub struct PushWorkload {
    pub write: Write,
    pub batch: usize,
    pub rows: usize,
    pub connections: usize,
    pub tenancy: Tenancy,
}

impl PushWorkload {
    /// One connection writing `rows` rows of its own tenant.
    pub fn single(write: Write, batch: usize, rows: usize) -> PushWorkload {
        PushWorkload { write, batch, rows, connections: 1, tenancy: Tenancy::OwnTenant }
    }

    /// What the workload is called in the tables.
    pub fn label(&self) -> String {
        let (write, batch, n) = (self.write.name(), self.batch, self.connections);
        match (self.tenancy, n) {
            (_, 1) => format!("{write}, batch {batch}, 1 tenant"),
            (Tenancy::OwnTenant, _) => format!("{write}, batch {batch}, {n} tenants × {n} connections"),
            (Tenancy::SharedTenant, _) => format!("{write}, batch {batch}, 1 tenant × {n} connections"),
        }
    }

    /// Runs the workload [`REPETITIONS`] times, alternating the contenders, each time on fresh tenants;
    /// returns each contender's median rate in changes/s.
    pub fn rates(&self, url: &str, stamps: &Stamps, contenders: &[Contender]) -> Vec<f64> {
        let mut rates = vec![Vec::new(); contenders.len()];
        for _ in 0..REPETITIONS {
            for (slot, contender) in contenders.iter().enumerate() {
                rates[slot].push(self.run(url, stamps, contender));
            }
        }
        rates.into_iter().map(median).collect()
    }

    /// One run: sets up every connection, starts them together, returns changes/s.
    pub fn run(&self, url: &str, stamps: &Stamps, contender: &Contender) -> f64 {
        let shared_tenant = fresh_name();
        let barrier = Arc::new(Barrier::new(self.connections + 1));
        let workers: Vec<_> = (0..self.connections)
            .map(|connection| {
                let tenant = match self.tenancy {
                    Tenancy::OwnTenant => fresh_name(),
                    Tenancy::SharedTenant => shared_tenant.clone(),
                };
                let mut client = connect(url);
                create_tenant(&mut client, &tenant);
                let statement = client.prepare(contender.sql).unwrap();
                // Keys unique in the database: bound tables key rows without their tenant.
                let rows = keys(&format!("{tenant}-{connection}-"), 0..self.rows);
                if self.write != Write::Insert {
                    push_all(&mut client, &statement, &tenant, &batches(stamps, Write::Insert, contender.model, &rows, 1000));
                }
                let bodies = batches(stamps, self.write, contender.model, &rows, self.batch);
                let barrier = barrier.clone();
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
        (self.rows * self.connections) as f64 / started.elapsed().as_secs_f64()
    }
}

/// Fills tenants' logs and snapshots directly, far faster than through pushes: each `(tenant, total)`
/// gets inserts of model `todo` (the standard todo, keys `old-<seq>`, stamps from 2020) until its log
/// holds `total` changes. One statement for all tenants, their rows interleaved in the tables as if
/// they had pushed at the same time. Settles afterwards.
pub fn fill(client: &mut Client, histories: &[(String, i64)]) {
    const FILL: &str = "
WITH plan AS (
    SELECT t.tenant_id, t.last_seq + 1 AS first, w.total AS last
      FROM unnest($1::text[], $2::bigint[]) AS w(tenant_id, total) JOIN sync_ext.tenants AS t USING (tenant_id)
     WHERE w.total > t.last_seq),
logged AS (
    INSERT INTO sync_ext.op_log (tenant_id, seq, op_id, model, pk, op, actor, hlc, updated_at, payload, payload_hash)
    SELECT p.tenant_id, n, gen_random_uuid(), 'todo', 'old-' || n, 'insert', 'history',
           to_char(timestamp '2020-01-01' + n * interval '1 ms', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') || '-0000',
           now(), jsonb_build_object('title', 'todo ' || n, 'done', false, 'priority', n % 5,
                                     'tags', '[\"home\", \"errand\"]'::jsonb, 'note', 'pick up before 5pm'),
           sha256(n::text::bytea)
      FROM plan AS p, generate_series(p.first, p.last) AS n
     ORDER BY n::float8 / p.last, p.tenant_id
 RETURNING tenant_id, seq, op_id, model, pk, actor, hlc, payload),
snapshotted AS (
    INSERT INTO sync_ext.snapshots (tenant_id, model, id, value, hlc, actor, op_id, deleted, seq)
    SELECT tenant_id, model, pk, payload, hlc, actor, op_id, false, seq FROM logged)
UPDATE sync_ext.tenants AS t SET last_seq = l.last_seq, last_hlc = l.last_hlc
  FROM (SELECT tenant_id, max(seq) AS last_seq, max(hlc) AS last_hlc FROM logged GROUP BY tenant_id) AS l
 WHERE t.tenant_id = l.tenant_id";
    let (tenants, totals): (Vec<&str>, Vec<i64>) = histories.iter().map(|(tenant, total)| (tenant.as_str(), *total)).unzip();
    let mut transaction = client.transaction().unwrap();
    transaction.execute("INSERT INTO sync_ext.tenants (tenant_id) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING", &[&tenants]).unwrap();
    transaction.execute(FILL, &[&tenants, &totals]).expect("filling the history");
    transaction.commit().unwrap();
    settle(client);
}

/// [`fill`] for one tenant.
pub fn fill_history(client: &mut Client, tenant: &str, total: i64) {
    fill(client, &[(tenant.to_owned(), total)]);
}

/// Vacuums, analyzes and checkpoints, so that a measurement does not share the machine with the
/// background work the previous one left behind.
pub fn settle(client: &mut Client) {
    client.batch_execute("VACUUM ANALYZE").expect("VACUUM ANALYZE");
    client.batch_execute("CHECKPOINT").expect("CHECKPOINT");
}
