//! Pull sections: paging through a pushed history, an app role's pull when there is nothing new, and a
//! backend's memory while it serves a million changes.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres::{Client, Statement};

use crate::harness::{
    batches, connect, connect_as, create_tenant, fill_history, grouped, keys, median, percent, push_all, settle, size, Bench, Section, WireBytes, Write,
    OUR_PULL_JSON, OUR_PULL_MSGPACK, OUR_PUSH, PLAIN_PULL, REPETITIONS,
};
use crate::scale::memory_history;
use crate::targets::{Goal, Target, Unit};

/// A pull strategy: the statement and what it is called in the tables.
pub struct PullKind {
    pub name: &'static str,
    pub sql: &'static str,
}

/// sync_ext's pulls, then the plain-SQL baseline (last).
pub const PULL_KINDS: [PullKind; 3] = [
    PullKind { name: "sync_ext, JSON", sql: OUR_PULL_JSON },
    PullKind { name: "sync_ext, MessagePack", sql: OUR_PULL_MSGPACK },
    PullKind { name: "plain SQL, JSON", sql: PLAIN_PULL },
];

/// The page size of the scale and memory sections.
pub const PAGE: i32 = 1000;

/// The tenant whose pushed history the pull and storage sections read, and its size.
const PULL_TENANT: &str = "pull";
const PULLED: usize = 100_000;

/// Pages through `changes` changes of `tenant` from seq 0, `page` at a time; returns (elapsed, bytes).
fn pull_through(client: &mut Client, statement: &Statement, tenant: &str, changes: i64, page: i32) -> (Duration, usize) {
    let (started, mut bytes, mut cursor) = (Instant::now(), 0, 0_i64);
    while cursor < changes {
        bytes += client.query_one(statement, &[&tenant, &cursor, &page]).expect("a pull").get::<_, WireBytes>(0).0;
        cursor += i64::from(page);
    }
    (started.elapsed(), bytes)
}

/// The pull database, its tenant holding [`PULLED`] standard todos pushed through `sync_push` in batches
/// of 1,000 (pushed on first use); returns its connection string and the history's length.
pub fn pushed_history(bench: &Bench) -> (String, i64) {
    let url = bench.database("pull");
    let mut client = connect(&url);
    create_tenant(&mut client, PULL_TENANT);
    let pulled = size(PULLED);
    let last_seq: i64 = client.query_one("SELECT last_seq FROM sync_ext.tenants WHERE tenant_id = $1", &[&PULL_TENANT]).unwrap().get(0);
    if last_seq == 0 {
        let statement = client.prepare(OUR_PUSH).unwrap();
        push_all(&mut client, &statement, PULL_TENANT, &batches(&bench.stamps, Write::Insert, "todo", &keys("row-", 0..pulled), 1000));
        settle(&mut client);
    }
    (url, pulled as i64)
}

/// The pull table: paging through a tenant's log in each encoding and two page sizes.
pub fn pull_section(bench: &Bench) -> Section {
    eprintln!("[bench] pull workloads");
    let (url, pulled) = pushed_history(bench);
    let mut client = connect(&url);
    let statements: Vec<Statement> = PULL_KINDS.iter().map(|kind| client.prepare(kind.sql).unwrap()).collect();
    let mut report = format!(
        "## Pull\n\nPaging through {} changes (pushed through sync_push) with `max_changes` 100 and 1,000, {REPETITIONS} runs \
         alternating the contenders (median); ratio against the plain-SQL JSON pull of the same pages.\n\n",
        grouped(pulled as usize)
    );
    report.push_str("| pull | page | changes/s | ratio | bytes/change on the wire |\n|---|---:|---:|---:|---:|\n");
    let mut targets = Vec::new();
    for page in [100, 1000] {
        let mut rates = vec![Vec::new(); PULL_KINDS.len()];
        let mut bytes = vec![0; PULL_KINDS.len()];
        for _ in 0..REPETITIONS {
            for (slot, statement) in statements.iter().enumerate() {
                let (elapsed, received) = pull_through(&mut client, statement, PULL_TENANT, pulled, page);
                rates[slot].push(pulled as f64 / elapsed.as_secs_f64());
                bytes[slot] = received;
            }
        }
        let rates: Vec<f64> = rates.into_iter().map(median).collect();
        let plain_rate = rates[PULL_KINDS.len() - 1];
        for (slot, kind) in PULL_KINDS.iter().enumerate() {
            let per_change = bytes[slot] as f64 / pulled as f64;
            eprintln!("[bench]   {}, page {page}: {:.0} changes/s", kind.name, rates[slot]);
            writeln!(report, "| {} | {page} | {:.0} | {} | {per_change:.0} |", kind.name, rates[slot], percent(rates[slot], plain_rate)).unwrap();
            if slot < PULL_KINDS.len() - 1 {
                let workload = format!("pull, {}, pages of {page}, vs plain SQL", kind.name);
                targets.push(Target::new(workload, rates[slot] / plain_rate, Goal::AtLeast(0.85), Unit::Ratio));
            }
        }
    }
    Section { report, targets }
}

/// The app's roles for the idle-pull section, set up as the README's Security section says: a group
/// role holding the tenant grant and a LOGIN role in it, with the recommended timeouts.
const APP_ROLES: &str = "
CREATE ROLE bench_devices NOLOGIN;
SELECT sync_grant_tenant('bench_devices', 'idle');
CREATE ROLE bench_device LOGIN IN ROLE bench_devices;
ALTER ROLE bench_device SET idle_in_transaction_session_timeout = '1min';
ALTER ROLE bench_device SET statement_timeout = '30s';
REVOKE TEMPORARY ON DATABASE idle_pull FROM PUBLIC;";

/// How many idle pulls each contender makes per run.
const IDLE_PULLS: usize = 2_000;

/// A device's pull when nothing is new, made by a granted non-superuser role, against the plain indexed
/// SELECT of the same page by the same role (row-level security applies to it).
pub fn idle_pull_section(bench: &Bench) -> Section {
    eprintln!("[bench] idle pull by an app role");
    let url = bench.database("idle_pull");
    let mut admin = connect(&url);
    admin.batch_execute(APP_ROLES).expect("setting up the app roles");
    let history = 10_000;
    fill_history(&mut admin, "idle", history);
    let mut device = connect_as(&url, "bench_device");
    let statements: Vec<Statement> = PULL_KINDS.iter().map(|kind| device.prepare(kind.sql).unwrap()).collect();
    let pulls = size(IDLE_PULLS);
    let mut micros = vec![Vec::new(); PULL_KINDS.len()];
    for _ in 0..REPETITIONS {
        for (slot, statement) in statements.iter().enumerate() {
            let started = Instant::now();
            for _ in 0..pulls {
                device.query_one(statement, &[&"idle", &history, &1000_i32]).expect("an idle pull");
            }
            micros[slot].push(started.elapsed().as_secs_f64() * 1e6 / pulls as f64);
        }
    }
    let micros: Vec<f64> = micros.into_iter().map(median).collect();
    let plain = micros[PULL_KINDS.len() - 1];
    let mut report = format!(
        "## Idle pull\n\nA pull from the tenant's last seq (nothing new) by `bench_device`, a LOGIN role in a group role granted \
         the tenant with `sync_grant_tenant`, no superuser (set up as the README's Security section says), the tenant holding \
         {} changes; the baseline is the plain-SQL pull of the same empty page by the same role (an index scan of \
         op_log under its row-level security). Microseconds per call over loopback, {} calls per run, {REPETITIONS} runs \
         alternating (median).\n\n",
        grouped(history as usize),
        grouped(pulls)
    );
    report.push_str("| pull | µs per call | time over plain SQL |\n|---|---:|---:|\n");
    let mut targets = Vec::new();
    for (slot, kind) in PULL_KINDS.iter().enumerate() {
        eprintln!("[bench]   {}: {:.0} µs", kind.name, micros[slot]);
        writeln!(report, "| {} | {:.0} | {:.2}× |", kind.name, micros[slot], micros[slot] / plain).unwrap();
        if slot < PULL_KINDS.len() - 1 {
            let workload = format!("idle pull by a granted app role, {}, time vs a plain indexed SELECT", kind.name);
            targets.push(Target::new(workload, micros[slot] / plain, Goal::AtMost(2.0), Unit::Times));
        }
    }
    Section { report, targets }
}

/// A backend's memory, in kB, from /proc (`RssAnon`: its private memory).
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

/// The memory table: a backend's private memory while it serves a whole million-change history.
pub fn memory_section(bench: &Bench) -> Section {
    eprintln!("[bench] memory");
    let url = bench.database("scale");
    let mut client = connect(&url);
    fill_history(&mut client, "scale", memory_history());
    let history: i64 = client.query_one("SELECT last_seq FROM sync_ext.tenants WHERE tenant_id = 'scale'", &[]).unwrap().get(0);
    let mut report = format!(
        "## Memory\n\nThe backend's private memory (`RssAnon`, sampled every 2 ms) while one connection pulls all {} changes of a \
         tenant, {} at a time.\n\n",
        grouped(history as usize),
        grouped(PAGE as usize)
    );
    report.push_str("| pull | before | peak | changes/s |\n|---|---:|---:|---:|\n");
    for kind in &PULL_KINDS {
        match pull_with_memory(&url, kind, "scale", history) {
            Some(memory) => {
                eprintln!("[bench]   {}: peak {} kB", memory.kind, memory.peak_kb);
                let mib = |kb: u64| kb as f64 / 1024.0;
                writeln!(report, "| {} | {:.1} MiB | {:.1} MiB | {:.0} |", memory.kind, mib(memory.before_kb), mib(memory.peak_kb), memory.changes_per_second)
            }
            None => writeln!(report, "| {} | n/a (cannot read the backend's /proc status) | | |", kind.name),
        }
        .unwrap();
    }
    Section { report, targets: Vec::new() }
}
