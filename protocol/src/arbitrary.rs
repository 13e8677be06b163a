//! Proptest strategies for random change sets: a few rows, a few fields, a few actors and a narrow
//! clock, so that equal hlcs, deletes racing updates and revived rows come up often.
//! Enabled by the `arbitrary` feature.

use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::change::{Change, Op};
use crate::hlc::Hlc;

/// Wall time of the generated stamps: 2026-01-01T00:00:00Z, well in the past of any server clock.
const BASE_MILLIS: i64 = 1_767_225_600_000;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![Just(Op::Insert), Just(Op::Update), Just(Op::Delete)]
}

fn field_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i32>().prop_map(Value::from),
        "[a-z]{0,3}".prop_map(Value::from),
        any::<bool>().prop_map(Value::from),
        Just(Value::Null),
    ]
}

fn fields() -> impl Strategy<Value = Map<String, Value>> {
    btree_map(prop_oneof![Just("a"), Just("b"), Just("c")], field_value(), 0..=3)
        .prop_map(|fields| fields.into_iter().map(|(name, value)| (name.to_owned(), value)).collect())
}

/// One change to one of `rows` rows of model `todo` (pks "0".."rows").
pub fn change(rows: u32) -> impl Strategy<Value = Change> {
    (0..rows, op(), 0..4i64, 0..3u16, prop_oneof![Just("a"), Just("b"), Just("c")], fields(), any::<u128>()).prop_map(
        |(row, op, millis, counter, actor, value, op_id)| Change {
            op_id: Uuid::from_u128(op_id),
            model: "todo".into(),
            pk: row.to_string(),
            op,
            hlc: Hlc::new(BASE_MILLIS + millis, counter).expect("in range"),
            actor: actor.into(),
            value: (op != Op::Delete).then_some(value),
        },
    )
}

/// A set of up to `max` changes to `rows` rows, with distinct op_ids.
pub fn change_set(rows: u32, max: usize) -> impl Strategy<Value = Vec<Change>> {
    vec(change(rows), 1..=max).prop_map(|mut changes| {
        changes.sort_by_key(|change| change.op_id);
        changes.dedup_by_key(|change| change.op_id);
        changes
    })
}

/// A change set of up to 24 changes to 3 rows, and the same changes in a random order.
pub fn shuffled_change_set() -> impl Strategy<Value = (Vec<Change>, Vec<Change>)> {
    change_set(3, 24).prop_flat_map(|changes| (Just(changes.clone()), Just(changes).prop_shuffle()))
}
