//! The Citus section (optional, `SYNC_EXT_BENCH_ONLY=citus`, needs Citus installed): sync_ext through the
//! coordinator of a coordinator and two workers, distributed as the README says, against sync_ext on one
//! plain node, on the same machine.

use std::fmt::Write as _;
use std::time::Instant;

use sync_ext_pgrx_tests::CitusCluster;

use crate::harness::{batches, connect, create_tenant, fresh_name, keys, median, push_all, size, Bench, PushWorkload, Section, Tenancy, Write, OUR_PULL_JSON, OUR_PUSH, REPETITIONS, SERVER_SETTINGS, SYNC_EXT};
use crate::targets::{Goal, Target, Unit};

/// How many changes the pull workload pages through.
const PULLED: usize = 20_000;

/// The README's recipe for the sync tables, on the coordinator.
const DISTRIBUTE: &str = "CREATE EXTENSION sync_ext; SELECT sync_distribute(); ANALYZE";

pub fn citus_section(bench: &Bench) -> Section {
    eprintln!("[bench] citus: a coordinator and two workers against one node");
    let citus = CitusCluster::start_with(2, SERVER_SETTINGS);
    connect(&citus.coordinator.connection_string("sync")).batch_execute(DISTRIBUTE).expect("distributing the sync tables");
    let urls = [bench.database("citus_baseline"), citus.coordinator.connection_string("sync")];
    let mut report = String::from(
        "## Citus\n\nsync_ext through the coordinator of a Citus cluster (a coordinator and two workers on this machine, \
         `sync_distribute()` as in the README) against sync_ext on one plain node with the same settings; changes per second, \
         median of the runs alternating the two. Each call made alone is delegated to the tenant's worker.\n\n\
         | workload | one node | Citus | Citus over one node |\n|---|---:|---:|---:|\n",
    );
    let mut targets = Vec::new();
    let workloads = [
        (PushWorkload { write: Write::Insert, batch: 100, rows: size(4_000), connections: 4, tenancy: Tenancy::OwnTenant }, 1.5),
        (PushWorkload::single(Write::Insert, 1, size(1_000)), 0.5),
    ];
    for (workload, goal) in workloads {
        workload.rates(&urls[1], &bench.stamps, &[SYNC_EXT]); // warm-up: connections, plans, notifiers
        let mut rates = [Vec::new(), Vec::new()];
        for _ in 0..REPETITIONS {
            for (slot, url) in urls.iter().enumerate() {
                rates[slot].push(workload.run(url, &bench.stamps, &SYNC_EXT));
            }
        }
        let [one_node, distributed] = rates.map(median);
        let label = format!("push {}", workload.label());
        eprintln!("[bench]   {label}: {one_node:.0} vs {distributed:.0} changes/s");
        writeln!(report, "| {label} | {one_node:.0} | {distributed:.0} | {:.2}× |", distributed / one_node).unwrap();
        targets.push(Target::new(format!("Citus, {label}, vs one node"), distributed / one_node, Goal::AtLeast(goal), Unit::Times));
    }
    let page = 100;
    let tenants: Vec<String> = urls.iter().map(|url| pushed_tenant(bench, url)).collect();
    let mut rates = [Vec::new(), Vec::new()];
    for _ in 0..REPETITIONS {
        for (slot, url) in urls.iter().enumerate() {
            let mut client = connect(url);
            let statement = client.prepare(OUR_PULL_JSON).unwrap();
            let (started, mut cursor) = (Instant::now(), 0_i64);
            while cursor < size(PULLED) as i64 {
                client.query_one(&statement, &[&tenants[slot], &cursor, &page]).expect("a pull");
                cursor += i64::from(page);
            }
            rates[slot].push(size(PULLED) as f64 / started.elapsed().as_secs_f64());
        }
    }
    let [one_node, distributed] = rates.map(median);
    let label = format!("pull JSON, pages of {page}, 1 tenant");
    eprintln!("[bench]   {label}: {one_node:.0} vs {distributed:.0} changes/s");
    writeln!(report, "| {label} | {one_node:.0} | {distributed:.0} | {:.2}× |", distributed / one_node).unwrap();
    targets.push(Target::new(format!("Citus, {label}, vs one node"), distributed / one_node, Goal::AtLeast(0.5), Unit::Times));
    Section { report, targets }
}

/// A fresh tenant holding [`PULLED`] standard todos pushed in batches of 1,000.
fn pushed_tenant(bench: &Bench, url: &str) -> String {
    let tenant = fresh_name();
    let mut client = connect(url);
    create_tenant(&mut client, &tenant);
    let statement = client.prepare(OUR_PUSH).unwrap();
    push_all(&mut client, &statement, &tenant, &batches(&bench.stamps, Write::Insert, "todo", &keys("row-", 0..size(PULLED)), 1000));
    client.batch_execute("ANALYZE").unwrap();
    tenant
}
