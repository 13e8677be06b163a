//! The guide of the README's "The client crate" section, compiled by `cargo test` (a test checks that
//! every Rust block of that section is in this file). Run it against a database with sync_ext:
//! `cargo run -p sync_ext_client --example guide -- "host=127.0.0.1 user=postgres dbname=app"`.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use sync_ext_client::{Cmp, LiveOptions, LiveState, LocalStore, Model, PgRemote, Query, Result, SyncClient, Wakeups};

#[derive(Debug, Serialize, Deserialize)]
struct Todo {
    title: String,
    done: bool,
}

/// A row of a table with a composite primary key (org, sku), bound as model `item`.
#[derive(Debug, Serialize, Deserialize)]
struct Item {
    org: i32,
    sku: String,
    qty: Option<i32>,
    tags: Option<Vec<String>>, // a NULL text[] is null: Option, not Vec
}

impl Model for Item {
    const NAME: &'static str = "item";
    const VERSION: u32 = 1;
    type Key = (i32, String);
    type Patch = serde_json::Value;
    fn key(&self) -> (i32, String) {
        (self.org, self.sku.clone())
    }
}

async fn guide(url: &str, direct_url: &str) -> Result<()> {
    let client = SyncClient::builder()
        .tenant("acme")
        .actor("device-a")
        .local(LocalStore::sqlite(std::env::temp_dir().join("sync_ext_guide.db"))?)
        .remote(PgRemote::new(url).connect_timeout(Duration::from_secs(10)).statement_timeout(Duration::from_secs(30)))
        .sync_timeout(Duration::from_secs(300))
        .on_rejected(|rejected| eprintln!("refused: {} {}: {}", rejected.change.model, rejected.change.pk, rejected.reason))
        .build()?;

    client.insert("todo", "42", &Todo { title: "buy milk".into(), done: false })?; // offline is fine
    client.update("todo", "42", &json!({"done": true}))?;
    let todo: Option<Todo> = client.get("todo", "42")?;
    println!("{todo:?}");

    let items = client.collection::<Item>()?;
    items.insert(&Item { org: 1, sku: "A-1".into(), qty: Some(3), tags: None })?; // pk [1,"A-1"], as the server writes it
    items.update(&(1, "A-1".into()), &json!({"qty": 5}))?;
    let low = items.query(&Query::new().filter("qty", Cmp::Lt, 10).order_by("sku").limit(50))?;
    for (pk, error) in &low.failed {
        eprintln!("{pk} does not decode: {error}"); // reported, never fatal to a list
    }
    client.transaction(|tx| {
        tx.delete::<Item>(&(1, "A-1".into()))?;
        tx.insert(&Item { org: 1, sku: "A-2".into(), qty: Some(5), tags: None })
    })?;

    match client.sync().await {
        Ok(report) => println!("pushed {}, pulled {}, refused {}", report.pushed, report.pulled, report.rejected.len()),
        Err(error) if error.is_transient() => println!("offline or busy, the next sync retries: {error}"),
        Err(error) => eprintln!("needs a person: {error} (SQLSTATE {:?})", error.sqlstate()),
    }

    for rejected in client.take_rejections()? {
        // Shown to the user once: the row is already back to the server's version.
        println!("not saved: {} {} ({})", rejected.change.model, rejected.change.pk, rejected.code());
    }

    for pending in client.outbox()? {
        if pending.attempts > 10 {
            println!("stuck: {:?} ({:?}); discarding it", pending.change.op_id, pending.last_error);
            client.discard(pending.change.op_id)?;
        }
    }

    let phone = SyncClient::builder()
        .tenant("acme")
        .actor("phone")
        .scopes(["project:1", "owner:ann"]) // the instances its user belongs to
        .local(LocalStore::sqlite(std::env::temp_dir().join("sync_ext_guide_phone.db"))?)
        .remote(PgRemote::new(url))
        .build()?;
    phone.subscribe(["project:2"]).await?; // bootstraps project 2's rows, then syncs
    phone.unsubscribe(["project:1"]).await?; // drops the rows only project 1 held
    println!("holding {:?}", phone.scopes()?);

    let mut status = client.status();
    let mut changes = client.changes();
    let client = Arc::new(client);
    let shown = client.run_blocking(|client| Ok(client.collection::<Item>()?.list()?.rows)).await?;
    println!("{} items", shown.len());
    let live = client.clone().live(LiveOptions { listen_url: Some(direct_url.into()), ..Default::default() });
    tokio::select! {
        Ok(()) = status.changed() => {
            let now = status.borrow().clone();
            println!("{:?}, {} pending, last synced {:?}, error {:?}", now.activity, now.pending, now.last_synced_at, now.last_error);
            if let LiveState::Running { wakeups: Wakeups::Unavailable { reason }, .. } = &now.live {
                println!("no live wake-ups ({reason}): syncing every 30 s");
            }
        }
        Ok(changed) = changes.recv() => {
            if changed.touches("todo") {
                println!("re-render the todo list: {:?}", client.list::<Todo>("todo")?);
            }
        }
    }
    live.stop().await;
    Ok(())
}

fn main() -> Result<()> {
    let url = std::env::args().nth(1).unwrap_or_else(|| "host=127.0.0.1 user=postgres dbname=app".into());
    let direct_url = std::env::args().nth(2).unwrap_or_else(|| url.clone());
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a runtime").block_on(guide(&url, &direct_url))
}
