//! The scale section: push and pull costs as a tenant's log grows to a million rows, and for a tenant
//! among 1,000 whose rows are interleaved in the tables.

use std::fmt::Write as _;
use std::time::Instant;

use postgres::Client;

use crate::harness::{batches, connect, fill, fill_history, fresh_name, grouped, keys, median, percent, push_all, size, Bench, Section, Stamps, WireBytes, Write, PLAIN_SQL, REPETITIONS, SYNC_EXT};
use crate::pull::{PAGE, PULL_KINDS};
use crate::targets::{Goal, Target, Unit};

const SCALE_BATCHES: usize = 30;
const SCALE_BATCH: usize = 100;
const SCALE_PAGES: usize = 30;

/// The most sync_ext's cost per push or per pull may grow from the cheapest point to the dearest and
/// still count as flat.
const FLAT: f64 = 1.3;

/// How many tenants the last point has, and how many rows each of them but the measured one holds.
const MANY_TENANTS: usize = 1_000;
const MANY_TENANT_ROWS: i64 = 1_000;

/// How long the big tenant's history is for the memory table (and the largest scale point).
pub fn memory_history() -> i64 {
    size(1_000_000) as i64
}

/// One line of the scale table: milliseconds per push batch and per pull page, sync_ext then plain SQL.
struct ScalePoint {
    tenant_rows: i64,
    tenants: i64,
    table_rows: i64,
    push_ms: [f64; 2],
    pull_ms: [f64; 2],
}

/// Push and pull times per batch for `tenant`, whose log holds `history` filled changes (the table's
/// size is taken before the measured pushes add to it).
fn measure(client: &mut Client, stamps: &Stamps, tenant: &str, history: i64) -> ScalePoint {
    let counts = client.query_one("SELECT (SELECT count(*) FROM sync_ext.tenants), (SELECT count(*) FROM sync_ext.op_log)", &[]).unwrap();
    let (tenants, table_rows): (i64, i64) = (counts.get(0), counts.get(1));
    let contenders = [SYNC_EXT, PLAIN_SQL];
    let push_statements = contenders.map(|contender| client.prepare(contender.sql).unwrap());
    // sync_ext's JSON pull and the plain-SQL pull.
    let pull_statements = [&PULL_KINDS[0], &PULL_KINDS[PULL_KINDS.len() - 1]].map(|kind| client.prepare(kind.sql).unwrap());
    let (mut push_ms, mut pull_ms) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    for repetition in 0..REPETITIONS {
        for slot in 0..2 {
            let rows = keys(&format!("{}-", fresh_name()), 0..SCALE_BATCHES * SCALE_BATCH);
            let bodies = batches(stamps, Write::Insert, contenders[slot].model, &rows, SCALE_BATCH);
            let elapsed = push_all(client, &push_statements[slot], tenant, &bodies);
            push_ms[slot].push(elapsed.as_secs_f64() * 1000.0 / SCALE_BATCHES as f64);
            let started = Instant::now();
            for page in 0..SCALE_PAGES {
                // Pages spread over the whole filled history, the same ones for both contenders.
                let since = (history - i64::from(PAGE)) * (page * REPETITIONS + repetition) as i64 / (SCALE_PAGES * REPETITIONS) as i64;
                client.query_one(&pull_statements[slot], &[&tenant, &since, &PAGE]).expect("a pull").get::<_, WireBytes>(0);
            }
            pull_ms[slot].push(started.elapsed().as_secs_f64() * 1000.0 / SCALE_PAGES as f64);
        }
    }
    ScalePoint { tenant_rows: history, tenants, table_rows, push_ms: push_ms.map(median), pull_ms: pull_ms.map(median) }
}

/// Largest over smallest.
fn spread(values: impl Iterator<Item = f64> + Clone) -> f64 {
    values.clone().fold(f64::MIN, f64::max) / values.fold(f64::MAX, f64::min)
}

/// The scale table: per-batch times with the tenant's log at 10,000, 100,000 and a million rows, and for
/// a tenant of 10,000 rows among 1,000 tenants.
pub fn scale_section(bench: &Bench) -> Section {
    eprintln!("[bench] scale");
    let mut client = connect(&bench.database("scale"));
    let mut points = Vec::new();
    for history in [size(10_000) as i64, size(100_000) as i64, memory_history()] {
        fill_history(&mut client, "scale", history);
        points.push(measure(&mut client, &bench.stamps, "scale", history));
    }
    let measured_rows = size(10_000) as i64;
    let mut histories: Vec<(String, i64)> = (1..size(MANY_TENANTS)).map(|n| (format!("many-{n}"), MANY_TENANT_ROWS)).collect();
    histories.push(("many-0".to_owned(), measured_rows));
    fill(&mut client, &histories);
    points.push(measure(&mut client, &bench.stamps, "many-0", measured_rows));
    let mut report = format!(
        "## Scale\n\nMilliseconds per push of {SCALE_BATCH} inserts ({SCALE_BATCHES} pushes) and per pull of a {PAGE}-change page \
         ({SCALE_PAGES} pages spread over the filled history), {REPETITIONS} runs alternating the contenders (median): one tenant's \
         log filled directly to each size, then a tenant of {} rows among {} more tenants of {} rows each (all their rows \
         interleaved in the tables, as when tenants push at the same time) in the same database. The measured pushes add rows \
         too. Flat means sync_ext's largest cost is at most {FLAT}× its smallest.\n\n",
        grouped(measured_rows as usize),
        grouped(size(MANY_TENANTS) - 1),
        grouped(MANY_TENANT_ROWS as usize)
    );
    report.push_str("| tenant's log | tenants | op_log rows | push, sync_ext | push, plain SQL | ratio | pull, sync_ext | pull, plain SQL | ratio |\n");
    report.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for point in &points {
        let ScalePoint { tenant_rows, tenants, table_rows, push_ms, pull_ms } = point;
        eprintln!("[bench]   {tenant_rows} rows, {tenants} tenants: push {:.2} vs {:.2} ms, pull {:.2} vs {:.2} ms", push_ms[0], push_ms[1], pull_ms[0], pull_ms[1]);
        writeln!(
            report,
            "| {} | {} | {} | {:.2} | {:.2} | {} | {:.2} | {:.2} | {} |",
            grouped(*tenant_rows as usize),
            grouped(*tenants as usize),
            grouped(*table_rows as usize),
            push_ms[0],
            push_ms[1],
            percent(push_ms[1], push_ms[0]),
            pull_ms[0],
            pull_ms[1],
            percent(pull_ms[1], pull_ms[0])
        )
        .unwrap();
    }
    let push_spread = [0, 1].map(|slot| spread(points.iter().map(|point| point.push_ms[slot])));
    let pull_spread = [0, 1].map(|slot| spread(points.iter().map(|point| point.pull_ms[slot])));
    writeln!(
        report,
        "| largest / smallest | | | {:.2}× | {:.2}× | | {:.2}× | {:.2}× | |",
        push_spread[0], push_spread[1], pull_spread[0], pull_spread[1]
    )
    .unwrap();
    let sizes = "10K / 100K / 1M log rows and a tenant among 1,000";
    let targets = vec![
        Target::new(format!("push cost at {sizes}: largest / smallest"), push_spread[0], Goal::AtMost(FLAT), Unit::Times),
        Target::new(format!("pull cost at {sizes}: largest / smallest"), pull_spread[0], Goal::AtMost(FLAT), Unit::Times),
    ];
    Section { report, targets }
}
