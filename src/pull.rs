//! `sync_pull`: a tenant's changes after a cursor, in seq order.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use sync_ext_protocol::validate_tenant;

use crate::errors::{SyncError, SyncResult};
use crate::jsonb::JsonbDatum;

/// Returns `{"changes":[...],"cursor":N,"has_more":bool}`: at most `max_changes` changes with seq
/// greater than `since`. The body is built by one query and returned without re-parsing.
#[pg_extern(stable, parallel_safe)]
fn sync_pull(tenant: &str, since: i64, max_changes: default!(i32, 1000)) -> Result<JsonbDatum, ErrorReport> {
    Ok(pull(tenant, since, max_changes)?)
}

fn pull(tenant: &str, since: i64, max_changes: i32) -> SyncResult<JsonbDatum> {
    validate_tenant(tenant)?;
    if since < 0 {
        return Err(SyncError::InvalidArgument { argument: "since", problem: format!("must be 0 or more, got {since}") });
    }
    if max_changes < 1 {
        return Err(SyncError::InvalidArgument {
            argument: "max_changes",
            problem: format!("must be 1 or more, got {max_changes}"),
        });
    }
    let limit = max_changes.min(crate::MAX_PULL_CHANGES.get().max(1));
    Spi::connect(|client| {
        let table = client.select(
            "WITH page AS (
                 SELECT seq, op_id, model, pk, op, hlc, actor, payload
                   FROM sync_ext.op_log
                  WHERE tenant_id = $1 AND seq > $2
                  ORDER BY seq
                  LIMIT $3 + 1),
             kept AS (SELECT * FROM page ORDER BY seq LIMIT $3)
             SELECT jsonb_build_object(
                 'changes', coalesce((SELECT jsonb_agg(jsonb_build_object(
                                'seq', seq, 'op_id', op_id, 'model', model, 'pk', pk, 'op', op,
                                'hlc', hlc, 'actor', actor, 'value', payload) ORDER BY seq) FROM kept), '[]'::jsonb),
                 'cursor', coalesce((SELECT max(seq) FROM kept), $2),
                 'has_more', (SELECT count(*) FROM page) > $3)",
            Some(1),
            &[tenant.into(), since.into(), limit.into()],
        )?;
        Ok(JsonbDatum::take_first(table)?)
    })
}
