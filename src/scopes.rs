//! Partial sync on the server: scope definitions (kept per backend), their definition and removal, and
//! the scope index rebuilt from the current rows when definitions change.
//!
//! The index is kept on every write by the push path (see [`crate::storage::write_batch`]):
//! - `sync_ext.scope_log`: one row per log entry and instance its row was in before or after the change
//!   (tenant-wide models under the instance `''`), which scoped pulls read in seq order;
//! - `sync_ext.snapshots.instances`: the instances of each row of a scoped model, which the next change of
//!   the row starts from;
//! - `sync_ext.scope_digests`: the digest of each instance's visible rows.
//!
//! While no scope is defined none of it is written. Defining or dropping a scope rebuilds all three from
//! the current rows of every tenant, under a lock that makes pushes wait (pulls go on), and raises every
//! tenant's `scope_horizon` to its last seq: scoped cursors from before are answered with a reset.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use serde_json::Value;
use sync_ext_protocol::change::validate_name;
use sync_ext_protocol::digest::row_digest;
use sync_ext_protocol::scope::{Instances, ScopeDefinition, Scopes, TENANT_WIDE};

use crate::errors::{SyncError, SyncResult};
use crate::identity::as_engine;
use crate::jsonb::JsonbDatum;

thread_local! {
    /// The definitions, with the invalidation generation they were read in.
    static KEPT: RefCell<Option<(u64, Rc<Scopes>)>> = const { RefCell::new(None) };
}

/// The database's scope definitions, kept per backend until `sync_ext.scopes` changes (see [`crate::kept`]).
pub fn definitions(client: &SpiClient<'_>) -> SyncResult<Rc<Scopes>> {
    let generation = crate::kept::generation();
    let kept = KEPT.with_borrow(|kept| kept.as_ref().filter(|(kept_in, _)| *kept_in == generation).map(|(_, scopes)| scopes.clone()));
    if let Some(kept) = kept {
        return Ok(kept);
    }
    crate::kept::watch_sync_table(c"scopes");
    let generation = crate::kept::generation();
    let scopes = Rc::new(read(client)?);
    if crate::kept::generation() == generation {
        KEPT.set(Some((generation, scopes.clone())));
    }
    Ok(scopes)
}

/// Reads the definitions as this transaction sees them.
fn read(client: &SpiClient<'_>) -> SyncResult<Scopes> {
    let rows = crate::plans::select(client, "SELECT scope, model, field FROM sync_ext.scopes", None, &[])?;
    let mut definitions = Vec::new();
    for row in rows {
        definitions.push(ScopeDefinition {
            scope: row.get(1)?.unwrap_or_default(),
            model: row.get(2)?.unwrap_or_default(),
            field: row.get(3)?.unwrap_or_default(),
        });
    }
    Ok(Scopes::new(definitions))
}

/// Puts the rows of `model` in the instances `<scope>:<value of field>` (redefines the scope's field if
/// it is defined for the model already). Rebuilds the scope index of every tenant. The owner's.
#[pg_extern(volatile, parallel_unsafe)]
fn sync_define_scope(scope: &str, model: &str, field: &str) -> Result<(), pgrx::pg_sys::panic::ErrorReport> {
    Ok(define(scope, model, field)?)
}

/// Removes the scope definition `scope` of `model`. Rebuilds the scope index of every tenant. The owner's.
#[pg_extern(volatile, parallel_unsafe)]
fn sync_drop_scope(scope: &str, model: &str) -> Result<(), pgrx::pg_sys::panic::ErrorReport> {
    Ok(drop_definition(scope, model)?)
}

fn define(scope: &str, model: &str, field: &str) -> SyncResult<()> {
    validate_name("scope", scope)?;
    if scope.contains(':') {
        return Err(SyncError::InvalidArgument { argument: "scope", problem: format!("must not contain ':' (instances are <scope>:<value>), got {scope:?}") });
    }
    validate_name("model", model)?;
    validate_name("field", field)?;
    crate::storage::require_primary("sync_define_scope")?;
    // As the caller: only the owner (or a superuser) may write the definitions.
    let changed = Spi::connect_mut(|client| {
        if let Some(bound) = crate::models::Model::load_named(client, &[model])?.remove(model) {
            if !bound.syncs(field) {
                return Err(SyncError::InvalidArgument {
                    argument: "field",
                    problem: format!("model {model} is bound to a table and syncs no column {field:?}, so no row would be in a {scope} instance"),
                });
            }
        }
        // `excluded.defined_at` is the column's default: Citus refuses functions in DO UPDATE on its tables.
        let written = client.update(
            "INSERT INTO sync_ext.scopes AS s (scope, model, field) VALUES ($1, $2, $3)
             ON CONFLICT (scope, model) DO UPDATE SET field = excluded.field, defined_at = excluded.defined_at
              WHERE s.field OPERATOR(pg_catalog.<>) excluded.field
             RETURNING 1",
            None,
            &[scope.into(), model.into(), field.into()],
        )?;
        Ok::<_, SyncError>(!written.is_empty())
    })?;
    if changed {
        rebuild_index()?;
    }
    Ok(())
}

fn drop_definition(scope: &str, model: &str) -> SyncResult<()> {
    crate::storage::require_primary("sync_drop_scope")?;
    let removed = Spi::connect_mut(|client| {
        let removed = client.update(
            "DELETE FROM sync_ext.scopes AS s WHERE s.scope OPERATOR(pg_catalog.=) $1 AND s.model OPERATOR(pg_catalog.=) $2 RETURNING 1",
            None,
            &[scope.into(), model.into()],
        )?;
        Ok::<_, SyncError>(!removed.is_empty())
    })?;
    if !removed {
        return Err(SyncError::UnknownScope { scope: scope.to_owned(), model: model.to_owned() });
    }
    rebuild_index()
}

/// Rebuilds the scope index of every tenant from its current rows, pushes waiting (see the module docs).
fn rebuild_index() -> SyncResult<()> {
    as_engine(|_| {
        Spi::connect_mut(|client| {
            client.update("LOCK TABLE sync_ext.tenants IN EXCLUSIVE MODE", None, &[])?;
            let scopes = read(client)?;
            let tenants = client.select("SELECT tenant_id FROM sync_ext.tenants", None, &[])?;
            let tenants: Vec<String> = tenants.into_iter().map(|row| row.get::<String>(1)).collect::<Result<Vec<_>, _>>()?.into_iter().flatten().collect();
            for tenant in &tenants {
                rebuild_tenant(client, tenant, &scopes)?;
            }
            client.update("UPDATE sync_ext.tenants SET scope_horizon = last_seq", None, &[])?;
            Ok(())
        })
    })
}

/// The scope index of one tenant, computed from its rows.
#[derive(Default)]
struct TenantIndex {
    /// The rows of scoped models.
    scoped_models: Vec<String>,
    scoped_ids: Vec<String>,
    /// `(model, id, instance)` for each instance of each row of a scoped model.
    member_models: Vec<String>,
    member_ids: Vec<String>,
    member_instances: Vec<String>,
    /// The index entries: each row's current seq under each instance it is in.
    entry_instances: Vec<String>,
    entry_seqs: Vec<i64>,
    digests: BTreeMap<String, u64>,
}

fn rebuild_tenant(client: &mut SpiClient<'_>, tenant: &str, scopes: &Scopes) -> SyncResult<()> {
    let rows = client.select(
        "SELECT model, id, value, deleted, instances, seq FROM sync_ext.snapshots WHERE tenant_id = $1",
        None,
        &[tenant.into()],
    )?;
    let mut index = TenantIndex::default();
    for row in rows {
        let model: String = row.get(1)?.unwrap_or_default();
        let id: String = row.get(2)?.unwrap_or_default();
        let deleted: bool = row.get(4)?.unwrap_or(false);
        let seq: i64 = row.get(6)?.unwrap_or_default();
        let value = match row.get::<JsonbDatum>(3)?.map(|datum| datum.value()).transpose() {
            Ok(Some(Value::Object(value))) => value,
            _ => return Err(SyncError::CorruptSnapshot { model, id, problem: "value: is not an object".into() }),
        };
        let scoped = scopes.is_scoped(&model);
        let instances: Instances = if scoped && deleted {
            // A tombstone stays in the instances of the scopes still defined for its model.
            let stored: Vec<String> = row.get(5)?.unwrap_or_default();
            stored.into_iter().filter(|instance| scopes.defines(&model, instance)).collect()
        } else {
            scopes.instances(&model, &value)
        };
        let digest = if deleted { 0 } else { row_digest(&model, &id, &value) };
        for instance in instances {
            if scoped {
                index.member_models.push(model.clone());
                index.member_ids.push(id.clone());
                index.member_instances.push(instance.clone());
            }
            let sum = index.digests.entry(instance.clone()).or_default();
            *sum = sum.wrapping_add(digest);
            index.entry_instances.push(instance);
            index.entry_seqs.push(seq);
        }
        if scoped {
            index.scoped_models.push(model);
            index.scoped_ids.push(id);
        }
    }
    if !scopes.is_empty() {
        index.digests.entry(TENANT_WIDE.to_owned()).or_default();
    }
    write_index(client, tenant, index)
}

fn write_index(client: &mut SpiClient<'_>, tenant: &str, index: TenantIndex) -> SyncResult<()> {
    let TenantIndex { scoped_models, scoped_ids, member_models, member_ids, member_instances, entry_instances, entry_seqs, digests } = index;
    client.update(
        "UPDATE sync_ext.snapshots AS s SET instances = n.instances
           FROM (SELECT m.model, m.id, g.instances
                   FROM unnest($2::text[], $3::text[]) AS m(model, id)
                   LEFT JOIN (SELECT p.model, p.id, array_agg(p.instance ORDER BY p.instance COLLATE \"C\") AS instances
                                FROM unnest($4::text[], $5::text[], $6::text[]) AS p(model, id, instance)
                               GROUP BY p.model, p.id) AS g ON g.model = m.model AND g.id = m.id) AS n
          WHERE s.tenant_id = $1 AND s.model = n.model AND s.id = n.id AND s.instances IS DISTINCT FROM n.instances",
        None,
        &[tenant.into(), scoped_models.clone().into(), scoped_ids.into(), member_models.into(), member_ids.into(), member_instances.into()],
    )?;
    // Rows of models no longer scoped lose their instances.
    client.update(
        "UPDATE sync_ext.snapshots AS s SET instances = NULL
          WHERE s.tenant_id = $1 AND s.instances IS NOT NULL AND s.model <> ALL ($2::text[])",
        None,
        &[tenant.into(), scoped_models.into()],
    )?;
    client.update("DELETE FROM sync_ext.scope_log WHERE tenant_id = $1", None, &[tenant.into()])?;
    client.update(
        "INSERT INTO sync_ext.scope_log (tenant_id, instance, seq, before, after)
         SELECT $1, instance, seq, true, true FROM unnest($2::text[], $3::bigint[]) AS e(instance, seq)",
        None,
        &[tenant.into(), entry_instances.into(), entry_seqs.into()],
    )?;
    client.update("DELETE FROM sync_ext.scope_digests WHERE tenant_id = $1", None, &[tenant.into()])?;
    // The digest travels as the bits of a u64 in a bigint.
    let (names, sums): (Vec<String>, Vec<i64>) = digests.into_iter().map(|(instance, digest)| (instance, digest as i64)).unzip();
    client.update(
        "INSERT INTO sync_ext.scope_digests (tenant_id, instance, digest)
         SELECT $1, instance, digest FROM unnest($2::text[], $3::bigint[]) AS d(instance, digest)",
        None,
        &[tenant.into(), names.into(), sums.into()],
    )?;
    Ok(())
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use std::collections::BTreeMap;

    use pgrx::prelude::*;
    use serde_json::{json, Map, Value};
    use sync_ext_protocol::digest::row_digest;
    use sync_ext_protocol::scope::{ScopeDefinition, Scopes};
    use sync_ext_protocol::{PullResponse, RowState};

    use crate::testing::{change, error_of, pull, pull_scoped, push, statuses};

    /// A change to a task (scoped by project and owner); `label` changes stay tenant-wide.
    fn task(n: u32, pk: &str, op: &str, hlc: &str, actor: &str, value: Value) -> Value {
        let mut change = change(n, pk, op, hlc, actor, value);
        change["model"] = json!("task");
        change
    }

    fn define_workspace_scopes() {
        Spi::run("SELECT sync_define_scope('project', 'task', 'project_id'); SELECT sync_define_scope('owner', 'task', 'owner')").unwrap();
    }

    /// What a device holds: rows by (model, pk).
    #[derive(Default)]
    struct Device {
        rows: BTreeMap<(String, String), RowState>,
        cursor: i64,
    }

    impl Device {
        /// Pulls `scopes` to the end, applying every page as a client must.
        fn sync(&mut self, tenant: &str, scopes: &[&str], page: i32) -> Vec<PullResponse> {
            let mut pages = Vec::new();
            loop {
                let response: PullResponse = serde_json::from_value(pull_scoped(tenant, self.cursor, page, scopes)).unwrap();
                if response.reset && self.cursor >= 0 {
                    self.rows.clear();
                }
                for pulled in &response.changes {
                    let key = (pulled.model.clone(), pulled.pk.clone());
                    if let Some(state) = pulled.apply_to(self.rows.remove(&key)).unwrap() {
                        self.rows.insert(key, state);
                    }
                }
                self.cursor = response.cursor;
                let more = response.has_more;
                pages.push(response);
                if !more {
                    return pages;
                }
            }
        }

        fn visible(&self) -> BTreeMap<String, Map<String, Value>> {
            self.rows.iter().filter_map(|((model, pk), row)| Some((format!("{model}/{pk}"), row.visible()?))).collect()
        }
    }

    /// The server's visible rows in `scopes` or of tenant-wide models, by the protocol's rule.
    fn server_rows_in(tenant: &str, scopes: &[&str]) -> BTreeMap<String, Map<String, Value>> {
        let definitions: Vec<ScopeDefinition> = serde_json::from_value(Spi::get_one::<pgrx::JsonB>("SELECT sync_scopes()").unwrap().unwrap().0).unwrap();
        let rule = Scopes::new(definitions);
        let rows = Spi::get_one_with_args::<pgrx::JsonB>(
            "SELECT coalesce(jsonb_agg(jsonb_build_array(model, id, value)), '[]') FROM sync_ext.snapshots WHERE tenant_id = $1 AND NOT deleted",
            &[tenant.into()],
        )
        .unwrap()
        .unwrap()
        .0;
        let mut held = BTreeMap::new();
        for row in rows.as_array().unwrap() {
            let (model, id, value) = (row[0].as_str().unwrap(), row[1].as_str().unwrap(), row[2].as_object().unwrap().clone());
            let instances = rule.instances(model, &value);
            if instances.iter().any(|instance| instance.is_empty() || scopes.contains(&instance.as_str())) {
                held.insert(format!("{model}/{id}"), value);
            }
        }
        held
    }

    fn ops(page: &Value) -> Vec<(String, String)> {
        page["changes"].as_array().unwrap().iter().map(|c| (c["pk"].as_str().unwrap().to_owned(), c["op"].as_str().unwrap().to_owned())).collect()
    }

    #[pg_test]
    fn fields_and_values_with_quotes_spaces_colons_and_unicode_place_rows_like_any_other() {
        Spi::run(
            "CREATE TABLE teams (id int PRIMARY KEY, tenant_id text NOT NULL, \"Team \"\"Name\"\"\" text);
             SELECT sync_register_model('team', 'teams', tenant_column => 'tenant_id');
             SELECT sync_define_scope('team', 'team', 'Team \"Name\"');
             SELECT sync_define_scope('proj', 'task', 'Pro\"jekt Nr ü');",
        )
        .unwrap();
        push("t", json!([task(1, "1", "insert", "00.000", "a", json!({"Pro\"jekt Nr ü": "a:b \"c\"", "title": "quoted"}))]));
        Spi::run("INSERT INTO teams VALUES (1, 't', 'x y'), (2, 't', 'élan')").unwrap();
        let first = pull_scoped("t", 0, 100, &["proj:a:b \"c\"", "team:x y"]);
        let mut held: Vec<(String, String)> = first["changes"].as_array().unwrap().iter().map(|c| (c["model"].as_str().unwrap().into(), c["pk"].as_str().unwrap().into())).collect();
        held.sort();
        assert_eq!(held, [("task".to_owned(), "1".to_owned()), ("team".to_owned(), "1".to_owned())], "{first}");
        Spi::run("UPDATE teams SET \"Team \"\"Name\"\"\" = 'élan' WHERE id = 1").unwrap();
        let moved = pull_scoped("t", first["cursor"].as_i64().unwrap(), 100, &["team:x y"]);
        assert_eq!(ops(&moved), [("1".to_owned(), "leave".to_owned())], "the row left team:x y");
        let joined = pull_scoped("t", first["cursor"].as_i64().unwrap(), 100, &["team:élan"]);
        assert_eq!(ops(&joined), [("1".to_owned(), "insert".to_owned())], "and moved into team:élan whole");
        assert_eq!(joined["changes"][0]["value"]["Team \"Name\""], "élan");
    }

    #[pg_test]
    fn rows_are_in_the_instances_of_their_fields_and_tenant_wide_models_in_every_pull() {
        define_workspace_scopes();
        let mut label = change(9, "l1", "insert", "00.000", "a", json!({"name": "urgent"}));
        label["model"] = json!("label");
        push("t", json!([
            task(1, "1", "insert", "00.000", "a", json!({"project_id": 1, "owner": "ann", "title": "one"})),
            task(2, "2", "insert", "00.000", "a", json!({"project_id": 2, "owner": "bob", "title": "two"})),
            task(3, "3", "insert", "00.000", "a", json!({"project_id": null, "owner": "ann", "title": "draft"})),
            label,
        ]));
        let mut device = Device::default();
        device.sync("t", &["project:1"], 100);
        assert_eq!(device.visible().keys().collect::<Vec<_>>(), ["label/l1", "task/1"]);
        let mut ann = Device::default();
        ann.sync("t", &["owner:ann"], 100);
        assert_eq!(ann.visible().keys().collect::<Vec<_>>(), ["label/l1", "task/1", "task/3"], "one row in two instances of two definitions");
        assert_eq!(ann.visible(), server_rows_in("t", &["owner:ann"]));
        let everything = pull("t", 0, 100);
        assert_eq!(everything["changes"].as_array().unwrap().len(), 4, "an unscoped pull is the whole tenant, as before");
        assert!(everything.get("digests").is_none());
    }

    #[pg_test]
    fn a_row_moving_in_arrives_whole_moving_out_leaves_and_between_held_instances_is_an_update() {
        define_workspace_scopes();
        push("t", json!([task(1, "1", "insert", "00.000", "a", json!({"project_id": 2, "title": "plan", "note": "written before the move"}))]));
        let (mut one, mut two, mut both) = (Device::default(), Device::default(), Device::default());
        one.sync("t", &["project:1"], 100);
        two.sync("t", &["project:2"], 100);
        both.sync("t", &["project:1", "project:2"], 100);
        let before = one.cursor;
        push("t", json!([task(2, "1", "update", "01.000", "b", json!({"project_id": 1}))]));
        let moved_in = pull_scoped("t", before, 100, &["project:1"]);
        assert_eq!(ops(&moved_in), [("1".to_owned(), "insert".to_owned())]);
        assert_eq!(moved_in["changes"][0]["value"], json!({"project_id": 1, "title": "plan", "note": "written before the move"}), "the whole row");
        assert!(moved_in["changes"][0]["field_stamps"].is_object(), "with its merge registers");
        assert_eq!(ops(&pull_scoped("t", before, 100, &["project:2"])), [("1".to_owned(), "leave".to_owned())]);
        let moved_between = pull_scoped("t", before, 100, &["project:1", "project:2"]);
        assert_eq!(moved_between["changes"][0]["op"], "update");
        assert_eq!(moved_between["changes"][0]["value"], json!({"project_id": 1}), "what the change won, as any update");
        for (device, scopes) in [(&mut one, &["project:1"][..]), (&mut two, &["project:2"][..]), (&mut both, &["project:1", "project:2"][..])] {
            device.sync("t", scopes, 100);
            assert_eq!(device.visible(), server_rows_in("t", scopes), "{scopes:?}");
        }
        // A later edit of a field written before the move merges on the moved-in copy exactly.
        push("t", json!([task(3, "1", "update", "00.500", "c", json!({"note": "older than the move, newer than the note"}))]));
        one.sync("t", &["project:1"], 100);
        assert_eq!(one.visible(), server_rows_in("t", &["project:1"]));
    }

    #[pg_test]
    fn a_delete_in_a_scope_reaches_its_devices_and_a_quiet_device_still_advances() {
        define_workspace_scopes();
        push("t", json!([task(1, "1", "insert", "00.000", "a", json!({"project_id": 1})), task(2, "2", "insert", "00.000", "a", json!({"project_id": 2}))]));
        let mut one = Device::default();
        one.sync("t", &["project:1"], 100);
        let cursor = one.cursor;
        push("t", json!([task(3, "2", "update", "01.000", "a", json!({"title": "busy elsewhere"}))]));
        let quiet = pull_scoped("t", cursor, 100, &["project:1"]);
        assert_eq!((quiet["changes"].clone(), quiet["cursor"].clone()), (json!([]), json!(3)), "the cursor moves to the tenant's last seq");
        let idle = pull_scoped("t", 3, 100, &["project:1"]);
        assert_eq!(idle, json!({"changes": [], "cursor": 3, "has_more": false, "digests": quiet["digests"]}), "from the last seq: the same page, digests too");
        assert!(quiet["digests"]["project:1"].as_str().is_some_and(|digest| digest != "0000000000000000"));
        push("t", json!([task(4, "1", "delete", "02.000", "a", Value::Null)]));
        let deleted = pull_scoped("t", 3, 100, &["project:1"]);
        assert_eq!(ops(&deleted), [("1".to_owned(), "delete".to_owned())], "a delete, not a leave");
        one.sync("t", &["project:1"], 100);
        assert!(one.visible().is_empty());
    }

    #[pg_test]
    fn ties_on_the_scope_field_place_the_row_where_the_merge_does_in_either_order() {
        define_workspace_scopes();
        let to_one = task(1, "1", "insert", "00.000", "device-a", json!({"project_id": 1}));
        let to_two = task(2, "1", "insert", "00.000", "device-b", json!({"project_id": 2}));
        push("x", json!([to_one.clone()]));
        push("x", json!([to_two.clone()]));
        push("y", json!([to_two]));
        push("y", json!([to_one]));
        for tenant in ["x", "y"] {
            let (mut one, mut two) = (Device::default(), Device::default());
            one.sync(tenant, &["project:1"], 100);
            two.sync(tenant, &["project:2"], 100);
            assert!(one.visible().is_empty(), "{tenant}: the greater actor wins the field");
            assert_eq!(two.visible().keys().collect::<Vec<_>>(), ["task/1"], "{tenant}");
        }
    }

    #[pg_test]
    fn resets_are_per_scope_after_compaction_and_after_scopes_change() {
        push("t", json!([task(1, "1", "insert", "00.000", "a", json!({"project_id": 1})), task(2, "2", "insert", "00.000", "a", json!({"project_id": 2}))]));
        let unscoped_before = pull("t", 1, 100);
        define_workspace_scopes();
        assert_eq!(pull("t", 1, 100), unscoped_before, "defining scopes changes nothing for unscoped devices");
        let after_definition = pull_scoped("t", 1, 100, &["project:1"]);
        assert_eq!(after_definition["reset"], true, "a scoped cursor from before the definition is reset");
        assert_eq!(ops(&after_definition), [("1".to_owned(), "insert".to_owned())]);
        let mut one = Device::default();
        one.sync("t", &["project:1"], 1);
        let behind = one.cursor;
        for n in 0..5 {
            push("t", json!([task(10 + n, "2", "update", &format!("0{}.000", n + 1), "a", json!({"n": n}))]));
        }
        Spi::run("SELECT sync_compact('t', '0 seconds')").unwrap();
        let reset = pull_scoped("t", behind, 100, &["project:1"]);
        assert_eq!((reset["reset"].clone(), ops(&reset)), (json!(true), vec![("1".to_owned(), "insert".to_owned())]), "only the scope's rows");
        assert_eq!(pull_scoped("t", 0, 100, &["project:2"])["changes"].as_array().unwrap().len(), 1, "a scoped pull from 0 is the current rows");
        let remaining = Spi::get_one::<i64>("SELECT count(*) FROM sync_ext.scope_log l WHERE NOT EXISTS (SELECT FROM sync_ext.op_log o WHERE o.tenant_id = l.tenant_id AND o.seq = l.seq)").unwrap();
        assert_eq!(remaining, Some(0), "compaction removes the index entries of the entries it removes");
        let mut paged = Device::default();
        paged.sync("t", &["project:1", "project:2"], 1);
        assert_eq!(paged.visible(), server_rows_in("t", &["project:1", "project:2"]), "reset pages of one row each");
    }

    #[pg_test]
    fn a_row_sent_early_in_a_reset_that_leaves_and_changes_again_before_the_reset_ends_leaves_the_device() {
        define_workspace_scopes();
        push("t", json!([task(1, "1", "insert", "00.000", "a", json!({"project_id": 1})), task(2, "2", "insert", "00.000", "a", json!({"project_id": 1}))]));
        let mut device = Device::default();
        let first = pull_scoped("t", 0, 1, &["project:1"]);
        assert_eq!((first["reset"].clone(), ops(&first)), (json!(true), vec![("1".to_owned(), "insert".to_owned())]));
        let page: PullResponse = serde_json::from_value(first).unwrap();
        let held = page.changes[0].apply_to(None).unwrap().unwrap();
        device.rows.insert(("task".into(), "1".into()), held);
        device.cursor = page.cursor;
        // While the reset is paged, the row sent moves out, then changes again where the device cannot see it.
        push("t", json!([task(3, "1", "update", "01.000", "a", json!({"project_id": 2})), task(4, "1", "update", "02.000", "a", json!({"title": "elsewhere"}))]));
        device.sync("t", &["project:1"], 1);
        assert_eq!(device.visible(), server_rows_in("t", &["project:1"]), "the row that left is gone, the other one arrived");
        assert_eq!(device.visible().keys().collect::<Vec<_>>(), ["task/2"]);
    }

    #[pg_test]
    fn each_instance_has_a_digest_kept_on_every_write() {
        define_workspace_scopes();
        push("t", json!([
            task(1, "1", "insert", "00.000", "a", json!({"project_id": 1, "owner": "ann"})),
            task(2, "2", "insert", "00.000", "a", json!({"project_id": 1})),
        ]));
        push("t", json!([task(3, "2", "update", "01.000", "a", json!({"project_id": 2})), task(4, "1", "delete", "01.000", "a", Value::Null)]));
        push("t", json!([task(5, "3", "insert", "02.000", "a", json!({"project_id": 2, "owner": "ann"}))]));
        let page = pull_scoped("t", 0, 100, &["project:1", "project:2", "owner:ann"]);
        let digests = page["digests"].as_object().unwrap();
        for instance in ["project:1", "project:2", "owner:ann", ""] {
            let rows = server_rows_in_instance("t", instance);
            let expected = rows.iter().fold(0u64, |sum, (pk, value)| sum.wrapping_add(row_digest("task", pk, value)));
            assert_eq!(digests[instance], format!("{expected:016x}"), "{instance}");
        }
        assert_eq!(digests["project:1"], "0000000000000000", "project 1 is empty now");
        Spi::run("SELECT sync_drop_scope('owner', 'task'); SELECT sync_define_scope('owner', 'task', 'owner')").unwrap();
        assert_eq!(pull_scoped("t", 0, 100, &["project:1", "project:2", "owner:ann"])["digests"], page["digests"], "a rebuild computes the same");
    }

    /// The visible tasks of one instance, by pk.
    fn server_rows_in_instance(tenant: &str, instance: &str) -> BTreeMap<String, Map<String, Value>> {
        if instance.is_empty() {
            return BTreeMap::new();
        }
        server_rows_in(tenant, &[instance]).into_iter().filter_map(|(key, value)| Some((key.strip_prefix("task/")?.to_owned(), value))).collect()
    }

    #[pg_test]
    fn a_role_granted_scopes_pulls_only_them_and_writes_only_inside_them() {
        define_workspace_scopes();
        push("t", json!([task(1, "1", "insert", "00.000", "admin", json!({"project_id": 1})), task(2, "2", "insert", "00.000", "admin", json!({"project_id": 2}))]));
        Spi::run("CREATE ROLE field_worker NOLOGIN; SELECT sync_grant_scope('field_worker', 't', 'project:1')").unwrap();
        let as_worker = |sql: &str| error_of(&format!("SET LOCAL ROLE field_worker; {sql}; RESET ROLE"));
        assert_eq!(
            as_worker("SELECT sync_pull('t', 0)"),
            "42501: permission denied for tenant t: role field_worker may pull only the scope instances granted to it: pass scopes (see sync_grant_scope)"
        );
        assert_eq!(
            as_worker("SELECT sync_pull('t', 0, 100, ARRAY['project:1', 'project:2'])"),
            "42501: permission denied for scope instance project:2 of tenant t: role field_worker has no grant for it (see sync_grant_scope)"
        );
        assert_eq!(as_worker("SELECT sync_pull_msgpack('t', 0, 100, ARRAY['project:1'])"), "no error");
        assert!(as_worker("SELECT sync_compact('t')").starts_with("42501"));
        assert_eq!(as_worker("SELECT count(*) FROM sync_ext.op_log"), "42501: permission denied for table op_log");
        assert!(as_worker("SELECT sync_define_scope('x', 'task', 'x')").starts_with("42501: permission denied for function"));
        let mut label = change(9, "l", "insert", "05.000", "phone", json!({"name": "tenant-wide"}));
        label["model"] = json!("label");
        let batch = json!([
            task(3, "1", "update", "05.000", "phone", json!({"title": "inside"})),
            task(4, "2", "update", "05.000", "phone", json!({"title": "outside"})),
            task(5, "1", "update", "05.500", "phone", json!({"project_id": 2})),
            task(6, "new", "insert", "05.000", "phone", json!({"project_id": 2})),
            task(7, "mine", "insert", "05.000", "phone", json!({"project_id": 1})),
            label,
        ]);
        Spi::run("SET LOCAL ROLE field_worker").unwrap();
        let response = crate::testing::push("t", batch);
        Spi::run("RESET ROLE").unwrap();
        assert_eq!(statuses(&response), ["applied", "rejected", "rejected", "rejected", "applied", "applied"]);
        assert_eq!(response["results"][1]["reason"], "out_of_scope");
        assert_eq!(response["results"][2]["reason"], "out_of_scope", "a row cannot be moved out of the granted instances");
        assert_eq!(response["results"][3]["reason"], "out_of_scope", "nor written into an ungranted one");
        Spi::run("SELECT sync_revoke_scope('field_worker', 't', 'project:1')").unwrap();
        assert!(as_worker("SELECT sync_pull('t', 0, 100, ARRAY['project:1'])").starts_with("42501: permission denied for tenant t"));
    }

    #[pg_test]
    fn the_jwt_scopes_claim_narrows_what_a_request_reaches() {
        define_workspace_scopes();
        Spi::run("CREATE ROLE web_user NOLOGIN; SELECT sync_grant_tenant('web_user', 't'); SELECT sync_configure('jwt_scopes_claim', 'scopes')").unwrap();
        Spi::run(r#"SET LOCAL request.jwt.claims = '{"scopes": ["project:1"]}'"#).unwrap();
        let as_web = |sql: &str| error_of(&format!("SET LOCAL ROLE web_user; {sql}; RESET ROLE"));
        assert_eq!(as_web("SELECT sync_pull('t', 0, 100, ARRAY['project:1'])"), "no error");
        assert!(as_web("SELECT sync_pull('t', 0, 100, ARRAY['project:2'])").starts_with("42501: permission denied for scope instance project:2"));
        assert!(as_web("SELECT sync_pull('t', 0)").starts_with("42501"), "a tenant grant is narrowed too");
        Spi::run("SET LOCAL request.jwt.claims = '{}'").unwrap();
        assert!(as_web("SELECT sync_pull('t', 0, 100, ARRAY['project:1'])").starts_with("42501"), "no claim, no instance");
    }

    #[pg_test]
    fn bad_scope_arguments_are_errors_naming_the_argument() {
        assert_eq!(error_of("SELECT sync_pull('t', 0, 100, ARRAY['project:1', 'project'])"), "22023: scopes[1]: expected <scope>:<value>, got \"project\"");
        assert!(error_of("SELECT sync_pull('t', 0, 100, array_fill('a:1'::text, ARRAY[1001]))").starts_with("22023: scopes: lists 1001 instances, the limit is 1000"));
        assert_eq!(error_of("SELECT sync_define_scope('a:b', 'task', 'x')"), "22023: scope: must not contain ':' (instances are <scope>:<value>), got \"a:b\"");
        assert_eq!(error_of("SELECT sync_define_scope('a', '', 'x')"), "22023: model: must not be empty");
        assert_eq!(error_of("SELECT sync_drop_scope('a', 'task')"), "42704: no scope a is defined for model task");
        assert_eq!(error_of("SELECT sync_grant_scope('postgres', 't', 'nothing')"), "22023: instance: expected <scope>:<value>, got nothing");
        Spi::run(
            "CREATE TABLE tasks (id int PRIMARY KEY, tenant_id text NOT NULL, project int, cost int);
             SELECT sync_register_model('task', 'tasks', tenant_column => 'tenant_id', columns => ARRAY['project'])",
        )
        .unwrap();
        for (field, problem) in [("cost", "\"cost\""), ("tenant_id", "\"tenant_id\""), ("colour", "\"colour\"")] {
            assert_eq!(
                error_of(&format!("SELECT sync_define_scope('p', 'task', '{field}')")),
                format!("22023: field: model task is bound to a table and syncs no column {problem}, so no row would be in a p instance")
            );
        }
        Spi::run("SELECT sync_define_scope('p', 'task', 'project')").unwrap();
        assert_eq!(pull_scoped("t", 0, 100, &["project:1"])["digests"], json!({"": "0000000000000000", "project:1": "0000000000000000"}), "without definitions every model is tenant-wide");
    }
}
