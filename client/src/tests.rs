//! Unit tests of the client against a server in memory.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde_json::{json, Map, Value};
use sync_ext_protocol::digest::{digest_of, row_state_digest, to_wire};
use sync_ext_protocol::scope::ScopeDefinition;
use sync_ext_protocol::hlc::wall_clock_millis;
use sync_ext_protocol::wire::{ChangeResult, PullResponse, PulledChange, PushResponse, REASON_CLOCK_SKEW};
use sync_ext_protocol::{Change, Op, RowState, Status, StoredRow};
use uuid::Uuid;

use crate::digest::{confirmed_digest, parse_digest};
use crate::sync::{read_cursor, Stream};
use crate::*;

type Hook = Box<dyn FnOnce() + Send>;

/// A server in memory: a log, the merged rows, and pages as `sync_pull` serves them (a reset for a
/// negative cursor or, on the primary, one beyond the log), with the digest of the visible rows on
/// the page that ends at the last seq.
#[derive(Default)]
struct Server {
    log: Vec<PulledChange>,
    rows: BTreeMap<(String, String), (i64, RowState)>,
    /// Whether pages carry digests (servers before digests send none).
    digests: bool,
    /// Added to every digest sent: a server no replica can match.
    skew: u64,
    /// Every pull: its `since`, and whether a standby answered it.
    pulls: Vec<(i64, bool)>,
    /// Run once when a pull asks for a cursor beyond the log (a repair), as the app writing meanwhile.
    on_repair: Option<Hook>,
    /// Pushes fail with this SQLSTATE.
    fail_pushes: Option<&'static str>,
    /// Pulls fail with this SQLSTATE.
    fail_pulls: Option<&'static str>,
    /// Pulls never answer.
    hang_pulls: bool,
    /// Changes stamped more than 5 minutes past the system clock are rejected `clock_skew`, and the
    /// remote tells the server time.
    server_clock: bool,
}

/// Whether a change writes a field of this name.
fn writes(change: &Change, field: &str) -> bool {
    change.value.as_ref().is_some_and(|value| value.contains_key(field))
}

impl Server {
    fn last_seq(&self) -> i64 {
        self.log.len() as i64
    }

    fn digest(&self) -> u64 {
        let visible: Vec<_> = self.rows.iter().filter_map(|((model, pk), (_, row))| row.visible().map(|value| (model, pk, value))).collect();
        digest_of(visible.iter().map(|(model, pk, value)| (model.as_str(), pk.as_str(), value)))
    }

    fn visible(&self, model: &str) -> BTreeMap<String, Map<String, Value>> {
        self.rows.iter().filter(|((m, _), _)| m == model).filter_map(|((_, pk), (_, row))| row.visible().map(|value| (pk.clone(), value))).collect()
    }

    /// A push as sync_push answers it; a change writing `forbidden` is rejected, one writing `poison`
    /// makes the whole call fail with 22023.
    fn push(&mut self, changes: &[Change]) -> Result<PushResponse> {
        if let Some(code) = self.fail_pushes {
            return Err(Error::server(code, "the push failed", None));
        }
        if let Some(at) = changes.iter().position(|change| writes(change, "poison")) {
            return Err(Error::server("22023", format!("changes[{at}].value.poison: not accepted"), None));
        }
        let mut results = Vec::new();
        for change in changes {
            let refusal = if writes(change, "forbidden") {
                Some("permission_denied: may not write forbidden".to_owned())
            } else if self.server_clock && change.hlc.millis() > wall_clock_millis() + 300_000 {
                Some(REASON_CLOCK_SKEW.to_owned())
            } else {
                None
            };
            if let Some(reason) = refusal {
                results.push(ChangeResult { op_id: change.op_id, status: Status::Rejected { reason } });
                continue;
            }
            let seq = self.last_seq() + 1;
            let (row_seq, row) = self.rows.entry((change.model.clone(), change.pk.clone())).or_default();
            let won = row.apply(change);
            let status = if won.anything() {
                *row_seq = seq;
                let value = (change.op != Op::Delete).then_some(won.fields);
                let Change { op_id, model, pk, op, hlc, actor, .. } = change.clone();
                self.log.push(PulledChange { seq, op_id, model, pk, op, hlc, actor, value, field_stamps: None, deleted_hlc: None });
                Status::Applied { seq }
            } else {
                Status::Superseded
            };
            results.push(ChangeResult { op_id: change.op_id, status });
        }
        Ok(PushResponse { cursor: self.last_seq(), results, limits: None })
    }

    fn pull(&mut self, since: i64, max: i32, standby: bool) -> PullResponse {
        self.pulls.push((since, standby));
        let (last, max) = (self.last_seq(), max as usize);
        if standby && since > last {
            return PullResponse { changes: Vec::new(), cursor: since, has_more: false, reset: false, digest: None, digests: None };
        }
        let reset = since < 0 || since > last;
        let (changes, has_more) = if reset {
            let after = if since < 0 { -since } else { 0 };
            let mut rows: Vec<_> = self.rows.iter().filter(|(_, (seq, _))| *seq > after).collect();
            rows.sort_by_key(|(_, (seq, _))| *seq);
            let has_more = rows.len() > max;
            let changes = rows.into_iter().take(max).map(|((model, pk), (seq, row))| whole_row(*seq, model, pk, row)).collect();
            (changes, has_more)
        } else {
            let after: Vec<_> = self.log.iter().filter(|change| change.seq > since).cloned().collect();
            (after.iter().take(max).cloned().collect::<Vec<_>>(), after.len() > max)
        };
        let last_kept = changes.last().map(|change: &PulledChange| change.seq);
        let cursor = match (reset, has_more) {
            (false, _) => last_kept.unwrap_or(since),
            (true, true) => -last_kept.expect("a page with more after it"),
            (true, false) => last,
        };
        let digest = (!has_more && self.digests).then(|| to_wire(self.digest().wrapping_add(self.skew)));
        PullResponse { changes, cursor, has_more, reset, digest, digests: None }
    }
}

/// A row's whole state, as a reset page (or a move-in) carries it.
fn whole_row(seq: i64, model: &str, pk: &str, row: &RowState) -> PulledChange {
    let stored = StoredRow::from_state(row).expect("a written row");
    PulledChange {
        seq,
        op_id: stored.stamp.op_id,
        model: model.to_owned(),
        pk: pk.to_owned(),
        op: if stored.deleted { Op::Delete } else { Op::Insert },
        hlc: stored.stamp.hlc,
        actor: stored.stamp.actor,
        value: (!stored.deleted).then_some(stored.value),
        field_stamps: Some(stored.field_stamps),
        deleted_hlc: stored.deleted_hlc,
    }
}

/// A connection to the [`Server`]: to its primary, or to a hot standby that has replayed it all.
#[derive(Clone)]
struct Fake {
    server: Arc<Mutex<Server>>,
    standby: bool,
}

impl Remote for Fake {
    fn push<'a>(&'a self, _tenant: &'a str, changes: &'a [Change]) -> RemoteFuture<'a, PushResponse> {
        assert!(!self.standby, "pushes go to the primary");
        let response = self.server.lock().unwrap().push(changes);
        Box::pin(async move { response })
    }

    fn pull<'a>(&'a self, _tenant: &'a str, since: i64, max_changes: i32, scopes: Option<&'a [String]>) -> RemoteFuture<'a, PullResponse> {
        assert!(scopes.is_none(), "the server in memory holds whole tenants only");
        let (page, hook) = {
            let mut server = self.server.lock().unwrap();
            if server.hang_pulls {
                server.pulls.push((since, self.standby));
                return Box::pin(std::future::pending());
            }
            if let Some(code) = server.fail_pulls {
                server.pulls.push((since, self.standby));
                return Box::pin(async move { Err(Error::server(code, "the pull failed", None)) });
            }
            let hook = if since > server.last_seq() { server.on_repair.take() } else { None };
            (server.pull(since, max_changes, self.standby), hook)
        };
        if let Some(hook) = hook {
            hook();
        }
        Box::pin(async move { Ok(page) })
    }

    fn server_time(&self) -> RemoteFuture<'_, Option<i64>> {
        let now = self.server.lock().unwrap().server_clock.then(wall_clock_millis);
        Box::pin(async move { Ok(now) })
    }
}

fn server(digests: bool) -> Arc<Mutex<Server>> {
    Arc::new(Mutex::new(Server { digests, ..Server::default() }))
}

fn primary(server: &Arc<Mutex<Server>>) -> Fake {
    Fake { server: server.clone(), standby: false }
}

/// Another device inserts a `todo` row and syncs it to `server`.
async fn another_device_inserts(server: &Arc<Mutex<Server>>, pk: &str, title: &str) {
    let other = client("other", LocalStore::memory(), primary(server));
    other.insert("todo", pk, &json!({"title": title})).unwrap();
    other.sync().await.unwrap();
}

fn client<R: Remote>(actor: &str, store: LocalStore, remote: R) -> SyncClient<R> {
    SyncClientBuilder::<R>::new().tenant("acme").actor(actor).local(store).remote(remote).pull_page(2).build().unwrap()
}

fn object(value: Value) -> Map<String, Value> {
    value.as_object().cloned().unwrap()
}

fn rows<R: Remote>(client: &SyncClient<R>) -> BTreeMap<String, Map<String, Value>> {
    client.list::<Map<String, Value>>("todo").unwrap().into_iter().collect()
}

/// A SQLite file in a directory removed when the returned guard drops (declare it first, so that it
/// outlives the clients using the file).
fn temp_db() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("replica.db");
    (dir, path)
}

/// Alters the stored rows behind the client's back, as a damaged or hand-edited file would: the
/// title of row 1 changes (in both halves), row 2 is lost, row 9 appears.
fn corrupt<R: Remote>(client: &SyncClient<R>) {
    client
        .store
        .transaction(|t| {
            let mut row = t.row("todo", "1")?;
            for state in [&mut row.confirmed, &mut row.local] {
                state.fields.get_mut("title").expect("row 1 has a title").value = json!("corrupted");
            }
            t.put_row("todo", "1", &row)?;
            t.put_row("todo", "2", &LocalRow::default())?;
            let mut phantom = RowState::default();
            phantom.apply(&Change {
                op_id: Uuid::new_v4(),
                model: "todo".into(),
                pk: "9".into(),
                op: Op::Insert,
                hlc: "2026-01-01T00:00:00.000Z-0000".parse().unwrap(),
                actor: "nobody".into(),
                value: Some(object(json!({"title": "phantom"}))),
            });
            t.put_row("todo", "9", &LocalRow { confirmed: phantom.clone(), local: phantom })
        })
        .unwrap();
}

async fn seed<R: Remote>(client: &SyncClient<R>) {
    for n in 1..=5 {
        client.insert("todo", &n.to_string(), &json!({"title": format!("row {n}"), "n": n})).unwrap();
    }
    client.update("todo", "1", &json!({"done": true})).unwrap();
    client.delete("todo", "4").unwrap();
    client.sync().await.unwrap();
}

#[tokio::test]
async fn the_client_digest_is_the_protocol_digest_of_its_confirmed_rows() {
    let (_dir, path) = temp_db();
    for store in [LocalStore::memory(), LocalStore::sqlite(&path).unwrap()] {
        let server = server(true);
        let device = client("device", store, primary(&server));
        seed(&device).await;
        device.update("todo", "3", &json!({"title": "unsent"})).unwrap();
        device.insert("todo", "6", &json!({"title": "unsent too"})).unwrap();
        device.delete("todo", "5").unwrap();

        let confirmed: Vec<(String, Map<String, Value>)> = device
            .store
            .transaction(|t| Ok(t.rows("todo")?.into_iter().filter_map(|(pk, row)| row.confirmed.visible().map(|value| (pk, value))).collect()))
            .unwrap();
        let expected = digest_of(confirmed.iter().map(|(pk, value)| ("todo", pk.as_str(), value)));
        let computed = device.store.transaction(confirmed_digest).unwrap();
        assert_eq!(computed, expected, "the client's digest is digest_of over its confirmed visible rows");
        assert_eq!(computed, server.lock().unwrap().digest(), "and the server's digest of the same rows");
        assert_eq!(confirmed.len(), 4, "the deleted row counts nothing");
        let local: Vec<(String, Map<String, Value>)> = rows(&device).into_iter().collect();
        assert_ne!(computed, digest_of(local.iter().map(|(pk, value)| ("todo", pk.as_str(), value))), "unsent changes are left out");
    }
}

#[tokio::test]
async fn a_replica_altered_behind_the_client_is_repaired_by_a_reset_that_keeps_unsent_changes() {
    let (_dir, path) = temp_db();
    let server = server(true);
    let device = Arc::new(client("device", LocalStore::sqlite(&path).unwrap(), primary(&server)));
    seed(&*device).await;
    let other = client("other", LocalStore::memory(), primary(&server));
    other.sync().await.unwrap();

    corrupt(&*device);
    other.update("todo", "3", &json!({"n": 30})).unwrap();
    other.sync().await.unwrap();
    // The app writes while the repair runs: the change must stay in the outbox, on top of the reset.
    let writer: Weak<SyncClient<Fake>> = Arc::downgrade(&device);
    server.lock().unwrap().on_repair = Some(Box::new(move || {
        writer.upgrade().unwrap().update("todo", "5", &json!({"title": "written during the repair"})).unwrap();
    }));
    let report = device.sync().await.unwrap();
    assert!(report.repaired, "{report:?}");
    assert!(server.lock().unwrap().pulls.iter().any(|(since, _)| *since == i64::MAX), "the repair asked for a reset from beyond the log");
    assert_eq!(device.pending().unwrap(), 1, "the change made during the repair is still unsent");
    let mut expected = server.lock().unwrap().visible("todo");
    expected.get_mut("5").unwrap().insert("title".into(), json!("written during the repair"));
    assert_eq!(rows(&*device), expected, "the server's rows, with the unsent change on top");
    assert_eq!(report.cursor, server.lock().unwrap().last_seq());

    let report = device.sync().await.unwrap();
    assert!(!report.repaired);
    assert_eq!((report.pushed, device.pending().unwrap()), (1, 0));
    assert_eq!(rows(&*device), server.lock().unwrap().visible("todo"));
    assert_eq!(rows(&*device)["5"]["title"], "written during the repair");
}

#[tokio::test]
async fn the_check_is_skipped_when_nothing_was_pulled_and_the_digest_was_verified() {
    let server = server(true);
    let device = client("device", LocalStore::memory(), primary(&server));
    seed(&device).await;
    corrupt(&device);
    let pulls = server.lock().unwrap().pulls.len();
    let report = device.sync().await.unwrap();
    assert!(!report.repaired && report.pulled == 0, "nothing pulled, same digest: not recomputed, so not seen");
    assert_eq!(server.lock().unwrap().pulls.len(), pulls + 1);

    another_device_inserts(&server, "7", "new").await;
    let report = device.sync().await.unwrap();
    assert!(report.repaired, "a pull brings a new digest: checked, and repaired");
    assert_eq!(rows(&device), server.lock().unwrap().visible("todo"));
}

#[tokio::test]
async fn a_mismatch_that_outlives_the_repair_is_an_error_after_one_repair() {
    let server = server(true);
    let device = client("device", LocalStore::memory(), primary(&server));
    seed(&device).await;
    another_device_inserts(&server, "7", "new").await;
    server.lock().unwrap().skew = 1;
    let error = device.sync().await.unwrap_err();
    let expected = to_wire(server.lock().unwrap().digest().wrapping_add(1));
    assert!(matches!(&error, Error::DigestMismatch { server, local, instance: None } if *server == expected && *local == to_wire(parse_digest(server).unwrap().wrapping_sub(1))), "{error}");
    let repairs = server.lock().unwrap().pulls.iter().filter(|(since, _)| *since == i64::MAX).count();
    assert_eq!(repairs, 1, "one repair, no loop");
    assert_eq!(rows(&device), server.lock().unwrap().visible("todo"));
}

#[tokio::test]
async fn without_a_digest_nothing_is_checked() {
    let server = server(false);
    let device = client("device", LocalStore::memory(), primary(&server));
    seed(&device).await;
    corrupt(&device);
    another_device_inserts(&server, "7", "new").await;
    let report = device.sync().await.unwrap();
    assert!(!report.repaired);
    assert!(server.lock().unwrap().pulls.iter().all(|(since, _)| *since != i64::MAX));
    assert_eq!(rows(&device)["1"]["title"], "corrupted");
}

#[tokio::test]
async fn a_read_replica_repairs_from_the_primary_and_a_standby_alone_cannot() {
    let server = server(true);
    let remote = ReadReplica { primary: primary(&server), replica: Fake { server: server.clone(), standby: true } };
    let device = client("device", LocalStore::memory(), remote);
    seed(&device).await;
    corrupt(&device);
    another_device_inserts(&server, "7", "new").await;
    let report = device.sync().await.unwrap();
    assert!(report.repaired);
    let repairs: Vec<_> = server.lock().unwrap().pulls.iter().filter(|(since, _)| *since == i64::MAX).copied().collect();
    assert_eq!(repairs, [(i64::MAX, false)], "the repair went to the primary");
    assert_eq!(rows(&device), server.lock().unwrap().visible("todo"));

    // A remote whose every pull reaches a standby gets no reset: nothing is applied, the cursor stays.
    let standby_only = client("standby-only", LocalStore::memory(), Fake { server: server.clone(), standby: true });
    standby_only.sync().await.unwrap();
    corrupt(&standby_only);
    another_device_inserts(&server, "8", "newer").await;
    let error = standby_only.sync().await.unwrap_err();
    assert!(matches!(&error, Error::Protocol(message) if message.contains("without one")), "{error}");
    assert_eq!(standby_only.store.transaction(read_cursor).unwrap(), server.lock().unwrap().last_seq(), "the cursor did not move past the log");
    assert_eq!(rows(&standby_only)["1"]["title"], "corrupted", "nothing was applied");
}

fn sqlite_client(actor: &str, path: &std::path::Path, server: &Arc<Mutex<Server>>, seen: &Arc<Mutex<Vec<i64>>>) -> SyncClient<Fake> {
    let seen = seen.clone();
    SyncClientBuilder::<Fake>::new()
        .tenant("acme")
        .actor(actor)
        .local(LocalStore::sqlite(path).unwrap())
        .remote(primary(server))
        .on_rejected(move |rejection| seen.lock().unwrap().push(rejection.id))
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_rejection_is_recorded_with_its_row_restored_before_the_pull_and_survives_a_crash() {
    let (_dir, path) = temp_db();
    let server = server(false);
    let seen: Arc<Mutex<Vec<i64>>> = Arc::default();
    {
        let device = sqlite_client("device", &path, &server, &seen);
        device.insert("todo", "1", &json!({"title": "ok"})).unwrap();
        device.sync().await.unwrap();
        device.update("todo", "1", &json!({"title": "refused", "forbidden": true})).unwrap();
        device.update("todo", "1", &json!({"note": "accepted in the same batch"})).unwrap();
        server.lock().unwrap().fail_pulls = Some("08006");
        let error = device.sync().await.unwrap_err();
        assert!(error.is_transient() && error.sqlstate() == Some("08006"), "{error}");
        assert_eq!(device.pending().unwrap(), 0);
        assert_eq!(Value::Object(rows(&device)["1"].clone()), json!({"title": "ok", "note": "accepted in the same batch"}), "restored without waiting for the pull");
        assert_eq!(seen.lock().unwrap().len(), 1, "the callback ran once");
        let status = device.status().borrow().clone();
        assert_eq!((status.rejections, status.pending, status.activity), (1, 0, Activity::Idle));
        assert_eq!(status.last_error.map(|error| (error.class, error.sqlstate)), Some((ErrorClass::Transient, Some("08006".into()))));
    }
    // The process ends here without another sync: the rejection is in the file.
    let reopened = sqlite_client("device", &path, &server, &seen);
    assert_eq!(reopened.status().borrow().rejections, 1);
    let rejections = reopened.take_rejections().unwrap();
    assert_eq!(rejections.len(), 1);
    assert_eq!((rejections[0].code(), rejections[0].id), ("permission_denied", seen.lock().unwrap()[0]));
    assert_eq!(rejections[0].change.value.as_ref().unwrap()["title"], "refused");
    assert!(reopened.take_rejections().unwrap().is_empty(), "drained once");
    server.lock().unwrap().fail_pulls = None;
    let report = reopened.sync().await.unwrap();
    assert!(report.rejected.is_empty());
    assert_eq!(rows(&reopened), server.lock().unwrap().visible("todo"));
    assert_eq!(seen.lock().unwrap().len(), 1, "no callback again");
}

#[tokio::test]
async fn a_change_refused_as_a_whole_call_is_isolated_and_cannot_block_the_rest() {
    let server = server(false);
    let device = client("device", LocalStore::memory(), primary(&server));
    for n in 0..7 {
        let value = if n == 4 { json!({"poison": n}) } else { json!({"n": n}) };
        device.insert("todo", &n.to_string(), &value).unwrap();
    }
    let report = device.sync().await.unwrap();
    assert_eq!(report.pushed, 7);
    let reasons: Vec<&str> = report.rejected.iter().map(|rejection| rejection.reason.as_str()).collect();
    assert_eq!(reasons, ["refused: 22023: changes[0].value.poison: not accepted"], "the change alone was refused");
    assert_eq!(report.rejected[0].change.pk, "4");
    assert_eq!(device.pending().unwrap(), 0);
    let on_server = server.lock().unwrap().visible("todo");
    assert_eq!(on_server.keys().collect::<Vec<_>>(), ["0", "1", "2", "3", "5", "6"]);
    assert_eq!(rows(&device), on_server);
    let order: Vec<i64> = server.lock().unwrap().log.iter().map(|change| change.pk.parse().unwrap()).collect();
    assert_eq!(order, [0, 1, 2, 3, 5, 6], "the rest went in outbox order");
}

#[tokio::test]
async fn the_outbox_lists_failures_and_a_pending_change_can_be_discarded() {
    let server = server(false);
    let device = client("device", LocalStore::memory(), primary(&server));
    device.insert("todo", "1", &json!({"title": "first"})).unwrap();
    let edit = device.update("todo", "1", &json!({"title": "second"})).unwrap();
    device.insert("todo", "2", &json!({"title": "other"})).unwrap();
    server.lock().unwrap().fail_pushes = Some("57P01");
    assert_eq!(device.sync().await.unwrap_err().sqlstate(), Some("57P01"));
    let outbox = device.outbox().unwrap();
    assert_eq!(outbox.len(), 3);
    assert!(outbox.iter().all(|pending| pending.attempts == 1 && pending.last_error.as_deref().is_some_and(|error| error.contains("57P01"))), "{outbox:?}");

    let mut events = device.changes();
    assert_eq!(device.discard(edit.op_id).unwrap(), edit);
    assert_eq!(rows(&device)["1"]["title"], "first", "the row shows the other unsent change only");
    assert!(events.try_recv().unwrap().touches("todo"));
    assert!(matches!(device.discard(edit.op_id), Err(Error::NotFound(_))));
    assert_eq!(device.status().borrow().pending, 2);

    server.lock().unwrap().fail_pushes = None;
    device.sync().await.unwrap();
    assert_eq!(server.lock().unwrap().visible("todo")["1"]["title"], "first", "the discarded change was never sent");
    assert_eq!(rows(&device), server.lock().unwrap().visible("todo"));
}

#[tokio::test]
async fn a_rejected_change_can_be_retried_as_a_new_change() {
    let server = server(false);
    let device = client("device", LocalStore::memory(), primary(&server));
    let refused = device.insert("todo", "1", &json!({"title": "x", "forbidden": 1})).unwrap();
    let report = device.sync().await.unwrap();
    assert_eq!(report.rejected.len(), 1);
    assert!(rows(&device).is_empty());
    let id = device.rejections().unwrap()[0].id;
    let retried = device.retry_rejection(id).unwrap();
    assert_ne!(retried.op_id, refused.op_id);
    assert!(retried.hlc > refused.hlc);
    assert!(device.rejections().unwrap().is_empty());
    assert!(matches!(device.retry_rejection(id), Err(Error::NotFound(_))));
    assert_eq!(device.pending().unwrap(), 1);
    assert_eq!(rows(&device)["1"]["title"], "x");
}

#[tokio::test]
async fn a_device_clock_an_hour_ahead_is_rebased_on_the_server_clock() {
    let (_dir, path) = temp_db();
    let server = server(false);
    server.lock().unwrap().server_clock = true;
    let hour = 3_600_000;
    let ahead = |path: &std::path::Path| {
        SyncClientBuilder::<Fake>::new()
            .tenant("acme")
            .actor("ahead")
            .local(LocalStore::sqlite(path).unwrap())
            .remote(primary(&server))
            .wall_clock(move || wall_clock_millis() + hour)
            .build()
            .unwrap()
    };
    let device = ahead(&path);
    device.insert("todo", "1", &json!({"title": "stamped an hour ahead"})).unwrap();
    let report = device.sync().await.unwrap();
    assert_eq!(report.rejected.iter().map(Rejection::code).collect::<Vec<_>>(), [REASON_CLOCK_SKEW]);

    let later = device.insert("todo", "2", &json!({"title": "after the rebase"})).unwrap();
    assert!((later.hlc.millis() - wall_clock_millis()).abs() < 60_000, "stamped with the server's time: {}", later.hlc);
    let retried = device.retry_rejection(report.rejected[0].id).unwrap();
    let report = device.sync().await.unwrap();
    assert!(report.rejected.is_empty(), "{report:?}");
    assert!(retried.hlc > later.hlc);
    assert_eq!(server.lock().unwrap().visible("todo").len(), 2);

    drop(device);
    let reopened = ahead(&path);
    let after_restart = reopened.insert("todo", "3", &json!({"title": "after a restart"})).unwrap();
    assert!(after_restart.hlc.millis() < wall_clock_millis() + 60_000, "the offset is kept: {}", after_restart.hlc);
    assert!(reopened.sync().await.unwrap().rejected.is_empty());
}

#[tokio::test]
async fn status_and_events_follow_writes_syncs_and_errors() {
    let server = server(true);
    let device = client("device", LocalStore::memory(), primary(&server));
    let other = client("other", LocalStore::memory(), primary(&server));
    let mut events = device.changes();
    let status = device.status();
    device.insert("todo", "1", &json!({"title": "mine"})).unwrap();
    assert_eq!(events.try_recv().unwrap(), RowsChanged { origin: Origin::Local, rows: vec![("todo".into(), "1".into())], all: false });
    assert_eq!((status.borrow().pending, status.borrow().connected, status.borrow().last_synced_at), (1, false, None));

    other.insert("note", "a", &json!({"body": "theirs"})).unwrap();
    other.sync().await.unwrap();
    device.sync().await.unwrap();
    let pulled: Vec<RowsChanged> = std::iter::from_fn(|| events.try_recv().ok()).collect();
    assert!(pulled.iter().any(|event| event.origin == Origin::Pull && event.touches("note") && !event.touches("other")), "{pulled:?}");
    let now = status.borrow().clone();
    assert!(now.connected && now.last_synced_at.is_some() && now.last_error.is_none() && now.pending == 0, "{now:?}");
    assert_eq!(now.activity, Activity::Idle);

    server.lock().unwrap().fail_pulls = Some("42501");
    let error = device.sync().await.unwrap_err();
    assert!(!error.is_transient());
    let failed = status.borrow().last_error.clone().unwrap();
    assert_eq!((failed.class, failed.sqlstate.as_deref()), (ErrorClass::Permanent, Some("42501")));
    assert!(failed.message.contains("the pull failed"), "{}", failed.message);
}

#[tokio::test]
async fn a_client_syncs_through_a_remote_trait_object() {
    let server = server(true);
    let remote: Arc<dyn Remote> = Arc::new(primary(&server));
    let device: SyncClient<Arc<dyn Remote>> = client("device", LocalStore::memory(), remote);
    device.insert("todo", "1", &json!({"title": "through dyn Remote"})).unwrap();
    device.sync().await.unwrap();
    assert_eq!(server.lock().unwrap().visible("todo")["1"]["title"], "through dyn Remote");
}

/// Waits (at most a generous 10 s) until `done` holds.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "not within 10 s: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn dropping_the_live_handle_ends_the_loop() {
    let server = server(false);
    let device = Arc::new(client("device", LocalStore::memory(), primary(&server)));
    let live = device.clone().live(LiveOptions { interval: Duration::from_millis(5), ..LiveOptions::default() });
    eventually("the loop syncs", || server.lock().unwrap().pulls.len() >= 3).await;
    drop(live);
    eventually("the loop lets go of the client", || Arc::strong_count(&device) == 1).await;
    let pulls = server.lock().unwrap().pulls.len();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(server.lock().unwrap().pulls.len(), pulls, "no sync after the loop ended");
    assert_eq!(device.status().borrow().live, LiveState::Off);
}

#[tokio::test]
async fn stop_returns_while_a_call_never_answers() {
    let server = server(false);
    server.lock().unwrap().hang_pulls = true;
    let device = Arc::new(client("device", LocalStore::memory(), primary(&server)));
    let live = device.clone().live(LiveOptions::default());
    eventually("the pull hangs", || !server.lock().unwrap().pulls.is_empty()).await;
    assert!(matches!(device.status().borrow().activity, Activity::Downloading { .. }));
    tokio::time::timeout(Duration::from_secs(10), live.stop()).await.expect("stop returns");
    assert_eq!(device.status().borrow().activity, Activity::Idle, "the abandoned sync left the status idle");
    assert_eq!(Arc::strong_count(&device), 1);
}

#[tokio::test]
async fn a_permanent_error_halts_the_live_loop_until_sync_now() {
    let server = server(false);
    server.lock().unwrap().fail_pulls = Some("42501");
    let device = Arc::new(client("device", LocalStore::memory(), primary(&server)));
    let status = device.status();
    let live = device.clone().live(LiveOptions { interval: Duration::from_millis(5), ..LiveOptions::default() });
    eventually("the loop halts", || matches!(status.borrow().live, LiveState::Running { halted: true, .. })).await;
    assert_eq!(status.borrow().last_error.as_ref().map(|error| error.class), Some(ErrorClass::Permanent));
    let wakeups = match &status.borrow().live {
        LiveState::Running { wakeups: Wakeups::Unavailable { reason }, .. } => reason.clone(),
        other => panic!("{other:?}"),
    };
    assert!(wakeups.contains("listen_url"), "{wakeups}");
    let pulls = server.lock().unwrap().pulls.len();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.lock().unwrap().pulls.len(), pulls, "no retries after a permanent error");

    server.lock().unwrap().fail_pulls = None;
    live.sync_now();
    eventually("the loop syncs again", || status.borrow().last_error.is_none() && status.borrow().last_synced_at.is_some()).await;
    assert!(matches!(status.borrow().live, LiveState::Running { halted: false, .. }));
    live.stop().await;
}

/// A remote that notes the client's status each time a pull reaches it, then pulls from `inner`.
struct Watching {
    inner: Fake,
    status: Arc<Mutex<Option<tokio::sync::watch::Receiver<SyncStatus>>>>,
    seen: Arc<Mutex<Vec<(bool, Activity)>>>,
}

impl Remote for Watching {
    fn push<'a>(&'a self, tenant: &'a str, changes: &'a [Change]) -> RemoteFuture<'a, PushResponse> {
        self.inner.push(tenant, changes)
    }

    fn pull<'a>(&'a self, tenant: &'a str, since: i64, max_changes: i32, scopes: Option<&'a [String]>) -> RemoteFuture<'a, PullResponse> {
        if let Some(status) = self.status.lock().unwrap().as_ref() {
            let now = status.borrow().clone();
            self.seen.lock().unwrap().push((now.connected, now.activity));
        }
        self.inner.pull(tenant, since, max_changes, scopes)
    }
}

#[tokio::test]
async fn the_status_is_connected_once_the_server_answers_and_counts_what_pulls_bring() {
    let server = server(false);
    let writer = client("writer", LocalStore::memory(), primary(&server));
    for n in 0..5 {
        writer.insert("todo", &n.to_string(), &json!({"n": n})).unwrap();
    }
    writer.sync().await.unwrap();
    let (status, seen) = (Arc::new(Mutex::new(None)), Arc::new(Mutex::new(Vec::new())));
    let device = client("device", LocalStore::memory(), Watching { inner: primary(&server), status: status.clone(), seen: seen.clone() });
    *status.lock().unwrap() = Some(device.status());
    device.insert("todo", "mine", &json!({"n": 9})).unwrap();
    let report = device.sync().await.unwrap();
    assert_eq!(report.pulled, 6, "pages of 2: the writer's 5 changes and its own");
    let seen = seen.lock().unwrap().clone();
    let received: Vec<usize> = seen.iter().map(|(_, activity)| match activity {
        Activity::Downloading { received, .. } => *received,
        other => panic!("a pull while {other:?}"),
    }).collect();
    assert_eq!(received, [0, 2, 4], "progress counts what earlier pages brought");
    assert!(seen.iter().all(|(connected, _)| *connected), "connected since the push was answered: {seen:?}");
}

/// A remote for partial sync: pulls are answered with scripted pages in order (once they run out, with
/// an empty page at the cursor asked for) and recorded with their scopes; pushes are applied; the scope
/// definitions are `task.project_id` (scope `project`) and `task.owner` (scope `owner`).
#[derive(Clone, Default)]
struct Scripted(Arc<Mutex<Script>>);

#[derive(Default)]
struct Script {
    pages: VecDeque<Result<PullResponse>>,
    pulls: Vec<(i64, Option<Vec<String>>)>,
    /// How many times the definitions were asked for.
    definitions_asked: usize,
    /// The definitions cannot be fetched.
    offline: bool,
    /// The cursor pushes answer.
    push_cursor: i64,
}

impl Scripted {
    fn serve(&self, pages: impl IntoIterator<Item = PullResponse>) {
        self.0.lock().unwrap().pages.extend(pages.into_iter().map(Ok));
    }

    fn fail_next_pull(&self) {
        self.0.lock().unwrap().pages.push_back(Err(Error::connection("injected: the pull never left", None)));
    }

    fn pulls(&self) -> Vec<(i64, Option<Vec<String>>)> {
        self.0.lock().unwrap().pulls.clone()
    }

    fn set_offline(&self, offline: bool) {
        self.0.lock().unwrap().offline = offline;
    }
}

impl Remote for Scripted {
    fn push<'a>(&'a self, _tenant: &'a str, changes: &'a [Change]) -> RemoteFuture<'a, PushResponse> {
        let results = changes.iter().zip(1000..).map(|(change, seq)| ChangeResult { op_id: change.op_id, status: Status::Applied { seq } }).collect();
        let cursor = self.0.lock().unwrap().push_cursor;
        Box::pin(async move { Ok(PushResponse { cursor, results, limits: None }) })
    }

    fn pull<'a>(&'a self, _tenant: &'a str, since: i64, _max_changes: i32, scopes: Option<&'a [String]>) -> RemoteFuture<'a, PullResponse> {
        let mut script = self.0.lock().unwrap();
        script.pulls.push((since, scopes.map(<[String]>::to_vec)));
        let page = script.pages.pop_front().unwrap_or_else(|| Ok(page(Vec::new(), since, false, false)));
        Box::pin(async move { page })
    }

    fn scope_definitions(&self) -> RemoteFuture<'_, Vec<ScopeDefinition>> {
        let mut script = self.0.lock().unwrap();
        script.definitions_asked += 1;
        let answer = match script.offline {
            true => Err(Error::connection("offline", None)),
            false => Ok([("project", "project_id"), ("owner", "owner")]
                .map(|(scope, field)| ScopeDefinition { scope: scope.into(), model: "task".into(), field: field.into() })
                .into()),
        };
        Box::pin(async move { answer })
    }
}

fn page(changes: Vec<PulledChange>, cursor: i64, has_more: bool, reset: bool) -> PullResponse {
    PullResponse { changes, cursor, has_more, reset, digest: None, digests: None }
}

/// The hlc `2026-01-01T00:00:00.<millis>Z-0000`.
fn at(millis: u16) -> sync_ext_protocol::Hlc {
    format!("2026-01-01T00:00:00.{millis:03}Z-0000").parse().unwrap()
}

/// A row written once, at `millis`, with `value`.
fn written(millis: u16, value: Value) -> RowState {
    let mut row = RowState::default();
    row.apply(&Change { op_id: Uuid::new_v4(), model: "-".into(), pk: "-".into(), op: Op::Insert, hlc: at(millis), actor: "server".into(), value: Some(object(value)) });
    row
}

/// A change as a pull delivers it (not a whole row), stamped at `millis`.
fn pulled(seq: i64, op: Op, model: &str, pk: &str, value: Option<Value>) -> PulledChange {
    let hlc = at(u16::try_from(seq).unwrap());
    PulledChange { seq, op_id: Uuid::new_v4(), model: model.into(), pk: pk.into(), op, hlc, actor: "server".into(), value: value.map(object), field_stamps: None, deleted_hlc: None }
}

fn scoped(store: LocalStore, remote: &Scripted, scopes: &[&str]) -> SyncClient<Scripted> {
    SyncClientBuilder::<Scripted>::new().tenant("acme").actor("device").local(store).remote(remote.clone()).scopes(scopes.iter().copied()).build().unwrap()
}

fn listed<R: Remote>(client: &SyncClient<R>, model: &str) -> BTreeMap<String, Map<String, Value>> {
    client.list::<Map<String, Value>>(model).unwrap().into_iter().collect()
}

fn scopes_of<R: Remote>(client: &SyncClient<R>) -> Option<Vec<String>> {
    client.scopes().unwrap().map(|scopes| scopes.into_iter().collect())
}

fn strings(texts: &[&str]) -> Option<Vec<String>> {
    Some(texts.iter().map(|text| text.to_string()).collect())
}

/// The first pull of a replica: tasks in project 1, project 2, and project 1 owned by ann; a label
/// (a tenant-wide model). It ends at seq 4.
fn workspace() -> PullResponse {
    page(
        vec![
            whole_row(1, "task", "t1", &written(1, json!({"project_id": 1, "title": "a"}))),
            whole_row(2, "task", "t2", &written(2, json!({"project_id": 2, "title": "b"}))),
            whole_row(3, "task", "t3", &written(3, json!({"project_id": 1, "owner": "ann", "title": "c"}))),
            whole_row(4, "label", "l1", &written(4, json!({"name": "urgent"}))),
        ],
        4,
        false,
        true,
    )
}

#[tokio::test]
async fn a_leave_drops_the_confirmed_row_and_a_whole_row_replaces_it_with_unsent_changes_on_top() {
    let remote = Scripted::default();
    let device = scoped(LocalStore::memory(), &remote, &["project:1", "project:2"]);
    remote.serve([workspace()]);
    device.sync().await.unwrap();
    assert_eq!(remote.pulls(), [(0, strings(&["project:1", "project:2"]))]);
    assert_eq!(listed(&device, "task").len(), 3);
    device.update("task", "t1", &json!({"title": "unsent"})).unwrap();
    device.update("task", "t3", &json!({"title": "unsent too"})).unwrap();

    let mut events = device.changes();
    let moved_in = written(7, json!({"project_id": 2, "note": "moved in"}));
    remote.serve([page(
        vec![
            pulled(5, Op::Leave, "task", "t1", None),
            pulled(6, Op::Leave, "task", "t2", None),
            whole_row(7, "task", "t3", &moved_in),
            pulled(8, Op::Update, "label", "l1", Some(json!({"color": "red"}))),
        ],
        8,
        false,
        false,
    )]);
    // Pulled without pushing first, so that the unsent changes stay unsent.
    let mut report = SyncReport::default();
    device.pull_pages(4, Stream::Main, strings(&["project:1", "project:2"]).as_deref(), &mut report).await.unwrap();

    let stored = device.store.transaction(|t| t.rows("task")).unwrap();
    assert_eq!(stored.keys().collect::<Vec<_>>(), ["t1", "t3"], "a row that left, with nothing unsent, is forgotten");
    assert_eq!(stored["t1"].confirmed, RowState::default(), "t1 left: nothing confirmed");
    assert_eq!(Value::Object(stored["t1"].local.visible().unwrap()), json!({"title": "unsent"}), "the app sees the unsent change alone");
    assert_eq!(Value::Object(stored["t3"].confirmed.visible().unwrap()), json!({"project_id": 2, "note": "moved in"}), "replaced, not merged: the old title is gone");
    assert_eq!(stored["t3"].confirmed, moved_in, "the whole row's registers");
    assert_eq!(Value::Object(listed(&device, "task")["t3"].clone()), json!({"project_id": 2, "note": "moved in", "title": "unsent too"}));
    assert_eq!(Value::Object(listed(&device, "label")["l1"].clone()), json!({"name": "urgent", "color": "red"}), "other changes merge");
    assert_eq!(device.pending().unwrap(), 2, "the outbox is untouched");
    let rows = ["label/l1", "task/t1", "task/t2", "task/t3"].map(|row| row.split_once('/').map(|(model, pk)| (model.to_owned(), pk.to_owned())).unwrap());
    assert_eq!(events.try_recv().unwrap(), RowsChanged { origin: Origin::Pull, rows: rows.into(), all: false }, "dropped rows are reported too");
    assert_eq!(report.cursor, 8);
}

#[tokio::test]
async fn a_leave_in_a_reset_drops_a_row_an_earlier_page_sent() {
    let remote = Scripted::default();
    let device = scoped(LocalStore::memory(), &remote, &["project:1"]);
    remote.serve([
        page(vec![whole_row(1, "task", "t1", &written(1, json!({"project_id": 1})))], -1, true, true),
        page(vec![whole_row(2, "task", "t2", &written(2, json!({"project_id": 1}))), pulled(3, Op::Leave, "task", "t1", None)], 3, false, true),
    ]);
    let report = device.sync().await.unwrap();
    assert_eq!(listed(&device, "task").keys().collect::<Vec<_>>(), ["t2"]);
    assert_eq!(device.store.transaction(|t| t.rows("task")).unwrap().len(), 1);
    assert_eq!((report.cursor, report.pulled), (3, 3));
}

#[tokio::test]
async fn unsubscribe_drops_the_rows_no_remaining_instance_holds_and_never_the_outbox() {
    let remote = Scripted::default();
    let device = scoped(LocalStore::memory(), &remote, &["project:1", "project:2", "owner:ann"]);
    remote.serve([workspace()]);
    device.sync().await.unwrap();
    device.update("task", "t1", &json!({"title": "unsent"})).unwrap();
    let mut events = device.changes();

    remote.set_offline(true);
    let error = device.unsubscribe(["project:1"]).await.unwrap_err();
    assert!(error.is_transient(), "{error}");
    assert_eq!(scopes_of(&device), strings(&["owner:ann", "project:2"]), "recorded at once");
    assert_eq!(listed(&device, "task").len(), 3, "nothing dropped without the definitions");

    remote.set_offline(false);
    device.unsubscribe(["project:1"]).await.unwrap();
    let stored = device.store.transaction(|t| t.rows("task")).unwrap();
    assert_eq!(stored["t1"].confirmed, RowState::default(), "t1 is in project:1 alone: dropped");
    assert_eq!(Value::Object(listed(&device, "task")["t1"].clone()), json!({"title": "unsent"}), "its unsent change stays");
    assert_eq!(listed(&device, "task").keys().collect::<Vec<_>>(), ["t1", "t2", "t3"], "t2 is in project:2, t3 in owner:ann");
    assert_eq!(listed(&device, "label").len(), 1, "a tenant-wide row stays");
    assert_eq!(device.pending().unwrap(), 1);
    assert_eq!(events.try_recv().unwrap(), RowsChanged { origin: Origin::OutOfScope, rows: vec![("task".into(), "t1".into())], all: false });
    assert_eq!(remote.0.lock().unwrap().definitions_asked, 2);

    // Offline again: the next sync drops the rows before it pulls, with the remaining scopes.
    remote.set_offline(true);
    assert!(device.unsubscribe(["owner:ann"]).await.is_err());
    remote.set_offline(false);
    device.sync().await.unwrap();
    assert_eq!(listed(&device, "task").keys().collect::<Vec<_>>(), ["t2"], "t3 dropped by the sync; t1 let go once its change was sent");
    assert_eq!(device.pending().unwrap(), 0);
    assert_eq!(remote.pulls().last().unwrap(), &(4, strings(&["project:2"])));
    device.sync().await.unwrap();
    assert_eq!(remote.0.lock().unwrap().definitions_asked, 4, "dropped once: the next sync asks for no definitions");
}

#[tokio::test]
async fn a_row_written_outside_the_scopes_is_let_go_once_a_pull_went_past_its_change() {
    let remote = Scripted::default();
    let device = scoped(LocalStore::memory(), &remote, &["project:1"]);
    remote.serve([workspace()]);
    device.sync().await.unwrap();
    device.insert("task", "t8", &json!({"project_id": 1})).unwrap();
    device.insert("task", "t9", &json!({"project_id": 3})).unwrap();
    remote.0.lock().unwrap().push_cursor = 9;
    device.sync().await.unwrap();
    assert_eq!(device.pending().unwrap(), 0);
    assert!(listed(&device, "task").contains_key("t9"), "the pull stopped at 4, before the push's 9: kept");

    let mut events = device.changes();
    let t8 = pulled(8, Op::Insert, "task", "t8", Some(json!({"project_id": 1})));
    remote.serve([page(vec![t8], 9, false, false)]);
    device.sync().await.unwrap();
    let tasks = listed(&device, "task");
    assert!(tasks.contains_key("t8") && !tasks.contains_key("t9"), "t8 came back, t9 (project 3) did not: {tasks:?}");
    let origins: Vec<(Origin, Vec<(String, String)>)> = std::iter::from_fn(|| events.try_recv().ok()).map(|event| (event.origin, event.rows)).collect();
    assert_eq!(origins, [(Origin::Pull, vec![("task".into(), "t8".into())]), (Origin::OutOfScope, vec![("task".into(), "t9".into())])]);
}

#[tokio::test]
async fn subscribe_bootstraps_the_new_instances_alone_resumes_after_a_crash_and_goes_on_from_the_lesser_cursor() {
    let (_dir, path) = temp_db();
    let remote = Scripted::default();
    {
        let device = scoped(LocalStore::sqlite(&path).unwrap(), &remote, &["project:1"]);
        remote.serve([page(vec![whole_row(3, "task", "t1", &written(3, json!({"project_id": 1}))), whole_row(4, "label", "l1", &written(4, json!({"name": "x"})))], 10, false, true)]);
        device.sync().await.unwrap();
        remote.serve([page(vec![whole_row(12, "task", "t2", &written(12, json!({"project_id": 2})))], -12, true, true)]);
        remote.fail_next_pull();
        let error = device.subscribe(["project:2", "project:1"]).await.unwrap_err();
        assert!(error.is_transient(), "{error}");
        assert_eq!(listed(&device, "task").keys().collect::<Vec<_>>(), ["t1", "t2"], "the bootstrap forgets nothing");
        assert_eq!(scopes_of(&device), strings(&["project:1", "project:2"]));
    }
    // Reopened with the same instances (in another order): the bootstrap goes on from its last page.
    // Then project 1 alone catches up from the main cursor: t6 moved from project 2 to project 1 after
    // it, so it is in no bootstrap page, and only this pull brings it whole; its leave of t4 (which
    // moved to project 2) is ignored.
    let device = scoped(LocalStore::sqlite(&path).unwrap(), &remote, &["project:2", "project:1"]);
    let bootstrap_end = page(vec![pulled(13, Op::Leave, "task", "t1", None), whole_row(14, "task", "t4", &written(14, json!({"project_id": 2})))], 20, false, true);
    let catch_up = page(vec![whole_row(15, "task", "t6", &written(15, json!({"project_id": 1, "title": "moved"}))), pulled(16, Op::Leave, "task", "t4", None)], 20, false, false);
    remote.serve([bootstrap_end, catch_up]);
    let report = device.sync().await.unwrap();
    assert_eq!(listed(&device, "task").keys().collect::<Vec<_>>(), ["t1", "t2", "t4", "t6"], "a bootstrap and a catch-up ignore leaves");
    assert_eq!(listed(&device, "task")["t6"]["title"], "moved");
    assert_eq!(listed(&device, "label").len(), 1);
    assert_eq!(
        remote.pulls(),
        [
            (0, strings(&["project:1"])),
            (0, strings(&["project:2"])),
            (-12, strings(&["project:2"])),
            (-12, strings(&["project:2"])),
            (10, strings(&["project:1"])),
            (10, strings(&["project:1", "project:2"])),
        ],
        "only the new instance is bootstrapped, the held one caught up; then one cursor, min(10, 20), over both"
    );
    assert_eq!(report.cursor, 10, "the scripted server had nothing after 10");
    assert_eq!(device.store.transaction(read_cursor).unwrap(), 10);
}

#[tokio::test]
async fn a_join_whose_catch_up_is_answered_with_a_reset_becomes_a_reset_of_every_instance() {
    let remote = Scripted::default();
    let device = scoped(LocalStore::memory(), &remote, &["project:1"]);
    remote.serve([page(vec![whole_row(1, "task", "t1", &written(1, json!({"project_id": 1})))], 10, false, true)]);
    device.sync().await.unwrap();
    let t2 = whole_row(12, "task", "t2", &written(12, json!({"project_id": 2})));
    let compacted = page(vec![whole_row(11, "task", "t1", &written(11, json!({"project_id": 1, "title": "newer"})))], 12, false, true);
    let reset = page(vec![whole_row(11, "task", "t1", &written(11, json!({"project_id": 1, "title": "newer"}))), t2.clone()], 12, false, true);
    remote.serve([page(vec![t2], 12, false, true), compacted, reset]);
    device.subscribe(["project:2"]).await.unwrap();
    assert_eq!(
        remote.pulls(),
        [(0, strings(&["project:1"])), (0, strings(&["project:2"])), (10, strings(&["project:1"])), (0, strings(&["project:1", "project:2"]))],
        "the catch-up's reset is not applied: the main stream starts again from 0"
    );
    assert_eq!(listed(&device, "task").keys().collect::<Vec<_>>(), ["t1", "t2"]);
    assert_eq!(listed(&device, "task")["t1"]["title"], "newer");
    assert_eq!((scopes_of(&device), device.store.transaction(read_cursor).unwrap()), (strings(&["project:1", "project:2"]), 12));
}

#[tokio::test]
async fn a_store_opened_with_other_scopes_moves_to_them_as_subscribe_and_unsubscribe_would() {
    let (_dir, path) = temp_db();
    let remote = Scripted::default();
    {
        let device = scoped(LocalStore::sqlite(&path).unwrap(), &remote, &["project:1", "project:2"]);
        remote.serve([workspace()]);
        device.sync().await.unwrap();
    }
    let device = scoped(LocalStore::sqlite(&path).unwrap(), &remote, &["project:2", "owner:ann"]);
    assert_eq!(scopes_of(&device), strings(&["owner:ann", "project:2"]));
    remote.serve([page(vec![whole_row(9, "task", "t5", &written(9, json!({"owner": "ann"})))], 9, false, true)]);
    device.sync().await.unwrap();
    assert_eq!(listed(&device, "task").keys().collect::<Vec<_>>(), ["t2", "t3", "t5"], "t1 (project:1 alone) dropped, owner:ann bootstrapped");
    assert_eq!(remote.pulls()[1..], [(0, strings(&["owner:ann"])), (4, strings(&["project:2"])), (4, strings(&["owner:ann", "project:2"]))]);
    drop(device);

    // Opened without scopes: the whole tenant, pulled from the start of the log over the rows held.
    let whole = client("device", LocalStore::sqlite(&path).unwrap(), remote.clone());
    assert_eq!(scopes_of(&whole), None);
    whole.sync().await.unwrap();
    assert_eq!(remote.pulls().last().unwrap(), &(0, None));
    assert_eq!(listed(&whole, "task").len(), 3, "nothing forgotten");
}

#[tokio::test]
async fn scopes_are_validated_and_a_replica_of_the_whole_tenant_has_none_to_change() {
    let built = SyncClientBuilder::<Scripted>::new().tenant("acme").actor("device").local(LocalStore::memory()).remote(Scripted::default()).scopes(["project"]).build();
    assert!(matches!(&built, Err(Error::InvalidChange(message)) if message.starts_with("scopes[0]: expected <scope>:<value>")), "{:?}", built.err());
    let whole = client("device", LocalStore::memory(), Scripted::default());
    assert!(matches!(whole.subscribe(["project:1"]).await, Err(Error::Config { .. })));
    assert!(matches!(whole.unsubscribe(["project:1"]).await, Err(Error::Config { .. })));
    assert!(matches!(whole.subscribe(["nope"]).await, Err(Error::InvalidChange(_))));

    // A replica that has pulled nothing yet holds new instances at once: its first pull is a reset of all.
    let remote = Scripted::default();
    let fresh = scoped(LocalStore::memory(), &remote, &[]);
    assert_eq!(scopes_of(&fresh), Some(Vec::new()), "no instance: the tenant-wide models alone");
    fresh.subscribe(["project:1"]).await.unwrap();
    assert_eq!(remote.pulls(), [(0, strings(&["project:1"]))]);
    fresh.clear().unwrap();
    assert_eq!(scopes_of(&fresh), strings(&["project:1"]), "a clear keeps the scopes");
}

#[tokio::test]
async fn a_scoped_replica_checks_the_digest_of_each_instance_and_repairs_with_a_scoped_reset() {
    let remote = Scripted::default();
    let device = scoped(LocalStore::memory(), &remote, &["project:1"]);
    let t1 = written(1, json!({"project_id": 1, "title": "a"}));
    let (l1, l2) = (written(2, json!({"name": "urgent"})), written(3, json!({"name": "later"})));
    let digests = |project: u64, wide: u64| Some(BTreeMap::from([("project:1".to_owned(), to_wire(project)), (String::new(), to_wire(wide))]));
    let (t1_digest, l1_digest, l2_digest) = (row_state_digest("task", "t1", &t1), row_state_digest("label", "l1", &l1), row_state_digest("label", "l2", &l2));
    let with = |mut page: PullResponse, project: u64, wide: u64| {
        page.digests = digests(project, wide);
        page
    };
    remote.serve([with(page(vec![whole_row(1, "task", "t1", &t1), whole_row(2, "label", "l1", &l1)], 2, false, true), t1_digest, l1_digest)]);
    assert!(!device.sync().await.unwrap().repaired);

    // The server holds a tenant-wide row this replica lacks: "" differs, and a reset of project:1 from
    // beyond the log repairs it.
    let reset = page(vec![whole_row(1, "task", "t1", &t1), whole_row(2, "label", "l1", &l1), whole_row(3, "label", "l2", &l2)], 3, false, true);
    let wide = l1_digest.wrapping_add(l2_digest);
    remote.serve([with(page(Vec::new(), 2, false, false), t1_digest, wide), with(reset.clone(), t1_digest, wide)]);
    let report = device.sync().await.unwrap();
    assert!(report.repaired, "{report:?}");
    assert_eq!(remote.pulls().last().unwrap(), &(i64::MAX, strings(&["project:1"])));
    assert_eq!(listed(&device, "label").len(), 2);

    // A digest the repair cannot match: an error naming the instance, after one repair.
    remote.serve([with(page(Vec::new(), 3, false, false), t1_digest.wrapping_add(1), wide), with(reset, t1_digest.wrapping_add(1), wide)]);
    let error = device.sync().await.unwrap_err();
    assert!(matches!(&error, Error::DigestMismatch { instance: Some(instance), .. } if instance == "project:1"), "{error}");
    assert_eq!(remote.pulls().iter().filter(|(since, _)| *since == i64::MAX).count(), 2);
}
