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

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;
    use serde_json::{json, Value};

    use crate::testing::{change, error_of, pull, push};

    fn seqs(page: &Value) -> Vec<i64> {
        page["changes"].as_array().unwrap().iter().map(|c| c["seq"].as_i64().unwrap()).collect()
    }

    #[pg_test]
    fn pages_in_seq_order_with_has_more() {
        let batch: Vec<Value> = (1..=5).map(|n| change(n, &n.to_string(), "insert", "00.000", "a", json!({"n": n}))).collect();
        push("t", Value::from(batch));
        let first = pull("t", 0, 2);
        assert_eq!((seqs(&first), first["cursor"].clone(), first["has_more"].clone()), (vec![1, 2], json!(2), json!(true)));
        let second = pull("t", 2, 2);
        assert_eq!((seqs(&second), second["has_more"].clone()), (vec![3, 4], json!(true)));
        let last = pull("t", 4, 2);
        assert_eq!((seqs(&last), last["cursor"].clone(), last["has_more"].clone()), (vec![5], json!(5), json!(false)));
        let caught_up = pull("t", 5, 2);
        assert_eq!(caught_up, json!({"changes": [], "cursor": 5, "has_more": false}));
        let exact = pull("t", 3, 2);
        assert_eq!((seqs(&exact), exact["has_more"].clone()), (vec![4, 5], json!(false)));
        assert_eq!(
            last["changes"][0],
            json!({"seq": 5, "op_id": "00000000-0000-4000-8000-000000000005", "model": "todo", "pk": "5", "op": "insert",
                   "hlc": "2026-01-01T00:00:00.000Z-0000", "actor": "a", "value": {"n": 5}})
        );
    }

    #[pg_test]
    fn max_pull_changes_caps_a_page() {
        let batch: Vec<Value> = (1..=3).map(|n| change(n, &n.to_string(), "insert", "00.000", "a", json!({}))).collect();
        push("t", Value::from(batch));
        Spi::run("SET LOCAL sync_ext.max_pull_changes = 2").unwrap();
        let page = pull("t", 0, 1000);
        assert_eq!((seqs(&page), page["has_more"].clone()), (vec![1, 2], json!(true)));
    }

    #[pg_test]
    fn a_tenant_never_sees_another_tenants_changes() {
        let shared_op_id = change(1, "1", "insert", "00.000", "a", json!({"owner": "acme"}));
        push("acme", json!([shared_op_id]));
        let mut other = change(1, "1", "insert", "00.000", "a", json!({"owner": "globex"}));
        other["value"]["owner"] = json!("globex");
        assert_eq!(push("globex", json!([other]))["results"][0]["status"], "applied", "op_ids are per tenant");
        let acme = pull("acme", 0, 100);
        let globex = pull("globex", 0, 100);
        assert_eq!(acme["changes"].as_array().unwrap().len(), 1);
        assert_eq!(acme["changes"][0]["value"]["owner"], "acme");
        assert_eq!(globex["changes"][0]["value"]["owner"], "globex");
        assert_eq!(pull("initech", 0, 100), json!({"changes": [], "cursor": 0, "has_more": false}));
    }

    #[pg_test]
    fn bad_pull_arguments_are_errors_naming_the_argument() {
        assert_eq!(error_of("SELECT sync_pull('', 0)"), "22023: tenant: must not be empty");
        assert_eq!(error_of("SELECT sync_pull('t', -1)"), "22023: since: must be 0 or more, got -1");
        assert_eq!(error_of("SELECT sync_pull('t', 0, 0)"), "22023: max_changes: must be 1 or more, got 0");
    }
}
