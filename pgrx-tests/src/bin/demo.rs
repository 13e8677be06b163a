//! The sync_ext demo: a throwaway Postgres with sync_ext, a typed table, and two devices with their
//! own SQLite files that edit offline (a conflict included), while server code writes with plain SQL.
//! They sync through Postgres and end identical. Every outcome is checked, so a wrong one stops it.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sync_ext_client::portable;
use sync_ext_client::{LocalStore, PgRemote, SyncClient, SyncReport};
use sync_ext_pgrx_tests::Cluster;

/// A row of the `groceries` table as the app sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Grocery {
    item: String,
    #[serde(with = "portable::decimal::option", default)]
    price: Option<Decimal>,
    #[serde(default)]
    bought: bool,
    #[serde(with = "portable::timestamp::option", default)]
    bought_at: Option<DateTime<Utc>>,
    #[serde(default)]
    tags: Vec<String>,
}

type Device = SyncClient<PgRemote>;

fn step(title: &str) {
    println!("\n== {title}");
}

fn show(name: &str, device: &Device) -> BTreeMap<String, Grocery> {
    let rows: BTreeMap<String, Grocery> = device.list("grocery").expect("local rows").into_iter().collect();
    println!("  {name} sees {} rows ({} unsent changes):", rows.len(), device.pending().unwrap());
    for (pk, row) in &rows {
        let price = row.price.map_or("-".to_owned(), |p| p.to_string());
        let bought = row.bought_at.map_or(String::new(), |at| format!(" at {}", at.to_rfc3339()));
        println!("    {pk}: {:<12} price {price:<6} bought {}{bought} tags {:?}", row.item, row.bought, row.tags);
    }
    rows
}

fn report(name: &str, report: &SyncReport) {
    println!("  {name} synced: pushed {}, pulled {}, cursor {}", report.pushed, report.pulled, report.cursor);
    for rejected in &report.rejected {
        println!("  {name}: the server rejected {} {}: {}", rejected.change.op.as_str(), rejected.change.pk, rejected.reason);
    }
}

fn sql(cluster: &Cluster, statement: &str) {
    println!("  server code runs: {statement}");
    let cluster_statement = statement.to_owned();
    std::thread::scope(|scope| scope.spawn(|| cluster.connect("demo").batch_execute(&cluster_statement).expect("SQL runs")).join().unwrap());
}

#[tokio::main]
async fn main() {
    println!("Starting a throwaway Postgres cluster with sync_ext...");
    let cluster = std::thread::spawn(|| {
        let cluster = Cluster::start();
        cluster.create_database("demo");
        cluster
    })
    .join()
    .unwrap();
    let url = cluster.connection_string("demo");
    sql(
        &cluster,
        "CREATE TABLE groceries (id text PRIMARY KEY, household text NOT NULL, item text NOT NULL,
                                 price numeric(6,2) CHECK (price >= 0), bought boolean NOT NULL DEFAULT false,
                                 bought_at timestamptz, tags text[] NOT NULL DEFAULT '{}');
         SELECT sync_register_model('grocery', 'groceries', tenant_column => 'household')",
    );

    let files = tempfile::tempdir().expect("a directory for the devices' databases");
    let device = |name: &str| -> Device {
        let store = LocalStore::sqlite(files.path().join(format!("{name}.db"))).expect("a SQLite store");
        SyncClient::builder().tenant("smiths").actor(name).local(store).remote(PgRemote::new(&url)).build().expect("a client")
    };
    let phone = device("phone");
    let laptop = device("laptop");
    println!("  phone and laptop each keep a SQLite file in {}", files.path().display());

    step("The phone, offline, adds two items; then it syncs and the laptop pulls them");
    let milk = Grocery { item: "milk".into(), price: Some("1.5".parse().unwrap()), bought: false, bought_at: None, tags: vec!["dairy".into()] };
    let eggs = Grocery { item: "eggs".into(), price: None, bought: false, bought_at: None, tags: vec![] };
    phone.insert("grocery", "g1", &milk).unwrap();
    phone.insert("grocery", "g2", &eggs).unwrap();
    show("phone", &phone);
    report("phone", &phone.sync().await.unwrap());
    report("laptop", &laptop.sync().await.unwrap());
    let seen = show("laptop", &laptop);
    assert_eq!(seen["g1"].price.unwrap().to_string(), "1.50", "the table's numeric(6,2) form comes back");

    step("Both go offline and edit; server code writes too");
    phone.update("grocery", "g1", &serde_json::json!({"item": "oat milk", "tags": ["dairy-free"]})).unwrap();
    println!("  phone: renames g1 to \"oat milk\", retags it");
    laptop.update("grocery", "g1", &serde_json::json!({"bought": true})).unwrap();
    println!("  laptop: ticks g1 bought (another field: both edits will be kept)");
    laptop.update("grocery", "g1", &serde_json::json!({"item": "almond milk"})).unwrap();
    println!("  laptop: renames g1 to \"almond milk\", later than the phone did (a conflict: the later write wins)");
    laptop.delete("grocery", "g2").unwrap();
    println!("  laptop: deletes g2");
    sql(&cluster, "UPDATE groceries SET bought_at = '2026-11-24 10:00:00.123456+00' WHERE id = 'g1'");
    sql(&cluster, "INSERT INTO groceries (id, household, item, price) VALUES ('g3', 'smiths', 'bread', 2.2)");
    phone.update("grocery", "g3", &serde_json::json!({"price": "-1"})).unwrap();
    println!("  phone: sets a price of -1 on g3, which the table's CHECK will refuse");

    step("Back online: phone, laptop, phone sync");
    report("phone", &phone.sync().await.unwrap());
    report("laptop", &laptop.sync().await.unwrap());
    report("phone", &phone.sync().await.unwrap());

    step("Final rows");
    let on_phone = show("phone", &phone);
    let on_laptop = show("laptop", &laptop);
    let on_server: String = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                cluster
                    .connect("demo")
                    .query_one("SELECT string_agg(format('%s: %s price %s bought %s at %s tags %s', id, item, price, bought, bought_at, tags), E'\\n    ' ORDER BY id) FROM groceries", &[])
                    .unwrap()
                    .get(0)
            })
            .join()
            .unwrap()
    });
    println!("  the server's groceries table:\n    {on_server}");
    assert_eq!(on_phone, on_laptop, "the replicas are identical");
    let g1 = &on_phone["g1"];
    assert_eq!((g1.item.as_str(), g1.bought, g1.tags.clone()), ("almond milk", true, vec!["dairy-free".to_owned()]));
    assert!(g1.bought_at.is_some(), "the server-side SQL write reached both devices");
    assert!(!on_phone.contains_key("g2"), "the delete reached both devices");
    assert_eq!(on_phone["g3"].price.unwrap().to_string(), "2.20", "the rejected price was rolled back to the server's");
    println!("\nDone: both devices and the server hold the same rows.");
}
