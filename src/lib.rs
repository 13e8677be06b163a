//! sync_ext: the server half of local-first sync, inside Postgres.
//!
//! `CREATE EXTENSION sync_ext;` creates the `sync_ext` schema (op log, snapshots, tenants) and the
//! SQL functions clients call: [`push::sync_push`] and [`pull::sync_pull`]. The merge rule and the
//! wire types live in the `sync_ext_protocol` crate, shared with clients.

// SQL functions return pgrx's ErrorReport, which carries the SQLSTATE; its size is pgrx's choice.
#![allow(clippy::result_large_err)]

use std::ffi::CStr;

use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};

mod auth;
mod capture;
mod compact;
mod errors;
mod jsonb;
mod models;
mod plans;
mod pull;
mod push;
mod storage;
mod subtransaction;
mod types;
#[cfg(any(test, feature = "pg_test"))]
mod testing;

::pgrx::pg_module_magic!(name, version);

pgrx::extension_sql_file!("../sql/bootstrap.sql", name = "bootstrap", bootstrap);
// A fresh install is the 0.1.0 schema plus every upgrade since, so fresh and upgraded databases match.
pgrx::extension_sql_file!("../sql/sync_ext--0.1.0--0.2.0.sql", name = "upgrade_0_2_0", finalize);

/// `sync_ext.jwt_tenant_claim`: when set, the claim of `request.jwt.claims` that must equal the tenant.
pub(crate) static JWT_TENANT_CLAIM: GucSetting<Option<std::ffi::CString>> = GucSetting::<Option<std::ffi::CString>>::new(None);

/// `sync_ext.max_clock_skew`: how far (ms) a change's hlc may run ahead of the server clock.
pub(crate) static MAX_CLOCK_SKEW_MS: GucSetting<i32> = GucSetting::<i32>::new(5 * 60 * 1000);
/// `sync_ext.max_push_changes`: the most changes one push may carry.
pub(crate) static MAX_PUSH_CHANGES: GucSetting<i32> = GucSetting::<i32>::new(10_000);
/// `sync_ext.max_value_bytes`: the largest value one change may carry.
pub(crate) static MAX_VALUE_BYTES: GucSetting<i32> = GucSetting::<i32>::new(1024 * 1024);
/// `sync_ext.max_pull_changes`: the most changes one pull returns, whatever it asks for.
pub(crate) static MAX_PULL_CHANGES: GucSetting<i32> = GucSetting::<i32>::new(10_000);

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

fn define_int(name: &'static CStr, short: &'static CStr, setting: &'static GucSetting<i32>, max: i32, flags: GucFlags) {
    GucRegistry::define_int_guc(name, short, c"", setting, 0, max, GucContext::Suset, flags);
}

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    define_int(
        c"sync_ext.max_clock_skew",
        c"How far a pushed change's HLC may be ahead of the server clock before it is rejected (clock_skew).",
        &MAX_CLOCK_SKEW_MS,
        i32::MAX,
        GucFlags::UNIT_MS,
    );
    define_int(
        c"sync_ext.max_push_changes",
        c"The most changes one sync_push may carry; a larger batch is an error.",
        &MAX_PUSH_CHANGES,
        1_000_000,
        GucFlags::default(),
    );
    define_int(
        c"sync_ext.max_value_bytes",
        c"The largest value (in bytes of JSON) one pushed change may carry; a larger one is an error.",
        &MAX_VALUE_BYTES,
        i32::MAX,
        GucFlags::UNIT_BYTE,
    );
    define_int(
        c"sync_ext.max_pull_changes",
        c"The most changes one sync_pull returns, whatever max_changes asks for.",
        &MAX_PULL_CHANGES,
        1_000_000,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"sync_ext.actor",
        c"The actor recorded for changes captured from plain SQL writes to registered tables.",
        c"",
        &ACTOR,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"sync_ext.jwt_tenant_claim",
        c"When set, the claim of request.jwt.claims that must equal the tenant of every sync call (PostgREST, Supabase).",
        c"",
        &JWT_TENANT_CLAIM,
        GucContext::Suset,
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
}

#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
