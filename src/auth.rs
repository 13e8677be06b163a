//! Who may sync which tenant.
//!
//! A superuser and the extension's owner may sync every tenant; any other role only the tenants granted
//! (`sync_grant_tenant`) to a role it is a member of, and, when the `jwt_tenant_claim` setting names a
//! claim, only while `request.jwt.claims` carries that claim equal to the tenant. A role granted only
//! scope instances of a tenant (`sync_grant_scope`) reaches those instances and the tenant-wide models:
//! it pulls naming them and pushes only to their rows. When the `jwt_scopes_claim` setting names a
//! claim, a request reaches only the instances that claim lists.
//!
//! The grants and the settings are read by the engine (see [`crate::identity`]) in one statement and
//! kept for the backend's life, until they change (see [`crate::kept`]). Role membership itself is read from Postgres's caches each call.

use std::cell::RefCell;
use std::collections::HashMap;

use pgrx::prelude::*;
use serde_json::Value;

use sync_ext_protocol::scope::Instances;

use crate::errors::{SyncError, SyncResult};
use crate::identity::{as_engine, Engine};
use crate::kept;
use crate::settings::Settings;

/// How much of a tenant a caller reaches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reach {
    /// The whole tenant.
    Tenant,
    /// The tenant-wide models and these scope instances, no more.
    Instances(Instances),
}

impl Reach {
    /// The instances a push may write, `None` for all.
    pub fn writable(&self) -> Option<Instances> {
        match self {
            Reach::Tenant => None,
            Reach::Instances(instances) => Some(instances.clone()),
        }
    }
}

/// Checks that the caller of the engine may access the whole of `tenant` and returns the settings in
/// force. Fails with 42501 otherwise. Call it inside [`as_engine`].
pub fn authorize(engine: &Engine, tenant: &str) -> SyncResult<Settings> {
    match access(engine, tenant)? {
        (settings, Some(Reach::Tenant)) => Ok(settings),
        _ => Err(SyncError::Forbidden { role: role_name(engine.caller), tenant: tenant.to_owned() }),
    }
}

/// Checks that the caller of the engine may access some of `tenant` and returns the settings in force
/// and how far it reaches. Fails with 42501 otherwise. Call it inside [`as_engine`].
pub fn authorize_reach(engine: &Engine, tenant: &str) -> SyncResult<(Settings, Reach)> {
    match access(engine, tenant)? {
        (settings, Some(reach)) => Ok((settings, reach)),
        (_, None) => Err(SyncError::Forbidden { role: role_name(engine.caller), tenant: tenant.to_owned() }),
    }
}

/// Fails with 42501 unless `reach` covers the pull of `scopes` (`None`: the whole tenant).
pub fn require_reach(engine: &Engine, tenant: &str, reach: &Reach, scopes: Option<&[String]>) -> SyncResult<()> {
    let Reach::Instances(granted) = reach else { return Ok(()) };
    let role = || role_name(engine.caller);
    let Some(scopes) = scopes else { return Err(SyncError::ScopesRequired { role: role(), tenant: tenant.to_owned() }) };
    match scopes.iter().find(|instance| !granted.contains(*instance)) {
        Some(instance) => Err(SyncError::ForbiddenInstance { role: role(), tenant: tenant.to_owned(), instance: instance.clone() }),
        None => Ok(()),
    }
}

/// The settings, and how far the caller reaches into `tenant` (`None`: not at all).
fn access(engine: &Engine, tenant: &str) -> SyncResult<(Settings, Option<Reach>)> {
    let (settings, grants) = grants_and_settings(tenant)?;
    let caller = engine.caller;
    // SAFETY: catalog cache lookups of role membership.
    let member = |role: pg_sys::Oid| unsafe { pg_sys::is_member_of_role(caller, role) };
    let privileged = caller == engine.owner || unsafe { pg_sys::superuser_arg(caller) };
    if privileged {
        return Ok((settings, Some(Reach::Tenant)));
    }
    if !settings.jwt_tenant_claim.as_deref().is_none_or(|claim| token_names(claim, tenant)) {
        return Ok((settings, None));
    }
    let reach = if grants.roles.iter().any(|&role| member(role)) {
        Some(Reach::Tenant)
    } else {
        let granted: Instances = grants.scoped.iter().filter(|(role, _)| member(*role)).map(|(_, instance)| instance.clone()).collect();
        (!granted.is_empty()).then_some(Reach::Instances(granted))
    };
    let reach = match (reach, settings.jwt_scopes_claim.as_deref()) {
        (Some(reach), Some(claim)) => {
            let listed = token_instances(claim);
            Some(Reach::Instances(match reach {
                Reach::Tenant => listed,
                Reach::Instances(granted) => granted.intersection(&listed).cloned().collect(),
            }))
        }
        (reach, _) => reach,
    };
    Ok((settings, reach))
}

/// The grants of one tenant: whole-tenant grants, and scope grants with their instances.
#[derive(Clone, Debug, Default)]
struct TenantGrants {
    roles: Vec<pg_sys::Oid>,
    scoped: Vec<(pg_sys::Oid, String)>,
}

/// What the engine keeps of `sync_ext.grants` and `sync_ext.settings` between calls.
#[derive(Default)]
struct Kept {
    /// The invalidation generation the entries were read in.
    generation: u64,
    settings: Option<Settings>,
    /// The grants of each tenant looked up so far.
    grants: HashMap<String, TenantGrants>,
}

/// The most tenants whose grants are kept; past it the map starts again.
const KEPT_TENANTS: usize = 10_000;

thread_local! {
    static KEPT: RefCell<Kept> = RefCell::new(Kept::default());
}

/// The settings and the roles granted `tenant`: kept ones while valid, else read in one statement (which
/// also checks that the extension's SQL objects are those of this library).
fn grants_and_settings(tenant: &str) -> SyncResult<(Settings, TenantGrants)> {
    let generation = kept::generation();
    let kept = KEPT.with_borrow(|kept| {
        let fresh = kept.generation == generation;
        Some((kept.settings.clone().filter(|_| fresh)?, kept.grants.get(tenant).filter(|_| fresh)?.clone()))
    });
    if let Some(kept) = kept {
        return Ok(kept);
    }
    // Watch the tables before reading them, so that a change committed while they are read is noticed.
    kept::watch_sync_table(c"grants");
    kept::watch_sync_table(c"settings");
    kept::watch_sync_table(c"scope_grants");
    let generation = kept::generation();
    let (roles, names, values, scoped_roles, instances) = Spi::connect(|client| {
        // The version first: an older schema may lack the tables read next.
        require_current_schema(client)?;
        let row = crate::plans::select(
            client,
            "SELECT ARRAY(SELECT g.role::oid FROM sync_ext.grants AS g WHERE g.tenant_id = $1),
                    ARRAY(SELECT s.name FROM sync_ext.settings AS s),
                    ARRAY(SELECT s.value FROM sync_ext.settings AS s),
                    ARRAY(SELECT g.role::oid FROM sync_ext.scope_grants AS g WHERE g.tenant_id = $1 ORDER BY g.role, g.instance),
                    ARRAY(SELECT g.instance FROM sync_ext.scope_grants AS g WHERE g.tenant_id = $1 ORDER BY g.role, g.instance)",
            Some(1),
            &[tenant.into()],
        )?
        .first();
        Ok::<_, SyncError>((
            row.get::<Vec<pg_sys::Oid>>(1)?,
            row.get::<Vec<String>>(2)?,
            row.get::<Vec<String>>(3)?,
            row.get::<Vec<pg_sys::Oid>>(4)?,
            row.get::<Vec<String>>(5)?,
        ))
    })?;
    let settings = Settings::from_rows(names.unwrap_or_default(), values.unwrap_or_default())?;
    let grants = TenantGrants {
        roles: roles.unwrap_or_default(),
        scoped: scoped_roles.unwrap_or_default().into_iter().zip(instances.unwrap_or_default()).collect(),
    };
    KEPT.with_borrow_mut(|kept| {
        if kept.generation != generation || kept.grants.len() >= KEPT_TENANTS {
            *kept = Kept { generation, ..Kept::default() };
        }
        // Kept only if no invalidation arrived while reading.
        if kept::generation() == generation {
            kept.settings = Some(settings.clone());
            kept.grants.insert(tenant.to_owned(), grants.clone());
        }
    });
    Ok((settings, grants))
}

/// Fails with 55000 unless the extension's SQL objects are those of this library (`ALTER EXTENSION
/// sync_ext UPDATE` brings them there).
pub fn require_current_schema(client: &pgrx::spi::SpiClient<'_>) -> SyncResult<()> {
    let version = crate::plans::select(client, "SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'sync_ext'", Some(1), &[])?;
    let version = if version.is_empty() { None } else { version.first().get_one::<String>()? };
    let library = env!("CARGO_PKG_VERSION");
    match version {
        Some(version) if version == library => Ok(()),
        Some(version) => Err(SyncError::OutdatedSchema { schema: version, library }),
        None => Err(SyncError::NotInstalled),
    }
}

/// Whether the request's JWT (`request.jwt.claims`, as PostgREST sets it) has `claim` equal to `tenant`.
fn token_names(claim: &str, tenant: &str) -> bool {
    match jwt_claims().as_ref().and_then(|claims| claims.get(claim)) {
        Some(Value::String(value)) => value == tenant,
        Some(Value::Number(value)) => value.to_string() == tenant,
        _ => false,
    }
}

/// The instances listed by `claim` of the request's JWT (a JSON array of strings); none without it.
fn token_instances(claim: &str) -> Instances {
    let claims = jwt_claims();
    let listed = claims.as_ref().and_then(|claims| claims.get(claim)).and_then(Value::as_array);
    listed.into_iter().flatten().filter_map(|instance| instance.as_str().map(str::to_owned)).collect()
}

/// The request's JWT claims (`request.jwt.claims`, as PostgREST sets them), if any.
fn jwt_claims() -> Option<Value> {
    // SAFETY: reads a configuration value as a C string owned by the GUC machinery, copied at once.
    let claims = unsafe { pg_sys::GetConfigOption(c"request.jwt.claims".as_ptr(), true, false) };
    if claims.is_null() {
        return None;
    }
    // SAFETY: a non-null GUC value is a NUL-terminated string.
    let claims = unsafe { std::ffi::CStr::from_ptr(claims) }.to_string_lossy();
    serde_json::from_str(&claims).ok()
}

fn role_name(role: pg_sys::Oid) -> String {
    // SAFETY: a catalog cache lookup; NULL when the role is gone.
    let name = unsafe { pg_sys::GetUserNameFromId(role, true) };
    if name.is_null() {
        return role.to_u32().to_string();
    }
    // SAFETY: a palloc'd NUL-terminated name.
    unsafe { std::ffi::CStr::from_ptr(name) }.to_string_lossy().into_owned()
}

/// Functions of the `sync_ext` schema.
#[pg_schema]
mod sync_ext {
    use pgrx::prelude::*;

    /// Whether the current role may sync (and read the rows of) the whole of `tenant`. The row-level security
    /// policies of `sync_ext.op_log` and `sync_ext.snapshots` use it.
    #[pg_extern(stable, parallel_safe)]
    fn may_access(tenant: &str) -> Result<bool, pgrx::pg_sys::panic::ErrorReport> {
        Ok(super::as_engine(|engine| super::access(engine, tenant))?.1 == Some(super::Reach::Tenant))
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;
    use serde_json::json;

    use crate::testing::{change, error_of, push};

    const PUSH: &str = r#"SELECT sync_push('acme', '[{"op_id": "00000000-0000-4000-8000-000000000009", "model": "todo", "pk": "9", "op": "insert", "hlc": "2026-01-01T00:00:00.000Z-0000", "actor": "app", "value": {}}]')"#;

    fn as_role(role: &str, sql: &str) -> String {
        error_of(&format!("SET LOCAL ROLE {role}; {sql}; RESET ROLE"))
    }

    #[pg_test]
    fn an_ungranted_role_is_refused_everything_and_changes_nothing() {
        push("acme", json!([change(1, "1", "insert", "00.000", "a", json!({"title": "secret"}))]));
        Spi::run("CREATE ROLE app_user NOLOGIN").unwrap();
        let denied = "42501: permission denied for tenant acme: role app_user has no grant for it (see sync_grant_tenant)";
        assert_eq!(as_role("app_user", PUSH), denied);
        assert_eq!(as_role("app_user", "SELECT sync_pull('acme', 0)"), denied);
        assert_eq!(as_role("app_user", "SELECT sync_pull_msgpack('acme', 0)"), denied);
        assert_eq!(as_role("app_user", "SELECT sync_compact('acme')"), denied);
        assert_eq!(as_role("app_user", "SELECT count(*) FROM sync_ext.op_log"), "42501: permission denied for table op_log");
        assert_eq!(as_role("app_user", "SELECT count(*) FROM sync_ext.snapshots"), "42501: permission denied for table snapshots");
        assert_eq!(as_role("app_user", "SELECT sync_grant_tenant('app_user', 'acme')"), "42501: permission denied for function sync_grant_tenant");
        assert_eq!(as_role("app_user", "SELECT sync_ext.may_access('acme')"), "no error", "a role may ask about itself");
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM sync_ext.op_log").unwrap(), Some(1), "nothing was pushed");
    }

    #[pg_test]
    fn a_granted_role_syncs_its_tenants_and_reads_only_their_rows() {
        push("acme", json!([change(1, "1", "insert", "00.000", "a", json!({"title": "acme's"}))]));
        push("globex", json!([change(1, "1", "insert", "00.000", "a", json!({"title": "globex's"}))]));
        Spi::run("CREATE ROLE app_user NOLOGIN; CREATE ROLE alice NOLOGIN IN ROLE app_user; SELECT sync_grant_tenant('app_user', 'acme')").unwrap();
        assert_eq!(as_role("alice", PUSH), "no error", "members of a granted role may push");
        assert_eq!(as_role("alice", "SELECT sync_pull('acme', 0)"), "no error");
        assert!(as_role("alice", "SELECT sync_pull('globex', 0)").starts_with("42501: permission denied for tenant globex"));
        for table in ["op_log", "snapshots"] {
            let seen = as_role("alice", &format!("DO $$ BEGIN RAISE '%', (SELECT string_agg(DISTINCT tenant_id, ',') FROM sync_ext.{table}); END $$"));
            assert_eq!(seen, "P0001: acme", "row-level security hides globex's rows of {table}");
        }
        Spi::run("SELECT sync_revoke_tenant('app_user', 'acme')").unwrap();
        assert!(as_role("alice", "SELECT sync_pull('acme', 0)").starts_with("42501"));
    }

    #[pg_test]
    fn the_jwt_claim_must_name_the_tenant_when_configured() {
        Spi::run("CREATE ROLE web_user NOLOGIN; SELECT sync_grant_tenant('web_user', 'acme'); SELECT sync_grant_tenant('web_user', 'globex')").unwrap();
        Spi::run("SELECT sync_configure('jwt_tenant_claim', 'org')").unwrap();
        Spi::run(r#"SET LOCAL request.jwt.claims = '{"sub": "u1", "org": "acme"}'"#).unwrap();
        assert_eq!(as_role("web_user", "SELECT sync_pull('acme', 0)"), "no error");
        assert!(as_role("web_user", "SELECT sync_pull('globex', 0)").starts_with("42501"), "granted, but not the tenant of the token");
        Spi::run("SET LOCAL request.jwt.claims = ''").unwrap();
        assert!(as_role("web_user", "SELECT sync_pull('acme', 0)").starts_with("42501"), "no token, no access");
    }
}
