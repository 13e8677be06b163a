//! Typed local data without a server: collections of models with single and composite keys, rows that
//! do not decode, queries (the same answers from SQLite and memory), multi-row transactions, model
//! versions and async access.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sync_ext_client::protocol::Op;
use sync_ext_client::{Cmp, Error, LocalStore, Model, PgRemote, Query, SyncClient};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Todo {
    id: i32,
    title: String,
    done: bool,
    priority: Option<i32>,
}

#[derive(Default, Serialize)]
struct TodoPatch {
    #[serde(skip_serializing_if = "Option::is_none")]
    title: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    done: Option<bool>,
}

impl Model for Todo {
    const NAME: &'static str = "todo";
    type Key = i32;
    type Patch = TodoPatch;
    fn key(&self) -> i32 {
        self.id
    }
}

/// A row of a table with a composite primary key (org bigint, name text).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Member {
    #[serde(with = "sync_ext_client::portable::i64_string")]
    org: i64,
    name: String,
    tags: Vec<String>,
}

impl Model for Member {
    const NAME: &'static str = "member";
    type Key = (i64, String);
    type Patch = Value;
    fn key(&self) -> (i64, String) {
        (self.org, self.name.clone())
    }
}

/// The same model as [`Member`], read with a nullable array.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct MemberTags {
    tags: Option<Vec<String>>,
}

impl Model for MemberTags {
    const NAME: &'static str = "member";
    type Key = (i64, String);
    type Patch = Value;
    fn key(&self) -> (i64, String) {
        unreachable!("read only")
    }
}

/// A client that never reaches a server (nothing here syncs).
fn offline(store: LocalStore) -> SyncClient<PgRemote> {
    SyncClient::builder().tenant("acme").actor("device").local(store).remote(PgRemote::new("host=127.0.0.1 port=1")).build().unwrap()
}

fn temp_db(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("sync_ext_collections_{name}_{}.db", uuid::Uuid::new_v4()))
}

fn todo(id: i32, title: &str, done: bool, priority: Option<i32>) -> Todo {
    Todo { id, title: title.into(), done, priority }
}

#[test]
fn a_collection_reads_and_writes_typed_rows_under_wire_pks() {
    let client = offline(LocalStore::memory());
    let todos = client.collection::<Todo>().unwrap();
    let insert = todos.insert(&todo(7, "milk", false, Some(2))).unwrap();
    assert_eq!((insert.model.as_str(), insert.pk.as_str(), insert.op), ("todo", "7", Op::Insert));
    todos.update(&7, &TodoPatch { done: Some(true), ..TodoPatch::default() }).unwrap();
    assert_eq!(todos.get(&7).unwrap(), Some(todo(7, "milk", true, Some(2))));
    assert_eq!(client.get::<Todo>("todo", "7").unwrap(), todos.get(&7).unwrap(), "the untyped API sees the same row");

    let members = client.collection::<Member>().unwrap();
    let change = members.insert(&Member { org: 9_007_199_254_740_993, name: "ann \"a\"".into(), tags: vec!["x".into()] }).unwrap();
    assert_eq!(change.pk, r#"["9007199254740993","ann \"a\""]"#, "a composite key is the server's JSON array of portable values");
    let key = (9_007_199_254_740_993, "ann \"a\"".to_owned());
    assert_eq!(members.get(&key).unwrap().map(|member| member.tags), Some(vec!["x".to_owned()]));
    members.delete(&key).unwrap();
    assert_eq!(members.get(&key).unwrap(), None);
    assert!(members.list().unwrap().rows.is_empty());
    assert_eq!(client.pending().unwrap(), 4);
}

#[test]
fn rows_that_do_not_decode_are_reported_and_never_fail_a_list() {
    let client = offline(LocalStore::memory());
    let todos = client.collection::<Todo>().unwrap();
    todos.insert(&todo(1, "fine", false, None)).unwrap();
    client.insert("todo", "2", &json!({"id": 2, "title": 42, "done": false})).unwrap();
    client.insert("todo", "not-a-number", &json!({"id": 3, "title": "bad key", "done": false})).unwrap();
    let listed = todos.list().unwrap();
    assert_eq!(listed.rows, [(1, todo(1, "fine", false, None))]);
    let failed: Vec<&str> = listed.failed.iter().map(|(pk, _)| pk.as_str()).collect();
    assert_eq!(failed, ["2", "not-a-number"]);
    assert!(listed.failed.iter().all(|(_, error)| matches!(error, Error::Decode { model, .. } if model == "todo")));
    assert!(matches!(todos.get(&2), Err(Error::Decode { .. })));

    // A NULL array (a bound table's NULL text[] column) is null: an Option<Vec<_>> reads it as None, a
    // Vec<_> refuses it (reported, like any row that does not decode).
    client.insert("member", r#"["1","bo"]"#, &json!({"org": "1", "name": "bo", "tags": null})).unwrap();
    let listed = client.collection::<Member>().unwrap().list().unwrap();
    assert!(listed.rows.is_empty());
    assert!(matches!(&listed.failed[..], [(pk, Error::Decode { problem, .. })] if pk == r#"["1","bo"]"# && problem.contains("null")), "{:?}", listed.failed);
    let tags = client.collection::<MemberTags>().unwrap().list().unwrap();
    assert_eq!(tags.rows, [((1, "bo".to_owned()), MemberTags { tags: None })]);
}

#[test]
fn queries_filter_and_order_by_fields_alike_in_sqlite_and_memory() {
    let path = temp_db("query");
    let mut answers = Vec::new();
    for store in [LocalStore::memory(), LocalStore::sqlite(&path).unwrap()] {
        let client = offline(store);
        let todos = client.collection::<Todo>().unwrap();
        for (id, title, done, priority) in [(1, "b", false, Some(3)), (2, "a", true, None), (3, "c", false, Some(1)), (4, "d", false, Some(3)), (5, "e", true, Some(2))] {
            todos.insert(&todo(id, title, done, priority)).unwrap();
        }
        todos.delete(&4).unwrap();
        let ids = |query: Query| todos.query(&query).unwrap().rows.into_iter().map(|(id, _)| id).collect::<Vec<i32>>();
        let answer = vec![
            ids(Query::new().filter("done", Cmp::Eq, false)),
            ids(Query::new().filter("done", Cmp::Eq, false).order_by("title")),
            ids(Query::new().order_by_desc("priority")),
            ids(Query::new().order_by("priority").limit(2)),
            ids(Query::new().filter("priority", Cmp::Ge, 2).order_by("title")),
            ids(Query::new().filter("priority", Cmp::Eq, Value::Null)),
            ids(Query::new().filter("title", Cmp::Gt, "b").filter("done", Cmp::Eq, false)),
        ];
        assert_eq!(answer, [vec![1, 3], vec![1, 3], vec![1, 5, 3, 2], vec![2, 3], vec![1, 5], vec![2], vec![3]]);
        answers.push(answer);
        assert!(matches!(todos.query(&Query::new().filter("x'; DROP TABLE rows; --", Cmp::Eq, 1)), Err(Error::InvalidQuery(_))));
        assert!(matches!(todos.query(&Query::new().filter("priority", Cmp::Lt, Value::Null)), Err(Error::InvalidQuery(_))));
    }
    assert_eq!(answers[0], answers[1]);
    std::fs::remove_file(&path).ok();
}

#[test]
fn a_local_transaction_commits_every_write_or_none() {
    let client = offline(LocalStore::memory());
    let mut events = client.changes();
    let failed: Result<(), Error> = client.transaction(|tx| {
        tx.insert(&todo(1, "first", false, None))?;
        tx.insert(&todo(2, "second", false, None))?;
        tx.apply_change("todo", "", Op::Delete, None)?;
        Ok(())
    });
    assert!(matches!(failed, Err(Error::InvalidChange(_))), "{failed:?}");
    assert_eq!((client.pending().unwrap(), client.collection::<Todo>().unwrap().list().unwrap().rows.len()), (0, 0), "nothing of it was kept");
    assert!(events.try_recv().is_err());

    let seen = client
        .transaction(|tx| {
            tx.insert(&todo(1, "first", false, None))?;
            tx.update::<Todo>(&1, &TodoPatch { title: Some("renamed".into()), ..TodoPatch::default() })?;
            tx.insert(&todo(2, "second", false, None))?;
            tx.get::<Todo>(&1)
        })
        .unwrap();
    assert_eq!(seen.map(|row| row.title), Some("renamed".into()), "a transaction reads its own writes");
    assert_eq!(client.pending().unwrap(), 3);
    let event = events.try_recv().unwrap();
    assert_eq!(event.rows, [("todo".to_owned(), "1".to_owned()), ("todo".into(), "2".into())], "each row once");
    assert!(events.try_recv().is_err(), "one event for the transaction");
}

/// Version 2 of `todo`: `title` is renamed `name`.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct TodoV2 {
    id: i32,
    name: String,
}

impl Model for TodoV2 {
    const NAME: &'static str = "todo";
    const VERSION: u32 = 2;
    type Key = i32;
    type Patch = Value;
    fn key(&self) -> i32 {
        self.id
    }
    fn migrate(from_version: u32, fields: &Map<String, Value>) -> Option<Map<String, Value>> {
        assert_eq!(from_version, 1);
        let mut fields = fields.clone();
        let title = fields.remove("title")?;
        fields.insert("name".into(), title);
        fields.remove("done");
        fields.remove("priority");
        Some(fields)
    }
}

#[test]
fn a_new_model_version_migrates_stored_rows_as_synced_updates_once() {
    let path = temp_db("versions");
    {
        let client = offline(LocalStore::sqlite(&path).unwrap());
        let todos = client.collection::<Todo>().unwrap();
        todos.insert(&todo(1, "one", false, Some(1))).unwrap();
        todos.insert(&todo(2, "two", true, None)).unwrap();
        todos.delete(&2).unwrap();
    }
    let client = offline(LocalStore::sqlite(&path).unwrap());
    let pending = client.pending().unwrap();
    let todos = client.collection::<TodoV2>().unwrap();
    assert_eq!(todos.list().unwrap().rows, [(1, TodoV2 { id: 1, name: "one".into() })]);
    let outbox = client.outbox().unwrap();
    assert_eq!(outbox.len(), pending + 1, "one update for the one live row");
    let update = &outbox.last().unwrap().change;
    assert_eq!((update.op, update.pk.as_str()), (Op::Update, "1"));
    assert_eq!(Value::Object(update.value.clone().unwrap()), json!({"name": "one", "title": null, "done": null, "priority": null}));
    client.collection::<TodoV2>().unwrap();
    assert_eq!(client.outbox().unwrap().len(), pending + 1, "migrated once");
    assert!(matches!(client.collection::<Todo>(), Err(Error::ModelVersion { stored: 2, this: 1, .. })), "older code refuses a newer store");
    drop(client);
    std::fs::remove_file(&path).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_code_reaches_the_store_on_blocking_threads() {
    let path = temp_db("async");
    let client = Arc::new(offline(LocalStore::sqlite(&path).unwrap()));
    let inserted = client.run_blocking(|client| client.collection::<Todo>()?.insert(&todo(1, "from async", false, None))).await.unwrap();
    assert_eq!(inserted.pk, "1");
    let listed = client.run_blocking(|client| Ok(client.collection::<Todo>()?.list()?.rows)).await.unwrap();
    assert_eq!(listed, [(1, todo(1, "from async", false, None))]);
    drop(client);
    std::fs::remove_file(&path).ok();
}
