//! Sync models bound to application tables.
//!
//! A registered model's pushed changes are decoded per column type and written into its table, in
//! the push's transaction; plain SQL writes to the table are captured into the op log (see
//! [`crate::capture`]). The table's primary key is the row's pk on the wire: a single column's
//! portable value as text (a string as itself, anything else as its JSON), or for a composite key
//! the JSON array of the columns' portable values.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use serde_json::{Map, Value};
use sync_ext_protocol::{validate_tenant, Change, Op, RowKey};

use crate::errors::{SyncError, SyncResult};
use crate::identity::as_engine;
use crate::subtransaction::{in_subtransaction, StepError};
use crate::types::{composite_fields, form_record, number_mode, Codec, Field};

/// A row as portable JSON, keyed by column name.
type Row = Map<String, Value>;

/// The outcome of checking one change: its value as the table will hold it, or why it is refused.
type Normalized = Result<Option<Row>, String>;

/// Which tenant a model's rows belong to.
#[derive(Clone, Debug)]
enum TenantBinding {
    /// Each row names its tenant in this column (an index into `Model::fields`).
    Column(usize),
    /// The whole table belongs to one tenant.
    Fixed(String),
}

/// A registered model and the shape of its table.
#[derive(Clone, Debug)]
pub struct Model {
    pub name: String,
    /// The table's name as SQL, schema-qualified and quoted.
    table: String,
    /// The table's own name, for messages.
    table_name: String,
    row_type: pg_sys::Oid,
    /// Live columns in attribute order.
    fields: Vec<Field>,
    /// Primary key columns but the tenant column, as indexes into `fields`, in key order: the wire pk.
    primary_key: Vec<usize>,
    /// Whether the table's primary key also holds the tenant column (as a table distributed by tenant needs).
    key_holds_tenant: bool,
    tenant: TenantBinding,
    /// Devices may not push to the model (see `sync_set_read_only`).
    read_only: bool,
    /// Whether the model syncs only some of the table's columns (`columns` at registration): `fields`
    /// then holds those, the key columns and the tenant column, and the others are left alone.
    narrowed: bool,
}

thread_local! {
    static APPLYING_PUSH: Cell<bool> = const { Cell::new(false) };
    static KEPT_MODELS: RefCell<KeptModels> = RefCell::new(KeptModels::default());
}

/// Model descriptions kept between calls, by model name and by bound table (`None`: no model is
/// registered under that name or for that table). Stale once `sync_ext.models` or a bound table changes
/// (see [`crate::kept`]).
#[derive(Default)]
struct KeptModels {
    generation: u64,
    by_name: HashMap<String, Option<Model>>,
    by_table: HashMap<pg_sys::Oid, Option<Model>>,
}

/// The most names and tables kept; past it the cache starts again.
const KEPT_MODEL_ENTRIES: usize = 1_000;

impl KeptModels {
    /// The kept descriptions, if still current.
    fn current(&self) -> Option<&Self> {
        (self.generation == crate::kept::generation()).then_some(self)
    }

    /// Watches `sync_ext.models` before it is read; returns the generation to keep what is read under.
    fn watch() -> u64 {
        crate::kept::watch_sync_table(c"models");
        crate::kept::generation()
    }

    /// Keeps what `fill` adds, unless an invalidation arrived since `generation` was taken.
    fn keep(generation: u64, fill: impl FnOnce(&mut KeptModels)) {
        if crate::kept::generation() != generation {
            return;
        }
        KEPT_MODELS.with_borrow_mut(|kept| {
            if kept.generation != generation || kept.by_name.len() + kept.by_table.len() >= KEPT_MODEL_ENTRIES {
                *kept = KeptModels { generation, ..KeptModels::default() };
            }
            fill(kept);
        });
    }
}

/// Whether the engine itself is writing a registered table (its writes are not captured again).
pub fn applying_push() -> bool {
    APPLYING_PUSH.with(Cell::get)
}

/// Marks the engine's own table writes for as long as it lives.
struct ApplyingPush;

impl ApplyingPush {
    fn start() -> Self {
        APPLYING_PUSH.with(|flag| flag.set(true));
        ApplyingPush
    }
}

impl Drop for ApplyingPush {
    fn drop(&mut self) {
        APPLYING_PUSH.with(|flag| flag.set(false));
    }
}

/// A name quoted as an SQL identifier.
pub fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The reason of a change refused while applying it to its table.
fn refusal(code: &str, detail: impl std::fmt::Display) -> String {
    format!("{code}: {detail}")
}

/// The five-character SQLSTATE of an error code.
pub fn sqlstate_text(code: i32) -> String {
    (0..5).map(|i| char::from(((code >> (6 * i)) & 0x3F) as u8 + b'0')).collect()
}

fn step_refusal(error: &StepError) -> String {
    let code = match error.sqlstate.as_str() {
        "42501" | "44000" => "permission_denied",
        "P0001" => "constraint_violation",
        sqlstate if sqlstate.starts_with("23") => "constraint_violation",
        _ => "invalid_value",
    };
    refusal(code, &error.message)
}

impl Model {
    /// Reads a table's shape and checks it can be synced: it has a primary key, every column maps
    /// to portable JSON, and the tenant column (if any) holds text.
    /// With `columns`, the model syncs only those columns of the table (and its key); names the table
    /// lacks (a column dropped since) are left out.
    fn describe(
        client: &SpiClient<'_>,
        name: &str,
        table: pg_sys::Oid,
        tenant_column: Option<&str>,
        tenant: Option<&str>,
        columns: Option<&[String]>,
    ) -> SyncResult<Model> {
        let shape = crate::plans::select(
            client,
            "SELECT c.relname::text, c.reltype, c.relkind::text,
                    (SELECT array_agg(a.attname::text ORDER BY k.ord)
                       FROM pg_index AS i, unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord), pg_attribute AS a
                      WHERE i.indrelid = c.oid AND i.indisprimary AND a.attrelid = c.oid AND a.attnum = k.attnum),
                    format('%I.%I', n.nspname, c.relname)
               FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace WHERE c.oid = $1",
            Some(1),
            &[table.into()],
        )?;
        if shape.is_empty() {
            return Err(SyncError::InvalidArgument { argument: "tbl", problem: format!("no table has oid {}", table.to_u32()) });
        }
        let shape = shape.first();
        let table_name: String = shape.get(1)?.unwrap_or_default();
        let row_type: pg_sys::Oid = shape.get(2)?.unwrap_or(pg_sys::InvalidOid);
        let kind: String = shape.get(3)?.unwrap_or_default();
        if !matches!(kind.as_str(), "r" | "p") {
            return Err(SyncError::InvalidArgument { argument: "tbl", problem: format!("{table_name} is not a table") });
        }
        let key_columns: Vec<String> = shape.get(4)?.unwrap_or_default();
        let table: String = shape.get(5)?.unwrap_or_default();
        if key_columns.is_empty() {
            return Err(SyncError::InvalidArgument {
                argument: "tbl",
                problem: format!("{table_name} has no primary key; a synced table needs one (it is the row's pk on the wire)"),
            });
        }
        let mut fields = composite_fields(row_type, -1)?;
        if let Some(columns) = columns {
            fields.retain(|field| columns.contains(&field.name) || key_columns.contains(&field.name) || tenant_column == Some(field.name.as_str()));
        }
        let position = |column: &str| fields.iter().position(|field| field.name == column);
        let mut primary_key: Vec<usize> = key_columns.iter().map(|column| position(column).expect("key columns are live")).collect();
        let tenant = match (tenant_column, tenant) {
            (Some(column), None) => {
                let index = position(column).ok_or_else(|| SyncError::InvalidArgument {
                    argument: "tenant_column",
                    problem: format!("{table_name} has no column {}", quote_identifier(column)),
                })?;
                if !matches!(fields[index].codec, Codec::Text(_)) {
                    return Err(SyncError::InvalidArgument {
                        argument: "tenant_column",
                        problem: format!("column {} must hold text (text or varchar)", quote_identifier(column)),
                    });
                }
                TenantBinding::Column(index)
            }
            (None, Some(tenant)) => {
                validate_tenant(tenant)?;
                TenantBinding::Fixed(tenant.to_owned())
            }
            _ => {
                return Err(SyncError::InvalidArgument {
                    argument: "tenant_column",
                    problem: "give exactly one of tenant_column (the column naming each row's tenant) and tenant (the one tenant owning the table)".into(),
                })
            }
        };
        let key_holds_tenant = match tenant {
            TenantBinding::Column(index) => primary_key.contains(&index),
            TenantBinding::Fixed(_) => false,
        };
        primary_key.retain(|&index| !matches!(tenant, TenantBinding::Column(column) if column == index));
        if primary_key.is_empty() {
            return Err(SyncError::InvalidArgument {
                argument: "tbl",
                problem: format!("the primary key of {table_name} is its tenant column alone; it needs a column that names the row within its tenant"),
            });
        }
        Ok(Model {
            name: name.to_owned(),
            table,
            table_name,
            row_type,
            fields,
            primary_key,
            key_holds_tenant,
            tenant,
            read_only: false,
            narrowed: columns.is_some(),
        })
    }

    /// On a distributed install: fails unless the table is distributed by its tenant column, co-located
    /// with the sync tables (pushes run on the tenant's node and write the table's shard there; capture
    /// triggers fire there and log to the tenant's shards of the sync tables).
    fn require_colocated(&self, client: &SpiClient<'_>) -> SyncResult<()> {
        let not_distributable = |problem: String| SyncError::NotDistributable { table: self.table_name.clone(), problem };
        let Some(column) = self.tenant_column() else {
            return Err(not_distributable(
                "a table bound to one tenant cannot be distributed by tenant; give it a tenant column that always holds that tenant \
                 (tenant_id text NOT NULL DEFAULT '<tenant>' CHECK (tenant_id = '<tenant>')), distribute it by that column \
                 and register it with tenant_column"
                    .to_owned(),
            ));
        };
        let colocated = client.select(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_dist_partition AS p, pg_catalog.pg_dist_partition AS t
                             WHERE p.logicalrelid OPERATOR(pg_catalog.=) $1::pg_catalog.regclass AND t.logicalrelid OPERATOR(pg_catalog.=) 'sync_ext.tenants'::pg_catalog.regclass
                               AND p.colocationid OPERATOR(pg_catalog.=) t.colocationid
                               AND pg_catalog.column_to_column_name(p.logicalrelid, p.partkey) OPERATOR(pg_catalog.=) $2)",
            Some(1),
            &[self.table.as_str().into(), column.name.as_str().into()],
        )?;
        if colocated.first().get_one::<bool>()? == Some(true) {
            return Ok(());
        }
        Err(not_distributable(format!(
            "distribute it by its tenant column, co-located with the sync tables, before registering it: \
             SELECT create_distributed_table('{}', '{}', colocate_with => 'sync_ext.tenants')",
            self.table.replace('\'', "''"),
            column.name.replace('\'', "''")
        )))
    }

    /// The registered models among `names`, by name (kept per backend, see [`KeptModels`]).
    pub fn load_named(client: &SpiClient<'_>, names: &[&str]) -> SyncResult<HashMap<String, Model>> {
        let kept = KEPT_MODELS.with_borrow(|kept| {
            let found: Option<Vec<Option<Model>>> = names.iter().map(|name| kept.current()?.by_name.get(*name).cloned()).collect();
            found.map(|models| models.into_iter().flatten().map(|model| (model.name.clone(), model)).collect())
        });
        if let Some(kept) = kept {
            return Ok(kept);
        }
        let generation = KeptModels::watch();
        let loaded = Self::load(client, "model = ANY($1)", names.to_vec().into())?;
        KeptModels::keep(generation, |kept| {
            for name in names {
                kept.by_name.insert((*name).to_owned(), loaded.get(*name).cloned());
            }
        });
        Ok(loaded)
    }

    /// The model registered for a table, if any (kept per backend, see [`KeptModels`]). On a distributed
    /// install `table` may be a shard of the registered table (capture triggers fire on shards).
    pub fn load_for_table(client: &SpiClient<'_>, table: pg_sys::Oid) -> SyncResult<Option<Model>> {
        let kept = KEPT_MODELS.with_borrow(|kept| kept.current()?.by_table.get(&table).cloned());
        if let Some(kept) = kept {
            return Ok(kept);
        }
        let generation = KeptModels::watch();
        let mut loaded = Self::load(client, "table_name = $1", table.into())?.into_values().next();
        if loaded.is_none() {
            if let Some(distributed) = crate::citus::table_of_shard(table)? {
                loaded = Self::load(client, "table_name = $1", distributed.into())?.into_values().next();
            }
        }
        KeptModels::keep(generation, |kept| {
            kept.by_table.insert(table, loaded.clone());
        });
        Ok(loaded)
    }

    fn load(client: &SpiClient<'_>, condition: &str, argument: DatumWithOid<'_>) -> SyncResult<HashMap<String, Model>> {
        let rows = crate::plans::select(
            client,
            &format!("SELECT model, table_name::oid, tenant_column::text, tenant, read_only, columns FROM sync_ext.models WHERE {condition}"),
            None,
            &[argument],
        )?;
        let mut registered = Vec::new();
        for row in rows {
            let table: pg_sys::Oid = row.get(2)?.unwrap_or(pg_sys::InvalidOid);
            let read_only = row.get::<bool>(5)?.unwrap_or(false);
            let columns = row.get::<Vec<String>>(6)?;
            registered.push((row.get::<String>(1)?.unwrap_or_default(), table, row.get::<String>(3)?, row.get::<String>(4)?, read_only, columns));
        }
        registered
            .into_iter()
            .map(|(name, table, column, tenant, read_only, columns)| {
                crate::kept::watch(table); // an ALTER TABLE makes the description stale
                let model = Model { read_only, ..Self::describe(client, &name, table, column.as_deref(), tenant.as_deref(), columns.as_deref())? };
                Ok((name, model))
            })
            .collect()
    }

    /// Whether devices may not push to the model.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn field(&self, name: &str) -> Option<(usize, &Field)> {
        self.fields.iter().enumerate().find(|(_, field)| field.name == name)
    }

    /// Whether the model's values carry the column `name` (the tenant column is implied, not carried).
    pub fn syncs(&self, name: &str) -> bool {
        self.field(name).is_some() && self.tenant_column().is_none_or(|column| column.name != name)
    }

    /// Why a change naming the column `name` is refused when the model does not sync it.
    fn unsynced(&self, name: &str) -> String {
        if self.narrowed {
            refusal("invalid_value", format!("column \"{name}\" is not one of the columns model {} syncs", self.name))
        } else {
            refusal("invalid_value", format!("column \"{name}\" does not exist in {}", self.table_name))
        }
    }

    fn tenant_column(&self) -> Option<&Field> {
        match self.tenant {
            TenantBinding::Column(index) => Some(&self.fields[index]),
            TenantBinding::Fixed(_) => None,
        }
    }

    /// The tenant of a row given as portable JSON (for a table with a tenant column, the column's value).
    pub fn tenant_of(&self, row: &Map<String, Value>) -> SyncResult<String> {
        match &self.tenant {
            TenantBinding::Fixed(tenant) => Ok(tenant.clone()),
            TenantBinding::Column(index) => match row.get(&self.fields[*index].name) {
                Some(Value::String(tenant)) if !tenant.is_empty() => Ok(tenant.clone()),
                _ => Err(SyncError::MissingTenant { table: self.table_name.clone(), column: self.fields[*index].name.clone() }),
            },
        }
    }

    /// Takes the tenant column out of a row given as portable JSON (the tenant is implied).
    pub fn remove_tenant_column(&self, row: &mut Map<String, Value>) {
        if let Some(column) = self.tenant_column() {
            row.remove(&column.name);
        }
    }

    /// The wire pk of a row given as portable JSON; `None` when a key column is missing or null.
    pub fn pk_text(&self, row: &Map<String, Value>) -> Option<String> {
        let values: Vec<&Value> = self.primary_key.iter().map(|&index| row.get(&self.fields[index].name)).collect::<Option<_>>()?;
        if values.iter().any(|value| value.is_null()) {
            return None;
        }
        Some(match values.as_slice() {
            [Value::String(text)] => text.clone(),
            [single] => single.to_string(),
            many => Value::Array(many.iter().map(|value| (*value).clone()).collect()).to_string(),
        })
    }

    /// The key columns' portable values encoded by a wire pk.
    fn pk_fields(&self, pk: &str) -> Result<Map<String, Value>, String> {
        let values = match self.primary_key.as_slice() {
            [only] => vec![match self.fields[*only].codec {
                Codec::Int2 | Codec::Int4 | Codec::Float4 | Codec::Float8 | Codec::Bool => {
                    serde_json::from_str(pk).map_err(|_| refusal("invalid_pk", format!("{pk:?} is not a value of column {}", self.fields[*only].name)))?
                }
                _ => Value::String(pk.to_owned()),
            }],
            many => match serde_json::from_str::<Vec<Value>>(pk) {
                Ok(values) if values.len() == many.len() => values,
                _ => return Err(refusal("invalid_pk", format!("expected a JSON array of {} key values, got {pk:?}", many.len()))),
            },
        };
        Ok(self.primary_key.iter().map(|&index| self.fields[index].name.clone()).zip(values).collect())
    }

    /// Decodes one portable column value and encodes it again: the value as the table will hold it.
    fn normalize_value(&self, field: &Field, value: &Value) -> Result<Value, String> {
        let decoded = field.codec.decode(value, field.typmod).map_err(|error| refusal("invalid_value", format!("column \"{}\": {error}", field.name)))?;
        Ok(match decoded {
            // SAFETY: the datum was just built as a value of the column's type.
            Some(datum) => unsafe { field.codec.encode(datum, number_mode()) }.map_err(|error| refusal("invalid_value", error))?,
            None => Value::Null,
        })
    }

    /// Checks a pushed change against the table and returns its value as the table will hold it
    /// (the tenant column left out, an insert's key columns filled from its pk), or the reason it is refused.
    /// May raise a Postgres error (a value out of a column's range): run it in a subtransaction.
    pub fn normalize(&self, change: &Change, tenant: &str) -> Normalized {
        if let TenantBinding::Fixed(owner) = &self.tenant {
            if owner != tenant {
                return Err(refusal("wrong_tenant", format!("model {} belongs to another tenant", self.name)));
            }
        }
        let mut key = Map::new();
        for (name, value) in self.pk_fields(&change.pk)? {
            let (_, field) = self.field(&name).expect("key columns are fields");
            if value.is_null() {
                return Err(refusal("invalid_pk", format!("key column \"{name}\" cannot be null")));
            }
            key.insert(name, self.normalize_value(field, &value)?);
        }
        let Some(value) = &change.value else { return Ok(None) };
        let mut normalized = if change.op == Op::Insert { key.clone() } else { Map::new() };
        for (name, value) in value {
            let Some((_, field)) = self.field(name) else { return Err(self.unsynced(name)) };
            if self.tenant_column().is_some_and(|column| column.name == *name) {
                if value.as_str() != Some(tenant) {
                    return Err(refusal("wrong_tenant", format!("column \"{name}\" is {value}, not the pushing tenant")));
                }
                continue;
            }
            let value = self.normalize_value(field, value)?;
            if key.get(name).is_some_and(|key_value| *key_value != value) {
                return Err(refusal("invalid_pk", format!("column \"{name}\" is {value}, which differs from the change's pk")));
            }
            normalized.insert(name.clone(), value);
        }
        Ok(Some(normalized))
    }

    /// A record of the table's row type holding `row`'s columns (absent ones null) and the tenant.
    fn record(&self, row: &Map<String, Value>, tenant: &str) -> Result<pg_sys::Datum, String> {
        let mut columns = row.clone();
        if let Some(column) = self.tenant_column() {
            columns.insert(column.name.clone(), Value::from(tenant));
        }
        let mut values = Vec::new();
        for (name, value) in &columns {
            let (_, field) = self.field(name).ok_or_else(|| refusal("invalid_value", format!("column \"{name}\" does not exist")))?;
            let datum = field.codec.decode(value, field.typmod).map_err(|error| refusal("invalid_value", format!("column \"{name}\": {error}")))?;
            values.push((field.position, datum));
        }
        Ok(form_record(self.row_type, values))
    }

    /// An array of records of the table's row type, as an SPI argument.
    fn records_argument(&self, records: Vec<pg_sys::Datum>) -> DatumWithOid<'static> {
        // SAFETY: the records are of the row type, a varlena aligned on doubles.
        unsafe {
            let mut records = records;
            let array = pg_sys::construct_array(records.as_mut_ptr(), records.len() as i32, self.row_type, -1, false, b'd' as std::ffi::c_char);
            DatumWithOid::new(pg_sys::Datum::from(array), pg_sys::get_array_type(self.row_type))
        }
    }

    fn columns_sql<'a>(&self, names: impl Iterator<Item = &'a String>, prefix: &str) -> String {
        names.map(|name| format!("{prefix}{}", quote_identifier(name))).collect::<Vec<_>>().join(", ")
    }

    /// Writes final row states into the table (`None`: the row is deleted): one statement per
    /// column set. Returns the pks of rows that belong to another tenant and were left alone.
    fn write(&self, client: &mut SpiClient<'_>, tenant: &str, rows: &[(String, RowWrite)]) -> Result<Vec<String>, String> {
        let key_names: Vec<&String> = self.primary_key.iter().map(|&index| &self.fields[index].name).collect();
        let tenant_guard = |alias: &str| match self.tenant_column() {
            Some(column) => format!(" AND {alias}.{} OPERATOR(pg_catalog.=) $2", quote_identifier(&column.name)),
            None => String::new(),
        };
        // Rows written by one statement: the same columns, and the same rule for the others.
        type Group = (Vec<String>, bool);
        let mut upserts: BTreeMap<Group, Vec<(&str, &Row)>> = BTreeMap::new();
        let mut deletes: Vec<&str> = Vec::new();
        for (pk, row) in rows {
            match row {
                RowWrite::Upsert { fields, others_default } => {
                    let mut columns: Vec<String> = fields.keys().cloned().collect();
                    columns.extend(self.tenant_column().map(|column| column.name.clone()));
                    upserts.entry((columns, *others_default)).or_default().push((pk.as_str(), fields));
                }
                RowWrite::Delete => deletes.push(pk.as_str()),
            }
        }
        let mut foreign = Vec::new();
        for ((columns, others_default), group) in upserts {
            let mut records = Vec::with_capacity(group.len());
            for (pk, row) in &group {
                let mut full = (*row).clone();
                full.extend(self.pk_fields(pk)?);
                records.push(self.record(&full, tenant)?);
            }
            let mut all_columns = columns.clone();
            for key in &key_names {
                if !all_columns.contains(key) {
                    all_columns.push((*key).clone());
                }
            }
            // The tenant column is never updated: the guard keeps the statement to the pushing tenant's rows,
            // and a device needs no UPDATE privilege on it.
            let tenant_column = self.tenant_column().map(|column| &column.name);
            let updated: Vec<&String> =
                all_columns.iter().filter(|column| !key_names.contains(column) && Some(*column) != tenant_column).collect();
            let mut assignments: Vec<String> = updated.iter().map(|column| format!("{0} = excluded.{0}", quote_identifier(column))).collect();
            if others_default {
                let hidden = self.fields.iter().filter(|field| {
                    !field.generated && !all_columns.contains(&field.name) && Some(&field.name) != tenant_column
                });
                assignments.extend(hidden.map(|field| format!("{} = DEFAULT", quote_identifier(&field.name))));
            }
            if assignments.is_empty() {
                assignments.push(format!("{0} = excluded.{0}", quote_identifier(key_names[0])));
            }
            let assignments = assignments.join(", ");
            // A key that holds the tenant conflicts only with the tenant's own rows; any other key may
            // meet another tenant's row, which the guard leaves alone (and reports as foreign below).
            let guard = if self.key_holds_tenant { String::new() } else { tenant_guard("t") };
            let mut conflict_key = key_names.clone();
            conflict_key.extend(tenant_column.filter(|_| self.key_holds_tenant));
            let statement = format!(
                "INSERT INTO {table} AS t ({columns}) SELECT {values} FROM pg_catalog.unnest($1) AS r
                 ON CONFLICT ({keys}) DO UPDATE SET {assignments} {where_guard}
                 RETURNING {returned}",
                table = self.table,
                columns = self.columns_sql(all_columns.iter(), ""),
                values = self.columns_sql(all_columns.iter(), "r."),
                keys = self.columns_sql(conflict_key.into_iter(), ""),
                where_guard = if guard.is_empty() { String::new() } else { format!("WHERE {}", &guard[5..]) },
                returned = self.columns_sql(key_names.iter().copied(), "t."),
            );
            let mut arguments = vec![self.records_argument(records)];
            arguments.push(tenant.into());
            let mut written = crate::plans::update_as_session(client, &statement, &arguments).map_err(|error| refusal("invalid_value", error))?;
            let mut written_pks = Vec::with_capacity(written.len());
            while written.next().is_some() {
                let mut key = Map::new();
                for (ordinal, &index) in self.primary_key.iter().enumerate() {
                    let field = &self.fields[index];
                    let value = match written.get_datum_by_ordinal(ordinal + 1).map_err(|error| refusal("invalid_value", error))? {
                        // SAFETY: RETURNING gives the key column, of the field's type.
                        Some(datum) => unsafe { field.codec.encode(datum, number_mode()) }.map_err(|error| refusal("invalid_value", error))?,
                        None => Value::Null,
                    };
                    key.insert(field.name.clone(), value);
                }
                written_pks.extend(self.pk_text(&key));
            }
            foreign.extend(group.iter().map(|(pk, _)| pk.to_string()).filter(|pk| !written_pks.contains(pk)));
        }
        if !deletes.is_empty() {
            let mut records = Vec::with_capacity(deletes.len());
            for pk in &deletes {
                records.push(self.record(&self.pk_fields(pk)?, tenant)?);
            }
            let matches =
                key_names.iter().map(|key| format!("t.{0} OPERATOR(pg_catalog.=) r.{0}", quote_identifier(key))).collect::<Vec<_>>().join(" AND ");
            let statement = format!("DELETE FROM {} AS t USING pg_catalog.unnest($1) AS r WHERE {matches}{}", self.table, tenant_guard("t"));
            crate::plans::update_as_session(client, &statement, &[self.records_argument(records), tenant.into()])
                .map_err(|error| refusal("invalid_value", error))?;
        }
        Ok(foreign)
    }
}

/// The state a row of a bound table must be left in after a push: the merge's visible row.
#[derive(Clone, Debug)]
pub enum RowWrite {
    /// The row holds exactly `fields`; with `others_default` (a delete once hid fields of the row),
    /// every other column is set as a fresh INSERT of those fields would leave it (its default, else NULL).
    Upsert { fields: Map<String, Value>, others_default: bool },
    /// The row is absent.
    Delete,
}

impl RowWrite {
    /// What the table must hold for a row in merge state `state`.
    pub fn of(state: &sync_ext_protocol::RowState) -> RowWrite {
        match state.visible() {
            Some(fields) => RowWrite::Upsert { fields, others_default: state.deleted_hlc.is_some() },
            None => RowWrite::Delete,
        }
    }
}

/// Rows of registered models whose final state a batch must write, by model: (pk, state to write).
pub type PendingWrites = HashMap<String, Vec<(String, RowWrite)>>;

/// Writes a batch's row states into the registered tables with the caller's rights (its privileges,
/// the tables' row-level security, triggers and defaults apply as to its own SQL), isolating failures:
/// the whole batch is tried in one subtransaction per model; if that fails, row by row. Returns the
/// refused rows with reasons. Errors that are not about a row's data (a cancel, a deadlock) propagate.
pub fn write_rows(tenant: &str, models: &HashMap<String, Model>, pending: &PendingWrites) -> SyncResult<HashMap<RowKey, String>> {
    let _applying = ApplyingPush::start();
    Spi::connect_mut(|client| Ok(write_rows_with(client, tenant, models, pending)))
}

fn write_rows_with(client: &mut SpiClient<'_>, tenant: &str, models: &HashMap<String, Model>, pending: &PendingWrites) -> HashMap<RowKey, String> {
    let mut refused = HashMap::new();
    for (model_name, rows) in pending {
        let model = &models[model_name];
        let mut record = |rows: &[(String, RowWrite)], refused: &mut HashMap<RowKey, String>| -> bool {
            match in_subtransaction(|| model.write(client, tenant, rows)) {
                Ok(Ok(foreign)) => {
                    for pk in foreign {
                        refused.insert((model.name.clone(), pk), refusal("wrong_tenant", "the row belongs to another tenant"));
                    }
                    true
                }
                Ok(Err(reason)) => {
                    if let [(pk, _)] = rows {
                        refused.insert((model.name.clone(), pk.to_string()), reason);
                    }
                    false
                }
                Err(error) => {
                    if let [(pk, _)] = rows {
                        refused.insert((model.name.clone(), pk.to_string()), step_refusal(&error));
                    }
                    false
                }
            }
        };
        if !record(rows, &mut refused) && rows.len() > 1 {
            for row in rows {
                record(std::slice::from_ref(row), &mut refused);
            }
        }
    }
    refused
}

/// Checks every change of a registered model (but those `already_refused`) and puts its value in the form the table holds.
/// Returns the refused changes (by index) with reasons. Values out of a column's range raise
/// Postgres errors, so the batch is checked in one subtransaction, then change by change if that fails.
pub fn normalize_changes(changes: &mut [Change], tenant: &str, models: &HashMap<String, Model>, already_refused: &HashMap<usize, String>) -> HashMap<usize, String> {
    let normalize_all = |changes: &[Change], indexes: &[usize]| -> Vec<(usize, Normalized)> {
        indexes.iter().map(|&index| (index, models[&changes[index].model].normalize(&changes[index], tenant))).collect()
    };
    let registered: Vec<usize> =
        (0..changes.len()).filter(|&index| models.contains_key(&changes[index].model) && !already_refused.contains_key(&index)).collect();
    let results = match in_subtransaction(|| normalize_all(changes, &registered)) {
        Ok(results) => results,
        Err(_) => registered
            .iter()
            .map(|&index| {
                let result = in_subtransaction(|| normalize_all(changes, &[index]).remove(0).1);
                (index, result.unwrap_or_else(|error| Err(step_refusal(&error))))
            })
            .collect(),
    };
    let mut refused = HashMap::new();
    for (index, result) in results {
        match result {
            Ok(value) => changes[index].value = value,
            Err(reason) => {
                refused.insert(index, reason);
            }
        }
    }
    refused
}

/// Binds a sync model to a table. Exactly one of `tenant_column` (the column holding each row's
/// tenant, filled by the engine on pushed inserts) and `tenant` (the one tenant owning the table)
/// must be given. With `columns`, the model syncs only those columns (its key columns always): the
/// others never enter the log, pushes cannot name them and leave them alone. Rows already in the table
/// are offered to pulling clients. Declared in SQL as `sync_register_model` by the 0.6.0 upgrade script.
#[pg_extern(sql = false)]
fn sync_register_model_columns(
    model: &str,
    tbl: pgrx::PgRelation,
    tenant_column: Option<&str>,
    tenant: Option<&str>,
    columns: Option<Vec<String>>,
) -> Result<(), pgrx::pg_sys::panic::ErrorReport> {
    Ok(register(model, tbl.oid(), tenant_column, tenant, columns.as_deref())?)
}

/// `sync_register_model` of before 0.6.0 (no `columns`): the SQL object of older versions calls it until
/// `ALTER EXTENSION sync_ext UPDATE`, and a fresh install declares it until its 0.6.0 part replaces it.
#[pg_extern(volatile, parallel_unsafe)]
fn sync_register_model(
    model: &str,
    tbl: pgrx::PgRelation,
    tenant_column: default!(Option<&str>, "NULL"),
    tenant: default!(Option<&str>, "NULL"),
) -> Result<(), pgrx::pg_sys::panic::ErrorReport> {
    sync_register_model_columns(model, tbl, tenant_column, tenant, None)
}

fn register(name: &str, table: pg_sys::Oid, tenant_column: Option<&str>, tenant: Option<&str>, columns: Option<&[String]>) -> SyncResult<()> {
    sync_ext_protocol::change::validate_name("model", name)?;
    Spi::connect_mut(|client| {
        let model = Model::describe(client, name, table, tenant_column, tenant, columns)?;
        if let Some(columns) = columns {
            let table_columns = composite_fields(model.row_type, -1)?;
            if let Some(unknown) = columns.iter().find(|column| !table_columns.iter().any(|field| field.name == **column)) {
                return Err(SyncError::InvalidArgument { argument: "columns", problem: format!("{} has no column {}", model.table_name, quote_identifier(unknown)) });
            }
        }
        if crate::citus::distributed() {
            model.require_colocated(client)?;
        }
        let taken = client.select(
            "SELECT model FROM sync_ext.models WHERE model = $1 OR table_name = $2",
            Some(1),
            &[name.into(), table.into()],
        )?;
        if !taken.is_empty() {
            return Err(SyncError::AlreadyRegistered { model: name.to_owned(), table: model.table_name.clone() });
        }
        client.update(
            "INSERT INTO sync_ext.models (model, table_name, tenant_column, tenant, columns) VALUES ($1, $2, $3, $4, $5)",
            None,
            &[name.into(), table.into(), tenant_column.into(), tenant.into(), columns.map(<[String]>::to_vec).into()],
        )?;
        // One statement each: Citus distributes one command at a time.
        let table_sql = &model.table;
        for trigger in [
            format!("CREATE TRIGGER sync_ext_capture_insert AFTER INSERT ON {table_sql}
                     REFERENCING NEW TABLE AS sync_ext_new FOR EACH STATEMENT EXECUTE FUNCTION sync_ext.capture_insert()"),
            format!("CREATE TRIGGER sync_ext_capture_update AFTER UPDATE ON {table_sql}
                     REFERENCING OLD TABLE AS sync_ext_old NEW TABLE AS sync_ext_new FOR EACH STATEMENT EXECUTE FUNCTION sync_ext.capture_update()"),
            format!("CREATE TRIGGER sync_ext_capture_delete AFTER DELETE ON {table_sql}
                     REFERENCING OLD TABLE AS sync_ext_old FOR EACH STATEMENT EXECUTE FUNCTION sync_ext.capture_delete()"),
            format!("CREATE TRIGGER sync_ext_forbid_truncate BEFORE TRUNCATE ON {table_sql} FOR EACH STATEMENT EXECUTE FUNCTION sync_ext.forbid_truncate()"),
        ] {
            client.update(&trigger, None, &[])?;
        }
        Ok(())
    })?;
    // Rows already in the table are logged as inserts, by the engine as any captured write.
    as_engine(|_| {
        Spi::connect_mut(|client| {
            let model = Model::load_for_table(client, table)?.ok_or_else(|| SyncError::UnknownModel { model: name.to_owned() })?;
            let rows = crate::capture::relation_rows(client, &model, Some(&model.table))?;
            crate::capture::log_rows(client, &model, Vec::new(), rows)
        })
    })
}

/// Unbinds a model from its table: its writes are no longer captured nor pushed changes applied.
/// The model's history stays in the op log.
#[pg_extern(volatile, parallel_unsafe)]
fn sync_unregister_model(model: &str) -> Result<(), pgrx::pg_sys::panic::ErrorReport> {
    Ok(unregister(model)?)
}

fn unregister(name: &str) -> SyncResult<()> {
    Spi::connect_mut(|client| {
        let removed = client.update("DELETE FROM sync_ext.models WHERE model = $1 RETURNING table_name::text", None, &[name.into()])?;
        if removed.is_empty() {
            return Err(SyncError::UnknownModel { model: name.to_owned() });
        }
        let table: String = removed.first().get_one()?.unwrap_or_default();
        for trigger in ["sync_ext_capture_insert", "sync_ext_capture_update", "sync_ext_capture_delete", "sync_ext_forbid_truncate"] {
            client.update(&format!("DROP TRIGGER IF EXISTS {trigger} ON {table}"), None, &[])?;
        }
        Ok(())
    })
}

/// Makes a bound model read-only for devices (`read_only` true) or writable again: pushed changes to it
/// are rejected `read_only`, while the table's own writes are captured and pulled as usual. The owner's.
#[pg_extern(volatile, parallel_unsafe)]
fn sync_set_read_only(model: &str, read_only: default!(bool, true)) -> Result<(), pgrx::pg_sys::panic::ErrorReport> {
    Ok(set_read_only(model, read_only)?)
}

fn set_read_only(name: &str, read_only: bool) -> SyncResult<()> {
    // As the caller: only the owner (or a superuser) may write the registered models.
    Spi::connect_mut(|client| {
        let updated = client.update(
            "UPDATE sync_ext.models AS m SET read_only = $2 WHERE m.model OPERATOR(pg_catalog.=) $1 RETURNING 1",
            None,
            &[name.into(), read_only.into()],
        )?;
        if updated.is_empty() {
            return Err(SyncError::UnknownModel { model: name.to_owned() });
        }
        Ok(())
    })
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;
    use serde_json::{json, Value};

    use crate::testing::{error_of, pull, push, statuses};

    const TODO_1: &str = "7f1e8c3a-0000-4000-8000-000000000001";
    const TODO_2: &str = "7f1e8c3a-0000-4000-8000-000000000002";

    fn create_todos() {
        Spi::run(
            "CREATE TABLE todos (
                 id uuid PRIMARY KEY,
                 tenant_id text NOT NULL,
                 title text NOT NULL,
                 done boolean NOT NULL DEFAULT false,
                 priority numeric(4,2) CHECK (priority >= 0),
                 due timestamptz,
                 tags text[],
                 meta jsonb);
             SELECT sync_register_model('todo', 'todos', tenant_column => 'tenant_id');",
        )
        .unwrap();
    }

    fn change(n: u32, pk: &str, op: &str, value: Value) -> Value {
        let mut change = json!({"op_id": format!("00000000-0000-4000-8000-{n:012}"), "model": "todo", "pk": pk, "op": op,
                                "hlc": "2026-01-01T00:00:00.000Z-0000", "actor": "device-a"});
        if !value.is_null() {
            change["value"] = value;
        }
        change
    }

    fn text(sql: &str) -> Option<String> {
        Spi::get_one::<String>(sql).unwrap()
    }

    #[pg_test]
    fn a_pushed_insert_lands_as_a_typed_row_and_is_pulled_in_portable_form() {
        create_todos();
        let response = push(
            "acme",
            json!([change(1, TODO_1, "insert", json!({"title": "milk", "priority": "3.5", "tags": ["home", null], "due": "2026-11-24T10:00:00Z", "meta": {"n": [1]}}))]),
        );
        assert_eq!(statuses(&response), ["applied"]);
        let row = text("SELECT format('%s|%s|%s|%s|%s|%s', tenant_id, priority, pg_typeof(priority), tags, pg_typeof(tags), done) FROM todos");
        assert_eq!(row.as_deref(), Some("acme|3.50|numeric|{home,NULL}|text[]|f"));
        let pulled = pull("acme", 0, 10);
        assert_eq!(
            pulled["changes"][0]["value"],
            json!({"id": TODO_1, "title": "milk", "priority": "3.50", "tags": ["home", null], "due": "2026-11-24T10:00:00Z", "meta": {"n": [1]}})
        );
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM sync_ext.op_log").unwrap(), Some(1), "the engine's own write is not captured again");
    }

    #[pg_test]
    fn a_plain_sql_update_is_pulled_with_the_server_actor() {
        create_todos();
        push("acme", json!([change(1, TODO_1, "insert", json!({"title": "milk"}))]));
        Spi::run(&format!("UPDATE todos SET done = true WHERE id = '{TODO_1}'")).unwrap();
        let pulled = pull("acme", 1, 10);
        let captured = &pulled["changes"][0];
        assert_eq!((captured["op"].clone(), captured["actor"].clone(), captured["value"].clone()), (json!("update"), json!("server"), json!({"done": true})));
        assert!(captured["hlc"].as_str().unwrap() > "2026-01-01T00:00:00.000Z-0000", "the server stamps after what it has seen");
        Spi::run(&format!("SET LOCAL sync_ext.actor = 'admin-panel'; DELETE FROM todos WHERE id = '{TODO_1}'")).unwrap();
        let deleted = &pull("acme", 2, 10)["changes"][0];
        assert_eq!((deleted["op"].clone(), deleted["actor"].clone(), deleted["pk"].clone()), (json!("delete"), json!("admin-panel"), json!(TODO_1)));
    }

    /// A change of todo `pk` at second `second` of the test clock.
    fn at(n: u32, pk: &str, op: &str, second: u32, value: Value) -> Value {
        let mut change = change(n, pk, op, value);
        change["hlc"] = json!(format!("2026-01-01T00:00:{second:02}.000Z-0000"));
        change
    }

    fn row(pk: &str) -> Option<String> {
        text(&format!("SELECT (SELECT format('%s|%s|%s', title, done, coalesce(priority::text, 'NULL')) FROM todos WHERE id = '{pk}')"))
    }

    #[pg_test]
    fn a_late_delete_clears_the_fields_it_hides_from_the_table_too() {
        create_todos();
        push("acme", json!([at(1, TODO_1, "insert", 1, json!({"title": "milk", "priority": "1", "done": true})),
                            at(2, TODO_1, "update", 5, json!({"title": "oat milk"}))]));
        assert_eq!(row(TODO_1).as_deref(), Some("oat milk|t|1.00"));
        assert_eq!(statuses(&push("acme", json!([at(3, TODO_1, "delete", 3, Value::Null)]))), ["applied"]);
        assert_eq!(pull("acme", 2, 10)["changes"][0]["op"], "delete", "the delete hid the fields written before it");
        assert_eq!(row(TODO_1).as_deref(), Some("oat milk|f|NULL"), "hidden columns are as a fresh insert leaves them");
    }

    #[pg_test]
    fn a_delete_and_a_recreating_update_in_one_push_leave_only_the_new_fields() {
        create_todos();
        push("acme", json!([at(1, TODO_1, "insert", 1, json!({"title": "milk", "priority": "1"}))]));
        push("acme", json!([at(2, TODO_1, "delete", 2, Value::Null), at(3, TODO_1, "update", 3, json!({"title": "bread"}))]));
        assert_eq!(row(TODO_1).as_deref(), Some("bread|f|NULL"));
    }

    #[pg_test]
    fn a_resurrection_that_leaves_a_not_null_column_without_value_is_rejected_like_an_insert_without_it() {
        create_todos();
        push("acme", json!([at(1, TODO_1, "insert", 1, json!({"title": "milk"})), at(2, TODO_1, "delete", 2, Value::Null)]));
        let revived = push("acme", json!([at(3, TODO_1, "update", 3, json!({"priority": "2"}))]));
        assert!(revived["results"][0]["reason"].as_str().unwrap().starts_with("constraint_violation: null value in column \"title\""), "{revived}");
        assert_eq!(row(TODO_1), None, "the row stays deleted");
    }

    #[pg_test]
    fn column_names_never_change_behaviour() {
        // Named after every alias, keyword and name the engine's statements use, quoted, mixed-case and unicode.
        Spi::run(
            r#"CREATE TABLE weird ("n" int PRIMARY KEY, "o" text, "value" text, "row" text, "tenant_id" text, "op" text, "seq" int,
                                  "r" text, "t" text, "excluded" text, "sync_ext_new" text, "sync_ext_old" text, "select" text,
                                  "Mixed Case" text, "quo""ted" text, "ñandú" text, "owner" text NOT NULL);
               SELECT sync_register_model('weird', 'weird', tenant_column => 'owner');"#,
        )
        .unwrap();
        let all = json!({"o": "o", "value": "v", "row": "w", "tenant_id": "ti", "op": "op", "seq": 7, "r": "r", "t": "t", "excluded": "x",
                         "sync_ext_new": "sn", "sync_ext_old": "so", "select": "s", "Mixed Case": "M", "quo\"ted": "q", "ñandú": "ñ"});
        let mut pushed = change(1, "1", "insert", all.clone());
        pushed["model"] = json!("weird");
        assert_eq!(statuses(&push("acme", json!([pushed]))), ["applied"]);
        let mut update = change(2, "1", "update", json!({"r": "r2", "ñandú": "ñ2"}));
        update["model"] = json!("weird");
        update["hlc"] = json!("2026-01-01T00:00:01.000Z-0000");
        assert_eq!(statuses(&push("acme", json!([update]))), ["applied"]);
        assert_eq!(text(r#"SELECT "r" || "ñandú" || "quo""ted" FROM weird WHERE n = 1"#).as_deref(), Some("r2ñ2q"));

        Spi::run(r#"INSERT INTO weird ("n", "owner", "o", "Mixed Case") VALUES (2, 'acme', 'plain', 'MC')"#).unwrap();
        Spi::run(r#"UPDATE weird SET "value" = 'changed', "t" = 't2' WHERE n = 2"#).unwrap();
        Spi::run(r#"COPY weird ("n", "owner", "row") FROM PROGRAM 'printf "3\tacme\tcopied\n"'"#).unwrap();
        Spi::run("DELETE FROM weird WHERE n = 1").unwrap();
        let captured: Vec<(String, String, Value)> = pull("acme", 2, 10)["changes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["op"].as_str().unwrap().to_owned(), c["pk"].as_str().unwrap().to_owned(), c["value"].clone()))
            .collect();
        let row_2 = json!({"n": 2, "o": "plain", "value": null, "row": null, "tenant_id": null, "op": null, "seq": null, "r": null, "t": null,
                           "excluded": null, "sync_ext_new": null, "sync_ext_old": null, "select": null, "Mixed Case": "MC", "quo\"ted": null, "ñandú": null});
        let mut row_3 = row_2.clone();
        row_3.as_object_mut().unwrap().extend([("n".to_owned(), json!(3)), ("o".to_owned(), json!(null)), ("Mixed Case".to_owned(), json!(null)), ("row".to_owned(), json!("copied"))]);
        assert_eq!(
            captured,
            [
                ("insert".to_owned(), "2".to_owned(), row_2),
                ("update".to_owned(), "2".to_owned(), json!({"value": "changed", "t": "t2"})),
                ("insert".to_owned(), "3".to_owned(), row_3),
                ("delete".to_owned(), "1".to_owned(), Value::Null),
            ]
        );
    }

    #[pg_test]
    fn a_bad_value_is_rejected_naming_the_column_and_the_rest_of_the_batch_applies() {
        create_todos();
        let response = push(
            "acme",
            json!([
                change(1, TODO_1, "insert", json!({"title": "milk", "priority": "abc"})),
                change(2, TODO_2, "insert", json!({"title": "eggs", "priority": "1"})),
                change(3, "7f1e8c3a-0000-4000-8000-000000000003", "insert", json!({"priority": "2"})),
                change(4, "7f1e8c3a-0000-4000-8000-000000000004", "insert", json!({"title": "x", "priority": "-1"})),
                change(5, "7f1e8c3a-0000-4000-8000-000000000005", "insert", json!({"title": "x", "colour": "red"})),
                change(6, "7f1e8c3a-0000-4000-8000-000000000006", "insert", json!({"title": "x", "priority": "999.5"})),
                change(7, "not-a-uuid", "insert", json!({"title": "x"})),
            ]),
        );
        let results = response["results"].as_array().unwrap();
        assert_eq!(statuses(&response), ["rejected", "applied", "rejected", "rejected", "rejected", "rejected", "rejected"]);
        let reason = |i: usize| results[i]["reason"].as_str().unwrap().to_owned();
        assert!(reason(0).starts_with("invalid_value: column \"priority\": expected a string of exact digits"), "{}", reason(0));
        assert!(reason(2).starts_with("constraint_violation: null value in column \"title\""), "{}", reason(2));
        assert!(reason(3).starts_with("constraint_violation: new row for relation \"todos\" violates check constraint \"todos_priority_check\""), "{}", reason(3));
        assert_eq!(reason(4), "invalid_value: column \"colour\" does not exist in todos");
        assert!(reason(5).starts_with("invalid_value: numeric field overflow"), "{}", reason(5));
        assert!(reason(6).starts_with("invalid_value: column \"id\": expected a UUID string"), "{}", reason(6));
        assert_eq!(text("SELECT string_agg(title, ',') FROM todos").as_deref(), Some("eggs"));
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM sync_ext.op_log").unwrap(), Some(1));
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM sync_ext.snapshots").unwrap(), Some(1));
        assert_eq!(response["results"][1]["seq"], 1);
    }

    #[pg_test]
    fn a_key_that_holds_the_tenant_column_is_the_rest_of_the_key_on_the_wire() {
        Spi::run(
            "CREATE TABLE notes (tenant_id text NOT NULL, id int NOT NULL, body text, PRIMARY KEY (tenant_id, id));
             SELECT sync_register_model('todo', 'notes', tenant_column => 'tenant_id');",
        )
        .unwrap();
        let mut update = change(2, "7", "update", json!({"body": "edited"}));
        update["hlc"] = json!("2026-01-01T00:00:01.000Z-0000");
        let pushed = push("acme", json!([change(1, "7", "insert", json!({"body": "first"})), update]));
        assert_eq!(statuses(&pushed), ["applied", "applied"]);
        push("globex", json!([change(3, "7", "insert", json!({"body": "globex's seven"}))]));
        let rows = || text("SELECT string_agg(tenant_id || '/' || id || '=' || body, ',' ORDER BY tenant_id) FROM notes");
        assert_eq!(rows().as_deref(), Some("acme/7=edited,globex/7=globex's seven"), "the same id in two tenants is two rows");
        Spi::run("UPDATE notes SET body = 'from SQL' WHERE tenant_id = 'globex'").unwrap();
        let captured = pull("globex", 1, 10)["changes"][0].clone();
        assert_eq!((captured["pk"].clone(), captured["value"].clone()), (json!("7"), json!({"body": "from SQL"})), "captured with the wire pk");
        let mut delete = change(4, "7", "delete", Value::Null);
        delete["hlc"] = json!("2026-01-01T00:00:02.000Z-0000");
        push("acme", json!([delete]));
        assert_eq!(rows().as_deref(), Some("globex/7=from SQL"), "acme's delete leaves globex's row alone");
        let only_tenant = error_of("CREATE TABLE solo (tenant_id text PRIMARY KEY, body text); SELECT sync_register_model('solo', 'solo', tenant_column => 'tenant_id')");
        assert!(only_tenant.starts_with("22023: tbl: the primary key of solo is its tenant column alone"), "{only_tenant}");
    }

    /// `todos` bound as a model syncing only `title` and `done` (its key always): `priority`, `due`,
    /// `tags` and `meta` stay the server's.
    fn create_narrow_todos() {
        Spi::run(
            "CREATE TABLE todos (id uuid PRIMARY KEY, tenant_id text NOT NULL, title text NOT NULL, done boolean NOT NULL DEFAULT false,
                                 priority numeric(4,2) CHECK (priority >= 0), due timestamptz, tags text[], meta jsonb);
             SELECT sync_register_model('todo', 'todos', tenant_column => 'tenant_id', columns => ARRAY['title', 'done']);",
        )
        .unwrap();
    }

    #[pg_test]
    fn a_model_syncing_some_columns_never_logs_the_others_and_pushes_leave_them_alone() {
        create_narrow_todos();
        let inserted = push("acme", json!([at(1, TODO_1, "insert", 1, json!({"title": "milk"})), at(2, TODO_2, "insert", 1, json!({"title": "bread", "done": true}))]));
        assert_eq!(statuses(&inserted), ["applied", "applied"]);
        Spi::run(&format!("UPDATE todos SET priority = 2, meta = '{{\"private\": 1}}' WHERE id = '{TODO_2}'")).unwrap();
        assert_eq!(pull("acme", 2, 10)["changes"].as_array().unwrap().len(), 0, "a write of unsynced columns alone is not logged");
        Spi::run(&format!("UPDATE todos SET title = 'rye bread', priority = 4 WHERE id = '{TODO_2}'")).unwrap();
        assert_eq!(pull("acme", 2, 10)["changes"][0]["value"], json!({"title": "rye bread"}), "only the synced column enters the log");
        assert_eq!(statuses(&push("acme", json!([at(3, TODO_2, "update", 5, json!({"done": false}))]))), ["applied"]);
        let rows = text("SELECT string_agg(format('%s|%s|%s|%s', title, done, coalesce(priority::text, 'NULL'), coalesce(meta::text, 'NULL')), ',' ORDER BY id) FROM todos");
        assert_eq!(rows.as_deref(), Some("milk|f|NULL|NULL,rye bread|f|4.00|{\"private\": 1}"), "a push writes the synced columns and keeps the others");
        let fingerprint = crate::testing::fingerprint();
        let refused = push("acme", json!([at(4, TODO_2, "update", 6, json!({"priority": "9"}))]));
        assert_eq!(refused["results"][0]["status"], "rejected");
        assert_eq!(refused["results"][0]["reason"], "invalid_value: column \"priority\" is not one of the columns model todo syncs");
        assert_eq!(crate::testing::fingerprint(), fingerprint, "the refused change changed nothing");
    }

    #[pg_test]
    fn registering_columns_the_table_lacks_is_refused_naming_the_argument() {
        Spi::run("CREATE TABLE todos (id uuid PRIMARY KEY, tenant_id text NOT NULL, title text)").unwrap();
        let unknown = error_of("SELECT sync_register_model('todo', 'todos', tenant_column => 'tenant_id', columns => ARRAY['title', 'colour'])");
        assert_eq!(unknown, "22023: columns: todos has no column \"colour\"");
        assert_eq!(text("SELECT count(*)::text FROM sync_ext.models").as_deref(), Some("0"), "nothing was registered");
        Spi::run(&format!("INSERT INTO todos VALUES ('{TODO_1}', 'acme', 'already here')")).unwrap();
        Spi::run("SELECT sync_register_model('todo', 'todos', tenant_column => 'tenant_id', columns => '{}')").unwrap();
        assert_eq!(pull("acme", 0, 10)["changes"][0]["value"], json!({"id": TODO_1}), "rows already there are offered, with the key alone for an empty list");
    }

    #[pg_test]
    fn a_change_can_never_reach_another_tenants_row() {
        create_todos();
        push("globex", json!([change(1, TODO_1, "insert", json!({"title": "globex secret"}))]));
        let hijack = push("acme", json!([change(2, TODO_1, "update", json!({"title": "mine now"}))]));
        assert_eq!(hijack["results"][0]["reason"], "wrong_tenant: the row belongs to another tenant");
        let spoof = push("acme", json!([change(3, TODO_2, "insert", json!({"title": "x", "tenant_id": "globex"}))]));
        assert!(spoof["results"][0]["reason"].as_str().unwrap().starts_with("wrong_tenant: column \"tenant_id\""));
        push("acme", json!([change(4, TODO_1, "delete", Value::Null)]));
        assert_eq!(text("SELECT tenant_id || ':' || title FROM todos").as_deref(), Some("globex:globex secret"));
        assert_eq!(pull("acme", 0, 10)["changes"].as_array().unwrap().len(), 1, "only acme's own tombstone");
    }

    #[pg_test]
    fn multi_row_statements_copy_like_inserts_and_key_changes_are_captured() {
        create_todos();
        Spi::run(
            "INSERT INTO todos (id, tenant_id, title)
             SELECT ('7f1e8c3a-0000-4000-8000-00000000000' || n)::uuid, CASE WHEN n < 3 THEN 'acme' ELSE 'globex' END, 'task ' || n
               FROM generate_series(1, 4) AS n",
        )
        .unwrap();
        assert_eq!(pull("acme", 0, 10)["changes"].as_array().unwrap().len(), 2);
        assert_eq!(pull("globex", 0, 10)["changes"].as_array().unwrap().len(), 2);
        Spi::run(&format!("UPDATE todos SET id = '7f1e8c3a-0000-4000-8000-000000000009' WHERE id = '{TODO_1}'")).unwrap();
        let moved = pull("acme", 2, 10);
        let ops: Vec<(String, String)> =
            moved["changes"].as_array().unwrap().iter().map(|c| (c["op"].as_str().unwrap().into(), c["pk"].as_str().unwrap().into())).collect();
        assert_eq!(ops, [("insert".to_owned(), "7f1e8c3a-0000-4000-8000-000000000009".to_owned()), ("delete".to_owned(), TODO_1.to_owned())]);
        Spi::run("UPDATE todos SET title = title").unwrap();
        assert_eq!(pull("acme", 4, 10)["changes"].as_array().unwrap().len(), 0, "an update that changes nothing logs nothing");
        assert!(error_of("TRUNCATE todos").starts_with("55000: table todos is synced by sync_ext"));
        Spi::run(r#"COPY todos (id, tenant_id, title) FROM PROGRAM 'printf "7f1e8c3a-0000-4000-8000-000000000008\tacme\tcopied\n"'"#).unwrap();
        let copied = pull("acme", 4, 10);
        assert_eq!((copied["changes"][0]["op"].clone(), copied["changes"][0]["value"]["title"].clone()), (json!("insert"), json!("copied")));
    }

    #[pg_test]
    fn rows_present_at_registration_are_offered_to_new_clients() {
        Spi::run(
            "CREATE TABLE notes (list int, pos int, body text, PRIMARY KEY (list, pos));
             INSERT INTO notes VALUES (1, 1, 'first'), (1, 2, 'second');
             SELECT sync_register_model('note', 'notes', tenant => 'acme');",
        )
        .unwrap();
        let pulled = pull("acme", 0, 10);
        let pks: Vec<&str> = pulled["changes"].as_array().unwrap().iter().map(|c| c["pk"].as_str().unwrap()).collect();
        assert_eq!(pks, ["[1,1]", "[1,2]"]);
        assert_eq!(pulled["changes"][0]["value"], json!({"list": 1, "pos": 1, "body": "first"}));
        let mut update = change(1, "[1,2]", "update", json!({"body": "edited"}));
        update["model"] = json!("note");
        update["hlc"] = json!("2999-01-01T00:00:00.000Z-0000");
        assert_eq!(statuses(&push("acme", json!([update.clone()]))), ["rejected"], "clock skew");
        update["hlc"] = json!(sync_ext_protocol::Hlc::new(sync_ext_protocol::hlc::wall_clock_millis(), 9).unwrap().to_string());
        assert_eq!(statuses(&push("acme", json!([update.clone()]))), ["applied"]);
        assert_eq!(text("SELECT body FROM notes WHERE list = 1 AND pos = 2").as_deref(), Some("edited"));
        update["op_id"] = json!("00000000-0000-4000-8000-000000000077");
        assert!(push("globex", json!([update]))["results"][0]["reason"].as_str().unwrap().starts_with("wrong_tenant: model note belongs to another tenant"));
    }

    #[pg_test]
    fn registration_checks_the_table_and_its_arguments() {
        Spi::run(
            "CREATE TABLE places (id int PRIMARY KEY, tenant_id text, at point);
             CREATE TABLE keyless (id int, tenant_id text);
             CREATE TABLE good (id int PRIMARY KEY, tenant_id text, n int);",
        )
        .unwrap();
        assert_eq!(
            error_of("SELECT sync_register_model('place', 'places', tenant_column => 'tenant_id')"),
            "0A000: column \"at\" has type point, which has no portable JSON form"
        );
        assert!(error_of("SELECT sync_register_model('k', 'keyless', tenant_column => 'tenant_id')").starts_with("22023: tbl: keyless has no primary key"));
        assert!(error_of("SELECT sync_register_model('g', 'good')").starts_with("22023: tenant_column: give exactly one of"));
        assert!(error_of("SELECT sync_register_model('g', 'good', 'tenant_id', 'acme')").starts_with("22023: tenant_column: give exactly one of"));
        assert_eq!(error_of("SELECT sync_register_model('g', 'good', 'nope')"), "22023: tenant_column: good has no column \"nope\"");
        assert_eq!(error_of("SELECT sync_register_model('g', 'good', 'n')"), "22023: tenant_column: column \"n\" must hold text (text or varchar)");
        Spi::run("SELECT sync_register_model('g', 'good', 'tenant_id')").unwrap();
        assert_eq!(error_of("SELECT sync_register_model('g', 'good', 'tenant_id')"), "42710: model g or table good is registered already");
        Spi::run("SELECT sync_unregister_model('g')").unwrap();
        Spi::run("INSERT INTO good VALUES (1, 'acme', 1)").unwrap();
        assert_eq!(pull("acme", 0, 10)["changes"].as_array().unwrap().len(), 0, "unregistered: no longer captured");
        assert_eq!(error_of("SELECT sync_unregister_model('g')"), "42704: no model g is registered");
    }
}
