//! Who may sync which tenant, and running the engine's own reads and writes as the extension's owner.
//!
//! The SQL functions run with the caller's rights so that the caller can be checked
//! (`sync_ext.may_access`: superuser, extension owner, or a member of a granted role, and the JWT
//! claim when `sync_ext.jwt_tenant_claim` is set). Once allowed, the work on the sync tables runs as
//! the extension's owner, so callers need no privileges on them. Postgres restores the caller's
//! identity if the work fails, and [`as_owner`] restores it when the work returns.

use pgrx::prelude::*;

use crate::errors::{SyncError, SyncResult};

/// Fails with 42501 unless the current role may access `tenant`.
pub fn authorize(tenant: &str) -> SyncResult<()> {
    // SAFETY: reads the current user's superuser flag from the catalog cache.
    if unsafe { pg_sys::superuser() } {
        return Ok(());
    }
    // Reads go through read-only SPI (pgrx's Spi::get_* helpers would assign a transaction id, which a
    // hot standby refuses and which would cost every pull an xid on the primary).
    let allowed = Spi::connect(|client| {
        crate::plans::select(&client, "SELECT sync_ext.may_access($1, current_user), current_user::text", Some(1), &[tenant.into()])?
            .first()
            .get_two::<bool, String>()
    })?;
    match allowed {
        (Some(true), _) => Ok(()),
        (_, role) => Err(SyncError::Forbidden { role: role.unwrap_or_default(), tenant: tenant.to_owned() }),
    }
}

/// Restores the caller's identity when dropped (also while unwinding from an error).
struct CallerIdentity {
    user: pg_sys::Oid,
    context: i32,
}

impl Drop for CallerIdentity {
    fn drop(&mut self) {
        // SAFETY: puts back the identity saved when switching.
        unsafe { pg_sys::SetUserIdAndSecContext(self.user, self.context) };
    }
}

/// Runs `work` as the owner of the sync_ext extension.
pub fn as_owner<T>(work: impl FnOnce() -> SyncResult<T>) -> SyncResult<T> {
    let owner = Spi::connect(|client| {
        crate::plans::select(&client, "SELECT extowner FROM pg_catalog.pg_extension WHERE extname = 'sync_ext'", Some(1), &[])?.first().get_one::<pg_sys::Oid>()
    })?
    .ok_or(SyncError::NotInstalled)?;
    let (mut user, mut context) = (pg_sys::InvalidOid, 0);
    // SAFETY: the same protocol SECURITY DEFINER functions follow; the guard restores the identity.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(owner, context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32);
    }
    let _caller = CallerIdentity { user, context };
    work()
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
        assert_eq!(as_role("app_user", "SELECT sync_grant_tenant('app_user', 'acme')"), "42501: permission denied for table grants");
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
        Spi::run("SET LOCAL sync_ext.jwt_tenant_claim = 'org'").unwrap();
        Spi::run(r#"SET LOCAL request.jwt.claims = '{"sub": "u1", "org": "acme"}'"#).unwrap();
        assert_eq!(as_role("web_user", "SELECT sync_pull('acme', 0)"), "no error");
        assert!(as_role("web_user", "SELECT sync_pull('globex', 0)").starts_with("42501"), "granted, but not the tenant of the token");
        Spi::run("SET LOCAL request.jwt.claims = ''").unwrap();
        assert!(as_role("web_user", "SELECT sync_pull('acme', 0)").starts_with("42501"), "no token, no access");
    }
}
