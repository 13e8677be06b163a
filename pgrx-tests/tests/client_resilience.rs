//! The client crate against failing servers: typed errors (a missing extension, a denied role), a
//! server that stops answering (SIGSTOP: timeouts, a live loop that stops at once), pushes the server
//! refuses as a whole, and a device whose clock is an hour ahead.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};
use sync_ext_client::protocol::hlc::wall_clock_millis;
use sync_ext_client::{Activity, Error, ErrorClass, LiveOptions, LiveState, LocalStore, PgRemote, Remote, SyncClient};
use sync_ext_pgrx_tests::{execute, off_runtime, server_rows, sync_cluster};

type Row = Map<String, Value>;

fn client<R: Remote>(actor: &str, remote: R) -> SyncClient<R> {
    SyncClient::builder().tenant("acme").actor(actor).local(LocalStore::memory()).remote(remote).build().expect("client builds")
}

fn rows(client: &SyncClient<impl Remote>) -> std::collections::BTreeMap<String, Row> {
    client.list::<Row>("todo").expect("local rows").into_iter().collect()
}

/// Waits (at most a generous 30 s) until `done` holds.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "not within 30 s: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_extension_and_a_denied_role_are_permanent_errors_that_halt_the_live_loop() {
    let (cluster, _url) = sync_cluster();
    let device = Arc::new(client("device", PgRemote::new(cluster.connection_string("postgres"))));
    device.insert("todo", "1", &json!({"title": "kept"})).unwrap();
    let error = device.sync().await.unwrap_err();
    assert!(matches!(&error, Error::ExtensionMissing { code, .. } if code == "42883"), "{error}");
    assert_eq!((error.class(), error.sqlstate()), (ErrorClass::Permanent, Some("42883")));
    assert!(error.to_string().contains("sync_ext is not installed in this database"), "{error}");
    assert!(std::error::Error::source(&error).is_some(), "the driver's error is kept as the source");
    assert_eq!(device.pending().unwrap(), 1, "nothing lost");

    let status = device.status();
    let live = device.clone().live(LiveOptions { interval: Duration::from_millis(20), ..LiveOptions::default() });
    eventually("the live loop halts", || matches!(status.borrow().live, LiveState::Running { halted: true, .. })).await;
    let shown = status.borrow().last_error.clone().expect("the error is in the status");
    assert_eq!((shown.class, shown.sqlstate.as_deref()), (ErrorClass::Permanent, Some("42883")));
    live.stop().await;

    execute(&cluster, "CREATE ROLE stranger LOGIN");
    let mut config = sync_ext_client::tokio_postgres::Config::new();
    config.host("127.0.0.1").port(cluster.port()).user("stranger").dbname("sync");
    let denied = client("device", PgRemote::from_config(config));
    denied.insert("todo", "1", &json!({"title": "x"})).unwrap();
    let error = denied.sync().await.unwrap_err();
    assert!(matches!(&error, Error::Server { code, message, .. } if code == "42501" && message.contains("acme")), "{error}");
    assert!(!error.is_transient());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_server_makes_calls_time_out_and_live_loops_stop_at_once() {
    let (cluster, url) = sync_cluster();
    let quick = |actor: &str| {
        let remote = PgRemote::new(&url).connect_timeout(Duration::from_secs(1)).statement_timeout(Duration::from_secs(2));
        client(actor, remote)
    };
    let device = quick("device");
    device.insert("todo", "1", &json!({"title": "before"})).unwrap();
    device.sync().await.unwrap();
    let patient = Arc::new(
        SyncClient::builder()
            .tenant("acme")
            .actor("patient")
            .local(LocalStore::memory())
            .remote(PgRemote::new(&url).connect_timeout(Duration::from_secs(600)).statement_timeout(Duration::from_secs(600)))
            .sync_timeout(Duration::from_secs(1))
            .build()
            .unwrap(),
    );
    let looping = Arc::new(client("looping", PgRemote::new(&url).connect_timeout(Duration::from_secs(600)).statement_timeout(Duration::from_secs(600))));

    let paused = cluster.pause();
    device.insert("todo", "2", &json!({"title": "while paused"})).unwrap();
    let error = tokio::time::timeout(Duration::from_secs(60), device.sync()).await.expect("the sync gives up by itself").unwrap_err();
    assert!(matches!(error, Error::Timeout { what: "statement", .. }) && error.is_transient(), "{error}");
    assert_eq!(device.pending().unwrap(), 1);
    assert!(!device.status().borrow().connected);

    let fresh = quick("fresh");
    let error = tokio::time::timeout(Duration::from_secs(60), fresh.sync()).await.expect("the connect gives up by itself").unwrap_err();
    assert!(matches!(error, Error::Timeout { what: "connect", .. }), "{error}");

    let error = tokio::time::timeout(Duration::from_secs(60), patient.sync()).await.expect("the sync gives up by itself").unwrap_err();
    assert!(matches!(error, Error::Timeout { what: "sync", .. }), "{error}");
    assert_eq!(patient.status().borrow().activity, Activity::Idle);

    // A live loop whose calls would wait ten minutes, listening on the paused server too.
    let live = looping.clone().live(LiveOptions { listen_url: Some(url.clone()), ..LiveOptions::default() });
    let status = looping.status();
    eventually("the live loop is inside a sync", || status.borrow().activity != Activity::Idle).await;
    tokio::time::timeout(Duration::from_secs(10), live.stop()).await.expect("stop returns while the server is paused");
    assert_eq!(Arc::strong_count(&looping), 1, "the loop and its listener let go of the client");

    drop(paused);
    device.sync().await.unwrap();
    assert_eq!(device.pending().unwrap(), 0, "synced once the server is back");
    assert_eq!(rows(&device), server_rows(&cluster, "acme", "todo"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_live_handle_stops_its_loop() {
    let (_cluster, url) = sync_cluster();
    let device = Arc::new(client("device", PgRemote::new(&url)));
    let status = device.status();
    let live = device.clone().live(LiveOptions { listen_url: Some(url.clone()), interval: Duration::from_millis(10), ..LiveOptions::default() });
    eventually("the live loop listens", || matches!(&status.borrow().live, LiveState::Running { wakeups: sync_ext_client::Wakeups::Listening, .. })).await;
    eventually("the live loop syncs", || status.borrow().last_synced_at.is_some()).await;
    drop(live);
    eventually("the loop lets go of the client", || Arc::strong_count(&device) == 1).await;
    assert_eq!(status.borrow().live, LiveState::Off);
    let synced = status.borrow().last_synced_at;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(status.borrow().last_synced_at, synced, "no sync after the loop ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_over_the_servers_size_limit_is_split_and_the_change_it_never_takes_is_rejected_alone() {
    let (cluster, url) = sync_cluster();
    execute(&cluster, "SELECT sync_configure('max_push_bytes', '64kB')");
    let device = client("device", PgRemote::new(&url));
    for n in 0..20 {
        let size = if n == 10 { 100_000 } else { 8_000 };
        device.insert("todo", &format!("{n:02}"), &json!({"body": "x".repeat(size)})).unwrap();
    }
    let report = device.sync().await.unwrap();
    assert_eq!(report.pushed, 20);
    assert_eq!(report.rejected.len(), 1, "{:?}", report.rejected.iter().map(|rejection| &rejection.reason).collect::<Vec<_>>());
    let rejected = &report.rejected[0];
    assert_eq!((rejected.change.pk.as_str(), rejected.code()), ("10", "refused"));
    assert!(rejected.reason.starts_with("refused: 54000: changes: the body is"), "{}", rejected.reason);
    assert_eq!(device.pending().unwrap(), 0, "nothing is stuck behind it");
    assert_eq!(device.rejections().unwrap(), report.rejected);
    let server = server_rows(&cluster, "acme", "todo");
    assert_eq!(server.len(), 19);
    assert_eq!(rows(&device), server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_clock_an_hour_ahead_is_corrected_after_its_first_rejection() {
    let (cluster, url) = sync_cluster();
    let ahead = SyncClient::builder()
        .tenant("acme")
        .actor("ahead")
        .local(LocalStore::memory())
        .remote(PgRemote::new(&url))
        .wall_clock(|| wall_clock_millis() + 3_600_000)
        .build()
        .unwrap();
    let laptop = client("laptop", PgRemote::new(&url));
    ahead.insert("todo", "1", &json!({"title": "stamped an hour ahead"})).unwrap();
    let report = ahead.sync().await.unwrap();
    let codes: Vec<&str> = report.rejected.iter().map(|rejection| rejection.code()).collect();
    assert_eq!(codes, ["clock_skew"]);
    assert!(rows(&ahead).is_empty(), "the refused row is gone");

    let later = ahead.insert("todo", "2", &json!({"title": "after the correction"})).unwrap();
    assert!(later.hlc.millis() < wall_clock_millis() + 60_000, "{}", later.hlc);
    ahead.retry_rejection(report.rejected[0].id).unwrap();
    let report = ahead.sync().await.unwrap();
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    assert_eq!(server_rows(&cluster, "acme", "todo").len(), 2);

    // Its stamps are now comparable with a device whose clock is right: a later edit there wins.
    laptop.sync().await.unwrap();
    laptop.update("todo", "2", &json!({"title": "edited on the laptop"})).unwrap();
    laptop.sync().await.unwrap();
    ahead.sync().await.unwrap();
    assert_eq!(rows(&ahead), server_rows(&cluster, "acme", "todo"));
    assert_eq!(server_rows(&cluster, "acme", "todo")["2"]["title"], "edited on the laptop");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_credentials_hook_sets_up_every_new_connection() {
    let (cluster, url) = sync_cluster();
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // The configuration names a database that does not exist; only the hook's answer can connect.
    let mut config: sync_ext_client::tokio_postgres::Config = url.parse().unwrap();
    config.dbname("no_such_database");
    let counted = calls.clone();
    let remote = PgRemote::from_config(config).credentials(move |mut config| -> sync_ext_client::RemoteFuture<'static, _> {
        let call = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        Box::pin(async move {
            config.dbname("sync").application_name(format!("refreshed-{call}"));
            Ok(config)
        })
    });
    let device = client("device", remote);
    device.insert("todo", "1", &json!({"title": "milk"})).unwrap();
    device.sync().await.expect("the hook's configuration connects");
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1, "one connection, one refresh");
    assert_eq!(server_rows(&cluster, "acme", "todo").len(), 1);

    // The server drops the connection: the next call connects again, through the hook.
    off_runtime(|| {
        cluster.connect("sync").batch_execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'refreshed-1'").unwrap()
    });
    device.insert("todo", "2", &json!({"title": "bread"})).unwrap();
    let mut synced = device.sync().await;
    if synced.as_ref().is_err_and(Error::is_transient) {
        synced = device.sync().await; // the call that found the connection closed
    }
    synced.expect("a new connection through the hook");
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2, "the new connection was refreshed");
    let names = off_runtime(|| {
        cluster.connect("sync").query_one("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'refreshed-2'", &[]).unwrap().get::<_, i64>(0)
    });
    assert_eq!(names, 1, "connected with what the hook returned");
}
