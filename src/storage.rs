//! Reads and writes of the sync tables, one statement per batch.

use std::collections::HashMap;

use pgrx::datum::DatumWithOid;
use pgrx::spi::SpiClient;
use pgrx::JsonB;
use serde_json::{Map, Value};
use sync_ext_protocol::batch::{Appended, TouchedRow};
use sync_ext_protocol::{Change, Hlc, LoggedOp, RowKey, RowState, Stamp, StoredRow};

use crate::errors::{SyncError, SyncResult};

fn pg_uuid(id: &uuid::Uuid) -> pgrx::Uuid {
    pgrx::Uuid::from_bytes(*id.as_bytes())
}

fn rust_uuid(id: &pgrx::Uuid) -> uuid::Uuid {
    uuid::Uuid::from_bytes(*id.as_bytes())
}

/// The tenant's last seq, without locking (0 for a tenant that never pushed).
pub fn last_seq(client: &SpiClient<'_>, tenant: &str) -> SyncResult<i64> {
    let table = client.select("SELECT last_seq FROM sync_ext.tenants WHERE tenant_id = $1", Some(1), &[tenant.into()])?;
    Ok(if table.is_empty() { 0 } else { table.first().get_one::<i64>()?.unwrap_or(0) })
}

/// A tenant's counters, read under its lock.
#[derive(Clone, Copy, Debug)]
pub struct TenantState {
    pub last_seq: i64,
    /// The greatest hlc applied so far.
    pub last_hlc: Option<Hlc>,
}

/// Locks the tenant's counter row until the transaction ends (creating it on first use) and returns
/// its counters. Pushes to one tenant run one after another from here on; other tenants never wait.
pub fn lock_tenant(client: &mut SpiClient<'_>, tenant: &str) -> SyncResult<TenantState> {
    let mut locked = client.update(
        "SELECT last_seq, last_hlc FROM sync_ext.tenants WHERE tenant_id = $1 FOR NO KEY UPDATE",
        Some(1),
        &[tenant.into()],
    )?;
    if locked.is_empty() {
        locked = client.update(
            "INSERT INTO sync_ext.tenants AS t (tenant_id) VALUES ($1)
             ON CONFLICT (tenant_id) DO UPDATE SET last_seq = t.last_seq
             RETURNING last_seq, last_hlc",
            Some(1),
            &[tenant.into()],
        )?;
    }
    let (last_seq, last_hlc) = locked.first().get_two::<i64, String>()?;
    let last_hlc = last_hlc.map(|text| text.parse().map_err(|_| SyncError::CorruptTenant { tenant: tenant.to_owned() })).transpose()?;
    Ok(TenantState { last_seq: last_seq.unwrap_or(0), last_hlc })
}

/// Records the tenant's new last seq, greatest hlc and push time.
pub fn advance_tenant(client: &mut SpiClient<'_>, tenant: &str, last_seq: i64, last_hlc: Option<Hlc>) -> SyncResult<()> {
    client.update(
        "UPDATE sync_ext.tenants SET last_seq = $2, last_hlc = $3, last_push_at = now() WHERE tenant_id = $1",
        None,
        &[tenant.into(), last_seq.into(), last_hlc.map(|hlc| hlc.to_string()).into()],
    )?;
    Ok(())
}

/// The batch's op_ids that are already in the log.
pub fn logged_ops(client: &SpiClient<'_>, tenant: &str, changes: &[Change]) -> SyncResult<HashMap<uuid::Uuid, LoggedOp>> {
    let op_ids: Vec<pgrx::Uuid> = changes.iter().map(|change| pg_uuid(&change.op_id)).collect();
    let table = client.select(
        "SELECT op_id, seq, payload_hash FROM sync_ext.op_log WHERE tenant_id = $1 AND op_id = ANY($2)",
        None,
        &[tenant.into(), op_ids.into()],
    )?;
    let mut logged = HashMap::new();
    for row in table {
        let (Some(op_id), Some(seq), Some(hash)) = (row.get::<pgrx::Uuid>(1)?, row.get::<i64>(2)?, row.get::<Vec<u8>>(3)?)
        else {
            continue;
        };
        let payload_hash = hash.try_into().unwrap_or([0; 32]);
        logged.insert(rust_uuid(&op_id), LoggedOp { seq, payload_hash });
    }
    Ok(logged)
}

/// The merge states of the rows the batch touches, read in one statement.
pub fn load_rows(client: &SpiClient<'_>, tenant: &str, changes: &[Change]) -> SyncResult<HashMap<RowKey, RowState>> {
    let models: Vec<&str> = changes.iter().map(|change| change.model.as_str()).collect();
    let pks: Vec<&str> = changes.iter().map(|change| change.pk.as_str()).collect();
    let table = client.select(
        "SELECT s.model, s.id, s.value, s.hlc, s.actor, s.op_id, s.deleted, s.deleted_hlc, s.field_stamps
           FROM (SELECT DISTINCT model, id FROM unnest($2::text[], $3::text[]) AS k(model, id)) AS k
           JOIN sync_ext.snapshots AS s ON s.tenant_id = $1 AND s.model = k.model AND s.id = k.id",
        None,
        &[tenant.into(), models.into(), pks.into()],
    )?;
    let mut rows = HashMap::new();
    for row in table {
        let model: String = row.get(1)?.unwrap_or_default();
        let id: String = row.get(2)?.unwrap_or_default();
        let corrupt = |problem: String| SyncError::CorruptSnapshot { model: model.clone(), id: id.clone(), problem };
        let hlc_column = |ordinal: usize| -> SyncResult<Option<Hlc>> {
            row.get::<String>(ordinal)?
                .map(|text| text.parse().map_err(|e: sync_ext_protocol::hlc::HlcParseError| corrupt(e.to_string())))
                .transpose()
        };
        let stored = StoredRow {
            value: object_column(row.get::<JsonB>(3)?).ok_or_else(|| corrupt("value is not an object".into()))?,
            stamp: Stamp {
                hlc: hlc_column(4)?.ok_or_else(|| corrupt("hlc is null".into()))?,
                actor: row.get(5)?.unwrap_or_default(),
                op_id: row.get::<pgrx::Uuid>(6)?.as_ref().map(rust_uuid).unwrap_or_default(),
            },
            deleted: row.get(7)?.unwrap_or(false),
            deleted_hlc: hlc_column(8)?,
            field_stamps: object_column(row.get::<JsonB>(9)?).ok_or_else(|| corrupt("field_stamps is not an object".into()))?,
        };
        let state = stored.into_state().map_err(corrupt)?;
        rows.insert((model, id), state);
    }
    Ok(rows)
}

fn object_column(value: Option<JsonB>) -> Option<Map<String, Value>> {
    match value?.0 {
        Value::Object(map) => Some(map),
        _ => None,
    }
}

/// Appends the applied changes to the log in one statement.
pub fn append_ops(client: &mut SpiClient<'_>, tenant: &str, changes: &[Change], appended: &[Appended]) -> SyncResult<()> {
    let mut seqs = Vec::with_capacity(appended.len());
    let mut op_ids = Vec::with_capacity(appended.len());
    let mut models = Vec::with_capacity(appended.len());
    let mut pks = Vec::with_capacity(appended.len());
    let mut ops = Vec::with_capacity(appended.len());
    let mut actors = Vec::with_capacity(appended.len());
    let mut hlcs = Vec::with_capacity(appended.len());
    let mut payloads = Vec::with_capacity(appended.len());
    let mut hashes = Vec::with_capacity(appended.len());
    for entry in appended {
        let change = &changes[entry.index];
        seqs.push(entry.seq);
        op_ids.push(pg_uuid(&change.op_id));
        models.push(change.model.as_str());
        pks.push(change.pk.as_str());
        ops.push(change.op.as_str());
        actors.push(change.actor.as_str());
        hlcs.push(change.hlc.to_string());
        payloads.push(entry.payload.clone().map(|fields| JsonB(Value::Object(fields))));
        hashes.push(entry.payload_hash.to_vec());
    }
    let args: [DatumWithOid; 10] = [
        tenant.into(),
        seqs.into(),
        op_ids.into(),
        models.into(),
        pks.into(),
        ops.into(),
        actors.into(),
        hlcs.into(),
        payloads.into(),
        hashes.into(),
    ];
    client.update(
        "INSERT INTO sync_ext.op_log (tenant_id, seq, op_id, model, pk, op, actor, hlc, updated_at, payload, payload_hash)
         SELECT $1, seq, op_id, model, pk, op, actor, hlc, left(hlc, 23)::timestamp AT TIME ZONE 'UTC', payload, payload_hash
           FROM unnest($2::bigint[], $3::uuid[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::jsonb[], $10::bytea[])
                AS c(seq, op_id, model, pk, op, actor, hlc, payload, payload_hash)",
        None,
        &args,
    )?;
    Ok(())
}

/// Writes the new states of the changed rows in one statement.
pub fn save_rows(client: &mut SpiClient<'_>, tenant: &str, rows: &HashMap<RowKey, TouchedRow>) -> SyncResult<()> {
    let mut models = Vec::with_capacity(rows.len());
    let mut ids = Vec::with_capacity(rows.len());
    let mut values = Vec::with_capacity(rows.len());
    let mut hlcs = Vec::with_capacity(rows.len());
    let mut actors = Vec::with_capacity(rows.len());
    let mut op_ids = Vec::with_capacity(rows.len());
    let mut deleted = Vec::with_capacity(rows.len());
    let mut deleted_hlcs = Vec::with_capacity(rows.len());
    let mut field_stamps = Vec::with_capacity(rows.len());
    let mut seqs = Vec::with_capacity(rows.len());
    for ((model, id), touched) in rows {
        let Some(stored) = StoredRow::from_state(&touched.state) else { continue };
        models.push(model.as_str());
        ids.push(id.as_str());
        values.push(JsonB(Value::Object(stored.value)));
        hlcs.push(stored.stamp.hlc.to_string());
        actors.push(stored.stamp.actor);
        op_ids.push(pg_uuid(&stored.stamp.op_id));
        deleted.push(stored.deleted);
        deleted_hlcs.push(stored.deleted_hlc.map(|hlc| hlc.to_string()));
        field_stamps.push(JsonB(Value::Object(stored.field_stamps)));
        seqs.push(touched.seq);
    }
    let args: [DatumWithOid; 11] = [
        tenant.into(),
        models.into(),
        ids.into(),
        values.into(),
        hlcs.into(),
        actors.into(),
        op_ids.into(),
        deleted.into(),
        deleted_hlcs.into(),
        field_stamps.into(),
        seqs.into(),
    ];
    client.update(
        "INSERT INTO sync_ext.snapshots AS s (tenant_id, model, id, value, hlc, actor, op_id, deleted, deleted_hlc, field_stamps, seq)
         SELECT $1, * FROM unnest($2::text[], $3::text[], $4::jsonb[], $5::text[], $6::text[], $7::uuid[], $8::bool[],
                                  $9::text[], $10::jsonb[], $11::bigint[])
         ON CONFLICT (tenant_id, model, id) DO UPDATE SET
             value = excluded.value, hlc = excluded.hlc, actor = excluded.actor, op_id = excluded.op_id,
             deleted = excluded.deleted, deleted_hlc = excluded.deleted_hlc, field_stamps = excluded.field_stamps,
             seq = excluded.seq",
        None,
        &args,
    )?;
    Ok(())
}
