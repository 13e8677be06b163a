//! sync_ext: the server half of local-first sync, inside Postgres.
//!
//! `CREATE EXTENSION sync_ext;` creates the `sync_ext` schema (op log, snapshots, tenants) and the
//! SQL functions clients call: `sync_push` (`push.rs`) and `sync_pull` (`pull.rs`). The merge rule and the
//! wire types live in the `sync_ext_protocol` crate, shared with clients.

// SQL functions return pgrx's ErrorReport, which carries the SQLSTATE; its size is pgrx's choice.
#![allow(clippy::result_large_err)]

use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};

mod auth;
mod capture;
mod citus;
mod compact;
mod errors;
mod identity;
mod jsonb;
mod kept;
mod models;
mod notifier;
mod plans;
mod pull;
mod push;
mod scopes;
mod settings;
mod storage;
mod subtransaction;
mod types;
#[cfg(any(test, feature = "pg_test"))]
mod testing;

::pgrx::pg_module_magic!(name, version);

pgrx::extension_sql_file!("../sql/bootstrap.sql", name = "bootstrap", bootstrap);
// A fresh install is the 0.1.0 schema plus every upgrade since, so fresh and upgraded databases match.
// Each upgrade script replaces the Rust functions it declares, so it comes after them.
pgrx::extension_sql_file!(
    "../sql/sync_ext--0.1.0--0.2.0.sql",
    name = "upgrade_0_2_0",
    requires = [compact::sync_compact, push::sync_push_msgpack, pull::sync_pull_msgpack_scoped]
);
pgrx::extension_sql_file!(
    "../sql/sync_ext--0.2.0--0.3.0.sql",
    name = "upgrade_0_3_0",
    requires = ["upgrade_0_2_0", settings::sync_configure, pull::sync_ext::tenant_digest, auth::sync_ext::may_access, models::sync_register_model, models::sync_unregister_model]
);
pgrx::extension_sql_file!("../sql/sync_ext--0.3.0--0.4.0.sql", name = "upgrade_0_4_0", requires = ["upgrade_0_3_0"]);
pgrx::extension_sql_file!("../sql/sync_ext--0.4.0--0.5.0.sql", name = "upgrade_0_5_0", requires = ["upgrade_0_4_0"]);
pgrx::extension_sql_file!("../sql/sync_ext--0.5.0--0.6.0.sql", name = "upgrade_0_6_0", finalize);

/// Values of `sync_ext.number_mode`.
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum NumberModeSetting {
    /// bigint and numeric always travel as strings of exact digits.
    #[name = c"string"]
    String,
    /// bigint and numeric travel as JSON numbers when they are integers below 2^53.
    #[name = c"number_when_safe"]
    NumberWhenSafe,
}

/// `sync_ext.number_mode`: how bigint and numeric values are written in portable JSON.
pub(crate) static NUMBER_MODE: GucSetting<NumberModeSetting> = GucSetting::<NumberModeSetting>::new(NumberModeSetting::String);

/// `sync_ext.actor`: the actor of changes captured from plain SQL writes to registered tables.
pub(crate) static ACTOR: GucSetting<Option<std::ffi::CString>> = GucSetting::<Option<std::ffi::CString>>::new(Some(c"server"));

/// The actor that plain SQL writes are attributed to.
pub(crate) fn server_actor() -> String {
    ACTOR
        .get()
        .map(|actor| actor.to_string_lossy().into_owned())
        .filter(|actor| !actor.is_empty())
        .unwrap_or_else(|| "server".to_owned())
}

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    GucRegistry::define_string_guc(
        c"sync_ext.actor",
        c"The actor recorded for changes captured from plain SQL writes to registered tables.",
        c"",
        &ACTOR,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"sync_ext.number_mode",
        c"How bigint and numeric values are written in portable JSON: string, or number_when_safe.",
        c"",
        &NUMBER_MODE,
        GucContext::Suset,
        GucFlags::default(),
    );
    // The limits and the JWT rule are operator settings in sync_ext.settings (see settings.rs), not
    // parameters: nothing a session sets can replace them.
    kept::register_invalidation_callback();
}

#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
