//! The benchmark: sync_ext's push and pull against the same work done by plain SQL on the same schema,
//! in one run on a throwaway cluster, checked against the performance targets. Prints the document and
//! writes it to the file named by the first argument (`BENCHMARKS.md` by default); every missed target
//! is also printed to stderr at the end. Run it through `scripts/bench.sh` (release build).
//!
//! `SYNC_EXT_BENCH_ONLY=push,growth,...` runs some sections only (see [`SECTIONS`] for the names);
//! `SYNC_EXT_BENCH_QUICK=1` shrinks most sizes tenfold for development runs (figures not comparable).

// The sections' modules live in `bench/` (a binary's root resolves modules next to itself).
#[path = "bench/bound.rs"]
mod bound;
#[path = "bench/citus.rs"]
mod citus;
#[path = "bench/harness.rs"]
mod harness;
#[path = "bench/pull.rs"]
mod pull;
#[path = "bench/push.rs"]
mod push;
#[path = "bench/scale.rs"]
mod scale;
#[path = "bench/scopes.rs"]
mod scopes;
#[path = "bench/storage.rs"]
mod storage;
#[path = "bench/targets.rs"]
mod targets;

use std::time::Instant;

use harness::{quick, Bench, Section, SERVER_SETTINGS};

/// A section of the document: its name for `SYNC_EXT_BENCH_ONLY`, whether it runs on a cluster with
/// fsync on, whether it runs only when named (it needs what the machine may lack), and what measures it.
struct SectionSpec {
    name: &'static str,
    fsync: bool,
    optional: bool,
    run: fn(&Bench) -> Section,
}

/// Every section, in the order they run and appear.
const SECTIONS: [SectionSpec; 13] = [
    SectionSpec { name: "push", fsync: false, optional: false, run: push::push_section },
    SectionSpec { name: "growth", fsync: false, optional: false, run: push::growth_section },
    SectionSpec { name: "big-tenant", fsync: false, optional: false, run: push::big_tenant_section },
    SectionSpec { name: "concurrency", fsync: true, optional: false, run: push::concurrency_section },
    SectionSpec { name: "bound", fsync: false, optional: false, run: bound::bound_section },
    SectionSpec { name: "capture", fsync: false, optional: false, run: bound::capture_section },
    SectionSpec { name: "pull", fsync: false, optional: false, run: pull::pull_section },
    SectionSpec { name: "idle-pull", fsync: false, optional: false, run: pull::idle_pull_section },
    SectionSpec { name: "storage", fsync: false, optional: false, run: storage::storage_section },
    SectionSpec { name: "scale", fsync: false, optional: false, run: scale::scale_section },
    SectionSpec { name: "memory", fsync: false, optional: false, run: pull::memory_section },
    SectionSpec { name: "scopes", fsync: false, optional: false, run: scopes::scopes_section },
    // Needs Citus installed for PG_CONFIG (see scripts/citus-test.sh).
    SectionSpec { name: "citus", fsync: false, optional: true, run: citus::citus_section },
];

/// The sections `SYNC_EXT_BENCH_ONLY` names (comma-separated), to profile some parts without waiting for
/// the rest; all but the optional ones when it is unset. Panics on a name no section has.
fn selected_sections() -> Vec<&'static SectionSpec> {
    let Ok(only) = std::env::var("SYNC_EXT_BENCH_ONLY") else { return SECTIONS.iter().filter(|section| !section.optional).collect() };
    let names: Vec<&str> = only.split(',').map(str::trim).collect();
    let known: Vec<&str> = SECTIONS.iter().map(|section| section.name).collect();
    if let Some(unknown) = names.iter().find(|name| !known.contains(name)) {
        panic!("SYNC_EXT_BENCH_ONLY names no section {unknown:?}; the sections are {}", known.join(","));
    }
    SECTIONS.iter().filter(|section| names.contains(&section.name)).collect()
}

/// What the machine and the servers are; `durable` names the sections that ran with fsync on.
fn machine_description(bench: &Bench, durable: &[&str]) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo.lines().find(|line| line.starts_with("model name")).and_then(|line| line.split(':').nth(1)).unwrap_or("unknown").trim();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_gib = meminfo.lines().next().and_then(|line| line.split_whitespace().nth(1)).and_then(|kb| kb.parse::<f64>().ok()).unwrap_or(0.0) / 1048576.0;
    let mut client = bench.cluster.connect("postgres");
    let version: String = client.query_one("SHOW server_version", &[]).unwrap().get(0);
    let extension: String =
        client.query_one("SELECT default_version FROM pg_available_extensions WHERE name = 'sync_ext'", &[]).unwrap().get(0);
    let fsync = if durable.is_empty() {
        "fsync = off for every section".to_owned()
    } else {
        format!("fsync = off; fsync = on (a second cluster with the same settings) in: {}", durable.join(", "))
    };
    format!(
        "## Machine\n\n- CPU: {cpu}, {cores} cores available; memory {memory_gib:.0} GiB\n- PostgreSQL {version}, sync_ext {extension} \
         (release build); cluster settings: {}; {fsync}\n- client and server on the same machine, over loopback TCP\n",
        SERVER_SETTINGS.join(", ")
    )
}

fn main() {
    let output = std::env::args().nth(1).unwrap_or_else(|| "BENCHMARKS.md".into());
    let started = Instant::now();
    let selected = selected_sections();
    let bench = Bench::start();
    let mut reports = Vec::new();
    let mut targets = Vec::new();
    for section in &selected {
        let section_started = Instant::now();
        let Section { report, targets: measured } = (section.run)(&bench);
        eprintln!("[bench]   ({} took {:.0} s)", section.name, section_started.elapsed().as_secs_f64());
        reports.push(report);
        targets.extend(measured);
    }
    let durable: Vec<&str> = selected.iter().filter(|section| section.fsync).map(|section| section.name).collect();
    let mut notes = String::new();
    if selected.iter().filter(|section| !section.optional).count() < SECTIONS.iter().filter(|section| !section.optional).count() {
        let names: Vec<&str> = selected.iter().map(|section| section.name).collect();
        notes.push_str(&format!(" Only some sections ran (`SYNC_EXT_BENCH_ONLY={}`).", names.join(",")));
    }
    if quick() {
        notes.push_str(" **A quick development run (`SYNC_EXT_BENCH_QUICK=1`): most sizes a tenth; not comparable.**");
    }
    let document = format!(
        "# Benchmarks\n\nWritten by `bash scripts/bench.sh` in {:.0} s.{notes} sync_ext against the same work done by plain SQL \
         on the same schema in the same run: the plain-SQL push is one statement per batch (`jsonb_to_recordset`, `INSERT ... ON \
         CONFLICT` into op_log and snapshots, whole-row last-writer-wins); the plain-SQL pull is `SELECT ... ORDER BY seq LIMIT` \
         with `to_jsonb`. Percentages are sync_ext's rate over the baseline's (above 100%: sync_ext is faster); each section \
         says what its other figures are.\n\n{}\n{}\n{}",
        started.elapsed().as_secs_f64(),
        targets::section(&targets),
        machine_description(&bench, &durable),
        reports.join("\n")
    );
    std::fs::write(&output, &document).unwrap_or_else(|e| panic!("writing {output}: {e}"));
    println!("{document}");
    targets::report_missed(&targets);
}
