//! Push sections: throughput per batch size and kind of change, a connection's pushes as its database
//! grows from empty, pushes to one big tenant among many small ones, and concurrent connections on a
//! durable cluster.

use std::fmt::Write as _;

use postgres::{Client, Statement};
use sync_ext_pgrx_tests::Cluster;

use crate::harness::{
    batch_sizes, batches, connect, create_tenant, fill, fresh_name, grouped, keys, median, percent, push_all, push_each, settle, size, Bench, Contender, PushWorkload,
    Section, Stamps, Tenancy, Write, PLAIN_SQL, REPETITIONS, SERVER_SETTINGS, SYNC_EXT,
};
use crate::targets::{Goal, Target, Unit};

/// The plain-SQL ratio a one-connection push must reach, whatever its kind and batch.
const PUSH_TARGET: f64 = 0.75;

/// The push section's (batch, changes) on one connection, for each kind of change.
const ONE_CONNECTION: [(usize, usize); 3] = [(1, 2_000), (100, 10_000), (1000, 30_000)];

/// The push section's (kind, batch, changes per connection) on four connections at once.
const FOUR_CONNECTIONS: [(Write, usize, usize); 4] =
    [(Write::Insert, 1, 500), (Write::Insert, 100, 5_000), (Write::Insert, 1000, 10_000), (Write::Update, 1000, 10_000)];

/// The push table: sync_ext and plain SQL on the same changes, on the main cluster (fsync off).
pub fn push_section(bench: &Bench) -> Section {
    eprintln!("[bench] push workloads");
    let url = bench.database("push");
    PushWorkload::single(Write::Insert, 100, size(2_000)).rates(&url, &bench.stamps, &[SYNC_EXT, PLAIN_SQL]); // warm-up
    let mut workloads = Vec::new();
    for write in [Write::Insert, Write::Update, Write::Delete] {
        for (batch, rows) in ONE_CONNECTION {
            workloads.push(PushWorkload::single(write, batch, size(rows)));
        }
    }
    for (write, batch, rows) in FOUR_CONNECTIONS {
        workloads.push(PushWorkload { write, batch, rows: size(rows), connections: 4, tenancy: Tenancy::OwnTenant });
    }
    let four_connections: Vec<String> =
        FOUR_CONNECTIONS.iter().map(|(write, batch, rows)| format!("{} {} in batches of {}", grouped(size(*rows)), write.name(), grouped(*batch))).collect();
    let mut report = format!(
        "## Push\n\nChanges per second, each workload run {REPETITIONS} times alternating the contenders (median), on fresh tenants; \
         updates and deletes first insert their rows (untimed). One connection: {}; four connections at once, each on a \
         tenant of its own: {} per connection.\n\n",
        batch_sizes(&ONE_CONNECTION),
        four_connections.join(", ")
    );
    report.push_str("| workload | sync_ext | plain SQL | ratio |\n|---|---:|---:|---:|\n");
    let mut targets = Vec::new();
    for workload in workloads {
        let label = workload.label();
        let [ours, plain] = workload.rates(&url, &bench.stamps, &[SYNC_EXT, PLAIN_SQL])[..] else { unreachable!("two contenders") };
        eprintln!("[bench]   {label}: {ours:.0} vs {plain:.0} changes/s");
        writeln!(report, "| {label} | {ours:.0} | {plain:.0} | {} |", percent(ours, plain)).unwrap();
        if workload.connections == 1 {
            targets.push(Target::new(format!("push, {label}, vs plain SQL"), ours / plain, Goal::AtLeast(PUSH_TARGET), Unit::Ratio));
        }
    }
    settle(&mut connect(&url));
    Section { report, targets }
}

/// How many pushes of 1,000 inserts the growth section makes on each fresh database.
const GROWTH_PUSHES: usize = 20;

/// Turns autovacuum (and so its ANALYZE) off for every sync table of a database, so that the growth
/// section measures the engine as the tables grow, not whether autovacuum happened to analyze them
/// meanwhile (it wakes once a minute; a slow run would be rescued at a random push).
const WITHOUT_AUTOVACUUM: &str = "
DO $$
DECLARE
    sync_table regclass;
BEGIN
    FOR sync_table IN SELECT oid FROM pg_class WHERE relnamespace = 'sync_ext'::regnamespace AND relkind = 'r' LOOP
        EXECUTE format('ALTER TABLE %s SET (autovacuum_enabled = false)', sync_table);
    END LOOP;
END
$$";

/// Which pushes of the growth section the table shows (numbered from 1).
const GROWTH_SHOWN: [usize; 6] = [1, 2, 5, 10, 15, GROWTH_PUSHES];

/// Pushes on one connection opened on an empty database, while the database grows: the 20th push of
/// 1,000 inserts against the 2nd (the 1st also plans and warms the backend).
pub fn growth_section(bench: &Bench) -> Section {
    eprintln!("[bench] growth from an empty database");
    let contenders = [SYNC_EXT, PLAIN_SQL];
    let mut times = vec![vec![Vec::new(); GROWTH_PUSHES]; contenders.len()];
    for repetition in 0..REPETITIONS {
        for (slot, contender) in contenders.iter().enumerate() {
            let name = format!("growth_{repetition}_{slot}");
            let mut client = connect(&bench.cluster.create_database(&name));
            client.batch_execute(WITHOUT_AUTOVACUUM).expect("turning autovacuum off for the sync tables");
            let tenant = fresh_name();
            create_tenant(&mut client, &tenant);
            let statement = client.prepare(contender.sql).unwrap();
            let rows = keys("r", 0..GROWTH_PUSHES * 1000);
            let each = push_each(&mut client, &statement, &tenant, &batches(&bench.stamps, Write::Insert, contender.model, &rows, 1000));
            for (push, elapsed) in each.into_iter().enumerate() {
                times[slot][push].push(elapsed.as_secs_f64() * 1000.0);
            }
            drop(client);
            bench.cluster.connect("postgres").batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)")).expect("DROP DATABASE");
        }
    }
    let medians: Vec<Vec<f64>> = times.into_iter().map(|pushes| pushes.into_iter().map(median).collect()).collect();
    let growth: Vec<f64> = medians.iter().map(|ms| ms[GROWTH_PUSHES - 1] / ms[1]).collect();
    let mut report = format!(
        "## Growth from an empty database\n\nA fresh database per run and contender, one connection opened before any data, \
         {GROWTH_PUSHES} pushes of 1,000 inserts (new rows) in a row; milliseconds per push, median of {REPETITIONS} runs. \
         Autovacuum is off for the sync tables of these databases, so no ANALYZE runs meanwhile (in a slow run it would at \
         some random push, once a minute). The target compares push {GROWTH_PUSHES} with push 2 (push 1 also plans the \
         statements).\n\n"
    );
    report.push_str("| push | sync_ext | plain SQL |\n|---:|---:|---:|\n");
    for push in GROWTH_SHOWN {
        writeln!(report, "| {push} | {:.1} | {:.1} |", medians[0][push - 1], medians[1][push - 1]).unwrap();
    }
    writeln!(report, "| push {GROWTH_PUSHES} / push 2 | {:.2}× | {:.2}× |", growth[0], growth[1]).unwrap();
    eprintln!("[bench]   push {GROWTH_PUSHES} / push 2: {:.2}× vs {:.2}×", growth[0], growth[1]);
    let target = Target::new(
        format!("push {GROWTH_PUSHES} of 1,000 inserts on one connection from an empty database, vs push 2"),
        growth[0],
        Goal::AtMost(1.3),
        Unit::Times,
    );
    Section { report, targets: vec![target] }
}

/// The big tenant's history, and how many small tenants (of [`SMALL_TENANT_ROWS`] rows) share its database.
const BIG_TENANT_ROWS: usize = 100_000;
const SMALL_TENANTS: usize = 20_000;
const SMALL_TENANT_ROWS: i64 = 2;

/// The big tenant's rows in an order that spreads consecutive updates over its whole history
/// (a stride coprime with the row count visits every row once).
struct SpreadRows {
    next: usize,
    rows: usize,
}

impl SpreadRows {
    /// The keys of the next `count` rows (as [`fill`] names them).
    fn take(&mut self, count: usize) -> Vec<String> {
        const STRIDE: usize = 7919;
        let first = self.next;
        self.next += count;
        assert!(self.next <= self.rows, "the big tenant has rows enough for every update");
        keys("old-", (first..self.next).map(|i| i * STRIDE % self.rows + 1))
    }
}

/// Pushes to a tenant of 100,000 rows among 20,000 tenants of 2 rows each (filled directly, then
/// ANALYZE): updates of its existing rows, one and 100 at a time, on a connection opened after ANALYZE
/// and on one that pushed while the database was empty.
pub fn big_tenant_section(bench: &Bench) -> Section {
    eprintln!("[bench] big tenant among small ones");
    let url = bench.database("big_tenant");
    let contenders = [SYNC_EXT, PLAIN_SQL];
    let (big_rows, small_tenants) = (size(BIG_TENANT_ROWS), size(SMALL_TENANTS));
    let mut early = connect(&url);
    let early_statements = prepare_all(&mut early, &contenders);
    let warm_up = fresh_name();
    create_tenant(&mut early, &warm_up);
    for (statement, contender) in early_statements.iter().zip(&contenders) {
        for batch in [1, 100] {
            // Ten pushes: also past the point where Postgres may switch a prepared statement to its generic plan.
            let rows = keys(&format!("{}-", fresh_name()), 0..10 * batch);
            push_all(&mut early, statement, &warm_up, &batches(&bench.stamps, Write::Insert, contender.model, &rows, batch));
        }
    }
    let mut histories: Vec<(String, i64)> = (0..small_tenants).map(|n| (format!("small-{n}"), SMALL_TENANT_ROWS)).collect();
    histories.push(("big".to_owned(), big_rows as i64));
    fill(&mut early, &histories);
    let mut late = connect(&url);
    let late_statements = prepare_all(&mut late, &contenders);
    let mut spread = SpreadRows { next: 0, rows: big_rows };
    let mut report = format!(
        "## Big tenant\n\nUpdates of existing rows of a tenant with {} rows in a database of {} tenants with \
         {SMALL_TENANT_ROWS} rows each, all filled directly with SQL, then VACUUM ANALYZE. Milliseconds per push ({} pushes of 1 \
         change, {} of 100, each run {REPETITIONS} times alternating the contenders, median), on a connection opened after ANALYZE \
         and on one opened on the empty database that pushed ten times at each size before the data came (a long-lived pooled \
         connection).\n\n",
        grouped(big_rows),
        grouped(small_tenants),
        size(200),
        size(30)
    );
    report.push_str("| connection | push | sync_ext | plain SQL | ratio |\n|---|---|---:|---:|---:|\n");
    let mut targets = Vec::new();
    for (connection, client, statements) in
        [("opened after ANALYZE", &mut late, &late_statements), ("opened before any data", &mut early, &early_statements)]
    {
        for (batch, pushes) in [(1, size(200)), (100, size(30))] {
            let mut ms = [Vec::new(), Vec::new()];
            for _ in 0..REPETITIONS {
                for (slot, (statement, contender)) in statements.iter().zip(&contenders).enumerate() {
                    let bodies = batches(&bench.stamps, Write::Update, contender.model, &spread.take(pushes * batch), batch);
                    ms[slot].push(push_all(client, statement, "big", &bodies).as_secs_f64() * 1000.0 / pushes as f64);
                }
            }
            let [ours, plain] = ms.map(median);
            let push = if batch == 1 { "1 change".to_owned() } else { format!("{batch} changes") };
            eprintln!("[bench]   {connection}, {push}: {ours:.3} vs {plain:.3} ms");
            writeln!(report, "| {connection} | {push} | {ours:.3} | {plain:.3} | {} |", percent(plain, ours)).unwrap();
            targets.push(Target::new(
                format!("{push} push to a {}-row tenant among {} small ones, connection {connection}, vs plain SQL", grouped(big_rows), grouped(small_tenants)),
                plain / ours,
                Goal::AtLeast(0.6),
                Unit::Ratio,
            ));
        }
    }
    settle(&mut late);
    Section { report, targets }
}

/// Prepares each contender's statement on `client`.
fn prepare_all(client: &mut Client, contenders: &[Contender]) -> Vec<Statement> {
    contenders.iter().map(|contender| client.prepare(contender.sql).unwrap()).collect()
}

/// How many connections the concurrency section runs at once.
const CONNECTIONS: usize = 8;

/// The concurrency section's (batch, changes per connection).
const CONCURRENT_BATCHES: [(usize, usize); 2] = [(1, 300), (100, 3_000)];

/// Concurrent pushes on a cluster of their own with fsync on: 8 connections on 8 tenants and on one
/// tenant, against one connection, for sync_ext and plain SQL.
pub fn concurrency_section(_: &Bench) -> Section {
    eprintln!("[bench] concurrency (fsync on)");
    let cluster = Cluster::start_durable(SERVER_SETTINGS);
    let url = cluster.create_database("concurrency");
    let stamps = Stamps::default();
    let contenders = [SYNC_EXT, PLAIN_SQL];
    PushWorkload::single(Write::Insert, 100, size(2_000)).rates(&url, &stamps, &contenders); // warm-up
    let mut report = format!(
        "## Concurrency (fsync on)\n\nInserts on a second cluster with fsync on (the same settings otherwise): one connection, \
         {CONNECTIONS} connections each on a tenant of its own, and {CONNECTIONS} connections on one tenant (different rows). \
         Each connection writes {}; changes per second of all connections together, {REPETITIONS} runs alternating the \
         contenders (median). Scaling is the {CONNECTIONS}-connection rate over the one-connection rate.\n\n",
        batch_sizes(&CONCURRENT_BATCHES)
    );
    report.push_str("| workload | sync_ext | plain SQL | ratio |\n|---|---:|---:|---:|\n");
    let mut scaling_rows = String::new();
    let mut targets = Vec::new();
    for (batch, rows) in CONCURRENT_BATCHES {
        let mut run = |connections, tenancy| {
            let workload = PushWorkload { write: Write::Insert, batch, rows: size(rows), connections, tenancy };
            let rates = workload.rates(&url, &stamps, &contenders);
            let label = workload.label();
            eprintln!("[bench]   {label}: {:.0} vs {:.0} changes/s", rates[0], rates[1]);
            writeln!(report, "| {label} | {:.0} | {:.0} | {} |", rates[0], rates[1], percent(rates[0], rates[1])).unwrap();
            rates
        };
        let one = run(1, Tenancy::OwnTenant);
        let [many_tenants, one_tenant] =
            [Tenancy::OwnTenant, Tenancy::SharedTenant].map(|tenancy| -> Vec<f64> { run(CONNECTIONS, tenancy).iter().zip(&one).map(|(many, one)| many / one).collect() });
        for (scaling, tenants) in [(&many_tenants, format!("{CONNECTIONS} tenants")), (&one_tenant, "1 tenant".to_owned())] {
            writeln!(scaling_rows, "| batch {batch}, {tenants} | {:.2}× | {:.2}× |", scaling[0], scaling[1]).unwrap();
        }
        targets.push(Target::new(
            format!("{CONNECTIONS} connections on {CONNECTIONS} tenants vs 1, batch {batch}, fsync on: sync_ext's scaling over plain SQL's"),
            many_tenants[0] / many_tenants[1],
            Goal::AtLeast(0.9),
            Unit::Ratio,
        ));
        targets.push(Target::new(
            format!("{CONNECTIONS} connections on one tenant vs 1, batch {batch}, fsync on"),
            one_tenant[0],
            Goal::AtLeast(1.5),
            Unit::Times,
        ));
    }
    write!(report, "\n| scaling, {CONNECTIONS} connections over 1 | sync_ext | plain SQL |\n|---|---:|---:|\n{scaling_rows}").unwrap();
    Section { report, targets }
}
