//! Capturing plain SQL writes to registered tables into the op log.
//!
//! Statement-level triggers pass every row a statement touched (INSERT, UPDATE, DELETE, COPY,
//! multi-row statements alike); each becomes a change stamped by the server's clock, with actor
//! `sync_ext.actor`, logged in the same transaction so clients pull it like any pushed change.

use std::collections::BTreeMap;

use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::AnyArray;
use serde_json::{Map, Value};
use sync_ext_protocol::{Change, HlcClock, Op};

use crate::errors::{SyncError, SyncResult};
use crate::models::{applying_push, Model};
use crate::push::store_batch;
use crate::storage;
use crate::types::{number_mode, Codec};

/// Functions internal to the engine, in the `sync_ext` schema.
#[pg_schema]
mod sync_ext {
    use pgrx::prelude::*;
    use pgrx::AnyArray;

    /// Called by the capture triggers of a registered table with the rows a statement replaced and wrote.
    #[pg_extern(volatile, parallel_unsafe)]
    fn capture_rows(table: pg_sys::Oid, old_rows: Option<AnyArray>, new_rows: Option<AnyArray>) -> Result<(), pgrx::pg_sys::panic::ErrorReport> {
        if super::applying_push() {
            return Ok(());
        }
        Ok(super::capture(table, old_rows, new_rows)?)
    }
}

/// A captured row: its tenant, wire pk and portable columns (the tenant column left out).
struct CapturedRow {
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

fn capture(table: pg_sys::Oid, old_rows: Option<AnyArray>, new_rows: Option<AnyArray>) -> SyncResult<()> {
    crate::auth::as_owner(|| Spi::connect_mut(|client| {
        let Some(model) = Model::load_for_table(client, table)? else { return Ok(()) };
        let mut old: BTreeMap<(String, String), Map<String, Value>> =
            captured_rows(&model, old_rows)?.into_iter().map(|row| ((row.tenant, row.pk), row.columns)).collect();
        let mut drafts: BTreeMap<String, Vec<Draft>> = BTreeMap::new();
        for row in captured_rows(&model, new_rows)? {
            let draft = match old.remove(&(row.tenant.clone(), row.pk.clone())) {
                Some(before) => {
                    let changed: Map<String, Value> =
                        row.columns.into_iter().filter(|(name, value)| before.get(name) != Some(value)).collect();
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
    }))
}

/// Logs changes made by the server for one tenant: stamped after every hlc the tenant has seen, so
/// they win over every change already applied, as a write made later should.
pub fn commit_server_changes(client: &mut SpiClient<'_>, tenant: &str, model: &str, drafts: Vec<Draft>) -> SyncResult<()> {
    let state = storage::lock_tenant(client, tenant)?;
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
    store_batch(client, tenant, &state, &changes, Default::default())?;
    Ok(())
}
