//! The sync_ext walk-through: a throwaway cluster, two devices, pushes, pulls, conflicts and a
//! server-side write, printed step by step. Every outcome is checked, so a wrong one stops the demo.

use postgres::Client;
use serde_json::{json, Value};
use sync_ext_pgrx_tests::{change, hlc_ago, pull, push, Cluster};
use sync_ext_protocol::{Change, Op, PushResponse, Status};

fn step(title: &str) {
    println!("\n== {title}");
}

fn show_push(device: &str, changes: &[Change], response: &PushResponse) {
    for (change, result) in changes.iter().zip(&response.results) {
        let what = match &change.value {
            Some(value) => format!("{} {} {}", change.op.as_str(), change.pk, Value::Object(value.clone())),
            None => format!("{} {}", change.op.as_str(), change.pk),
        };
        let outcome = match &result.status {
            Status::Applied { seq } => format!("applied at seq {seq}"),
            Status::Duplicate { seq } => format!("duplicate of seq {seq}: nothing changed"),
            Status::Superseded => "superseded: a newer write already holds it".to_owned(),
            Status::Rejected { reason } => format!("rejected ({reason})"),
        };
        println!("  {device} pushes {what} @ {} -> {outcome}", change.hlc);
    }
    println!("  tenant cursor is now {}", response.cursor);
}

fn show_row(client: &mut Client, pk: &str) -> Value {
    let row = client
        .query_opt("SELECT value, deleted FROM sync_ext.snapshots WHERE tenant_id = 'acme' AND model = 'todo' AND id = $1", &[&pk])
        .expect("snapshot query")
        .expect("the row is known");
    let (value, deleted): (Value, bool) = (row.get(0), row.get(1));
    println!("  server row {pk}: {}", if deleted { "deleted".to_owned() } else { value.to_string() });
    value
}

fn statuses(response: &PushResponse) -> Vec<&Status> {
    response.results.iter().map(|result| &result.status).collect()
}

fn main() {
    println!("Starting a throwaway Postgres cluster with sync_ext...");
    let cluster = Cluster::start();
    cluster.create_database("demo");
    let mut phone = cluster.connect("demo");
    let mut laptop = cluster.connect("demo");
    // Stamps from an hour ago onwards, `seconds` apart: devices that were offline push them late.
    let at = |seconds: i64| hlc_ago(3_600_000 - seconds * 1_000, 0);

    step("The phone creates a todo while online");
    let create = vec![change(Op::Insert, "todo", "42", at(0), "phone", json!({"title": "buy milk", "done": false}))];
    let response = push(&mut phone, "acme", &create).unwrap();
    show_push("phone", &create, &response);
    assert_eq!(statuses(&response), [&Status::Applied { seq: 1 }]);

    step("The laptop pulls from cursor 0");
    let page = pull(&mut laptop, "acme", 0, 100).unwrap();
    for pulled in &page.changes {
        println!("  seq {}: {} {} by {} -> {}", pulled.seq, pulled.op.as_str(), pulled.pk, pulled.actor, Value::Object(pulled.value.clone().unwrap_or_default()));
    }
    println!("  cursor {}, has_more {}", page.cursor, page.has_more);
    assert_eq!((page.changes.len(), page.cursor), (1, 1));

    step("Both edit the todo offline: the phone renames it, the laptop ticks it done");
    let rename = vec![change(Op::Update, "todo", "42", at(10), "phone", json!({"title": "buy oat milk"}))];
    let tick = vec![change(Op::Update, "todo", "42", at(20), "laptop", json!({"done": true}))];
    let laptop_response = push(&mut laptop, "acme", &tick).unwrap();
    show_push("laptop", &tick, &laptop_response);
    let phone_response = push(&mut phone, "acme", &rename).unwrap();
    show_push("phone", &rename, &phone_response);
    println!("  different fields: both edits are kept, whatever order they arrive in");
    assert_eq!(show_row(&mut phone, "42"), json!({"title": "buy oat milk", "done": true}));

    step("A real conflict: both rename the todo offline; the later HLC wins on every replica");
    let laptop_title = vec![change(Op::Update, "todo", "42", at(40), "laptop", json!({"title": "buy almond milk"}))];
    let phone_title = vec![change(Op::Update, "todo", "42", at(30), "phone", json!({"title": "buy soy milk"}))];
    let response = push(&mut laptop, "acme", &laptop_title).unwrap();
    show_push("laptop", &laptop_title, &response);
    let response = push(&mut phone, "acme", &phone_title).unwrap();
    show_push("phone", &phone_title, &response);
    assert_eq!(statuses(&response), [&Status::Superseded]);
    println!("  winner: the laptop's title (its HLC {} is later than the phone's {})", laptop_title[0].hlc, phone_title[0].hlc);
    assert_eq!(show_row(&mut phone, "42")["title"], "buy almond milk");

    step("The phone lost its connection mid-push and sends the same batch again");
    let response = push(&mut phone, "acme", &rename).unwrap();
    show_push("phone", &rename, &response);
    assert_eq!(statuses(&response), [&Status::Duplicate { seq: 3 }]);

    step("A buggy client reuses an op_id for a different change");
    let mut reused = rename.clone();
    reused[0].value = Some(json!({"title": "something else"}).as_object().unwrap().clone());
    let response = push(&mut phone, "acme", &reused).unwrap();
    show_push("phone", &reused, &response);
    assert!(matches!(statuses(&response)[..], [Status::Rejected { reason }] if reason == "op_id_conflict"));

    step("A device whose clock is a day ahead cannot win every conflict forever");
    let skewed = vec![change(Op::Update, "todo", "42", hlc_ago(-86_400_000, 0), "broken-clock", json!({"title": "mine forever"}))];
    let response = push(&mut laptop, "acme", &skewed).unwrap();
    show_push("broken-clock", &skewed, &response);
    assert!(matches!(statuses(&response)[..], [Status::Rejected { reason }] if reason == "clock_skew"));

    step("The laptop deletes the todo; the phone pulls the delete");
    let delete = vec![change(Op::Delete, "todo", "42", at(50), "laptop", Value::Null)];
    let response = push(&mut laptop, "acme", &delete).unwrap();
    show_push("laptop", &delete, &response);
    let page = pull(&mut phone, "acme", 4, 100).unwrap();
    for pulled in &page.changes {
        println!("  phone pulls seq {}: {} {}", pulled.seq, pulled.op.as_str(), pulled.pk);
    }
    assert_eq!(page.changes.last().map(|c| c.op), Some(Op::Delete));
    show_row(&mut phone, "42");

    step("Malformed input is an error that names the field, and changes nothing");
    let error = phone
        .query_one("SELECT sync_push('acme', '[{\"op_id\": \"not-a-uuid\"}]')", &[])
        .expect_err("a malformed push is refused");
    let db_error = error.as_db_error().expect("a database error");
    println!("  ERROR {}: {}", db_error.code().code(), db_error.message());
    assert_eq!(db_error.code().code(), "22P02");

    step("A typed table: register it, push into it, and write to it with plain SQL");
    phone
        .batch_execute(
            "CREATE TABLE groceries (id uuid PRIMARY KEY, tenant_id text NOT NULL, item text NOT NULL,
                                     price numeric(6,2), bought_at timestamptz, tags text[]);
             SELECT sync_register_model('grocery', 'groceries', tenant_column => 'tenant_id');",
        )
        .unwrap();
    let id = "7f1e8c3a-5b7d-4e2a-9c1f-2b3d4e5f6a7b";
    let add = vec![change(Op::Insert, "grocery", id, at(60), "phone", json!({"item": "milk", "price": "1.5", "tags": ["dairy"]}))];
    let response = push(&mut phone, "acme", &add).unwrap();
    show_push("phone", &add, &response);
    let typed: String = phone.query_one("SELECT format('price %s (%s), tags %s (%s)', price, pg_typeof(price), tags, pg_typeof(tags)) FROM groceries", &[]).unwrap().get(0);
    println!("  the table holds a typed row: {typed}");
    phone.batch_execute("UPDATE groceries SET bought_at = '2026-11-24 10:00:00.123456+00' WHERE item = 'milk'").unwrap();
    println!("  server code runs: UPDATE groceries SET bought_at = '2026-11-24 10:00:00.123456+00'");
    let page = pull(&mut laptop, "acme", response.cursor, 100).unwrap();
    let captured = page.changes.first().expect("the SQL write is pulled");
    println!("  the laptop pulls seq {}: {} by {} -> {}", captured.seq, captured.op.as_str(), captured.actor, Value::Object(captured.value.clone().unwrap_or_default()));
    assert_eq!((captured.actor.as_str(), &captured.value.clone().unwrap_or_default()["bought_at"]), ("server", &json!("2026-11-24T10:00:00.123456Z")));
    let bad = vec![change(Op::Update, "grocery", id, at(70), "phone", json!({"price": "cheap"}))];
    let response = push(&mut phone, "acme", &bad).unwrap();
    show_push("phone", &bad, &response);
    assert!(matches!(statuses(&response)[..], [Status::Rejected { reason }] if reason.contains("\"price\"")));

    step("Another tenant sees none of it");
    let other = pull(&mut laptop, "globex", 0, 100).unwrap();
    println!("  globex pulls {} changes", other.changes.len());
    assert!(other.changes.is_empty());

    step("The log, as every client of acme receives it");
    for row in phone.query("SELECT seq, op, pk, actor, hlc, coalesce(payload::text, '') FROM sync_ext.op_log WHERE tenant_id = 'acme' ORDER BY seq", &[]).unwrap() {
        let (seq, op, pk, actor, hlc, payload): (i64, String, String, String, String, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4), row.get(5));
        println!("  {seq:>2} {op:<6} {pk} by {actor:<6} @ {hlc} {payload}");
    }
    println!("\nDone: every step behaved as described.");
}
