//! The extension merges exactly as the protocol crate does, whatever order and batching changes
//! arrive in, and what a client pulls replays to the same rows.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

use postgres::Client;
use proptest::collection::vec;
use proptest::prop_assert_eq;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Map, Value};
use sync_ext_pgrx_tests::{pull_all, push, Cluster};
use sync_ext_protocol::arbitrary::shuffled_change_set;
use sync_ext_protocol::{merge_all, Change, PulledChange, RowKey, StoredRow};

/// A snapshot row's columns: value, hlc, actor, op_id, deleted, deleted_hlc, field_stamps.
type SnapshotColumns = (Value, String, String, String, bool, Option<String>, Value);

/// The server's snapshot rows of a tenant, in the flat stored form.
fn server_rows(client: &mut Client, tenant: &str) -> BTreeMap<RowKey, SnapshotColumns> {
    client
        .query(
            "SELECT model, id, value, hlc, actor, op_id::text, deleted, deleted_hlc, field_stamps
               FROM sync_ext.snapshots WHERE tenant_id = $1",
            &[&tenant],
        )
        .expect("snapshots")
        .iter()
        .map(|row| ((row.get(0), row.get(1)), (row.get(2), row.get(3), row.get(4), row.get(5), row.get(6), row.get(7), row.get(8))))
        .collect()
}

fn check_case(client: &mut Client, tenant: &str, changes: &[Change], shuffled: &[Change], batch_sizes: &[usize]) -> Result<(), TestCaseError> {
    let reference = merge_all(changes);
    let mut rest = shuffled;
    for size in batch_sizes.iter().copied().cycle() {
        if rest.is_empty() {
            break;
        }
        let (batch, tail) = rest.split_at(size.min(rest.len()));
        push(client, tenant, batch).map_err(|error| TestCaseError::fail(error.to_string()))?;
        rest = tail;
    }
    let expected: BTreeMap<RowKey, SnapshotColumns> = reference
        .iter()
        .map(|(key, state)| {
            let stored = StoredRow::from_state(state).expect("every merged row was written");
            let value = (
                Value::Object(stored.value),
                stored.stamp.hlc.to_string(),
                stored.stamp.actor,
                stored.stamp.op_id.to_string(),
                stored.deleted,
                stored.deleted_hlc.map(|hlc| hlc.to_string()),
                Value::Object(stored.field_stamps),
            );
            (key.clone(), value)
        })
        .collect();
    prop_assert_eq!(server_rows(client, tenant), expected);

    let pulled = pull_all(client, tenant, 0, 7).map_err(|error| TestCaseError::fail(error.to_string()))?;
    let replayed = merge_all(&pulled.changes.iter().map(PulledChange::to_change).collect::<Vec<_>>());
    let visible = |rows: &BTreeMap<RowKey, sync_ext_protocol::RowState>| -> BTreeMap<RowKey, Option<Map<String, Value>>> {
        rows.iter().map(|(key, row)| (key.clone(), row.visible())).collect()
    };
    prop_assert_eq!(visible(&replayed), visible(&reference));
    Ok(())
}

#[test]
fn shuffled_batches_give_the_protocols_state_and_pulls_replay_to_it() {
    let cluster = Cluster::start();
    cluster.create_database("sync");
    let client = RefCell::new(cluster.connect("sync"));
    let mut runner = TestRunner::new(Config { cases: 48, ..Config::default() });
    let case = Cell::new(0);
    runner
        .run(&(shuffled_change_set(), vec(1usize..6, 1..6)), |((changes, shuffled), batch_sizes)| {
            case.set(case.get() + 1);
            check_case(&mut client.borrow_mut(), &format!("case-{}", case.get()), &changes, &shuffled, &batch_sizes)
        })
        .expect("the extension and the protocol agree");
}
