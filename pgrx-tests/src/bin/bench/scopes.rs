//! Scopes section: a device's pull of one scope instance among many in a busy tenant against an unscoped
//! pull of a tenant the size of that instance, and what two scope definitions on a model add to its pushes.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use postgres::types::ToSql;
use postgres::{Client, Statement};
use serde_json::json;

use crate::harness::{
    batch_sizes, batches_of, connect, fresh_name, grouped, keys, median, percent, push_all, settle, size, Bench, JsonbBody, Section, Stamps, Write, OUR_PULL_JSON,
    OUR_PUSH, REPETITIONS,
};
use crate::targets::{Goal, Target, Unit};

/// The scope instances of the busy tenant (each a project), and the rows of each.
const INSTANCES: usize = 1000;
const ROWS_PER_INSTANCE: usize = 100;

/// The tenant holding [`INSTANCES`] projects, and the tenant holding as many rows as one of them, unscoped.
const BUSY: &str = "busy";
const FLAT: &str = "flat";

/// The model with two scope definitions (`project:` on its field `project`, `owner:` on `owner`), and the
/// same rows' model without any.
const SCOPED_MODEL: &str = "task";
const UNSCOPED_MODEL: &str = "plain_task";

/// The instance the scoped device pulls.
const PULLED_INSTANCE: &str = "project:7";

const SCOPED_PULL: &str = "SELECT sync_pull($1, $2, $3, $4)";

/// Pulls per contender per repetition.
const CALLS: usize = 200;

/// The push comparison's (batch, inserts), then the batch and size of the updates moving rows between projects.
const PUSH_BATCHES: [(usize, usize); 3] = [(1, 2_000), (100, 10_000), (1000, 30_000)];
const MOVES: (usize, usize) = (100, 10_000);

/// A task's first value: in project `n % projects`, owned by one of seven members.
fn task(n: usize, projects: usize) -> serde_json::Value {
    json!({"title": format!("task {n}"), "done": false, "priority": n % 5, "project": n % projects,
           "owner": format!("member-{}", n % 7), "note": "due before the review"})
}

/// Pushes the tasks `rows` of `model` to `tenant` (in batches of 1,000, so consecutive changes belong to
/// different projects), then one update of each that leaves it in its project.
fn push_tasks(client: &mut Client, stamps: &Stamps, tenant: &str, model: &str, rows: usize, projects: usize) {
    let statement = client.prepare(OUR_PUSH).unwrap();
    let keys = keys("task-", 0..rows);
    push_all(client, &statement, tenant, &batches_of(stamps, Write::Insert, model, &keys, 1000, |n| task(n, projects)));
    push_all(client, &statement, tenant, &batches_of(stamps, Write::Update, model, &keys, 1000, |n| json!({"done": true, "priority": (n + 1) % 5})));
}

/// Microseconds per call of the scoped and of the unscoped pull, the calls alternating (so that the
/// machine's ups and downs fall on both alike): the median of [`REPETITIONS`] × [`CALLS`] calls each.
fn alternating_micros(client: &mut Client, contenders: [(&Statement, &[&(dyn ToSql + Sync)]); 2]) -> [f64; 2] {
    let mut micros = [Vec::new(), Vec::new()];
    for _ in 0..REPETITIONS * CALLS {
        for (slot, (statement, params)) in contenders.iter().enumerate() {
            let started = Instant::now();
            client.query_one(*statement, params).expect("a pull");
            micros[slot].push(started.elapsed().as_secs_f64() * 1e6);
        }
    }
    micros.map(median)
}

/// How many changes a pull returns (to check that both contenders do the same work).
fn pulled_changes(client: &mut Client, statement: &Statement, params: &[&(dyn ToSql + Sync)]) -> usize {
    let page: serde_json::Value = client.query_one(statement, params).unwrap().get(0);
    page["changes"].as_array().map_or(0, Vec::len)
}

/// One pull comparison: the scoped device's call on the busy tenant against the unscoped call on the flat one.
struct PullCase {
    name: &'static str,
    scoped_since: i64,
    flat_since: i64,
}

/// The scopes table.
pub fn scopes_section(bench: &Bench) -> Section {
    eprintln!("[bench] scopes");
    let url = bench.database("scopes");
    let mut client = connect(&url);
    client
        .batch_execute(&format!(
            "SELECT sync_define_scope('project', '{SCOPED_MODEL}', 'project'); SELECT sync_define_scope('owner', '{SCOPED_MODEL}', 'owner');"
        ))
        .expect("defining the scopes");
    let rows_per_instance = size(ROWS_PER_INSTANCE);
    push_tasks(&mut client, &bench.stamps, BUSY, SCOPED_MODEL, INSTANCES * rows_per_instance, INSTANCES);
    // The flat tenant's rows all belong to project 7, as the pulled instance's do.
    push_tasks(&mut client, &bench.stamps, FLAT, UNSCOPED_MODEL, rows_per_instance, 1);
    settle(&mut client);
    let last_seq = |client: &mut Client, tenant: &str| -> i64 {
        client.query_one("SELECT last_seq FROM sync_ext.tenants WHERE tenant_id = $1", &[&tenant]).unwrap().get(0)
    };
    let (busy_last, flat_last) = (last_seq(&mut client, BUSY), last_seq(&mut client, FLAT));
    let cases = [
        PullCase { name: "catch-up: every change of the instance (scoped from seq 1, unscoped from 0)", scoped_since: 1, flat_since: 0 },
        PullCase { name: "reset: the instance's current rows (scoped from 0, unscoped from ahead of the log)", scoped_since: 0, flat_since: flat_last + 1 },
        PullCase { name: "idle: nothing new (from the tenant's last seq)", scoped_since: busy_last, flat_since: flat_last },
    ];
    let (scoped, unscoped) = (client.prepare(SCOPED_PULL).unwrap(), client.prepare(OUR_PULL_JSON).unwrap());
    let instances = vec![PULLED_INSTANCE.to_owned()];
    let page = 1000_i32;
    let mut report = format!(
        "## Scopes\n\nTenant `{BUSY}` holds {} projects of {} tasks each ({} rows of model `{SCOPED_MODEL}`, which has two scope \
         definitions: `project` and `owner`), each task inserted then updated through sync_push in batches of 1,000 that \
         interleave the projects ({} changes in its log); tenant `{FLAT}` holds {} tasks of a model without definitions, \
         pushed the same way. A device pulls the instance `{PULLED_INSTANCE}` of `{BUSY}` (`max_changes` 1,000, one page) \
         against the unscoped pull of the whole of `{FLAT}`: the same rows and changes. Microseconds per call, the two pulls \
         alternating call by call, the median of {} calls each.\n\n",
        grouped(INSTANCES),
        grouped(rows_per_instance),
        grouped(INSTANCES * rows_per_instance),
        grouped(busy_last as usize),
        grouped(rows_per_instance),
        grouped(REPETITIONS * CALLS),
    );
    report.push_str("| pull | changes | scoped, 1 instance of 1,000 | unscoped, tenant of its size | time over unscoped |\n|---|---:|---:|---:|---:|\n");
    let mut targets = Vec::new();
    for case in &cases {
        let scoped_params: [&(dyn ToSql + Sync); 4] = [&BUSY, &case.scoped_since, &page, &instances];
        let flat_params: [&(dyn ToSql + Sync); 3] = [&FLAT, &case.flat_since, &page];
        let (scoped_changes, flat_changes) = (pulled_changes(&mut client, &scoped, &scoped_params), pulled_changes(&mut client, &unscoped, &flat_params));
        assert_eq!(scoped_changes, flat_changes, "{}: both pulls must return the same number of changes", case.name);
        let [ours, baseline] = alternating_micros(&mut client, [(&scoped, &scoped_params), (&unscoped, &flat_params)]);
        eprintln!("[bench]   {}: scoped {ours:.0} µs vs unscoped {baseline:.0} µs", case.name);
        writeln!(report, "| {} | {scoped_changes} | {ours:.0} µs | {baseline:.0} µs | {:.2}× |", case.name, ours / baseline).unwrap();
        let workload = format!("scoped pull of 1 instance among 1,000, {}, time vs an unscoped pull of a tenant its size", case.name.split(':').next().unwrap());
        targets.push(Target::new(workload, ours / baseline, Goal::AtMost(1.5), Unit::Times));
    }
    let (push_report, push_targets) = push_overhead(&mut client, &bench.stamps);
    report.push_str(&push_report);
    targets.extend(push_targets);
    settle(&mut client);
    Section { report, targets }
}

/// Pushes to the model with two scope definitions against the same pushes to the model without: inserts
/// per batch size, and updates that move every row to another project.
fn push_overhead(client: &mut Client, stamps: &Stamps) -> (String, Vec<Target>) {
    let statement = client.prepare(OUR_PUSH).unwrap();
    let projects = 50;
    let mut workloads: Vec<(String, usize, usize)> = PUSH_BATCHES.iter().map(|&(batch, rows)| (format!("inserts, batch {batch}"), batch, size(rows))).collect();
    workloads.push((format!("updates moving each row to another project, batch {}", MOVES.0), MOVES.0, size(MOVES.1)));
    let mut report = format!(
        "\nPushes to `{SCOPED_MODEL}` (two scope definitions, so each row is in a `project:` and an `owner:` instance of {projects} \
         projects and 7 members) against the same pushes to `{UNSCOPED_MODEL}` (none), one connection, a fresh tenant per run: {} \
         inserts, and {} updates in batches of {} that move every row to another project (its rows inserted first, untimed). \
         Changes per second, the two tenants' batches pushed in turn, {REPETITIONS} runs (median).\n\n",
        batch_sizes(&PUSH_BATCHES),
        grouped(size(MOVES.1)),
        MOVES.0
    );
    report.push_str("| push | no scope | two scope definitions | ratio | time over no scope |\n|---|---:|---:|---:|---:|\n");
    let mut targets = Vec::new();
    for (name, batch, rows) in workloads {
        let moves = name.starts_with("updates");
        let mut rates = [Vec::new(), Vec::new()];
        for _ in 0..REPETITIONS {
            // A fresh tenant per model; their timed batches alternate, one of each in turn.
            let runs = [UNSCOPED_MODEL, SCOPED_MODEL].map(|model| {
                let tenant = fresh_name();
                let keys = keys("task-", 0..rows);
                let timed: Vec<JsonbBody> = if moves {
                    push_all(client, &statement, &tenant, &batches_of(stamps, Write::Insert, model, &keys, 1000, |n| task(n, projects)));
                    batches_of(stamps, Write::Update, model, &keys, batch, |n| json!({"project": (n + 1) % projects, "done": true}))
                } else {
                    batches_of(stamps, Write::Insert, model, &keys, batch, |n| task(n, projects))
                };
                (tenant, timed)
            });
            let mut elapsed = [Duration::ZERO; 2];
            for batch in 0..runs[0].1.len() {
                for (slot, (tenant, timed)) in runs.iter().enumerate() {
                    elapsed[slot] += push_all(client, &statement, tenant, std::slice::from_ref(&timed[batch]));
                }
            }
            for slot in 0..2 {
                rates[slot].push(rows as f64 / elapsed[slot].as_secs_f64());
            }
        }
        let [unscoped, scoped] = rates.map(median);
        eprintln!("[bench]   push {name}: two scopes {scoped:.0} vs none {unscoped:.0} changes/s");
        writeln!(report, "| {name} | {unscoped:.0} | {scoped:.0} | {} | {:.2}× |", percent(scoped, unscoped), unscoped / scoped).unwrap();
        targets.push(Target::new(format!("push, {name}, two scope definitions, time vs no scope"), unscoped / scoped, Goal::AtMost(1.3), Unit::Times));
    }
    (report, targets)
}
