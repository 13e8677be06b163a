//! A catalog of hostile pushes: each gets a clear error (with its SQLSTATE) or a rejection, and the
//! sync tables are exactly as before. The backend survives all of them.

use postgres::types::ToSql;
use postgres::Client;
use serde_json::{json, Value};
use sync_ext_pgrx_tests::Cluster;

/// Everything the sync tables hold, as text.
fn fingerprint(client: &mut Client) -> String {
    client
        .query_one(
            "SELECT concat_ws('|', (SELECT string_agg(t::text, ',' ORDER BY tenant_id) FROM sync_ext.tenants t),
                                   (SELECT string_agg(o::text, ',' ORDER BY tenant_id, seq) FROM sync_ext.op_log o),
                                   (SELECT string_agg(s::text, ',' ORDER BY tenant_id, model, id) FROM sync_ext.snapshots s))",
            &[],
        )
        .unwrap()
        .get(0)
}

fn valid(n: u32) -> Value {
    json!({"op_id": format!("00000000-0000-4000-8000-{n:012}"), "model": "todo", "pk": n.to_string(), "op": "insert",
           "hlc": "2026-01-01T00:00:00.000Z-0000", "actor": "device", "value": {"title": "ok"}})
}

/// The SQLSTATE and message of a call expected to fail.
fn error_of(client: &mut Client, sql: &str, params: &[&(dyn ToSql + Sync)]) -> (String, String) {
    let error = client.query_one(sql, params).expect_err(&format!("{sql} must fail"));
    let db = error.as_db_error().unwrap_or_else(|| panic!("not a database error: {error}"));
    (db.code().code().to_owned(), db.message().to_owned())
}

#[test]
fn hostile_pushes_are_refused_clearly_and_change_nothing() {
    let cluster = Cluster::start();
    cluster.create_database("sync");
    let mut client = cluster.connect("sync");
    client.query_one("SELECT sync_push('acme', $1::jsonb)", &[&json!([valid(1)])]).unwrap();
    let before = fingerprint(&mut client);

    let nested = format!("[{{\"op_id\": \"00000000-0000-4000-8000-000000000002\", \"model\": \"todo\", \"pk\": \"2\", \"op\": \"insert\", \"hlc\": \"2026-01-01T00:00:00.000Z-0000\", \"actor\": \"a\", \"value\": {{\"d\": {}1{}}}}}]", "[".repeat(200), "]".repeat(200));
    let mut ten_megabytes = valid(3);
    ten_megabytes["value"] = json!({"blob": "x".repeat(10 * 1024 * 1024)});
    let mut two_megabytes = valid(11);
    two_megabytes["value"] = json!({"blob": "x".repeat(2 * 1024 * 1024)});
    let mut huge_array = valid(4);
    huge_array["value"] = json!({"items": vec![1; 1_000_000]});
    let too_many = Value::from((0..10_001).map(valid).collect::<Vec<_>>());
    let beyond_f64 = r#"[{"op_id": "00000000-0000-4000-8000-000000000005", "model": "todo", "pk": "5", "op": "insert", "hlc": "2026-01-01T00:00:00.000Z-0000", "actor": "a", "value": {"n": 1e400}}]"#;
    let duplicate_keys = r#"[{"op_id": "00000000-0000-4000-8000-000000000006", "model": "todo", "pk": "6", "op": "insert", "op": "delete", "hlc": "2026-01-01T00:00:00.000Z-0000", "actor": "a", "value": {"title": "x"}}]"#;
    let nul = r#"[{"op_id": "00000000-0000-4000-8000-000000000007", "model": "todo\u0000", "pk": "7", "op": "insert", "hlc": "2026-01-01T00:00:00.000Z-0000", "actor": "a", "value": {}}]"#;

    let json_cases: Vec<(&str, String, &str, &str)> = vec![
        ("nesting 200 levels deep", nested, "22023", "changes[0].value.d: is nested more than 120 levels deep"),
        ("a 10 MB body", json!([ten_megabytes]).to_string(), "54000", "changes: the body is 10485960 bytes, over max_push_bytes (8388608)"),
        ("an array of a million numbers", json!([huge_array]).to_string(), "54000", "changes: the body is"),
        ("10,001 changes", too_many.to_string(), "22023", "changes: 10001 changes exceed max_push_changes (10000)"),
        ("a number beyond double precision", beyond_f64.to_owned(), "22023", "changes[0].value.n: the number 1000000000000000000000000000000000000000... (401 characters) cannot be carried exactly"),
        ("duplicate keys (jsonb keeps the last: a delete with a value)", duplicate_keys.to_owned(), "22023", "changes[0].value: a delete carries no value"),
        ("a NUL character", nul.to_owned(), "22P05", "unsupported Unicode escape sequence"),
        ("op_id of the wrong type", json!([{"op_id": {}, "model": "m"}]).to_string(), "22023", "changes[0].op_id: expected a string, got an object"),
        ("hlc of the wrong type", json!([{"op_id": "00000000-0000-4000-8000-000000000008", "model": "m", "pk": "1", "op": "insert", "hlc": [], "actor": "a"}]).to_string(), "22023", "changes[0].hlc: expected a string, got an array"),
        ("value of the wrong type", json!([{"op_id": "00000000-0000-4000-8000-000000000008", "model": "m", "pk": "1", "op": "insert", "hlc": "2026-01-01T00:00:00.000Z-0000", "actor": "a", "value": "x"}]).to_string(), "22023", "changes[0].value: expected an object, got a string"),
        ("a scalar body", "42".to_owned(), "22023", "changes: expected a JSON array, got a number"),
    ];
    for (case, body, sqlstate, message) in &json_cases {
        let (code, text) = error_of(&mut client, "SELECT sync_push('acme', $1::text::jsonb)", &[body]);
        assert_eq!(code, *sqlstate, "{case}: {text}");
        assert!(text.starts_with(message) || text.contains(message), "{case}: {text}");
        assert_eq!(fingerprint(&mut client), before, "{case} changed something");
    }

    let msgpack_cases: Vec<(&str, Vec<u8>)> = vec![
        ("invalid UTF-8 in a string", vec![0x91, 0xa3, 0xff, 0xfe, 0xfd]),
        ("a reserved byte", vec![0xc1]),
        ("a truncated map", vec![0x91, 0x8f]),
        ("binary where text is expected", vec![0x91, 0xc4, 0x01, 0x00]),
        ("arrays nested 100,000 deep", vec![0x91; 100_000]),
    ];
    for (case, bytes) in &msgpack_cases {
        let (code, text) = error_of(&mut client, "SELECT sync_push_msgpack('acme', $1)", &[bytes]);
        assert_eq!(code, "22P02", "{case}: {text}");
        assert!(text.starts_with("changes: not valid MessagePack"), "{case}: {text}");
        assert_eq!(fingerprint(&mut client), before, "{case} changed something");
    }

    let (code, _) = error_of(&mut client, "SELECT sync_push('', $1::jsonb)", &[&json!([valid(9)])]);
    assert_eq!(code, "22023", "an empty tenant");
    let sneaky_tenant = "acme'); DROP TABLE sync_ext.op_log; --";
    let mut sneaky = valid(10);
    sneaky["model"] = json!("todo\"; DELETE FROM sync_ext.snapshots; --");
    let applied: Value = client.query_one("SELECT sync_push($1, $2::jsonb)", &[&sneaky_tenant, &json!([sneaky])]).unwrap().get(0);
    assert_eq!(applied["results"][0]["status"], "applied", "SQL in names is only data");
    let stored: String = client.query_one("SELECT tenant_id || ' / ' || model FROM sync_ext.op_log WHERE seq = 1 AND tenant_id <> 'acme'", &[]).unwrap().get(0);
    assert_eq!(stored, format!("{sneaky_tenant} / todo\"; DELETE FROM sync_ext.snapshots; --"));
    let acme_rows: i64 = client.query_one("SELECT count(*) FROM sync_ext.snapshots WHERE tenant_id = 'acme'", &[]).unwrap().get(0);
    assert_eq!(acme_rows, 1, "nothing was deleted or dropped");

    // Well formed but impossible to store: refused alone, the rest of the batch applies. jsonb cannot hold a
    // NUL character, so only MessagePack can carry one to the server.
    let mut nul_text = valid(12);
    nul_text["value"] = json!({"title": "a\u{0}b"});
    let batch = json!([valid(13), two_megabytes, nul_text, valid(14)]);
    let packed = sync_ext_protocol::msgpack::encode(&batch).unwrap();
    let response: Vec<u8> = client.query_one("SELECT sync_push_msgpack('acme', $1)", &[&packed]).unwrap().get(0);
    let response: Value = sync_ext_protocol::msgpack::decode(&response).unwrap();
    let outcomes: Vec<(String, String)> = response["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["status"].as_str().unwrap().to_owned(), r["reason"].as_str().unwrap_or_default().to_owned()))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("applied".to_owned(), String::new()),
            ("rejected".to_owned(), "value_too_large: changes[1].value is over 1048576 bytes (max_value_bytes)".to_owned()),
            ("rejected".to_owned(), "invalid_text: changes[2].value.title holds a NUL character, which Postgres cannot store".to_owned()),
            ("applied".to_owned(), String::new()),
        ]
    );
}
