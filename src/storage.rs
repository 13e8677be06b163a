//! Reads and writes of the sync tables, one statement per batch.

use std::borrow::Cow;
use std::collections::HashMap;

use pgrx::datum::DatumWithOid;
use pgrx::spi::SpiClient;
use serde_json::{Map, Value};
use sync_ext_protocol::batch::{Appended, BatchOutcome, TouchedRow};
use sync_ext_protocol::scope::Instances;
use sync_ext_protocol::{Change, Hlc, LoggedOp, RowKey, RowState, Stamp, StoredRow};

use crate::errors::{SyncError, SyncResult};
use crate::jsonb::{JsonbDatum, JsonbObject};
use crate::notifier::Route;
use crate::plans;

fn pg_uuid(id: &uuid::Uuid) -> pgrx::Uuid {
    pgrx::Uuid::from_bytes(*id.as_bytes())
}

fn rust_uuid(id: &pgrx::Uuid) -> uuid::Uuid {
    uuid::Uuid::from_bytes(*id.as_bytes())
}

/// The tenant's last seq, without locking (0 for a tenant that never pushed).
pub fn last_seq(client: &SpiClient<'_>, tenant: &str) -> SyncResult<i64> {
    let table = plans::select(client, "SELECT last_seq FROM sync_ext.tenants WHERE tenant_id = $1", Some(1), &[tenant.into()])?;
    Ok(if table.is_empty() { 0 } else { table.first().get_one::<i64>()?.unwrap_or(0) })
}

/// Fails with 25006 on a hot standby, before `function` tries to write (Postgres itself would fail later,
/// with an internal error about transaction ids).
pub fn require_primary(function: &'static str) -> SyncResult<()> {
    // SAFETY: reads the backend's recovery state.
    if unsafe { pgrx::pg_sys::RecoveryInProgress() } {
        return Err(SyncError::ReadOnlyStandby { function });
    }
    Ok(())
}

/// A tenant's counters, read under its lock.
#[derive(Clone, Copy, Debug)]
pub struct TenantState {
    pub last_seq: i64,
    /// The greatest hlc applied so far.
    pub last_hlc: Option<Hlc>,
    /// The greatest hlc compaction removed from the log: changes at or before it are `stale`.
    pub horizon_hlc: Option<Hlc>,
    /// The digest of the tenant's visible rows (see `sync_ext_protocol::digest`).
    pub digest: u64,
    /// Whether a push of this transaction is writing the tenant's bound tables (see [`Lock::WritingTables`]).
    pub applying_push: bool,
}

/// What a push or a capture that locks a tenant is about to do.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Lock {
    /// Read and write the sync tables.
    Counters,
    /// Write the tenant's bound tables too: the tenant's row says so (`applying_push`) until the batch is
    /// stored, so that capture triggers leave the engine's own writes alone wherever they fire (on a
    /// distributed install, in the backend of another node that writes the table's shard).
    WritingTables,
}

/// Locks the tenant's counter row until the transaction ends (creating it on first use) and returns
/// its counters. Pushes to one tenant run one after another from here on; other tenants never wait.
pub fn lock_tenant(client: &mut SpiClient<'_>, tenant: &str, lock: Lock) -> SyncResult<TenantState> {
    let mut locked = lock_row(client, tenant, lock)?;
    if locked.is_empty() {
        locked = plans::update(
            client,
            "INSERT INTO sync_ext.tenants AS t (tenant_id, applying_push) VALUES ($1, $2)
             ON CONFLICT (tenant_id) DO UPDATE SET applying_push = t.applying_push OR excluded.applying_push
             RETURNING last_seq, last_hlc, horizon_hlc, digest, applying_push",
            Some(1),
            &[tenant.into(), (lock == Lock::WritingTables).into()],
        )?;
    }
    let row = locked.first();
    let hlc = |ordinal: usize| -> SyncResult<Option<Hlc>> {
        row.get::<String>(ordinal)?.map(|text| text.parse().map_err(|_| SyncError::CorruptTenant { tenant: tenant.to_owned() })).transpose()
    };
    Ok(TenantState {
        last_seq: row.get::<i64>(1)?.unwrap_or(0),
        last_hlc: hlc(2)?,
        horizon_hlc: hlc(3)?,
        // The digest travels as the bits of a u64 in a bigint.
        digest: row.get::<i64>(4)?.unwrap_or(0) as u64,
        applying_push: row.get::<bool>(5)?.unwrap_or(false),
    })
}

/// The statement of [`lock_tenant`] for an existing row: its counters, the row locked.
fn lock_row<'conn>(client: &mut SpiClient<'conn>, tenant: &str, lock: Lock) -> pgrx::spi::SpiResult<pgrx::spi::SpiTupleTable<'conn>> {
    match lock {
        Lock::Counters => plans::update(
            client,
            "SELECT last_seq, last_hlc, horizon_hlc, digest, applying_push FROM sync_ext.tenants WHERE tenant_id = $1 FOR NO KEY UPDATE",
            Some(1),
            &[tenant.into()],
        ),
        Lock::WritingTables => plans::update(
            client,
            "UPDATE sync_ext.tenants SET applying_push = true WHERE tenant_id = $1
             RETURNING last_seq, last_hlc, horizon_hlc, digest, applying_push",
            None,
            &[tenant.into()],
        ),
    }
}

/// Ends [`Lock::WritingTables`] for a push that stored nothing (one that stored a batch ends it there).
pub fn end_writing_tables(client: &mut SpiClient<'_>, tenant: &str) -> SyncResult<()> {
    plans::update(client, "UPDATE sync_ext.tenants SET applying_push = false WHERE tenant_id = $1", None, &[tenant.into()])?;
    Ok(())
}

/// The batch's op_ids that are already in the log.
///
/// Both lookups of a batch go key by key (`LATERAL ... LIMIT 1` keeps the planner from turning them into
/// a join against the tenant's whole range): their kept generic plans cannot know how big the tenant is.
pub fn logged_ops(client: &SpiClient<'_>, tenant: &str, changes: &[Change]) -> SyncResult<HashMap<uuid::Uuid, LoggedOp>> {
    let op_ids: Vec<pgrx::Uuid> = changes.iter().map(|change| pg_uuid(&change.op_id)).collect();
    let table = plans::select(client, 
        "SELECT o.op_id, o.seq, o.payload_hash
           FROM unnest($2::uuid[]) AS k(op_id)
           CROSS JOIN LATERAL (SELECT op_id, seq, payload_hash FROM sync_ext.op_log
                                WHERE tenant_id = $1 AND op_id = k.op_id LIMIT 1) AS o",
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

/// The rows a batch touches, read in one statement: their merge states, and the scope instances of
/// those of scoped models.
pub struct LoadedRows {
    pub states: HashMap<RowKey, RowState>,
    pub instances: HashMap<RowKey, Instances>,
}

/// The merge states (and scope instances) of the rows the batch touches, read in one statement.
pub fn load_rows(client: &SpiClient<'_>, tenant: &str, changes: &[Change]) -> SyncResult<LoadedRows> {
    let models: Vec<&str> = changes.iter().map(|change| change.model.as_str()).collect();
    let pks: Vec<&str> = changes.iter().map(|change| change.pk.as_str()).collect();
    let table = plans::select(client, 
        "SELECT s.model, s.id, s.value, s.hlc, s.actor, s.op_id, s.deleted, s.deleted_hlc, s.field_stamps, s.instances
           FROM (SELECT DISTINCT model, id FROM unnest($2::text[], $3::text[]) AS k(model, id)) AS k
           CROSS JOIN LATERAL (SELECT * FROM sync_ext.snapshots
                                WHERE tenant_id = $1 AND model = k.model AND id = k.id LIMIT 1) AS s",
        None,
        &[tenant.into(), models.into(), pks.into()],
    )?;
    let mut rows = LoadedRows { states: HashMap::new(), instances: HashMap::new() };
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
            value: object_column(row.get::<JsonbDatum>(3)?).map_err(|problem| corrupt(format!("value: {problem}")))?,
            stamp: Stamp {
                hlc: hlc_column(4)?.ok_or_else(|| corrupt("hlc is null".into()))?,
                actor: row.get(5)?.unwrap_or_default(),
                op_id: row.get::<pgrx::Uuid>(6)?.as_ref().map(rust_uuid).unwrap_or_default(),
            },
            deleted: row.get(7)?.unwrap_or(false),
            deleted_hlc: hlc_column(8)?,
            field_stamps: object_column(row.get::<JsonbDatum>(9)?).map_err(|problem| corrupt(format!("field_stamps: {problem}")))?,
        };
        let state = stored.into_state().map_err(corrupt)?;
        if let Some(instances) = row.get::<Vec<String>>(10)? {
            rows.instances.insert((model.clone(), id.clone()), instances.into_iter().collect());
        }
        rows.states.insert((model, id), state);
    }
    Ok(rows)
}

/// A jsonb column that must hold an object, read without JSON text.
fn object_column(datum: Option<JsonbDatum>) -> Result<Map<String, Value>, String> {
    match datum.map(|datum| datum.value()).transpose()? {
        Some(Value::Object(map)) => Ok(map),
        _ => Err("is not an object".to_owned()),
    }
}

/// Writes a batch's outcome in one statement (one per table where Citus routes them, see [`WriteBatch`]):
/// appends the applied changes to the log, saves the new states of the rows they changed, advances the
/// tenant's counters and notifies listeners (itself or through the notifier, as `route` says).
///
/// Every changed row's new state belongs to the last change that altered it, so both travel in one
/// array row; a state whose value is exactly what that change logged is sent once.
pub fn write_batch(client: &mut SpiClient<'_>, tenant: &str, changes: &[Change], outcome: &BatchOutcome, digests: &Digests, route: Route) -> SyncResult<()> {
    let final_states: HashMap<i64, &TouchedRow> = outcome.rows.values().map(|touched| (touched.seq, touched)).collect();
    let count = outcome.appended.len();
    let mut log = LogColumns::with_capacity(count);
    let mut rows = RowColumns::with_capacity(count);
    for entry in &outcome.appended {
        log.push(&changes[entry.index], entry);
        rows.push(final_states.get(&entry.seq).and_then(|touched| StoredRow::from_state(&touched.state)), entry.payload.as_ref());
    }
    let LogColumns { seqs, op_ids, models, pks, ops, actors, hlcs, payloads, hashes } = log;
    let RowColumns { saved, values, hlcs: row_hlcs, actors: row_actors, op_ids: row_op_ids, deleted, deleted_hlcs, field_stamps } = rows;
    let index = IndexColumns::of(outcome);
    let (digest_instances, digest_deltas): (Vec<&str>, Vec<i64>) = digests.instances.iter().map(|(instance, delta)| (instance.as_str(), *delta as i64)).unzip();
    let args: [DatumWithOid; 28] = [
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
        saved.into(),
        values.into(),
        row_hlcs.into(),
        row_actors.into(),
        row_op_ids.into(),
        deleted.into(),
        deleted_hlcs.into(),
        field_stamps.into(),
        outcome.last_seq.into(),
        digests.last_hlc.map(|hlc| hlc.to_string()).into(),
        // The digest travels as the bits of a u64 in a bigint.
        (digests.tenant as i64).into(),
        route.notifies_itself().into(),
        index.seqs.into(),
        index.instances.into(),
        index.before.into(),
        index.after.into(),
        digest_instances.into(),
        digest_deltas.into(),
    ];
    if crate::citus::routed() {
        for statement in &WRITE_BATCH.each {
            plans::update(client, statement, None, &args)?;
        }
    } else {
        plans::update(client, &WRITE_BATCH.combined, None, &args)?;
    }
    Ok(())
}

/// The statements that write a batch: one per table, each reading the batch's arrays, run either as one
/// statement (its parts as CTEs) or, on a distributed install, one by one (Citus routes each to the
/// tenant's node, where the combined statement would be sent to every node).
struct WriteBatch {
    combined: String,
    each: Vec<String>,
}

static WRITE_BATCH: std::sync::LazyLock<WriteBatch> = std::sync::LazyLock::new(|| {
    let batch = "batch AS (
    SELECT * FROM unnest($2::bigint[], $3::uuid[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::jsonb[],
                         $10::bytea[], $11::bool[], $12::jsonb[], $13::text[], $14::text[], $15::uuid[], $16::bool[],
                         $17::text[], $18::jsonb[])
        AS b(seq, op_id, model, pk, op, actor, hlc, payload, payload_hash,
             saved, row_value, row_hlc, row_actor, row_op_id, row_deleted, row_deleted_hlc, row_field_stamps))";
    let scoped = "scoped AS (SELECT * FROM unnest($23::bigint[], $24::text[], $25::bool[], $26::bool[]) AS e(seq, instance, before, after))";
    // A saved row's instances are those its last change left it in (the seq is that change's).
    let row_instances = "row_instances AS (
    SELECT seq, array_agg(instance ORDER BY instance COLLATE \"C\") AS instances FROM scoped
     WHERE after AND instance <> '' GROUP BY seq)";
    let logged = "INSERT INTO sync_ext.op_log (tenant_id, seq, op_id, model, pk, op, actor, hlc, updated_at, payload, payload_hash)
    SELECT $1, seq, op_id, model, pk, op, actor, hlc, left(hlc, 23)::timestamp AT TIME ZONE 'UTC', payload, payload_hash
      FROM batch";
    // Index entries note where their log rows were written (see `sync_ext.scope_log`), which only the
    // combined statement knows.
    let indexed = |log_tid: &str, entries: &str| {
        format!(
            "INSERT INTO sync_ext.scope_log (tenant_id, instance, seq, before, after, log_tid)
    SELECT $1, e.instance, e.seq, e.before, e.after, {log_tid} FROM {entries}"
        )
    };
    let saved = "INSERT INTO sync_ext.snapshots AS s (tenant_id, model, id, value, hlc, actor, op_id, deleted, deleted_hlc, field_stamps, seq, instances)
    SELECT $1, model, pk, coalesce(row_value, payload), row_hlc, row_actor, row_op_id, row_deleted, row_deleted_hlc,
           coalesce(row_field_stamps, '{}'), b.seq, r.instances
      FROM batch AS b LEFT JOIN row_instances AS r ON r.seq = b.seq WHERE saved
        ON CONFLICT (tenant_id, model, id) DO UPDATE SET
           value = excluded.value, hlc = excluded.hlc, actor = excluded.actor, op_id = excluded.op_id,
           deleted = excluded.deleted, deleted_hlc = excluded.deleted_hlc, field_stamps = excluded.field_stamps,
           seq = excluded.seq, instances = excluded.instances";
    // Digests are sums modulo 2^64 held as the bits of a bigint: the deltas are added the same way.
    let digested = "INSERT INTO sync_ext.scope_digests AS d (tenant_id, instance, digest)
    SELECT $1, instance, delta FROM unnest($27::text[], $28::bigint[]) AS x(instance, delta)
        ON CONFLICT (tenant_id, instance) DO UPDATE SET
           digest = ((d.digest::numeric + excluded.digest::numeric + 27670116110564327424) % 18446744073709551616
                     - 9223372036854775808)::bigint";
    let advanced = "UPDATE sync_ext.tenants SET last_seq = $19, last_hlc = $20, last_push_at = now(), digest = $21, applying_push = false
     WHERE tenant_id = $1";
    let woken = "INSERT INTO sync_ext.wakeups (tenant_id) SELECT $1 WHERE NOT $22";
    let notified = "SELECT pg_notify('sync_ext', $1) WHERE $22";
    WriteBatch {
        combined: format!(
            "WITH {batch},\n{scoped},\n{row_instances},\nlogged AS ({logged} RETURNING seq, ctid),\nsaved AS ({saved}),\nindexed AS ({}),\n\
             digested AS ({digested}),\nadvanced AS ({advanced}),\nwoken AS ({woken})\n{notified}",
            indexed("l.ctid", "scoped AS e LEFT JOIN logged AS l ON l.seq = e.seq")
        ),
        // A push on a distributed install never notifies itself (see `crate::citus`).
        each: vec![
            format!("WITH {batch} {logged}"),
            format!("WITH {batch}, {scoped}, {row_instances} {saved}"),
            format!("WITH {scoped} {}", indexed("NULL::tid", "scoped AS e")),
            digested.to_owned(),
            advanced.to_owned(),
            woken.to_owned(),
        ],
    }
});

/// What a batch moves besides the log and the rows: the tenant's greatest hlc and digest, and the
/// digest of each scope instance it touched (by how much each moved).
pub struct Digests {
    pub last_hlc: Option<Hlc>,
    pub tenant: u64,
    pub instances: std::collections::BTreeMap<String, u64>,
}

/// The scope index entries of a batch, as arrays: one per appended change and instance its row was in
/// before or after it.
#[derive(Default)]
struct IndexColumns<'a> {
    seqs: Vec<i64>,
    instances: Vec<&'a str>,
    before: Vec<bool>,
    after: Vec<bool>,
}

impl<'a> IndexColumns<'a> {
    fn of(outcome: &'a BatchOutcome) -> Self {
        let mut columns = IndexColumns::default();
        for entry in &outcome.appended {
            for instance in entry.before.union(&entry.after) {
                columns.seqs.push(entry.seq);
                columns.instances.push(instance);
                columns.before.push(entry.before.contains(instance));
                columns.after.push(entry.after.contains(instance));
            }
        }
        columns
    }
}

/// The op log columns of a batch, as arrays.
struct LogColumns<'a> {
    seqs: Vec<i64>,
    op_ids: Vec<pgrx::Uuid>,
    models: Vec<&'a str>,
    pks: Vec<&'a str>,
    ops: Vec<&'a str>,
    actors: Vec<&'a str>,
    hlcs: Vec<String>,
    payloads: Vec<Option<JsonbObject<'a>>>,
    hashes: Vec<Vec<u8>>,
}

impl<'a> LogColumns<'a> {
    fn with_capacity(count: usize) -> Self {
        LogColumns {
            seqs: Vec::with_capacity(count),
            op_ids: Vec::with_capacity(count),
            models: Vec::with_capacity(count),
            pks: Vec::with_capacity(count),
            ops: Vec::with_capacity(count),
            actors: Vec::with_capacity(count),
            hlcs: Vec::with_capacity(count),
            payloads: Vec::with_capacity(count),
            hashes: Vec::with_capacity(count),
        }
    }

    fn push(&mut self, change: &'a Change, entry: &'a Appended) {
        self.seqs.push(entry.seq);
        self.op_ids.push(pg_uuid(&change.op_id));
        self.models.push(&change.model);
        self.pks.push(&change.pk);
        self.ops.push(change.op.as_str());
        self.actors.push(&change.actor);
        self.hlcs.push(change.hlc.to_string());
        self.payloads.push(entry.payload.as_ref().map(|payload| JsonbObject(Cow::Borrowed(payload))));
        self.hashes.push(entry.payload_hash.to_vec());
    }
}

/// The snapshot columns of a batch, aligned with its log entries: `saved` marks the entry whose change
/// left a row in its final state; a NULL value means the change's payload, a NULL field_stamps `{}`.
struct RowColumns {
    saved: Vec<bool>,
    values: Vec<Option<JsonbObject<'static>>>,
    hlcs: Vec<Option<String>>,
    actors: Vec<Option<String>>,
    op_ids: Vec<Option<pgrx::Uuid>>,
    deleted: Vec<Option<bool>>,
    deleted_hlcs: Vec<Option<String>>,
    field_stamps: Vec<Option<JsonbObject<'static>>>,
}

impl RowColumns {
    fn with_capacity(count: usize) -> Self {
        RowColumns {
            saved: Vec::with_capacity(count),
            values: Vec::with_capacity(count),
            hlcs: Vec::with_capacity(count),
            actors: Vec::with_capacity(count),
            op_ids: Vec::with_capacity(count),
            deleted: Vec::with_capacity(count),
            deleted_hlcs: Vec::with_capacity(count),
            field_stamps: Vec::with_capacity(count),
        }
    }

    fn push(&mut self, stored: Option<StoredRow>, payload: Option<&Map<String, Value>>) {
        self.saved.push(stored.is_some());
        let Some(stored) = stored else {
            self.values.push(None);
            self.hlcs.push(None);
            self.actors.push(None);
            self.op_ids.push(None);
            self.deleted.push(None);
            self.deleted_hlcs.push(None);
            self.field_stamps.push(None);
            return;
        };
        self.values.push((payload != Some(&stored.value)).then_some(JsonbObject(Cow::Owned(stored.value))));
        self.hlcs.push(Some(stored.stamp.hlc.to_string()));
        self.actors.push(Some(stored.stamp.actor));
        self.op_ids.push(Some(pg_uuid(&stored.stamp.op_id)));
        self.deleted.push(Some(stored.deleted));
        self.deleted_hlcs.push(stored.deleted_hlc.map(|hlc| hlc.to_string()));
        self.field_stamps.push((!stored.field_stamps.is_empty()).then_some(JsonbObject(Cow::Owned(stored.field_stamps))));
    }
}
