//! Attacks by a device that holds a legitimate grant: `mallory`, a LOGIN member of `acme_devices`, set up
//! exactly as the README tells an operator to (sync_grant_tenant, table privileges on bound tables), and
//! keeping the defaults an operator may forget (TEMP on the database, a schema of its own). Another tenant,
//! `globex`, holds data mallory must never see nor alter.
//!
//! Escalation payloads only record that they ran, in `public.attack_log(who, superuser, what)`: the engine
//! must never run caller-controlled code with rights other than the caller's. Refusals must be errors with
//! the contract's SQLSTATE, leave globex's data, every role and every setting as they were, and errors
//! raised inside a push (timeouts, deadlocks, cancels) must stay errors, never become rejected results.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use postgres::types::ToSql;
use postgres::{Client, NoTls};
use serde_json::{json, Value};
use sync_ext_pgrx_tests::{change, hlc_ago, pull, pull_all, pull_scoped, push, Cluster};
use sync_ext_protocol::{Change, Hlc, Op, PullResponse, PushResponse, Status};

const ACME_TODO: &str = "7f1e8c3a-0000-4000-8000-00000000a001";
const MIB: usize = 1024 * 1024;

/// The README's setup of device roles and a bound table, the payload recorder, and the attacker.
const README_SETUP: &str = "
    CREATE TABLE public.attack_log (who name, superuser boolean, what text);
    GRANT INSERT ON public.attack_log TO PUBLIC;
    CREATE FUNCTION public.attack_note(what text) RETURNS void LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
        INSERT INTO public.attack_log
        SELECT current_user, (SELECT r.rolsuper FROM pg_catalog.pg_roles AS r WHERE r.rolname OPERATOR(pg_catalog.=) current_user), what
    $$;
    CREATE FUNCTION public.attack_noted(what text) RETURNS boolean LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
        SELECT public.attack_note(what); SELECT true
    $$;

    CREATE ROLE acme_devices NOLOGIN;
    SELECT sync_grant_tenant('acme_devices', 'acme');
    CREATE ROLE mallory LOGIN IN ROLE acme_devices;
    CREATE SCHEMA mallory AUTHORIZATION mallory;
    CREATE ROLE globex_devices NOLOGIN;
    SELECT sync_grant_tenant('globex_devices', 'globex');

    CREATE TABLE public.todos (id uuid PRIMARY KEY, tenant_id text NOT NULL, title text, done boolean NOT NULL DEFAULT false);
    SELECT sync_register_model('todo', 'public.todos', tenant_column => 'tenant_id');
    GRANT SELECT, INSERT, UPDATE, DELETE ON public.todos TO acme_devices, globex_devices;
    INSERT INTO public.todos (id, tenant_id, title) VALUES
        ('7f1e8c3a-0000-4000-8000-00000000a001', 'acme', 'acme plan'),
        ('7f1e8c3a-0000-4000-8000-00000000b001', 'globex', 'globex secret');
";

/// A cluster set up by [`README_SETUP`], with data in both tenants, and a superuser connection.
struct Scene {
    cluster: Cluster,
    admin: Client,
}

impl Scene {
    fn new() -> Scene {
        Scene::on(Cluster::start())
    }

    fn on(cluster: Cluster) -> Scene {
        cluster.create_database("sync");
        let mut admin = cluster.connect("sync");
        admin.batch_execute(README_SETUP).expect("the README's setup");
        let globex = [
            note(Op::Insert, "g1", "globex secret"),
            note(Op::Update, "g1", "globex secret v2"),
            note(Op::Insert, "g2", "globex plan"),
            change(Op::Delete, "note", "g2", hlc_now(), "globex-phone", Value::Null),
        ];
        push(&mut admin, "globex", &globex).expect("globex's data");
        push(&mut admin, "acme", &[note(Op::Insert, "a1", "acme note")]).expect("acme's data");
        admin.batch_execute("TRUNCATE public.attack_log").unwrap();
        Scene { cluster, admin }
    }

    fn login(&self, user: &str) -> Client {
        self.cluster.connect_as("sync", user)
    }

    fn attacker(&self) -> Client {
        self.login("mallory")
    }

    fn count(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> i64 {
        self.admin.query_one(sql, params).unwrap().get(0)
    }

    /// A tenant's sync state and its rows of every bound table (last_push_at left out), as text.
    fn tenant_state(&mut self, tenant: &str) -> String {
        let sync: String = self
            .admin
            .query_one(
                "SELECT concat_ws(' | ',
                    (SELECT string_agg((to_jsonb(t) - 'last_push_at')::text, ';') FROM sync_ext.tenants AS t WHERE t.tenant_id = $1),
                    (SELECT string_agg(o::text, ';' ORDER BY o.seq) FROM sync_ext.op_log AS o WHERE o.tenant_id = $1),
                    (SELECT string_agg(s::text, ';' ORDER BY s.model, s.id) FROM sync_ext.snapshots AS s WHERE s.tenant_id = $1))",
                &[&tenant],
            )
            .unwrap()
            .get(0);
        let tables = self
            .admin
            .query("SELECT table_name::text, quote_ident(tenant_column) FROM sync_ext.models WHERE tenant_column IS NOT NULL ORDER BY 1", &[])
            .unwrap();
        let mut state = vec![sync];
        for table in tables {
            let (name, column): (String, String) = (table.get(0), table.get(1));
            let sql = format!("SELECT coalesce(string_agg(t::text, ';' ORDER BY t::text), '') FROM {name} AS t WHERE {column} = $1");
            state.push(format!("{name}: {}", self.admin.query_one(&sql, &[&tenant]).unwrap().get::<_, String>(0)));
        }
        state.join("\n")
    }

    /// What no attack may change: globex's data, roles, memberships, role settings, grants, operator
    /// settings, and the privileges of the extension's functions and tables.
    fn witness(&mut self) -> Vec<String> {
        let mut seen = vec![self.tenant_state("globex")];
        for sql in [
            "SELECT string_agg(format('%s super=%s createrole=%s createdb=%s login=%s bypassrls=%s', rolname, rolsuper, rolcreaterole, rolcreatedb, rolcanlogin, rolbypassrls), '; ' ORDER BY rolname) FROM pg_roles",
            "SELECT string_agg(roleid::regrole || ' > ' || member::regrole, '; ' ORDER BY roleid::regrole::text, member::regrole::text) FROM pg_auth_members",
            "SELECT coalesce(string_agg(format('%s@%s: %s', setrole::regrole, setdatabase, setconfig), '; ' ORDER BY setrole, setdatabase), '') FROM pg_db_role_setting",
            "SELECT string_agg(g::text, '; ' ORDER BY g::text) FROM sync_ext.grants AS g",
            "SELECT string_agg(format('%s %s', p.oid::regprocedure, p.proacl), '; ' ORDER BY p.oid::regprocedure::text)
               FROM pg_depend AS d JOIN pg_proc AS p ON p.oid = d.objid
              WHERE d.classid = 'pg_proc'::regclass AND d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
                AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'sync_ext')",
            "SELECT string_agg(format('%s %s rls=%s', c.oid::regclass, c.relacl, c.relrowsecurity), '; ' ORDER BY c.oid::regclass::text)
               FROM pg_class AS c WHERE c.relnamespace = 'sync_ext'::regnamespace",
        ] {
            seen.push(self.admin.query_one(sql, &[]).unwrap().get::<_, Option<String>>(0).unwrap_or_default());
        }
        let has_settings: bool = self.admin.query_one("SELECT to_regclass('sync_ext.settings') IS NOT NULL", &[]).unwrap().get(0);
        if has_settings {
            let sql = "SELECT coalesce(string_agg(to_jsonb(s)::text, '; ' ORDER BY to_jsonb(s)::text), '') FROM sync_ext.settings AS s";
            seen.push(self.admin.query_one(sql, &[]).unwrap().get(0));
        }
        seen
    }

    fn assert_witness_unchanged(&mut self, before: &[String]) {
        let after = self.witness();
        for (before, after) in before.iter().zip(&after) {
            assert_eq!(after, before, "the attack changed another tenant's data, a role or a setting");
        }
        assert_eq!(after.len(), before.len());
    }

    /// Every payload run recorded, as (who, superuser, what).
    fn attack_log(&mut self) -> Vec<(String, bool, String)> {
        let rows = self.admin.query("SELECT who::text, coalesce(superuser, true), what FROM public.attack_log", &[]).unwrap();
        rows.iter().map(|row| (row.get(0), row.get(1), row.get(2))).collect()
    }

    /// No payload ran as a superuser, nor as anyone but the attacker.
    fn assert_no_escalation(&mut self, attacker: &str) {
        let escalated: BTreeSet<String> = self
            .attack_log()
            .into_iter()
            .filter(|(who, superuser, _)| *superuser || who != attacker)
            .map(|(who, superuser, what)| format!("{what} ran as {who} (superuser: {superuser})"))
            .collect();
        assert!(
            escalated.is_empty(),
            "attacker-controlled code ran with rights other than {attacker}'s:\n  {}",
            escalated.into_iter().collect::<Vec<_>>().join("\n  ")
        );
    }

    /// Binds `public.<model>s (id int, tenant_id, title)` as model `<model>`, with a BEFORE ROW trigger of
    /// its owner running `body` (PL/pgSQL statements), writable by acme's devices.
    fn bind_table_with_trigger(&mut self, model: &str, body: &str) {
        self.admin
            .batch_execute(&format!(
                "CREATE TABLE public.{model}s (id int PRIMARY KEY, tenant_id text NOT NULL, title text);
                 CREATE FUNCTION public.{model}_trigger() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN {body} RETURN NEW; END $$;
                 CREATE TRIGGER {model}_trigger BEFORE INSERT OR UPDATE ON public.{model}s FOR EACH ROW EXECUTE FUNCTION public.{model}_trigger();
                 SELECT sync_register_model('{model}', 'public.{model}s', tenant_column => 'tenant_id');
                 GRANT SELECT, INSERT, UPDATE, DELETE ON public.{model}s TO acme_devices;"
            ))
            .unwrap();
    }

    fn logged(&mut self, model: &str) -> i64 {
        self.count("SELECT count(*) FROM sync_ext.op_log WHERE model = $1", &[&model])
    }

    fn backend_pid(client: &mut Client) -> i32 {
        client.query_one("SELECT pg_catalog.pg_backend_pid()", &[]).unwrap().get(0)
    }

    /// Waits (bounded) until backend `pid` waits on `wait_event`.
    fn await_wait_event(&mut self, pid: i32, wait_event: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.count("SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND wait_event = $2", &[&pid, &wait_event]) == 0 {
            assert!(Instant::now() < deadline, "backend {pid} never waited on {wait_event}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// An HLC of now, ordered after every earlier one this process made.
fn hlc_now() -> Hlc {
    static COUNTER: AtomicU16 = AtomicU16::new(0);
    hlc_ago(0, COUNTER.fetch_add(1, Ordering::Relaxed))
}

fn note(op: Op, pk: &str, body: &str) -> Change {
    change(op, "note", pk, hlc_now(), "phone", json!({ "body": body }))
}

fn sqlstate(error: &postgres::Error) -> String {
    error.code().map_or_else(|| format!("(no SQLSTATE: {error})"), |code| code.code().to_owned())
}

/// A value's debug form, cut to a readable length.
fn brief(value: &impl Debug) -> String {
    let text = format!("{value:?}");
    if text.chars().count() > 300 {
        format!("{}...", text.chars().take(300).collect::<String>())
    } else {
        text
    }
}

/// An error as its SQLSTATE and message.
fn describe(error: &postgres::Error) -> String {
    format!("{} {}", sqlstate(error), error.as_db_error().map_or_else(|| error.to_string(), |db| db.message().to_owned()))
}

/// The message of a call that must fail with `code`; panics showing what happened instead.
fn expect_error<T: Debug>(result: Result<T, postgres::Error>, code: &str, context: &str) -> String {
    match result {
        Err(error) if sqlstate(&error) == code => error.as_db_error().map(|db| db.message().to_owned()).unwrap_or_default(),
        Err(error) => panic!("{context}: expected SQLSTATE {code}, got {}", describe(&error)),
        Ok(value) => panic!("{context}: expected SQLSTATE {code}, but it succeeded: {}", brief(&value)),
    }
}

fn statuses(response: &PushResponse) -> Vec<String> {
    response
        .results
        .iter()
        .map(|result| match &result.status {
            Status::Applied { .. } => "applied".to_owned(),
            Status::Duplicate { .. } => "duplicate".to_owned(),
            Status::Superseded => "superseded".to_owned(),
            Status::Rejected { reason } => format!("rejected: {reason}"),
        })
        .collect()
}

fn pks(response: &PullResponse) -> BTreeSet<String> {
    response.changes.iter().map(|change| change.pk.clone()).collect()
}

/// Everything an attack broke, reported together so one run shows every breach.
#[derive(Default)]
struct Breaches(Vec<String>);

impl Breaches {
    fn check(&mut self, holds: bool, breach: impl FnOnce() -> String) {
        if !holds {
            self.0.push(breach());
        }
    }

    fn expect_error<T: Debug>(&mut self, result: Result<T, postgres::Error>, code: &str, message_part: &str, context: &str) {
        match result {
            Err(error) if sqlstate(&error) == code => {
                let message = error.as_db_error().map(|db| db.message().to_owned()).unwrap_or_default();
                self.check(message.contains(message_part), || format!("{context}: the {code} error does not name {message_part}: {message}"));
            }
            Err(error) => self.0.push(format!("{context}: expected SQLSTATE {code}, got {}", describe(&error))),
            Ok(value) => self.0.push(format!("{context}: expected SQLSTATE {code}, but it succeeded: {}", brief(&value))),
        }
    }

    fn assert_none(self) {
        assert!(self.0.is_empty(), "{} breach(es):\n  {}", self.0.len(), self.0.join("\n  "));
    }
}

// ---------------------------------------------------------------------------------------------------
// Function privileges
// ---------------------------------------------------------------------------------------------------

/// The extension's functions an ordinary role may execute, as schema.name.
const PUBLIC_API: [&str; 10] = [
    "public.sync_compact",
    "public.sync_from_portable",
    "public.sync_pull",
    "public.sync_pull_msgpack",
    "public.sync_push",
    "public.sync_push_msgpack",
    "public.sync_row_to_portable",
    "public.sync_scopes",
    "public.sync_to_portable",
    "sync_ext.may_access",
];

#[test]
fn an_ordinary_role_can_execute_the_sync_api_and_no_other_function_of_the_extension() {
    let mut scene = Scene::new();
    let before = scene.witness();
    // Every function of the extension, whether mallory may execute it, and a call of it with NULL
    // arguments (NULL when an argument type cannot be written in SQL). The NULLs are subqueries: the planner
    // folds a STRICT function of constant NULLs to NULL without ever checking the privilege to execute it.
    let functions = scene
        .admin
        .query(
            "SELECT p.pronamespace::regnamespace::text || '.' || p.proname, p.oid::regprocedure::text,
                    has_function_privilege('mallory', p.oid, 'EXECUTE'), p.prokind::text, p.prorettype = 'trigger'::regtype,
                    (SELECT CASE WHEN bool_and(a.sql IS NOT NULL) IS NOT FALSE
                                 THEN format('%s %I.%I(%s)', CASE p.prokind WHEN 'p' THEN 'CALL' ELSE 'SELECT' END, n.nspname, p.proname,
                                             coalesce(string_agg(a.sql, ', ' ORDER BY a.i), '')) END
                       FROM (SELECT i, CASE WHEN ty.typtype <> 'p' THEN '(SELECT NULL::' || format_type(ty.oid, NULL) || ')'
                                            WHEN ty.typname IN ('anyarray', 'anycompatiblearray') THEN '(SELECT NULL::int[])'
                                            WHEN ty.typname IN ('anyelement', 'anynonarray', 'anycompatible', 'anycompatiblenonarray', 'any') THEN '(SELECT NULL::int)' END
                               FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY AS t(oid, i) JOIN pg_type AS ty ON ty.oid = t.oid) AS a(i, sql))
               FROM pg_depend AS d JOIN pg_proc AS p ON p.oid = d.objid JOIN pg_namespace AS n ON n.oid = p.pronamespace
              WHERE d.classid = 'pg_proc'::regclass AND d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
                AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'sync_ext')
              ORDER BY 2",
            &[],
        )
        .unwrap();
    let names: BTreeSet<String> = functions.iter().map(|row| row.get(0)).collect();
    let mut breaches = Breaches::default();
    for internal in [
        "public.sync_grant_tenant",
        "public.sync_revoke_tenant",
        "public.sync_register_model",
        "public.sync_unregister_model",
        "public.sync_configure",
        "public.sync_distribute",
        "sync_ext.forbid_truncate",
        "sync_ext.forbid_op_log_update",
    ] {
        breaches.check(names.contains(internal), || format!("the extension has no {internal}"));
    }
    let executable: BTreeSet<String> = functions.iter().filter(|row| row.get::<_, bool>(2)).map(|row| row.get(0)).collect();
    let expected: BTreeSet<String> = PUBLIC_API.iter().map(|name| name.to_string()).collect();
    breaches.check(executable == expected, || {
        format!(
            "mallory may execute {:?} beyond the sync API, and not {:?} of it",
            executable.difference(&expected).collect::<Vec<_>>(),
            expected.difference(&executable).collect::<Vec<_>>()
        )
    });
    let mut mallory = scene.attacker();
    let mut triggers_called = 0;
    for row in functions.iter().filter(|row| !expected.contains(&row.get::<_, String>(0))) {
        let (signature, kind, trigger, call): (String, String, bool, Option<String>) = (row.get(1), row.get(3), row.get(4), row.get(5));
        let Some(call) = call.filter(|_| kind != "a" && kind != "w") else { continue };
        triggers_called += usize::from(trigger);
        breaches.expect_error(mallory.batch_execute(&call), "42501", "", &format!("mallory calling {signature} as `{call}`"));
    }
    assert!(triggers_called > 0, "the extension's trigger functions were called directly");
    let other_may_access =
        scene.count("SELECT count(*) FROM pg_proc WHERE proname = 'may_access' AND pronamespace = 'sync_ext'::regnamespace AND pronargs <> 1", &[]);
    breaches.check(other_may_access == 0, || "sync_ext.may_access takes one argument (the tenant), and has no other form".into());
    breaches.assert_none();
    scene.assert_witness_unchanged(&before);
}

// ---------------------------------------------------------------------------------------------------
// Operator settings
// ---------------------------------------------------------------------------------------------------

/// Runs `sql` in a transaction whose `request.jwt.claims` is `claims` (as a trusted proxy sets it).
fn with_claims(client: &mut Client, claims: Option<&str>, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Value, postgres::Error> {
    let mut transaction = client.transaction()?;
    if let Some(claims) = claims {
        transaction.execute("SELECT pg_catalog.set_config('request.jwt.claims', $1, true)", &[&claims])?;
    }
    let value = transaction.query_one(sql, params)?.get(0);
    transaction.commit()?;
    Ok(value)
}

/// The operator's configuration (jwt_tenant_claim = org, max_push_changes = 2, max_push_bytes = 100kB)
/// holds for `client`, whatever it did to its session before.
fn configuration_holds(client: &mut Client, attempt: &str, breaches: &mut Breaches) {
    const ACME: &str = r#"{"org": "acme"}"#;
    let pull_sql = "SELECT sync_pull('acme', 0, 10)";
    if let Err(error) = with_claims(client, Some(ACME), pull_sql, &[]) {
        breaches.0.push(format!("{attempt}: a pull with the acme claim failed: {}", describe(&error)));
    }
    breaches.expect_error(with_claims(client, None, pull_sql, &[]), "42501", "", &format!("{attempt}: a pull without the claim"));
    breaches.expect_error(
        with_claims(client, Some(r#"{"org": "globex"}"#), pull_sql, &[]),
        "42501",
        "",
        &format!("{attempt}: a pull of acme with the globex claim"),
    );
    let three = serde_json::to_value((0..3).map(|n| note(Op::Insert, &format!("over-{n}"), "x")).collect::<Vec<_>>()).unwrap();
    let push = "SELECT sync_push('acme', $1::jsonb)";
    breaches.expect_error(with_claims(client, Some(ACME), push, &[&three]), "22023", "max_push_changes", &format!("{attempt}: a push of 3 changes"));
    let heavy = serde_json::to_value((0..2).map(|n| note(Op::Insert, &format!("heavy-{n}"), &"x".repeat(60_000))).collect::<Vec<_>>()).unwrap();
    breaches.expect_error(with_claims(client, Some(ACME), push, &[&heavy]), "54000", "max_push_bytes", &format!("{attempt}: a push of 120 kB"));
}

fn operator_settings_hold_against_every_session_override(cluster: Cluster) {
    let mut scene = Scene::on(cluster);
    scene
        .admin
        .batch_execute("SELECT sync_configure('jwt_tenant_claim', 'org'); SELECT sync_configure('max_push_changes', '2'); SELECT sync_configure('max_push_bytes', '100kB');")
        .expect("the operator configures sync_ext with sync_configure");
    let before = scene.witness();
    let mut breaches = Breaches::default();
    let widen = ["sync_ext.jwt_tenant_claim", "sync_ext.max_push_changes", "sync_ext.max_push_bytes"];
    let values = ["", "100000", "999999999"];

    // Each attempt on a fresh connection, before anything loads the library; errors are fine.
    let sets: Vec<String> = widen.iter().zip(values).map(|(name, value)| format!("SET {name} = '{value}'")).collect();
    let set_configs: Vec<String> = widen.iter().zip(values).map(|(name, value)| format!("SELECT set_config('{name}', '{value}', false)")).collect();
    let alters: Vec<String> = widen
        .iter()
        .zip(values)
        .flat_map(|(name, value)| {
            [
                format!("ALTER ROLE mallory SET {name} = '{value}'"),
                format!("ALTER ROLE mallory IN DATABASE sync SET {name} = '{value}'"),
                format!("ALTER DATABASE sync SET {name} = '{value}'"),
            ]
        })
        .collect();
    for (attempt, statements, reconnect) in [("SET", &sets, false), ("set_config", &set_configs, false), ("ALTER ROLE / DATABASE", &alters, true)] {
        let mut client = scene.attacker();
        for sql in statements {
            let _ = client.batch_execute(sql);
        }
        if reconnect {
            client = scene.attacker();
        }
        configuration_holds(&mut client, attempt, &mut breaches);
    }
    let options = "-c sync_ext.jwt_tenant_claim= -c sync_ext.max_push_changes=100000 -c sync_ext.max_push_bytes=999999999";
    if let Ok(mut client) = scene.cluster.try_connect_with_options("sync", "mallory", options) {
        configuration_holds(&mut client, "PGOPTIONS", &mut breaches);
    }

    let mut client = scene.attacker();
    for sql in [
        "UPDATE sync_ext.settings SET value = '' WHERE name = 'jwt_tenant_claim'",
        "INSERT INTO sync_ext.settings (name, value) VALUES ('max_push_bytes', '999999999')",
        "DELETE FROM sync_ext.settings",
        "SELECT sync_configure('jwt_tenant_claim', NULL)",
        "SELECT sync_configure('max_push_changes', '100000')",
    ] {
        breaches.expect_error(client.batch_execute(sql), "42501", "", &format!("mallory: {sql}"));
    }
    configuration_holds(&mut client, "writing sync_ext.settings", &mut breaches);
    let role_settings = scene.count("SELECT count(*) FROM pg_db_role_setting WHERE setrole = 'mallory'::regrole", &[]);
    breaches.check(role_settings == 0, || format!("pg_db_role_setting gained {role_settings} row(s) for mallory"));
    breaches.assert_none();
    scene.assert_witness_unchanged(&before);
}

#[test]
fn operator_settings_hold_against_every_session_override_without_the_library_preloaded() {
    operator_settings_hold_against_every_session_override(Cluster::start());
}

#[test]
fn operator_settings_hold_against_every_session_override_with_the_library_preloaded() {
    operator_settings_hold_against_every_session_override(Cluster::start_with(&["shared_preload_libraries = 'sync_ext'"]));
}

// ---------------------------------------------------------------------------------------------------
// Code the attacker controls
// ---------------------------------------------------------------------------------------------------

/// A logging shadow in schema mallory of every plain pg_catalog function and operator whose types are not
/// pseudo-types (those that fail to create are skipped).
const SHADOW_EVERY_CATALOG_FUNCTION_AND_OPERATOR: &str = r#"
DO $gen$
DECLARE f record; body text;
BEGIN
    FOR f IN
        SELECT p.proname, pg_get_function_identity_arguments(p.oid) AS args, pg_get_function_result(p.oid) AS result, p.proretset
          FROM pg_proc AS p
         WHERE p.pronamespace = 'pg_catalog'::regnamespace AND p.prokind = 'f' AND p.provariadic = 0 AND p.proallargtypes IS NULL
           AND NOT EXISTS (SELECT FROM unnest(p.proargtypes::oid[] || p.prorettype) AS t(oid) JOIN pg_type AS ty ON ty.oid = t.oid WHERE ty.typtype = 'p')
    LOOP
        BEGIN
            body := format('BEGIN PERFORM public.attack_note(%L); RETURN%s; END', 'function ' || f.proname, CASE WHEN f.proretset THEN '' ELSE ' NULL' END);
            EXECUTE format('CREATE FUNCTION mallory.%I(%s) RETURNS %s LANGUAGE plpgsql AS %L', f.proname, f.args, f.result, body);
        EXCEPTION WHEN OTHERS THEN NULL;
        END;
    END LOOP;
    FOR f IN
        SELECT o.oid, o.oprname, o.oprleft, o.oprright, o.oprresult
          FROM pg_operator AS o
         WHERE o.oprnamespace = 'pg_catalog'::regnamespace AND o.oprright <> 0 AND o.oprresult <> 0
           AND NOT EXISTS (SELECT FROM unnest(ARRAY[o.oprleft, o.oprright, o.oprresult]) AS t(oid) JOIN pg_type AS ty ON ty.oid = t.oid WHERE ty.typtype = 'p')
    LOOP
        BEGIN
            body := format('BEGIN PERFORM public.attack_note(%L); RETURN NULL; END', 'operator ' || f.oprname);
            IF f.oprleft = 0 THEN
                EXECUTE format('CREATE FUNCTION mallory.%I(%s) RETURNS %s LANGUAGE plpgsql AS %L', 'attack_op_' || f.oid, format_type(f.oprright, NULL), format_type(f.oprresult, NULL), body);
                EXECUTE format('CREATE OPERATOR mallory.%s (RIGHTARG = %s, FUNCTION = mallory.%I)', f.oprname, format_type(f.oprright, NULL), 'attack_op_' || f.oid);
            ELSE
                EXECUTE format('CREATE FUNCTION mallory.%I(%s, %s) RETURNS %s LANGUAGE plpgsql AS %L', 'attack_op_' || f.oid, format_type(f.oprleft, NULL), format_type(f.oprright, NULL), format_type(f.oprresult, NULL), body);
                EXECUTE format('CREATE OPERATOR mallory.%s (LEFTARG = %s, RIGHTARG = %s, FUNCTION = mallory.%I)', f.oprname, format_type(f.oprleft, NULL), format_type(f.oprright, NULL), 'attack_op_' || f.oid);
            END IF;
        EXCEPTION WHEN OTHERS THEN NULL;
        END;
    END LOOP;
END $gen$;
"#;

/// Hand-written shadows of polymorphic functions and aggregates the generator cannot write.
const SHADOW_POLYMORPHIC_AND_AGGREGATES: &str = "
    CREATE FUNCTION mallory.unnest(anyarray) RETURNS SETOF anyelement LANGUAGE plpgsql AS $$ BEGIN PERFORM public.attack_note('unnest'); RETURN; END $$;
    CREATE FUNCTION mallory.attack_array_agg(anyarray, anynonarray) RETURNS anyarray LANGUAGE plpgsql AS $$ BEGIN PERFORM public.attack_note('array_agg'); RETURN $1; END $$;
    CREATE AGGREGATE mallory.array_agg(anynonarray) (SFUNC = mallory.attack_array_agg, STYPE = anyarray);
    CREATE FUNCTION mallory.attack_jsonb_agg(jsonb, anyelement) RETURNS jsonb LANGUAGE plpgsql AS $$ BEGIN PERFORM public.attack_note('jsonb_agg'); RETURN $1; END $$;
    CREATE AGGREGATE mallory.jsonb_agg(anyelement) (SFUNC = mallory.attack_jsonb_agg, STYPE = jsonb);
    CREATE FUNCTION mallory.attack_count(bigint) RETURNS bigint LANGUAGE plpgsql AS $$ BEGIN PERFORM public.attack_note('count(*)'); RETURN $1; END $$;
    CREATE AGGREGATE mallory.count(*) (SFUNC = mallory.attack_count, STYPE = bigint, INITCOND = '0');
    CREATE FUNCTION mallory.attack_max(bigint, bigint) RETURNS bigint LANGUAGE plpgsql AS $$ BEGIN PERFORM public.attack_note('max'); RETURN $1; END $$;
    CREATE AGGREGATE mallory.max(bigint) (SFUNC = mallory.attack_max, STYPE = bigint);
    CREATE FUNCTION mallory.attack_jsonb_object_agg(jsonb, text, jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$ BEGIN PERFORM public.attack_note('jsonb_object_agg'); RETURN $1; END $$;
    CREATE AGGREGATE mallory.jsonb_object_agg(text, jsonb) (SFUNC = mallory.attack_jsonb_object_agg, STYPE = jsonb);
";

/// Shadows in the session's temporary schema.
const SHADOW_IN_PG_TEMP: &str = "
    CREATE FUNCTION pg_temp.pg_notify(text, text) RETURNS void LANGUAGE plpgsql AS $$ BEGIN PERFORM public.attack_note('pg_temp.pg_notify'); END $$;
    CREATE FUNCTION pg_temp.now() RETURNS timestamptz LANGUAGE plpgsql AS $$ BEGIN PERFORM public.attack_note('pg_temp.now'); RETURN '2000-01-01 00:00:00+00'; END $$;
    CREATE FUNCTION pg_temp.pg_is_in_recovery() RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN PERFORM public.attack_note('pg_temp.pg_is_in_recovery'); RETURN false; END $$;
    CREATE FUNCTION pg_temp.unnest(anyarray) RETURNS SETOF anyelement LANGUAGE plpgsql AS $$ BEGIN PERFORM public.attack_note('pg_temp.unnest'); RETURN; END $$;
    CREATE FUNCTION pg_temp.current_setting(text, boolean) RETURNS text LANGUAGE plpgsql AS $$ BEGIN PERFORM public.attack_note('pg_temp.current_setting'); RETURN ''; END $$;
    CREATE FUNCTION pg_temp.pg_has_role(name, oid, text) RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN PERFORM public.attack_note('pg_temp.pg_has_role'); RETURN true; END $$;
";

/// Catalogs shadowed by temporary views that pass the real rows through (but anyarray columns, which a view
/// cannot hold) and record who read them.
const SHADOW_CATALOGS_WITH_TEMP_VIEWS: &str = "
DO $gen$
DECLARE catalog text;
BEGIN
    FOREACH catalog IN ARRAY ARRAY['pg_class', 'pg_extension', 'pg_roles', 'pg_index', 'pg_attribute', 'pg_namespace', 'pg_type', 'pg_proc'] LOOP
        EXECUTE format('CREATE TEMP VIEW %I AS SELECT %s FROM pg_catalog.%I WHERE (SELECT public.attack_noted(%L))', catalog,
                       (SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum) FROM pg_attribute AS a
                         WHERE a.attrelid = ('pg_catalog.' || catalog)::regclass AND a.attnum > 0 AND NOT a.attisdropped AND a.atttypid <> 'anyarray'::regtype),
                       catalog, 'temp view ' || catalog);
    END LOOP;
END $gen$;
";

#[test]
fn search_path_and_pg_temp_shadows_never_run_with_elevated_rights() {
    let mut scene = Scene::new();
    let before = scene.witness();
    let mut m = scene.attacker();
    m.batch_execute(SHADOW_EVERY_CATALOG_FUNCTION_AND_OPERATOR).unwrap();
    m.batch_execute(SHADOW_POLYMORPHIC_AND_AGGREGATES).unwrap();
    m.batch_execute(SHADOW_IN_PG_TEMP).unwrap();
    m.batch_execute(SHADOW_CATALOGS_WITH_TEMP_VIEWS).unwrap();
    m.batch_execute("SET search_path = mallory, pg_catalog, public").unwrap();
    let functions = scene.count("SELECT count(*) FROM pg_proc WHERE pronamespace = 'mallory'::regnamespace", &[]);
    let operators = scene.count("SELECT count(*) FROM pg_operator WHERE oprnamespace = 'mallory'::regnamespace", &[]);
    assert!(functions > 2_000 && operators > 500, "the shadows exist: {functions} functions, {operators} operators");
    let armed: Option<String> = m.query_one("SELECT lower('ARMED')", &[]).unwrap().get(0);
    assert_eq!(armed, None, "mallory's session resolves names to its shadows");

    let mut broken = Breaches::default();
    let start = scene.count("SELECT last_seq FROM sync_ext.tenants WHERE tenant_id = 'acme'", &[]);
    const TODO: &str = "7f1e8c3a-0000-4000-8000-00000000a002";
    const TYPED: &str = "7f1e8c3a-0000-4000-8000-00000000a003";
    let batch = [note(Op::Insert, "shadow-1", "unbound"), change(Op::Insert, "todo", TODO, hlc_now(), "phone", json!({"title": "shadowed"}))];
    match push(&mut m, "acme", &batch) {
        Ok(response) => broken.check(statuses(&response) == ["applied", "applied"], || format!("sync_push: {:?}", statuses(&response))),
        Err(error) => broken.0.push(format!("sync_push failed: {}", describe(&error))),
    }
    let typed = scene.count("SELECT count(*) FROM public.todos WHERE id = $1::text::uuid AND title = 'shadowed' AND tenant_id = 'acme'", &[&TODO]);
    broken.check(typed == 1, || "the pushed todo is not in public.todos".into());
    let pulled = pull(&mut m, "acme", start, 100).map(|response| pks(&response)).map_err(|e| describe(&e));
    broken.check(matches!(&pulled, Ok(pks) if pks.contains("shadow-1") && pks.contains(TODO)), || format!("sync_pull: {pulled:?}"));

    let body = sync_ext_protocol::msgpack::encode(&vec![note(Op::Insert, "shadow-2", "msgpack")]).unwrap();
    let packed = m
        .query_one("SELECT sync_push_msgpack($1::text, $2::bytea)", &[&"acme", &body])
        .map(|row| sync_ext_protocol::msgpack::decode::<PushResponse>(&row.get::<_, Vec<u8>>(0)).map(|r| statuses(&r)))
        .map_err(|e| describe(&e));
    broken.check(matches!(&packed, Ok(Ok(statuses)) if statuses == &["applied"]), || format!("sync_push_msgpack: {packed:?}"));
    let unpacked = m
        .query_one("SELECT sync_pull_msgpack($1::text, $2::bigint, 100)", &[&"acme", &start])
        .map(|row| sync_ext_protocol::msgpack::decode::<PullResponse>(&row.get::<_, Vec<u8>>(0)).map(|r| pks(&r)))
        .map_err(|e| describe(&e));
    broken.check(matches!(&unpacked, Ok(Ok(pks)) if pks.contains("shadow-2")), || format!("sync_pull_msgpack: {unpacked:?}"));

    let before_sql = scene.count("SELECT last_seq FROM sync_ext.tenants WHERE tenant_id = 'acme'", &[]);
    let plain_sql = m.batch_execute(&format!(
        "INSERT INTO public.todos (id, tenant_id, title) VALUES ('{TYPED}', 'acme', 'typed');
         UPDATE public.todos SET title = 'retyped' WHERE id OPERATOR(pg_catalog.=) '{TYPED}'::uuid;
         DELETE FROM public.todos WHERE id OPERATOR(pg_catalog.=) '{TYPED}'::uuid;"
    ));
    broken.check(plain_sql.is_ok(), || format!("plain SQL on todos: {}", describe(plain_sql.as_ref().unwrap_err())));
    let captured =
        pull(&mut m, "acme", before_sql, 100).map(|r| r.changes.iter().map(|c| format!("{:?} {}", c.op, c.pk)).collect::<Vec<_>>()).map_err(|e| describe(&e));
    let expected: Vec<String> = [Op::Insert, Op::Update, Op::Delete].iter().map(|op| format!("{op:?} {TYPED}")).collect();
    broken.check(matches!(&captured, Ok(ops) if ops == &expected), || format!("captured plain SQL: {captured:?}"));

    let compacted = m.query_one("SELECT sync_compact('acme')", &[]).map(|row| row.get::<_, Value>(0)).map_err(|e| describe(&e));
    broken.check(matches!(&compacted, Ok(result) if result["horizon"].is_i64()), || format!("sync_compact: {compacted:?}"));
    scene.admin.query_one("SELECT sync_compact('acme', '0 seconds')", &[]).unwrap();
    let reset = pull_all(&mut m, "acme", 0, 1000).map_err(|e| describe(&e));
    let rows: BTreeSet<String> =
        scene.admin.query("SELECT id FROM sync_ext.snapshots WHERE tenant_id = 'acme' AND NOT deleted", &[]).unwrap().iter().map(|row| row.get(0)).collect();
    let live = reset.as_ref().map(|r| (r.reset, r.changes.iter().filter(|c| c.op != Op::Delete).map(|c| c.pk.clone()).collect::<BTreeSet<_>>()));
    broken.check(matches!(&live, Ok((true, pks)) if pks == &rows && pks.contains("shadow-2")), || format!("the reset pull: {live:?}, expected {rows:?}"));

    for table in ["op_log", "snapshots"] {
        let seen = m
            .query(&format!("SELECT tenant_id FROM sync_ext.{table}"), &[])
            .map(|rows| rows.iter().map(|row| row.get::<_, String>(0)).collect::<BTreeSet<_>>())
            .map_err(|e| describe(&e));
        broken.check(matches!(&seen, Ok(tenants) if tenants.len() == 1 && tenants.contains("acme")), || format!("SELECT FROM sync_ext.{table}: {seen:?}"));
    }
    scene.assert_no_escalation("mallory");
    broken.assert_none();
    scene.assert_witness_unchanged(&before);
}

/// An application table owned by a non-superuser, whose default, domain check and row triggers record who ran them.
const OWNED_TABLE: &str = "
    CREATE ROLE app_owner NOLOGIN;
    GRANT CREATE ON SCHEMA public TO app_owner;
    CREATE SCHEMA app_owner_schema AUTHORIZATION app_owner;
    SET ROLE app_owner;
    CREATE FUNCTION public.log_default() RETURNS text LANGUAGE plpgsql AS $$ BEGIN PERFORM public.attack_note('column default'); RETURN 'noted'; END $$;
    CREATE FUNCTION public.log_check(value text) RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN PERFORM public.attack_note('domain check'); RETURN true; END $$;
    CREATE DOMAIN public.checked_text AS text CHECK (public.log_check(VALUE));
    CREATE FUNCTION public.log_row() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM public.attack_note(lower(TG_WHEN) || ' row trigger'); RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END; END $$;
    CREATE TABLE app_owner_schema.todos (id uuid PRIMARY KEY, tenant_id text NOT NULL, title text, note text DEFAULT public.log_default(), checked public.checked_text);
    CREATE TRIGGER log_before BEFORE INSERT OR UPDATE OR DELETE ON app_owner_schema.todos FOR EACH ROW EXECUTE FUNCTION public.log_row();
    CREATE TRIGGER log_after AFTER INSERT OR UPDATE OR DELETE ON app_owner_schema.todos FOR EACH ROW EXECUTE FUNCTION public.log_row();
    GRANT USAGE ON SCHEMA app_owner_schema TO acme_devices;
    GRANT SELECT, INSERT, UPDATE, DELETE ON app_owner_schema.todos TO acme_devices;
    RESET ROLE;
    SELECT sync_register_model('owned_todo', 'app_owner_schema.todos', tenant_column => 'tenant_id');
    TRUNCATE public.attack_log;
";

#[test]
fn defaults_domain_checks_and_triggers_of_a_bound_table_run_as_the_pushing_caller() {
    let mut scene = Scene::new();
    scene.admin.batch_execute(OWNED_TABLE).unwrap();
    let before = scene.witness();
    let mut m = scene.attacker();
    const PUSHED: &str = "7f1e8c3a-0000-4000-8000-00000000c001";
    const TYPED: &str = "7f1e8c3a-0000-4000-8000-00000000c002";
    let insert = change(Op::Insert, "owned_todo", PUSHED, hlc_now(), "phone", json!({"title": "pushed", "checked": "ok"}));
    let pushed_insert = push(&mut m, "acme", &[insert]);
    let update = change(Op::Update, "owned_todo", PUSHED, hlc_now(), "phone", json!({"title": "renamed", "checked": "again"}));
    let pushed_update = push(&mut m, "acme", &[update]);
    let since = scene.count("SELECT last_seq FROM sync_ext.tenants WHERE tenant_id = 'acme'", &[]);
    let plain_sql = m.batch_execute(&format!(
        "INSERT INTO app_owner_schema.todos (id, tenant_id, title, checked) VALUES ('{TYPED}', 'acme', 'typed', 'sql');
         UPDATE app_owner_schema.todos SET checked = 'sql again' WHERE id = '{TYPED}';
         DELETE FROM app_owner_schema.todos WHERE id = '{TYPED}';"
    ));

    scene.assert_no_escalation("mallory");
    assert_eq!(statuses(&pushed_insert.unwrap()), ["applied"]);
    assert_eq!(statuses(&pushed_update.unwrap()), ["applied"]);
    plain_sql.expect("mallory's plain SQL on the owned table");
    let row: String = scene
        .admin
        .query_one("SELECT format('%s|%s|%s', title, note, checked) FROM app_owner_schema.todos WHERE id = $1::text::uuid", &[&PUSHED])
        .unwrap()
        .get(0);
    assert_eq!(row, "renamed|noted|again", "the pushed row was written, its default filled");
    let captured = pull(&mut m, "acme", since, 10).unwrap();
    assert_eq!(captured.changes.iter().map(|c| c.op).collect::<Vec<_>>(), [Op::Insert, Op::Update, Op::Delete], "plain SQL was captured");
    let ran: BTreeSet<String> = scene.attack_log().into_iter().map(|(_, _, what)| what).collect();
    for payload in ["column default", "domain check", "before row trigger", "after row trigger"] {
        assert!(ran.contains(payload), "the {payload} ran (as mallory): {ran:?}");
    }
    scene.assert_witness_unchanged(&before);
}

// ---------------------------------------------------------------------------------------------------
// Table privileges, row security and direct reads
// ---------------------------------------------------------------------------------------------------

const LIMITED_ROLES: &str = "
    CREATE ROLE acme_columns NOLOGIN; SELECT sync_grant_tenant('acme_columns', 'acme'); CREATE ROLE trent LOGIN IN ROLE acme_columns;
    GRANT SELECT, INSERT (id, tenant_id, title), UPDATE (title) ON public.todos TO acme_columns;
    CREATE ROLE acme_readers NOLOGIN; SELECT sync_grant_tenant('acme_readers', 'acme'); CREATE ROLE rita LOGIN IN ROLE acme_readers;
    GRANT SELECT ON public.todos TO acme_readers;
    CREATE ROLE acme_rls NOLOGIN; SELECT sync_grant_tenant('acme_rls', 'acme'); CREATE ROLE ruth LOGIN IN ROLE acme_rls;
    GRANT SELECT, INSERT, UPDATE, DELETE ON public.todos TO acme_rls;
    ALTER TABLE public.todos ENABLE ROW LEVEL SECURITY;
    CREATE POLICY every_row ON public.todos USING (true);
    CREATE POLICY nothing_forbidden ON public.todos AS RESTRICTIVE TO acme_rls
        USING (title IS DISTINCT FROM 'forbidden') WITH CHECK (title IS DISTINCT FROM 'forbidden');
";

fn todo(op: Op, n: u32, value: Value) -> Change {
    change(op, "todo", &format!("7f1e8c3a-0000-4000-8000-{n:012}"), hlc_now(), "phone", value)
}

fn assert_permission_denied(response: &PushResponse, index: usize, context: &str) {
    let status = &statuses(response)[index];
    assert!(status.starts_with("rejected: permission_denied"), "{context}: {status}");
}

#[test]
fn column_privileges_and_row_security_of_a_bound_table_refuse_pushed_changes() {
    let mut scene = Scene::new();
    scene.admin.batch_execute(LIMITED_ROLES).unwrap();
    let before = scene.witness();

    let mut trent = scene.login("trent");
    let first = push(
        &mut trent,
        "acme",
        &[
            todo(Op::Insert, 1, json!({"title": "mine"})),
            todo(Op::Insert, 2, json!({"title": "x", "done": true})),
            todo(Op::Insert, 3, json!({"title": "other"})),
        ],
    )
    .unwrap();
    let writable = "a change writing only title applies (the engine fills id and tenant_id, which the role may INSERT)";
    assert_eq!(statuses(&first)[0], "applied", "{writable}");
    assert_permission_denied(&first, 1, "an insert writing a column without INSERT privilege");
    assert_eq!(statuses(&first)[2], "applied", "{writable}");
    let second = push(&mut trent, "acme", &[todo(Op::Update, 1, json!({"title": "renamed"})), todo(Op::Update, 3, json!({"done": true}))]).unwrap();
    assert_eq!(statuses(&second)[0], "applied", "an update of title only needs UPDATE (title)");
    assert_permission_denied(&second, 1, "an update of a column without UPDATE privilege");
    let rows: Vec<String> = scene.admin.query("SELECT format('%s %s %s', right(id::text, 1), title, done) FROM public.todos WHERE tenant_id = 'acme' AND id::text LIKE '7f1e8c3a-0000-4000-8000-00000000000%' ORDER BY id", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(rows, ["1 renamed f", "3 other f"]);
    let refused_logged = scene.count(
        "SELECT (SELECT count(*) FROM sync_ext.op_log WHERE pk = $1 OR pk = $2 AND payload->>'done' = 'true')
              + (SELECT count(*) FROM sync_ext.snapshots WHERE id = $1 OR id = $2 AND value->>'done' = 'true')",
        &[&"7f1e8c3a-0000-4000-8000-000000000002", &"7f1e8c3a-0000-4000-8000-000000000003"],
    );
    assert_eq!(refused_logged, 0, "refused changes are neither logged nor snapshotted");

    let mut rita = scene.login("rita");
    let acme = scene.tenant_state("acme");
    let read_only = push(&mut rita, "acme", &[todo(Op::Insert, 4, json!({"title": "read-only"}))]).unwrap();
    assert_permission_denied(&read_only, 0, "an insert by a role that may only SELECT the table");
    assert_eq!(scene.tenant_state("acme"), acme, "a refused push writes nothing: table, op_log, snapshots");

    let mut ruth = scene.login("ruth");
    let policed = push(&mut ruth, "acme", &[todo(Op::Insert, 5, json!({"title": "forbidden"})), todo(Op::Insert, 6, json!({"title": "fine"}))]).unwrap();
    assert_permission_denied(&policed, 0, "a row the table's row-level security policy refuses");
    assert_eq!(statuses(&policed)[1], "applied");
    assert_eq!(scene.count("SELECT count(*) FROM public.todos WHERE title = 'forbidden'", &[]), 0);

    let pulled = pks(&pull_all(&mut rita, "acme", 0, 100).expect("the log is the tenant's: a read-only device pulls it"));
    let pk = |n: u32| format!("7f1e8c3a-0000-4000-8000-{n:012}");
    assert!([1, 3, 6].iter().all(|n| pulled.contains(&pk(*n))) && pulled.contains(ACME_TODO), "applied changes are pulled: {pulled:?}");
    assert!([2, 4, 5].iter().all(|n| !pulled.contains(&pk(*n))), "refused changes are not: {pulled:?}");
    scene.assert_witness_unchanged(&before);
}

#[test]
fn an_attacker_reads_only_its_tenants_rows_and_cannot_probe_other_roles() {
    let mut scene = Scene::new();
    scene.admin.batch_execute("ANALYZE").unwrap();
    let before = scene.witness();
    let mut m = scene.attacker();
    for table in ["op_log", "snapshots"] {
        let seen: BTreeSet<String> = m.query(&format!("SELECT tenant_id FROM sync_ext.{table}"), &[]).unwrap().iter().map(|row| row.get(0)).collect();
        assert_eq!(seen, BTreeSet::from(["acme".to_owned()]), "mallory's view of sync_ext.{table}");
    }
    let relations: Vec<String> = scene
        .admin
        .query("SELECT oid::regclass::text FROM pg_class WHERE relnamespace = 'sync_ext'::regnamespace AND relkind IN ('r', 'p', 'v', 'm', 'f')", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for relation in relations {
        match m.query(&format!("SELECT to_jsonb(t)::text FROM {relation} AS t"), &[]) {
            Ok(rows) => assert!(rows.iter().all(|row| !row.get::<_, String>(0).contains("globex")), "{relation} shows mallory globex's rows"),
            Err(error) => assert_eq!(sqlstate(&error), "42501", "reading {relation}: {}", describe(&error)),
        }
    }
    let statistics: Option<String> =
        m.query_one("SELECT string_agg(concat(most_common_vals, histogram_bounds), ' ') FROM pg_stats WHERE schemaname = 'sync_ext'", &[]).unwrap().get(0);
    assert!(!statistics.unwrap_or_default().contains("globex"), "planner statistics leak globex's values");
    expect_error(m.query_one("SELECT sync_ext.may_access('globex', 'postgres')", &[]), "42883", "a two-argument may_access to probe another role");
    assert_eq!(scene.count("SELECT count(*) FROM pg_proc WHERE proname = 'may_access' AND pronargs <> 1", &[]), 0);
    let may = m.query_one("SELECT sync_ext.may_access('acme'), sync_ext.may_access('globex')", &[]).map(|row| (row.get::<_, bool>(0), row.get::<_, bool>(1)));
    assert_eq!(may.map_err(|e| describe(&e)), Ok((true, false)), "may_access answers for the current role");
    scene.assert_witness_unchanged(&before);
}

#[test]
fn an_attacker_can_neither_fake_nor_silence_wake_ups() {
    use postgres::fallible_iterator::FallibleIterator;
    let mut scene = Scene::new();
    let before = scene.witness();
    let mut m = scene.attacker();
    let mut listener = scene.cluster.connect("sync");
    listener.batch_execute("LISTEN sync_ext").unwrap();
    expect_error(m.execute("INSERT INTO sync_ext.wakeups VALUES ('globex')", &[]), "42501", "writing a wake-up for another tenant");
    // The notifier's advisory locks (its own, and the one a notifier takes to exit), held by mallory
    // before any notifier runs and for the rest of the test.
    m.batch_execute("SELECT pg_advisory_lock(1937337955, 1), pg_advisory_lock(1937337955, 2)").unwrap();
    for n in 0..5 {
        while listener.notifications().timeout_iter(Duration::from_millis(1)).next().unwrap().is_some() {}
        let response = push(&mut m, "acme", &[note(Op::Insert, &format!("woken-{n}"), "wake up")]).unwrap();
        assert_eq!(statuses(&response), ["applied"]);
        let woken = listener.notifications().timeout_iter(Duration::from_secs(3)).next().unwrap();
        assert_eq!(woken.map(|note| note.payload().to_owned()).as_deref(), Some("acme"), "push {n} woke acme's listeners");
        std::thread::sleep(Duration::from_millis(300));
    }
    scene.assert_witness_unchanged(&before);
}

// ---------------------------------------------------------------------------------------------------
// Resource limits
// ---------------------------------------------------------------------------------------------------

/// The backend's peak resident memory (VmHWM), in bytes.
fn peak_memory(pid: i32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    let kib = status.lines().find_map(|line| line.strip_prefix("VmHWM:")).map(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().unwrap());
    kib.expect("VmHWM in /proc/<pid>/status") * 1024
}

fn blob(n: usize, bytes: usize) -> Change {
    change(Op::Insert, "blob", &format!("blob-{n:04}"), hlc_now(), "phone", json!({ "blob": format!("{n:06}{}", "x".repeat(bytes - 6)) }))
}

#[test]
fn a_push_of_120_megabytes_of_in_limit_values_is_refused_with_bounded_memory() {
    let mut scene = Scene::new();
    let before = scene.witness();
    let acme = scene.tenant_state("acme");
    let mut m = scene.attacker();
    let pid = Scene::backend_pid(&mut m);
    let peak_before = peak_memory(pid);
    // 130 changes (within the default max_push_changes), each value 0.9 MB (within max_value_bytes).
    let batch: Vec<Change> = (0..130).map(|n| blob(n, 943_000)).collect();
    let result = push(&mut m, "acme", &batch).map(|response| statuses(&response).len());
    let growth = peak_memory(pid).saturating_sub(peak_before);
    let message = expect_error(result, "54000", &format!("a 120 MB push (the backend's peak memory grew by {} MB)", growth / MIB));
    assert!(message.contains("max_push_bytes"), "the error names max_push_bytes: {message}");
    assert!(growth < 1024 * MIB, "the backend's peak memory grew by {} MB", growth / MIB);
    assert_eq!(scene.tenant_state("acme"), acme, "the refused push changed nothing");
    scene.assert_witness_unchanged(&before);
}

#[test]
fn pulls_of_many_large_values_are_paged_by_bytes_and_deliver_each_change_once() {
    const MAX_PULL_BYTES: usize = 8 * MIB;
    let mut scene = Scene::new();
    let before = scene.witness();
    let mut m = scene.attacker();
    let values: Vec<Change> = (0..270).map(|n| blob(n, 1_000_000)).collect();
    for batch in values.chunks(7) {
        let response = push(&mut m, "acme", batch).expect("a push of 7 MB");
        assert!(statuses(&response).iter().all(|status| status == "applied"));
    }
    let (mut since, mut seqs, mut pages, mut stopped_early) = (0_i64, Vec::new(), 0, false);
    loop {
        pages += 1;
        assert!(pages < 1_000, "the pulls never ended");
        let text: String = m
            .query_one("SELECT sync_pull($1::text, $2::bigint)::text", &[&"acme", &since])
            .unwrap_or_else(|e| panic!("page {pages} failed: {}", describe(&e)))
            .get(0);
        let page: PullResponse = serde_json::from_str(&text).unwrap();
        assert!(!page.reset);
        assert!(
            page.changes.len() <= 1 || text.len() <= MAX_PULL_BYTES + MIB + 64 * 1024,
            "page {pages} holds {} changes in {} bytes",
            page.changes.len(),
            text.len()
        );
        stopped_early |= page.has_more && page.changes.len() < 1000;
        seqs.extend(page.changes.iter().filter(|c| c.model == "blob").map(|c| (c.seq, c.pk.clone())));
        if !page.has_more {
            break;
        }
        assert!(page.cursor > since, "the cursor moves on");
        since = page.cursor;
    }
    assert!(stopped_early, "a page stopped before max_changes because of its size");
    assert!(seqs.windows(2).all(|pair| pair[0].0 < pair[1].0), "changes arrive in seq order");
    let delivered: BTreeSet<&String> = seqs.iter().map(|(_, pk)| pk).collect();
    assert_eq!((seqs.len(), delivered.len()), (270, 270), "every change arrives exactly once");
    scene.assert_witness_unchanged(&before);
}

// ---------------------------------------------------------------------------------------------------
// Errors stay errors
// ---------------------------------------------------------------------------------------------------

#[test]
fn a_statement_timeout_inside_a_push_is_an_error_not_a_rejection() {
    let mut scene = Scene::new();
    scene.bind_table_with_trigger("slow", "PERFORM pg_sleep(2);");
    let before = scene.witness();
    let acme = scene.tenant_state("acme");
    let mut m = scene.attacker();
    m.batch_execute("SET statement_timeout = '200ms'").unwrap();
    let result = push(&mut m, "acme", &[change(Op::Insert, "slow", "1", hlc_now(), "phone", json!({"title": "slow"}))]);
    expect_error(result.map(|r| statuses(&r)), "57014", "a push running into statement_timeout");
    assert_eq!(scene.tenant_state("acme"), acme, "nothing was logged or written");
    scene.assert_witness_unchanged(&before);
}

#[test]
fn a_deadlock_inside_a_push_is_an_error_not_a_rejection() {
    let mut scene = Scene::new();
    // The owner's trigger waits (bounded) until another backend waits for this one, then takes lock 42.
    scene.bind_table_with_trigger(
        "locking",
        "FOR attempt IN 1..3000 LOOP
             EXIT WHEN EXISTS (SELECT FROM pg_stat_activity AS a WHERE pg_backend_pid() = ANY (pg_blocking_pids(a.pid)));
             PERFORM pg_sleep(0.01);
         END LOOP;
         PERFORM pg_advisory_xact_lock(42);",
    );
    let before = scene.witness();
    let url = scene.cluster.connection_string("sync");
    let mut a = scene.cluster.connect("sync");
    a.batch_execute("SET deadlock_timeout = '10s'; SET statement_timeout = '60s'; SELECT pg_advisory_lock(42);").unwrap();
    let mut b = Client::connect(&url, NoTls).unwrap();
    b.batch_execute("SET deadlock_timeout = '50ms'; SET statement_timeout = '60s';").unwrap();
    let b_pid = Scene::backend_pid(&mut b);
    let pushing_b =
        std::thread::spawn(move || push(&mut b, "acme", &[change(Op::Insert, "locking", "1", hlc_now(), "b", json!({"title": "b"}))]).map(|r| statuses(&r)));
    scene.await_wait_event(b_pid, "PgSleep");
    let pushing_a = std::thread::spawn(move || {
        let result = push(&mut a, "acme", &[note(Op::Insert, "from-a", "a")]).map(|r| statuses(&r));
        (a, result)
    });
    let b_result = pushing_b.join().unwrap();
    let (mut a, a_result) = pushing_a.join().unwrap();
    a.batch_execute("SELECT pg_advisory_unlock(42)").unwrap();
    expect_error(b_result, "40P01", "B's push, the deadlock victim");
    assert_eq!(a_result.expect("A's push completes once B rolled back"), ["applied"]);
    assert_eq!((scene.logged("locking"), scene.count("SELECT count(*) FROM public.lockings", &[])), (0, 0), "B wrote nothing");
    scene.assert_witness_unchanged(&before);
}

#[test]
fn a_lock_timeout_inside_a_push_is_an_error_not_a_rejection() {
    let mut scene = Scene::new();
    let before = scene.witness();
    let acme = scene.tenant_state("acme");
    let mut m = scene.attacker();
    m.batch_execute("SET lock_timeout = '100ms'; SET statement_timeout = '60s';").unwrap();
    let mut holder = scene.cluster.connect("sync");
    let mut row_lock = holder.transaction().unwrap();
    row_lock.query("SELECT * FROM public.todos WHERE id = $1::text::uuid FOR UPDATE", &[&ACME_TODO]).unwrap();
    let result = push(&mut m, "acme", &[change(Op::Update, "todo", ACME_TODO, hlc_now(), "phone", json!({"title": "blocked"}))]);
    row_lock.rollback().unwrap();
    expect_error(result.map(|r| statuses(&r)), "55P03", "a push waiting on a locked row past lock_timeout");
    assert_eq!(scene.tenant_state("acme"), acme, "nothing was logged or written");
    scene.assert_witness_unchanged(&before);
}

#[test]
fn a_cancelled_push_is_an_error_not_a_rejection() {
    let mut scene = Scene::new();
    scene.bind_table_with_trigger("slow", "PERFORM pg_sleep(2);");
    let before = scene.witness();
    let acme = scene.tenant_state("acme");
    let mut m = scene.attacker();
    let pid = Scene::backend_pid(&mut m);
    let pushing = std::thread::spawn(move || {
        push(&mut m, "acme", &[change(Op::Insert, "slow", "1", hlc_now(), "phone", json!({"title": "slow"}))]).map(|r| statuses(&r))
    });
    scene.await_wait_event(pid, "PgSleep");
    let cancelled: bool = scene.admin.query_one("SELECT pg_cancel_backend($1)", &[&pid]).unwrap().get(0);
    assert!(cancelled);
    expect_error(pushing.join().unwrap(), "57014", "a push cancelled with pg_cancel_backend");
    assert_eq!(scene.tenant_state("acme"), acme, "nothing was logged or written");
    scene.assert_witness_unchanged(&before);
}

// ---------------------------------------------------------------------------------------------------
// Scope grants
// ---------------------------------------------------------------------------------------------------

/// A device granted one scope instance, set up as the README's Partial sync section says (a LOGIN role
/// and `sync_grant_scope`), given TEMP and a schema of its own.
const SCOPED_DEVICE: &str = "
    SELECT sync_define_scope('project', 'task', 'project_id');
    CREATE ROLE eve LOGIN;
    SELECT sync_grant_scope('eve', 'acme', 'project:1');
    CREATE SCHEMA eve AUTHORIZATION eve;
";

/// What eve plants before syncing: look-alikes of the scope tables first on her search path and in
/// pg_temp, shadows of the functions the engine calls, and a JWT claim naming instances she was not granted.
const SCOPED_DEVICE_SHADOWS: &str = r#"
    CREATE TABLE eve.scopes (scope text, model text, field text);
    INSERT INTO eve.scopes VALUES ('project', 'task', 'title');
    CREATE TABLE eve.scope_grants (tenant_id text, role regrole, instance text);
    INSERT INTO eve.scope_grants VALUES ('acme', 'eve', 'project:2'), ('globex', 'eve', 'project:1');
    CREATE TEMP TABLE scope_log (tenant_id text, instance text, seq bigint, before boolean, after boolean);
    SET request.jwt.claims = '{"scopes": ["project:2"], "tenant": "globex"}';
"#;

fn task(pk: &str, value: Value) -> Change {
    change(Op::Update, "task", pk, hlc_now(), "eve-phone", value)
}

#[test]
fn a_device_granted_one_scope_reaches_only_it_whatever_it_plants_in_its_session() {
    let mut scene = Scene::new();
    scene.admin.batch_execute(SCOPED_DEVICE).unwrap();
    for (tenant, pk, project) in [("acme", "t1", 1), ("acme", "t2", 2), ("globex", "g1", 1)] {
        push(&mut scene.admin, tenant, &[task(pk, json!({"project_id": project, "title": format!("{tenant} {pk}")}))]).unwrap();
    }
    let before = scene.witness();
    let grants = |scene: &mut Scene| -> String {
        scene.admin.query_one("SELECT string_agg(g::text, ';' ORDER BY g::text) FROM sync_ext.scope_grants AS g", &[]).unwrap().get(0)
    };
    let (grants_before, t2_before) = (grants(&mut scene), scene.tenant_state("acme").contains("acme t2"));
    let mut eve = scene.cluster.connect_with_options("sync", "eve", "-c search_path=eve,pg_catalog,public -c statement_timeout=30s");
    eve.batch_execute(SCOPED_DEVICE_SHADOWS).unwrap();
    eve.batch_execute(SHADOW_IN_PG_TEMP).unwrap();
    eve.batch_execute(SHADOW_CATALOGS_WITH_TEMP_VIEWS).unwrap();

    let mut broken = Breaches::default();
    let mine = pull_all_scoped(&mut eve, "acme", &["project:1"]);
    let expected = BTreeSet::from([ACME_TODO.to_owned(), "a1".to_owned(), "t1".to_owned()]);
    broken.check(mine.as_ref() == Ok(&expected), || format!("eve's pull of project:1 (its task, acme's tenant-wide todo and note): {mine:?}"));
    let written = push(&mut eve, "acme", &[task("t1", json!({"title": "eve's edit"})), task("t3", json!({"project_id": 1, "title": "new"})), note(Op::Insert, "e1", "a note")]);
    broken.check(matches!(&written, Ok(r) if statuses(r) == ["applied", "applied", "applied"]), || format!("eve's writes inside project:1: {written:?}"));
    let escapes = push(&mut eve, "acme", &[task("t1", json!({"project_id": 2})), task("t2", json!({"title": "hijacked"})), task("t4", json!({"project_id": 2}))]);
    let all_out_of_scope = |r: &PushResponse| r.results.iter().all(|result| matches!(&result.status, Status::Rejected { reason } if reason == "out_of_scope"));
    broken.check(matches!(&escapes, Ok(r) if all_out_of_scope(r)), || format!("eve's writes leaving or outside project:1: {escapes:?}"));

    let refused: [(&str, Result<Value, postgres::Error>); 9] = [
        ("the whole tenant", pull(&mut eve, "acme", 0, 100).map(|_| Value::Null)),
        ("an ungranted instance", pull_scoped(&mut eve, "acme", 0, 100, &["project:2"]).map(|_| Value::Null)),
        ("another tenant's instance", pull_scoped(&mut eve, "globex", 0, 100, &["project:1"]).map(|_| Value::Null)),
        ("sync_compact", eve.query_one("SELECT sync_compact('acme')", &[]).map(|row| row.get(0))),
        ("sync_grant_scope", eve.query_one("SELECT sync_grant_scope('eve', 'acme', 'project:2')::text", &[]).map(|_| Value::Null)),
        ("sync_define_scope", eve.query_one("SELECT sync_define_scope('project', 'task', 'title')::text", &[]).map(|_| Value::Null)),
        ("sync_register_model", eve.query_one("SELECT sync_register_model('evil', 'eve.scopes', tenant => 'acme', columns => '{}')::text", &[]).map(|_| Value::Null)),
        ("reading the scope index", eve.query_one("SELECT count(*)::text FROM sync_ext.scope_log", &[]).map(|_| Value::Null)),
        ("reading the log", eve.query_one("SELECT count(*)::text FROM sync_ext.op_log", &[]).map(|_| Value::Null)),
    ];
    for (what, result) in refused {
        broken.expect_error(result, "42501", "", what);
    }
    let still_mine = pull_all_scoped(&mut eve, "acme", &["project:1"]);
    broken.check(matches!(&still_mine, Ok(pks) if pks.contains("t3") && pks.contains("t1") && !pks.contains("t2")), || format!("eve's pull after the attempts: {still_mine:?}"));
    broken.check(grants(&mut scene) == grants_before, || "the scope grants changed".into());
    broken.check(scene.tenant_state("acme").contains("acme t2") == t2_before, || "acme's task outside project:1 changed".into());
    scene.assert_no_escalation("eve");
    broken.assert_none();
    scene.assert_witness_unchanged(&before);
}

/// The pks of the rows a device holding `instances` gets from a scoped pull from 0, to the end.
fn pull_all_scoped(client: &mut Client, tenant: &str, instances: &[&str]) -> Result<BTreeSet<String>, String> {
    let (mut cursor, mut rows) = (0, BTreeSet::new());
    loop {
        let page = pull_scoped(client, tenant, cursor, 2, instances).map_err(|error| describe(&error))?;
        rows.extend(page.changes.iter().filter(|change| change.op != Op::Leave && change.op != Op::Delete).map(|change| change.pk.clone()));
        cursor = page.cursor;
        if !page.has_more {
            return Ok(rows);
        }
    }
}
