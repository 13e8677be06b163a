//! `sync_push`: merges a batch of client changes into the op log and the snapshots.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::Value;
use sync_ext_protocol::hlc::wall_clock_millis;
use sync_ext_protocol::{merge_batch, parse_changes, validate_tenant, BatchContext, PushResponse};

use crate::errors::SyncResult;
use crate::storage;

/// Applies a batch of changes for `tenant` and returns one result per change plus the tenant's cursor.
/// See the README for the change format and the merge rule.
#[pg_extern(volatile, parallel_unsafe)]
fn sync_push(tenant: &str, changes: JsonB) -> Result<JsonB, ErrorReport> {
    let response = push(tenant, &changes.0)?;
    Ok(JsonB(serde_json::to_value(response).expect("push responses serialize")))
}

/// Validates, merges and stores one batch: a handful of statements whatever its size.
pub fn push(tenant: &str, body: &Value) -> SyncResult<PushResponse> {
    validate_tenant(tenant)?;
    let max_changes = usize::try_from(crate::MAX_PUSH_CHANGES.get()).unwrap_or(0);
    let changes = parse_changes(body, max_changes)?;
    if changes.is_empty() {
        let cursor = Spi::connect(|client| storage::last_seq(client, tenant))?;
        return Ok(PushResponse { cursor, results: Vec::new() });
    }
    let latest_allowed_millis = wall_clock_millis() + i64::from(crate::MAX_CLOCK_SKEW_MS.get());
    Spi::connect_mut(|client| {
        let last_seq = storage::lock_tenant(client, tenant)?;
        let context = BatchContext {
            last_seq,
            logged: storage::logged_ops(client, tenant, &changes)?,
            rows: storage::load_rows(client, tenant, &changes)?,
            latest_allowed_millis,
        };
        let outcome = merge_batch(&changes, context);
        if !outcome.appended.is_empty() {
            storage::append_ops(client, tenant, &changes, &outcome.appended)?;
            storage::save_rows(client, tenant, &outcome.rows)?;
            storage::advance_tenant(client, tenant, outcome.last_seq)?;
            client.update("SELECT pg_notify('sync_ext', $1)", None, &[tenant.into()])?;
        }
        Ok(PushResponse { cursor: outcome.last_seq, results: outcome.results })
    })
}
