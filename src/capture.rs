//! Capturing plain SQL writes to registered tables into the op log.
//!
//! Statement-level triggers pass every row a statement touched (INSERT, UPDATE, DELETE, COPY,
//! multi-row statements alike); each becomes a change stamped by the server's clock, with actor
//! `sync_ext.actor`, logged in the same transaction so clients pull it like any pushed change.

use std::collections::BTreeMap;
use std::convert::Infallible;

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::AnyArray;
use serde_json::{Map, Value};
use sync_ext_protocol::{Change, HlcClock, Op};

use crate::errors::{SyncError, SyncResult};
use crate::identity::as_engine;
use crate::models::{applying_push, Model};
use crate::push::store_batch;
use crate::storage;
use crate::types::{number_mode, Codec};

/// The capture trigger of a registered table (`sync_ext.capture_insert`, `_update` and `_delete` are
/// this function): logs the rows one statement inserted, updated or deleted, read from its transition
/// tables. A trigger function cannot be called directly.
#[pg_trigger(sql = false)]
fn capture<'a>(trigger: &'a PgTrigger<'a>) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, Infallible> {
    if !applying_push() {
        if let Err(error) = capture_statement(trigger) {
            ErrorReport::from(error).report(PgLogLevel::ERROR);
        }
    }
    Ok(None)
}

/// The capture entry point of sync_ext 0.1.0 and 0.2.0 (`sync_ext.capture_rows`, called by their
/// PL/pgSQL triggers; this version declares no SQL function for it). Between installing this library
/// and `ALTER EXTENSION sync_ext UPDATE` it says what to do, as the other functions do.
#[pg_extern(sql = false)]
fn capture_rows(_table: pg_sys::Oid, _old_rows: Option<AnyArray>, _new_rows: Option<AnyArray>) -> Result<(), ErrorReport> {
    as_engine(|_| Spi::connect(crate::auth::require_current_schema))?;
    // Only an older schema declares this function, so the check above has failed.
    Err(SyncError::NotInstalled.into())
}

fn capture_statement(trigger: &PgTrigger<'_>) -> SyncResult<()> {
    let transition_table = |name: Option<&str>| name.map(crate::models::quote_identifier);
    let old = transition_table(trigger.old_transition_table_name().unwrap_or_default());
    let new = transition_table(trigger.new_transition_table_name().unwrap_or_default());
    let data = trigger.trigger_data() as *const pg_sys::TriggerData as *mut pg_sys::TriggerData;
    as_engine(|_| {
        Spi::connect_mut(|client| {
            // SAFETY: makes this trigger's transition tables visible to the statements of this connection.
            unsafe { pg_sys::SPI_register_trigger_data(data) };
            crate::auth::require_current_schema(client)?;
            let Some(model) = Model::load_for_table(client, trigger.relid().expect("a trigger has a table"))? else { return Ok(()) };
            let (old, new) = (relation_rows(client, &model, old.as_deref())?, relation_rows(client, &model, new.as_deref())?);
            log_rows(client, &model, old, new)
        })
    })
}

/// Logs the difference between the `old` rows (replaced or deleted) and the `new` rows (written) of
/// one statement as server changes of `model`. Run by the engine.
pub fn log_rows(client: &mut SpiClient<'_>, model: &Model, old: Vec<CapturedRow>, new: Vec<CapturedRow>) -> SyncResult<()> {
    let mut old: BTreeMap<(String, String), Map<String, Value>> = old.into_iter().map(|row| ((row.tenant, row.pk), row.columns)).collect();
    let mut drafts: BTreeMap<String, Vec<Draft>> = BTreeMap::new();
    for row in new {
        let draft = match old.remove(&(row.tenant.clone(), row.pk.clone())) {
            Some(before) => {
                let changed: Map<String, Value> = row.columns.into_iter().filter(|(name, value)| before.get(name) != Some(value)).collect();
                if changed.is_empty() {
                    continue;
                }
                Draft { pk: row.pk, op: Op::Update, value: Some(changed) }
            }
            None => Draft { pk: row.pk, op: Op::Insert, value: Some(row.columns) },
        };
        drafts.entry(row.tenant).or_default().push(draft);
    }
    for ((tenant, pk), _) in old {
        drafts.entry(tenant).or_default().push(Draft { pk, op: Op::Delete, value: None });
    }
    for (tenant, drafts) in drafts {
        commit_server_changes(client, &tenant, &model.name, drafts)?;
    }
    Ok(())
}

/// The rows of a relation (a transition table or the model's table) as captured rows.
pub fn relation_rows(client: &SpiClient<'_>, model: &Model, relation: Option<&str>) -> SyncResult<Vec<CapturedRow>> {
    let Some(relation) = relation else { return Ok(Vec::new()) };
    // `r.*` is the whole row whatever the table's columns are named.
    let rows = client.select(&format!("SELECT pg_catalog.array_agg(r.*) FROM {relation} AS r"), Some(1), &[])?;
    captured_rows(model, rows.first().get_one::<AnyArray>()?)
}

/// A captured row: its tenant, wire pk and portable columns (the tenant column left out).
pub struct CapturedRow {
    tenant: String,
    pk: String,
    columns: Map<String, Value>,
}

fn captured_rows(model: &Model, rows: Option<AnyArray>) -> SyncResult<Vec<CapturedRow>> {
    let Some(rows) = rows else { return Ok(Vec::new()) };
    let codec = Codec::for_type(rows.oid())?;
    // SAFETY: the datum is a non-null array of the table's row type.
    let Value::Array(rows) = unsafe { codec.encode(rows.datum(), number_mode()) }? else { return Ok(Vec::new()) };
    rows.into_iter()
        .filter_map(|row| match row {
            Value::Object(columns) => Some(columns),
            _ => None,
        })
        .map(|mut columns| {
            let tenant = model.tenant_of(&columns)?;
            model.remove_tenant_column(&mut columns);
            columns.retain(|name, _| model.syncs(name));
            let pk = model.pk_text(&columns).ok_or_else(|| SyncError::MissingKey { model: model.name.clone() })?;
            Ok(CapturedRow { tenant, pk, columns })
        })
        .collect()
}

/// A change the server makes, before the server clock stamps it.
pub struct Draft {
    pub pk: String,
    pub op: Op,
    pub value: Option<Map<String, Value>>,
}

/// Logs changes made by the server for one tenant: stamped after every hlc the tenant has seen, so
/// they win over every change already applied, as a write made later should.
pub fn commit_server_changes(client: &mut SpiClient<'_>, tenant: &str, model: &str, drafts: Vec<Draft>) -> SyncResult<()> {
    let state = storage::lock_tenant(client, tenant, storage::Lock::Counters)?;
    if state.applying_push {
        // The engine's own write of a push, made by another backend of this transaction (on a distributed
        // install, the one writing the table's shard); in this backend `applying_push()` stops it earlier.
        return Ok(());
    }
    let mut clock = HlcClock::resume(state.last_hlc);
    let wall = sync_ext_protocol::hlc::wall_clock_millis();
    let actor = crate::server_actor();
    let changes: Vec<Change> = drafts
        .into_iter()
        .map(|draft| Change {
            op_id: uuid::Uuid::new_v4(),
            model: model.to_owned(),
            pk: draft.pk,
            op: draft.op,
            hlc: clock.tick(wall),
            actor: actor.clone(),
            value: draft.value,
        })
        .collect();
    store_batch(client, tenant, &state, &changes, Default::default(), i32::MAX, None)?;
    Ok(())
}
