//! Bound-table sections: pushes into a model bound to a real table against pushes of an unbound model,
//! and plain SQL writes to a bound table (captured by its triggers) against the same writes uncaptured.

use std::fmt::Write as _;
use std::time::Instant;

use postgres::Client;

use crate::harness::{batch_sizes, connect, grouped, median, percent, settle, size, Bench, Contender, PushWorkload, Section, Write, OUR_PUSH, REPETITIONS, SYNC_EXT};
use crate::targets::{Goal, Target, Unit};

/// Creates `table`, typed columns for the bench's standard todo plus the tenant column, and binds it to
/// `model` unless `model` is `None`.
fn create_todo_table(client: &mut Client, table: &str, model: Option<&str>) {
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id text PRIMARY KEY, tenant_id text NOT NULL, title text NOT NULL,
                                   done boolean NOT NULL DEFAULT false, priority integer, tags text[], note text)"
        ))
        .expect("creating a todo table");
    if let Some(model) = model {
        client.batch_execute(&format!("SELECT sync_register_model('{model}', '{table}', tenant_column => 'tenant_id')")).expect("binding a table");
    }
}

/// Plain SQL writing the pushed rows into the bound table `bound_todos` (an upsert on its key, each
/// change's value decoded into the table's columns), where its capture triggers log them.
const PLAIN_INTO_BOUND: &str = "
INSERT INTO bound_todos
SELECT r.* FROM jsonb_to_recordset($2::jsonb) AS c(pk text, value jsonb),
       jsonb_populate_record(NULL::bound_todos, c.value || jsonb_build_object('id', c.pk, 'tenant_id', $1::text)) AS r
    ON CONFLICT (id) DO UPDATE
   SET title = excluded.title, done = excluded.done, priority = excluded.priority, tags = excluded.tags, note = excluded.note";

/// The bound section's contenders: the unbound push (the baseline), the bound push, and plain SQL into
/// the bound table (for information).
const BOUND_CONTENDERS: [Contender; 3] = [
    SYNC_EXT,
    Contender { sql: OUR_PUSH, model: "bound_todo" },
    Contender { sql: PLAIN_INTO_BOUND, model: "bound_todo" },
];

/// The bound section's (batch, changes).
const BOUND_BATCHES: [(usize, usize); 2] = [(1, 2_000), (1000, 30_000)];

/// Pushes of inserts into a model bound to a table against the same pushes of an unbound model.
pub fn bound_section(bench: &Bench) -> Section {
    eprintln!("[bench] bound tables");
    let url = bench.database("bound");
    create_todo_table(&mut connect(&url), "bound_todos", Some("bound_todo"));
    PushWorkload::single(Write::Insert, 100, size(2_000)).rates(&url, &bench.stamps, &BOUND_CONTENDERS); // warm-up
    let mut report = format!(
        "## Bound tables\n\nInserts of the standard todo into a model bound to a table (`id text PRIMARY KEY`, the tenant column \
         and five typed columns: text, boolean, integer, text[], text; see the README's \"Models bound to application tables\") \
         against the same inserts of an unbound model, and plain SQL writing the same rows into the bound table (an upsert from \
         `jsonb_populate_record`, logged by its capture triggers) for information. Changes per second, one connection, {}, \
         {REPETITIONS} runs alternating (median).\n\n",
        batch_sizes(&BOUND_BATCHES)
    );
    report.push_str("| workload | sync_ext, unbound | sync_ext, bound | ratio | plain SQL into the bound table |\n|---|---:|---:|---:|---:|\n");
    let mut targets = Vec::new();
    for (batch, rows) in BOUND_BATCHES {
        let workload = PushWorkload::single(Write::Insert, batch, size(rows));
        let label = workload.label();
        let [unbound, bound, plain] = workload.rates(&url, &bench.stamps, &BOUND_CONTENDERS)[..] else { unreachable!("three contenders") };
        eprintln!("[bench]   {label}: bound {bound:.0} vs unbound {unbound:.0} changes/s (plain SQL into the table {plain:.0})");
        writeln!(report, "| {label} | {unbound:.0} | {bound:.0} | {} | {plain:.0} |", percent(bound, unbound)).unwrap();
        targets.push(Target::new(format!("bound-table push vs unbound push, batch {batch}"), bound / unbound, Goal::AtLeast(0.8), Unit::Ratio));
    }
    settle(&mut connect(&url));
    Section { report, targets }
}

/// How many rows the capture section's bulk UPDATE changes.
const CAPTURED_ROWS: usize = 20_000;

/// A plain SQL bulk UPDATE of every row of a bound table (captured into the log by its triggers) against
/// the same UPDATE of an identical table that is not bound.
pub fn capture_section(bench: &Bench) -> Section {
    eprintln!("[bench] capture of plain SQL writes");
    let mut client = connect(&bench.database("capture"));
    let rows = size(CAPTURED_ROWS);
    let tables = ["captured_todos", "uncaptured_todos"];
    for (table, model) in tables.into_iter().zip([Some("captured_todo"), None]) {
        create_todo_table(&mut client, table, model);
        client
            .batch_execute(&format!(
                "INSERT INTO {table} (id, tenant_id, title, priority, tags, note)
                 SELECT 'r' || n, 'capture', 'todo ' || n, n % 5, '{{home,errand}}', 'pick up before 5pm' FROM generate_series(1, {rows}) AS n"
            ))
            .expect("filling a todo table");
    }
    settle(&mut client);
    let mut ms = [Vec::new(), Vec::new()];
    for _ in 0..REPETITIONS {
        for (slot, table) in tables.iter().enumerate() {
            client.batch_execute(&format!("VACUUM {table}")).unwrap();
            let started = Instant::now();
            client.batch_execute(&format!("UPDATE {table} SET done = NOT done")).expect("a bulk UPDATE");
            ms[slot].push(started.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let [captured, uncaptured] = ms.map(median);
    let logged: i64 = client.query_one("SELECT last_seq FROM sync_ext.tenants WHERE tenant_id = 'capture'", &[]).unwrap().get(0);
    let expected = ((REPETITIONS + 1) * rows) as i64;
    if logged != expected {
        eprintln!("[bench]   capture logged {logged} changes, expected {expected} (the inserts and every updated row)");
    }
    eprintln!("[bench]   captured {captured:.0} ms vs uncaptured {uncaptured:.0} ms");
    let report = format!(
        "## Capture of plain SQL writes\n\n`UPDATE ... SET done = NOT done` of all {} rows of a bound table (its statement-level \
         capture triggers log every row) against the same UPDATE of an identical table that is not bound (the same columns, \
         rows and indexes; a VACUUM of the table before each, untimed), {REPETITIONS} runs alternating (median). The log holds \
         {} captured changes afterwards ({} expected: the inserts that filled the table, then every row of every \
         UPDATE).\n\n| UPDATE of every row | ms | time over uncaptured |\n|---|---:|---:|\n\
         | bound table (captured) | {captured:.0} | {:.2}× |\n| the same table, not bound | {uncaptured:.0} | 1.00× |\n",
        grouped(rows),
        grouped(logged as usize),
        grouped(expected as usize),
        captured / uncaptured
    );
    let target = Target::new(format!("plain SQL UPDATE of {} rows of a bound table, vs the same table without capture", grouped(rows)), captured / uncaptured, Goal::AtMost(3.0), Unit::Times);
    Section { report, targets: vec![target] }
}
