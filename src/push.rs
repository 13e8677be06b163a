//! `sync_push`: merges a batch of client changes into the op log, the snapshots and bound tables.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use serde_json::Value;
use sync_ext_protocol::hlc::wall_clock_millis;
use sync_ext_protocol::digest::row_state_digest;
use sync_ext_protocol::scope::Instances;
use sync_ext_protocol::wire::{PushLimits, REASON_READ_ONLY};
use sync_ext_protocol::{merge_batch, parse_changes, validate_tenant, BatchContext, BatchOutcome, Change, ParsedBatch, PushResponse, RowKey, Status};

use crate::auth::authorize_reach;
use crate::citus::{self, Access, Placement};
use crate::errors::{SyncError, SyncResult};
use crate::identity::as_engine;
use crate::jsonb::{Body, ByteaBody, JsonbBody, JsonbDatum};
use crate::models::{self, Model, PendingWrites, RowWrite};
use crate::notifier;
use crate::storage::{self, Digests, LoadedRows, Lock, TenantState};

/// Applies a batch of changes for `tenant` and returns one result per change plus the tenant's cursor.
/// See the README for the change format and the merge rule.
#[pg_extern(volatile, parallel_unsafe)]
fn sync_push(tenant: &str, changes: JsonbBody) -> Result<JsonbDatum, ErrorReport> {
    let response = push(tenant, &changes.0, || changes.parse("changes"))?;
    Ok(JsonbDatum::from_serialize(&response))
}

/// `sync_push` with the changes and the response encoded as MessagePack (named fields).
#[pg_extern(volatile, parallel_unsafe)]
fn sync_push_msgpack(tenant: &str, changes: ByteaBody) -> Result<Vec<u8>, ErrorReport> {
    let response = push(tenant, &changes.0, || {
        sync_ext_protocol::msgpack::decode(changes.bytes())
            .map_err(|error| SyncError::InvalidMessagePack { argument: "changes", problem: error.to_string() })
    })?;
    Ok(sync_ext_protocol::msgpack::encode(&response).expect("push responses encode"))
}

/// Authorizes, checks the body's size, reads, validates, merges and stores one batch: a handful of
/// statements whatever its size. The sync tables are read and written by the engine; values are
/// decoded and bound tables written with the caller's rights (see [`crate::identity`]).
pub fn push(tenant: &str, body: &Body, read: impl FnOnce() -> SyncResult<Value>) -> SyncResult<PushResponse> {
    validate_tenant(tenant)?;
    // Batches of unbound models are done in one pass by the engine (reading the body runs no SQL).
    let Bound { mut changes, mut refused, skew, models, limits, placement, writable } = match as_engine(|engine| {
        let (settings, reach) = authorize_reach(engine, tenant)?;
        let writable = reach.writable();
        let limits = Some(settings.push_limits_for_clients());
        body.check_size("changes", settings.max_push_bytes)?;
        let ParsedBatch { changes, refused } = parse_changes(&read()?, &settings.push_limits())?;
        let placement = citus::placement(tenant, Access::Write)?;
        placement.run(|| Spi::connect_mut(|client| {
            if changes.is_empty() {
                return Ok(FirstPass::Done(PushResponse { cursor: storage::last_seq(client, tenant)?, results: Vec::new(), limits }));
            }
            storage::require_primary("sync_push")?;
            let names: BTreeSet<&str> = changes.iter().map(|change| change.model.as_str()).collect();
            let models = Model::load_named(client, &names.into_iter().collect::<Vec<_>>())?;
            if !models.is_empty() {
                let skew = settings.max_clock_skew_ms;
                return Ok(FirstPass::Bound(Box::new(Bound { changes, refused, skew, models, limits, placement: placement.clone(), writable })));
            }
            let state = storage::lock_tenant(client, tenant, Lock::Counters)?;
            let outcome = store_batch(client, tenant, &state, &changes, refused, settings.max_clock_skew_ms, writable.as_ref())?;
            Ok(FirstPass::Done(PushResponse { cursor: outcome.last_seq, results: outcome.results, limits }))
        }))
    })? {
        FirstPass::Done(response) => return Ok(response),
        FirstPass::Bound(bound) => *bound,
    };
    for (index, change) in changes.iter().enumerate() {
        if models.get(&change.model).is_some_and(Model::is_read_only) {
            refused.entry(index).or_insert_with(|| REASON_READ_ONLY.to_owned());
        }
    }
    for (index, reason) in models::normalize_changes(&mut changes, tenant, &models, &refused) {
        refused.insert(index, reason);
    }
    let (state, mut merged) = placement.run(|| as_engine(|_| Spi::connect_mut(|client| {
        let state = storage::lock_tenant(client, tenant, Lock::WritingTables)?;
        let merged = merge(client, tenant, &state, &changes, refused.clone(), skew, writable.as_ref())?;
        Ok((state, merged))
    })))?;
    let refused_rows = models::write_rows(tenant, &models, &pending_writes(&merged.outcome, &models))?;
    placement.run(|| as_engine(|_| Spi::connect_mut(|client| {
        if !refused_rows.is_empty() {
            for (index, change) in changes.iter().enumerate() {
                let duplicate = matches!(merged.outcome.results[index].status, Status::Duplicate { .. });
                if let Some(reason) = refused_rows.get(&(change.model.clone(), change.pk.clone())).filter(|_| !duplicate) {
                    refused.entry(index).or_insert_with(|| reason.clone());
                }
            }
            merged = merge(client, tenant, &state, &changes, refused, skew, writable.as_ref())?;
        }
        store(client, tenant, &state, &changes, &merged)?;
        Ok(PushResponse { cursor: merged.outcome.last_seq, results: merged.outcome.results, limits })
    })))
}

/// How far the engine's first pass got: the whole push, or a batch of bound models to decode and write
/// with the caller's rights.
enum FirstPass {
    Done(PushResponse),
    Bound(Box<Bound>),
}

/// A batch of bound models after the engine's first pass.
struct Bound {
    changes: Vec<Change>,
    /// The changes refused so far (by index), with reasons.
    refused: HashMap<usize, String>,
    /// The clock skew limit (ms).
    skew: i32,
    models: HashMap<String, Model>,
    limits: Option<PushLimits>,
    /// Where the tenant's sync state is (its shards' placement lock is held already).
    placement: Placement,
    /// The scope instances the caller may write, `None` for all (see [`crate::auth::Reach`]).
    writable: Option<Instances>,
}
/// The final states of the registered models' rows that a batch changed, to write into their tables.
fn pending_writes(outcome: &BatchOutcome, models: &HashMap<String, Model>) -> PendingWrites {
    let mut pending = PendingWrites::new();
    for ((model, pk), touched) in &outcome.rows {
        if models.contains_key(model) {
            pending.entry(model.clone()).or_default().push((pk.clone(), RowWrite::of(&touched.state)));
        }
    }
    pending
}

/// A batch's outcome, and the tenant's state digest after it and how far the digests of the scope
/// instances it touched moved.
struct Merged {
    outcome: BatchOutcome,
    digest: u64,
    instance_digests: BTreeMap<String, u64>,
}

/// Decides a batch against the stored state of a locked tenant (three reads, no writes). Changes stamped
/// more than `max_clock_skew_ms` ahead of the server clock are refused, and with `writable` those to rows
/// outside its instances. The digests move by what the changed rows' digests moved.
fn merge(
    client: &SpiClient<'_>,
    tenant: &str,
    state: &TenantState,
    changes: &[Change],
    refused: HashMap<usize, String>,
    max_clock_skew_ms: i32,
    writable: Option<&Instances>,
) -> SyncResult<Merged> {
    let LoadedRows { states: rows, instances } = storage::load_rows(client, tenant, changes)?;
    // Read after the tenant's lock, so that a scope (re)definition committed meanwhile is seen.
    let scopes = crate::scopes::definitions(client)?;
    let before: HashMap<RowKey, (u64, Instances)> = rows
        .iter()
        .map(|(key, row)| (key.clone(), (row_state_digest(&key.0, &key.1, row), scopes.membership(&key.0, row, instances.get(key)))))
        .collect();
    let context = BatchContext {
        last_seq: state.last_seq,
        logged: storage::logged_ops(client, tenant, changes)?,
        rows,
        latest_allowed_millis: wall_clock_millis() + i64::from(max_clock_skew_ms),
        stale_through: state.horizon_hlc,
        refused,
        scopes: &scopes,
        instances,
        writable: writable.cloned(),
    };
    let outcome = merge_batch(changes, context);
    let mut digest = state.digest;
    let mut instance_digests: BTreeMap<String, u64> = BTreeMap::new();
    for (key, touched) in &outcome.rows {
        let (was, was_in) = before.get(key).cloned().unwrap_or_default();
        let now = row_state_digest(&key.0, &key.1, &touched.state);
        digest = digest.wrapping_sub(was).wrapping_add(now);
        for instance in was_in {
            let moved = instance_digests.entry(instance).or_default();
            *moved = moved.wrapping_sub(was);
        }
        for instance in &touched.instances {
            let moved = instance_digests.entry(instance.clone()).or_default();
            *moved = moved.wrapping_add(now);
        }
    }
    Ok(Merged { outcome, digest, instance_digests })
}

/// Writes a batch's outcome: the op log, the snapshots, the scope index, the tenant's counters and
/// digests, and a notification.
fn store(client: &mut SpiClient<'_>, tenant: &str, state: &TenantState, changes: &[Change], merged: &Merged) -> SyncResult<()> {
    let outcome = &merged.outcome;
    if outcome.appended.is_empty() {
        if state.applying_push {
            storage::end_writing_tables(client, tenant)?;
        }
        return Ok(());
    }
    let newest = outcome.appended.iter().map(|entry| changes[entry.index].hlc).max();
    let digests = Digests { last_hlc: state.last_hlc.max(newest), tenant: merged.digest, instances: merged.instance_digests.clone() };
    storage::write_batch(client, tenant, changes, outcome, &digests, notifier::route()?)?;
    Ok(())
}

/// Merges and stores a batch for a locked tenant (`writable`: the instances the writer may write, `None` for all).
pub fn store_batch(
    client: &mut SpiClient<'_>,
    tenant: &str,
    state: &TenantState,
    changes: &[Change],
    refused: HashMap<usize, String>,
    max_clock_skew_ms: i32,
    writable: Option<&Instances>,
) -> SyncResult<BatchOutcome> {
    let merged = merge(client, tenant, state, changes, refused, max_clock_skew_ms, writable)?;
    store(client, tenant, state, changes, &merged)?;
    let outcome = merged.outcome;
    Ok(outcome)
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;
    use serde_json::{json, Value};

    use crate::testing::{change, error_of, fingerprint, pull, push, snapshot, statuses};

    fn title(tenant: &str, pk: &str) -> Value {
        snapshot(tenant, pk).0["title"].clone()
    }

    #[pg_test]
    fn applied_then_duplicate_with_the_original_seq() {
        let batch = json!([change(1, "1", "insert", "00.000", "a", json!({"title": "milk"}))]);
        let first = push("t", batch.clone());
        assert_eq!(
            first,
            json!({"cursor": 1, "results": [{"op_id": "00000000-0000-4000-8000-000000000001", "status": "applied", "seq": 1}],
                   "limits": {"max_push_changes": 10000, "max_push_bytes": 8388608, "max_value_bytes": 1048576}})
        );
        push("t", json!([change(2, "2", "insert", "00.000", "a", json!({"title": "eggs"}))]));
        let before = fingerprint();
        let again = push("t", batch);
        assert_eq!(again["results"][0], json!({"op_id": "00000000-0000-4000-8000-000000000001", "status": "duplicate", "seq": 1}));
        assert_eq!(again["cursor"], 2);
        assert_eq!(fingerprint(), before);
    }

    #[pg_test]
    fn an_older_write_is_superseded_changes_nothing_and_is_never_pulled() {
        push("t", json!([change(1, "1", "insert", "05.000", "a", json!({"title": "new"}))]));
        let before = fingerprint();
        let older = push("t", json!([change(2, "1", "update", "01.000", "b", json!({"title": "old"}))]));
        assert_eq!(older["results"][0], json!({"op_id": "00000000-0000-4000-8000-000000000002", "status": "superseded"}));
        assert_eq!(older["cursor"], 1);
        assert_eq!(fingerprint(), before);
        assert_eq!(pull("t", 0, 100)["changes"].as_array().unwrap().len(), 1);
    }

    #[pg_test]
    fn the_same_op_id_with_another_payload_is_rejected_op_id_conflict() {
        push("t", json!([change(1, "1", "insert", "00.000", "a", json!({"title": "milk"}))]));
        let before = fingerprint();
        let conflict = push("t", json!([change(1, "1", "insert", "00.000", "a", json!({"title": "beer"}))]));
        assert_eq!(conflict["results"][0]["status"], "rejected");
        assert_eq!(conflict["results"][0]["reason"], "op_id_conflict");
        assert_eq!(fingerprint(), before);
        let within_batch = push(
            "t",
            json!([change(7, "7", "insert", "00.000", "a", json!({"n": 1})), change(7, "7", "insert", "00.000", "a", json!({"n": 2}))]),
        );
        assert_eq!(statuses(&within_batch), ["applied", "rejected"]);
        assert_eq!(snapshot("t", "7").0, json!({"n": 1}));
    }

    #[pg_test]
    fn a_clock_far_ahead_is_rejected_clock_skew_and_the_rest_applies() {
        let mut future = change(1, "1", "insert", "00.000", "a", json!({"title": "from the future"}));
        future["hlc"] = json!("2999-01-01T00:00:00.000Z-0000");
        let response = push("t", json!([future.clone(), change(2, "2", "insert", "00.000", "a", json!({"title": "fine"}))]));
        assert_eq!(response["results"][0]["reason"], "clock_skew");
        assert_eq!(response["results"][1], json!({"op_id": "00000000-0000-4000-8000-000000000002", "status": "applied", "seq": 1}));
        let mut an_hour_ahead = future;
        let ahead = chrono_like_now_plus_minutes(60);
        an_hour_ahead["hlc"] = json!(ahead);
        assert_eq!(push("t", json!([an_hour_ahead.clone()]))["results"][0]["reason"], "clock_skew");
        Spi::run("SELECT sync_configure('max_clock_skew', '2h')").unwrap();
        assert_eq!(statuses(&push("t", json!([an_hour_ahead]))), ["applied"]);
    }

    /// The server clock plus `minutes`, as an HLC.
    fn chrono_like_now_plus_minutes(minutes: i64) -> String {
        let millis = sync_ext_protocol::hlc::wall_clock_millis() + minutes * 60_000;
        sync_ext_protocol::Hlc::new(millis, 0).unwrap().to_string()
    }

    #[pg_test]
    fn the_later_hlc_wins_in_either_arrival_order() {
        let early = change(1, "1", "update", "01.000", "z", json!({"title": "early"}));
        let late = change(2, "1", "update", "02.000", "a", json!({"title": "late"}));
        assert_eq!(statuses(&push("x", json!([early.clone(), late.clone()]))), ["applied", "applied"]);
        assert_eq!(statuses(&push("y", json!([late, early]))), ["applied", "superseded"]);
        assert_eq!(title("x", "1"), "late");
        assert_eq!(title("y", "1"), "late");
    }

    #[pg_test]
    fn on_equal_hlc_a_delete_beats_an_update_in_either_order() {
        let update = change(1, "1", "update", "03.000", "zzz", json!({"title": "kept?"}));
        let delete = change(2, "1", "delete", "03.000", "aaa", Value::Null);
        push("x", json!([update.clone(), delete.clone()]));
        push("y", json!([delete, update]));
        assert!(snapshot("x", "1").1 && snapshot("y", "1").1);
        assert_eq!(snapshot("x", "1").0, json!({}));
        assert_eq!(snapshot("y", "1").0, json!({}));
    }

    #[pg_test]
    fn on_equal_hlc_the_greater_actor_wins_then_the_greater_op_id() {
        let by_a = change(9, "1", "update", "03.000", "device-a", json!({"title": "a"}));
        let by_b = change(1, "1", "update", "03.000", "device-b", json!({"title": "b"}));
        push("x", json!([by_a.clone(), by_b.clone()]));
        push("y", json!([by_b, by_a]));
        assert_eq!((title("x", "1"), title("y", "1")), (json!("b"), json!("b")));

        let low_id = change(1, "2", "update", "03.000", "device-a", json!({"title": "low"}));
        let high_id = change(2, "2", "update", "03.000", "device-a", json!({"title": "high"}));
        push("x", json!([low_id.clone(), high_id.clone()]));
        push("y", json!([high_id, low_id]));
        assert_eq!((title("x", "2"), title("y", "2")), (json!("high"), json!("high")));
    }

    #[pg_test]
    fn an_update_is_a_patch_and_upserts_an_unseen_row() {
        push("t", json!([change(1, "1", "insert", "00.000", "a", json!({"title": "milk", "done": false}))]));
        push("t", json!([change(2, "1", "update", "01.000", "b", json!({"done": true}))]));
        assert_eq!(snapshot("t", "1"), (json!({"title": "milk", "done": true}), false));
        push("t", json!([change(3, "new", "update", "01.000", "b", json!({"done": true}))]));
        assert_eq!(snapshot("t", "new"), (json!({"done": true}), false));
    }

    #[pg_test]
    fn concurrent_offline_edits_to_different_fields_both_survive() {
        push("t", json!([change(1, "1", "insert", "00.000", "a", json!({"title": "milk", "done": false}))]));
        let from_b = push("t", json!([change(3, "1", "update", "02.000", "b", json!({"done": true}))]));
        let from_a = push("t", json!([change(2, "1", "update", "01.000", "a", json!({"title": "oat milk"}))]));
        assert_eq!((statuses(&from_b), statuses(&from_a)), (vec!["applied".to_owned()], vec!["applied".to_owned()]));
        assert_eq!(snapshot("t", "1").0, json!({"title": "oat milk", "done": true}));
    }

    #[pg_test]
    fn a_delete_is_pulled_and_a_later_write_revives_only_its_fields() {
        push("t", json!([change(1, "1", "insert", "00.000", "a", json!({"title": "milk", "note": "2L"}))]));
        push("t", json!([change(2, "1", "delete", "01.000", "a", Value::Null)]));
        let pulled = pull("t", 1, 10);
        assert_eq!(pulled["changes"][0]["op"], "delete");
        assert_eq!(pulled["changes"][0]["value"], Value::Null);
        assert_eq!(pulled["changes"][0]["seq"], 2);
        assert_eq!(snapshot("t", "1"), (json!({}), true));
        push("t", json!([change(3, "1", "update", "02.000", "b", json!({"title": "back"}))]));
        assert_eq!(snapshot("t", "1"), (json!({"title": "back"}), false));
    }

    #[pg_test]
    fn a_batch_is_merged_in_order_and_logs_only_what_each_change_won() {
        let response = push(
            "t",
            json!([
                change(1, "1", "insert", "00.000", "a", json!({"title": "milk", "done": false})),
                change(2, "1", "update", "05.000", "b", json!({"done": true})),
                change(3, "1", "update", "03.000", "c", json!({"title": "oat milk", "done": false})),
            ]),
        );
        assert_eq!(statuses(&response), ["applied", "applied", "applied"]);
        let log = pull("t", 0, 10);
        assert_eq!(log["changes"][2]["value"], json!({"title": "oat milk"}), "only the field it won is logged");
        assert_eq!(snapshot("t", "1").0, json!({"title": "oat milk", "done": true}));
    }

    #[pg_test]
    fn numbers_are_carried_exactly_or_refused_naming_the_field() {
        let before = fingerprint();
        for literal in ["18446744073709551617", "123456789012345678901234567890", "0.1000000000000000055511151231257827"] {
            let body = format!(
                r#"[{{"op_id": "00000000-0000-4000-8000-000000000001", "model": "todo", "pk": "1", "op": "insert",
                     "hlc": "2026-01-01T00:00:00.000Z-0000", "actor": "a", "value": {{"ok": 0.5, "n": {literal}}}}}]"#
            );
            let error = error_of(&format!("SELECT sync_push('t', '{body}')"));
            assert_eq!(error, format!("22023: changes[0].value.n: the number {literal} cannot be carried exactly as a JSON number (send it as a string)"));
            let portable = error_of(&format!("SELECT sync_to_portable('{{\"n\": {literal}}}'::jsonb)"));
            assert!(portable.starts_with("22023: value.n: the number"), "the portable converter refuses it too: {portable}");
        }
        assert_eq!(fingerprint(), before, "nothing was stored");
        let exact = push("t", json!([change(2, "2", "insert", "00.000", "a", json!({"big": 9007199254740993u64, "max": u64::MAX, "tiny": 5e-324}))]));
        assert_eq!(statuses(&exact), ["applied"]);
        assert_eq!(pull("t", 0, 10)["changes"][0]["value"], json!({"big": 9007199254740993u64, "max": u64::MAX, "tiny": 5e-324}));
    }

    #[pg_test]
    fn the_payload_hash_does_not_depend_on_how_a_number_is_spelled() {
        let spelled = |n: &str| {
            format!(
                r#"[{{"op_id": "00000000-0000-4000-8000-000000000001", "model": "todo", "pk": "1", "op": "insert",
                     "hlc": "2026-01-01T00:00:00.000Z-0000", "actor": "a", "value": {{"n": {n}, "half": 0.50}}}}]"#
            )
        };
        let first = Spi::get_one::<pgrx::JsonB>(&format!("SELECT sync_push('t', '{}')", spelled("1"))).unwrap().unwrap().0;
        assert_eq!(statuses(&first), ["applied"]);
        for n in ["1.0", "1e0", "10e-1", "1.000"] {
            let again = Spi::get_one::<pgrx::JsonB>(&format!("SELECT sync_push('t', '{}')", spelled(n))).unwrap().unwrap().0;
            assert_eq!(again["results"][0], json!({"op_id": "00000000-0000-4000-8000-000000000001", "status": "duplicate", "seq": 1}), "{n}");
        }
        let other = Spi::get_one::<pgrx::JsonB>(&format!("SELECT sync_push('t', '{}')", spelled("2"))).unwrap().unwrap().0;
        assert_eq!(other["results"][0]["reason"], "op_id_conflict", "another value is another payload");
    }

    /// `[a valid change, the valid change edited by `edit`]` as a SQL literal.
    fn batch_with_second(edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> String {
        let valid = change(1, "1", "insert", "00.000", "a", json!({"title": "milk"}));
        let mut bad = change(2, "2", "insert", "00.000", "a", json!({"title": "eggs"}));
        edit(bad.as_object_mut().unwrap());
        format!("'{}'", json!([valid, bad]).to_string().replace('\'', "''"))
    }

    #[pg_test]
    fn malformed_input_is_an_error_naming_index_and_field_and_changes_nothing() {
        push("t", json!([change(99, "seed", "insert", "00.000", "a", json!({"title": "already here"}))]));
        let mut cases: Vec<(String, &str, String)> = Vec::new();
        for field in ["op_id", "model", "pk", "op", "hlc", "actor"] {
            let missing = batch_with_second(|c| drop(c.remove(field)));
            cases.push((missing, "22023", format!("changes[1].{field}: is missing")));
            let mistyped = batch_with_second(|c| drop(c.insert(field.into(), json!(42))));
            cases.push((mistyped, "22023", format!("changes[1].{field}: expected a string, got a number")));
        }
        for field in ["model", "pk", "actor"] {
            let empty = batch_with_second(|c| drop(c.insert(field.into(), json!(""))));
            cases.push((empty, "22023", format!("changes[1].{field}: must not be empty")));
        }
        let long_model = batch_with_second(|c| drop(c.insert("model".into(), json!("m".repeat(256)))));
        cases.push((long_model, "22023", "changes[1].model: is 256 bytes, the limit is 255".into()));
        let bad_uuid = batch_with_second(|c| drop(c.insert("op_id".into(), json!("not-a-uuid"))));
        cases.push((bad_uuid, "22P02", "changes[1].op_id: expected a UUID, got \"not-a-uuid\"".into()));
        let bad_hlc = batch_with_second(|c| drop(c.insert("hlc".into(), json!("2026-01-01 00:00:00"))));
        cases.push((bad_hlc, "22P02", "changes[1].hlc: expected an HLC like".into()));
        let unknown_op = batch_with_second(|c| drop(c.insert("op".into(), json!("upsert"))));
        cases.push((unknown_op, "22023", "changes[1].op: expected \"insert\", \"update\" or \"delete\", got \"upsert\"".into()));
        let no_value = batch_with_second(|c| drop(c.remove("value")));
        cases.push((no_value, "22023", "changes[1].value: is missing (an insert needs an object)".into()));
        let array_value = batch_with_second(|c| drop(c.insert("value".into(), json!([1]))));
        cases.push((array_value, "22023", "changes[1].value: expected an object, got an array".into()));
        let delete_with_value = batch_with_second(|c| drop(c.insert("op".into(), json!("delete"))));
        cases.push((delete_with_value, "22023", "changes[1].value: a delete carries no value, got an object".into()));
        let not_an_object = format!("'{}'", json!([change(1, "1", "insert", "00.000", "a", json!({})), 7]));
        cases.push((not_an_object, "22023", "changes[1]: expected an object, got a number".into()));
        cases.push(("'{\"op_id\": 1}'".into(), "22023", "changes: expected a JSON array, got an object".into()));

        let before = fingerprint();
        for (literal, sqlstate, message) in &cases {
            let error = error_of(&format!("SELECT sync_push('t', {literal})"));
            assert!(error.starts_with(&format!("{sqlstate}: {message}")), "for {literal}: got {error:?}");
            assert_eq!(fingerprint(), before, "for {literal}: something changed");
        }

        let valid_pair = batch_with_second(|_| {});
        assert_eq!(error_of(&format!("SELECT sync_push('', {valid_pair})")), "22023: tenant: must not be empty");
        Spi::run("SELECT sync_configure('max_push_changes', '1')").unwrap();
        assert_eq!(
            error_of(&format!("SELECT sync_push('t', {valid_pair})")),
            "22023: changes: 2 changes exceed max_push_changes (1)"
        );
        assert_eq!(fingerprint(), before);
    }
}
