//! The storage section: bytes on disk per log entry and per snapshot row.

use std::fmt::Write as _;

use crate::harness::{connect, grouped, settle, Bench, Section};
use crate::pull::pushed_history;
use crate::targets::{Goal, Target, Unit};

/// The sync tables measured, and the most bytes per row each may take.
const TABLES: [(&str, &str, f64); 2] = [("sync_ext.op_log", "log entry", 300.0), ("sync_ext.snapshots", "snapshot row", 450.0)];

/// Bytes on disk per row of the op log and the snapshots after the pull section's history (standard
/// todos pushed through sync_push): `pg_total_relation_size` (heap, TOAST, indexes) over the row count.
pub fn storage_section(bench: &Bench) -> Section {
    eprintln!("[bench] storage");
    let (url, pulled) = pushed_history(bench);
    let mut client = connect(&url);
    settle(&mut client);
    let mut report = format!(
        "## Storage\n\nBytes on disk per row after {} inserts of the standard todo pushed through sync_push in batches of \
         1,000 (one tenant; nothing else in the database), then VACUUM ANALYZE: `pg_total_relation_size` (heap, TOAST, free \
         space and visibility maps, every index) over the table's rows.\n\n",
        grouped(pulled as usize)
    );
    report.push_str("| table | rows | heap and TOAST | indexes | total | bytes/row |\n|---|---:|---:|---:|---:|---:|\n");
    let mut targets = Vec::new();
    for (table, row, most) in TABLES {
        let sizes = client
            .query_one(
                &format!("SELECT count(*), pg_table_size('{table}'), pg_indexes_size('{table}'), pg_total_relation_size('{table}') FROM {table}"),
                &[],
            )
            .unwrap();
        let (rows, heap, indexes, total): (i64, i64, i64, i64) = (sizes.get(0), sizes.get(1), sizes.get(2), sizes.get(3));
        let per_row = total as f64 / rows as f64;
        let mib = |bytes: i64| bytes as f64 / 1048576.0;
        eprintln!("[bench]   {table}: {per_row:.0} bytes per {row}");
        writeln!(report, "| {table} | {} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {per_row:.0} |", grouped(rows as usize), mib(heap), mib(indexes), mib(total)).unwrap();
        targets.push(Target::new(format!("bytes on disk per {row} ({table} with its indexes)"), per_row, Goal::AtMost(most), Unit::Bytes));
    }
    Section { report, targets }
}
