//! The sync procedure: push the outbox in batches, settling each batch's results in one local
//! transaction, then pull pages until the server has nothing more.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use sync_ext_protocol::wire::{PulledChange, REASON_CLOCK_SKEW};
use sync_ext_protocol::{Change, Op, RowState, Status};
use tokio::sync::watch;

use crate::clock::{observe_server_stamp, read_clock, read_offset, write_clock, META_CLOCK_SKEWED};
use crate::digest::{Pulled, ServerDigest};
use crate::error::{Error, Result};
use crate::outbox::{Rejection, REASON_REFUSED};
use crate::scopes::{note_bootstrapped, note_caught_up, note_sent, pulled_scopes, restart_joined};
use crate::status::{Activity, Origin, SyncStatus};
use crate::store::{LocalRow, Transaction};
use crate::{protocol, Remote, SyncClient};

pub(crate) const META_CURSOR: &str = "cursor";
/// Set while a reset is being paged in.
pub(crate) const META_RESETTING: &str = "resetting";

/// How long one [`SyncClient::sync`] may take by default.
pub const DEFAULT_SYNC_TIMEOUT: Duration = Duration::from_secs(300);

/// What one [`SyncClient::sync`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Changes sent (each acknowledged or rejected).
    pub pushed: usize,
    /// Changes pulled from the server and merged.
    pub pulled: usize,
    /// Changes refused in this sync (also recorded: see [`SyncClient::rejections`]).
    pub rejected: Vec<Rejection>,
    /// The pull cursor after the sync.
    pub cursor: i64,
    /// The local replica differed from the server (the digest of its confirmed rows did not match the
    /// one the server sent) and was repaired by a reset; unsent changes were kept on top.
    pub repaired: bool,
}

pub(crate) fn read_cursor(t: &mut dyn Transaction) -> Result<i64> {
    Ok(t.meta(META_CURSOR)?.and_then(|text| text.parse().ok()).unwrap_or(0))
}

/// Puts rows back to what the server confirmed, with `also` (changes the server acknowledged that a
/// pull has not brought back yet) and the changes still unsent merged on top: after a rejection or a
/// discard, the row shows no trace of the change that left the outbox.
pub(crate) fn restore_rows(t: &mut dyn Transaction, rows: &BTreeSet<(String, String)>, also: &[&Change]) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let unsent = t.outbox(usize::MAX)?;
    for (model, pk) in rows {
        let mut row = t.row(model, pk)?;
        row.local = row.confirmed.clone();
        let unsent = unsent.iter().map(|pending| &pending.change);
        for change in also.iter().copied().chain(unsent).filter(|change| change.model == *model && change.pk == *pk) {
            row.local.apply(change);
        }
        t.put_row(model, pk, &row)?;
    }
    Ok(())
}

/// Sets the client's activity back to idle when a sync ends, also when its future is dropped.
struct IdleOnDrop<'a>(&'a watch::Sender<SyncStatus>);

impl Drop for IdleOnDrop<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|status| status.activity = Activity::Idle);
    }
}

impl<R: Remote> SyncClient<R> {

    /// Pushes the outbox in batches, then pulls until the server has nothing more.
    ///
    /// A change the server rejects leaves the outbox, its row goes back to the server's version (plus
    /// any changes still unsent) and it is recorded in [`SyncClient::rejections`], all in one local
    /// transaction per pushed batch, before anything else happens: a sync that fails, times out or is
    /// cancelled afterwards, or a crash, cannot lose it. A batch the server refuses as a whole as
    /// invalid input or too large (SQLSTATE 22xxx, 54000) is split until the change responsible is
    /// alone, and that change is rejected with reason [`REASON_REFUSED`]: a change the server will never
    /// accept cannot hold up the ones behind it. After a `clock_skew` rejection the client measures
    /// the server's clock ([`Remote::server_time`]) and from then on stamps changes with the device's
    /// clock corrected by the difference.
    ///
    /// If the server cannot be reached the error is returned and local state is as it was; a sync
    /// interrupted at any point converges on the next one (re-sent changes come back `duplicate`).
    /// The whole sync gives up with [`Error::Timeout`] after the builder's `sync_timeout`.
    ///
    /// Then the replica checks itself: when the last page of the pull carries the server's digest of
    /// the tenant's visible rows (servers that keep one send it on the page that ends at the tenant's
    /// last seq; a lagging standby and older servers send none, and then nothing is checked), the
    /// digest of the confirmed rows (the server's rows as this replica holds them, unsent changes left
    /// out) is compared with it. If they differ, the local data was altered or lost behind the client's
    /// back: a warning is logged and the confirmed rows are pulled again from scratch, by a reset from
    /// the primary ([`Remote::pull_primary`]), with the outbox untouched and its changes kept on top
    /// of the fresh rows, and [`SyncReport::repaired`] is set. The repaired rows are checked once more
    /// against the digest of the reset; if they still differ the sync fails with
    /// [`Error::DigestMismatch`] (the next sync checks, and repairs, again). A replica with scopes
    /// checks each instance it pulls, and the tenant-wide rows, against the digest the server sent for
    /// it (which rows are in an instance follows [`Remote::scope_definitions`]); its repair is a reset of
    /// its instances.
    ///
    /// With scopes, the sync first drops the rows an unsubscribe left to drop and bootstraps the
    /// instances a subscription added (see [`SyncClient::subscribe`], [`SyncClient::unsubscribe`]).
    ///
    /// Cost: the check reads and decodes every row of the local store, O(rows), inside one local
    /// transaction (local writes wait for it), and a repair pulls every row of the tenant. The check is
    /// skipped when the sync pulled nothing and the server's digest is the one this client last
    /// verified (remembered in memory, so the first sync of a process checks whenever a digest comes).
    pub async fn sync(&self) -> Result<SyncReport> {
        let _syncing = self.syncing.lock().await;
        self.sync_locked().await
    }

    /// [`SyncClient::sync`], for a caller that holds the sync lock.
    pub(crate) async fn sync_locked(&self) -> Result<SyncReport> {
        let _idle = IdleOnDrop(&self.status);
        let outcome = match tokio::time::timeout(self.sync_timeout, self.run_sync()).await {
            Ok(outcome) => outcome,
            Err(_) => Err(Error::Timeout { what: "sync", after: self.sync_timeout }),
        };
        self.status.send_modify(|status| match &outcome {
            Ok(_) => {
                status.connected = true;
                status.last_synced_at = Some(SystemTime::now());
                status.last_error = None;
            }
            Err(error) => {
                if matches!(error, Error::Connection { .. } | Error::Timeout { .. } | Error::Config { .. }) {
                    status.connected = false;
                }
                status.last_error = Some(error.into());
            }
        });
        outcome
    }

    async fn run_sync(&self) -> Result<SyncReport> {
        let mut report = SyncReport::default();
        let (skewed, offset) = self.in_place(|t| Ok((t.meta(META_CLOCK_SKEWED)?.is_some(), read_offset(t)?)))?;
        if skewed || offset != 0 {
            self.align_clock(skewed).await?;
        }
        let pushed_up_to = self.push_outbox(&mut report).await?;
        if self.in_place(|t| t.meta(META_CLOCK_SKEWED))?.is_some() {
            self.align_clock(true).await?;
        }
        self.prune().await?;
        let joined = self.join(&mut report).await?;
        let (cursor, scopes) = self.in_place(|t| Ok((read_cursor(t)?, pulled_scopes(t)?)))?;
        let mut pulled = self.pull_pages(cursor, Stream::Main, scopes.as_deref(), &mut report).await?;
        pulled.changed |= joined;
        if scopes.is_some() && report.cursor >= pushed_up_to {
            self.forget_sent_outside()?;
        }
        self.check_digest(pulled, scopes.as_deref(), &mut report).await?;
        Ok(report)
    }


    /// Pushes the outbox; returns the greatest cursor the server answered (0 when nothing was pushed),
    /// which a pull must reach to bring back what was pushed.
    async fn push_outbox(&self, report: &mut SyncReport) -> Result<i64> {
        let total = self.status.borrow().pending;
        let mut sent = 0;
        let mut pushed_up_to = 0;
        loop {
            self.status.send_modify(|status| status.activity = Activity::Uploading { sent, total: total.max(sent) });
            let server_max = self.limits().map_or(usize::MAX, |limits| usize::try_from(limits.max_push_changes).unwrap_or(1));
            let batch: Vec<Change> = self.in_place(|t| t.outbox(self.push_batch.min(server_max).max(1)))?.into_iter().map(|pending| pending.change).collect();
            if batch.is_empty() {
                return Ok(pushed_up_to);
            }
            pushed_up_to = pushed_up_to.max(self.push_batch(&batch, report).await?);
            sent += batch.len();
        }
    }

    /// Pushes one batch and settles its results; returns the greatest cursor the server answered. A
    /// batch the server refuses as a whole as invalid input is split in halves, in order, until the
    /// change responsible is alone; that change is rejected.
    async fn push_batch(&self, batch: &[Change], report: &mut SyncReport) -> Result<i64> {
        let mut parts = vec![batch];
        let mut pushed_up_to = 0;
        while let Some(part) = parts.pop() {
            match self.remote.push(&self.tenant, part).await {
                Ok(response) => {
                    self.reached_server();
                    pushed_up_to = pushed_up_to.max(response.cursor);
                    if response.results.len() != part.len() {
                        return Err(Error::Protocol(format!("push response: {} results for {} changes", response.results.len(), part.len())));
                    }
                    if let Some(limits) = response.limits {
                        *self.limits.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(limits);
                    }
                    let statuses: Vec<Status> = response.results.into_iter().map(|result| result.status).collect();
                    self.settle(part, &statuses, report)?;
                }
                Err(error) if error.refuses_input() && part.len() > 1 => {
                    let (first, second) = part.split_at(part.len() / 2);
                    parts.extend([second, first]);
                }
                Err(error) if error.refuses_input() => {
                    tracing::warn!(op_id = %part[0].op_id, %error, "the server refuses this change alone: rejecting it");
                    let reason = format!("{REASON_REFUSED}: {}: {}", error.sqlstate().unwrap_or_default(), error_message(&error));
                    self.settle(part, &[Status::Rejected { reason }], report)?;
                }
                Err(error) => {
                    let text = error.to_string();
                    self.in_place(|t| part.iter().try_for_each(|change| t.note_failure(change.op_id, &text)))?;
                    return Err(error);
                }
            }
        }
        Ok(pushed_up_to)
    }

    /// Settles pushed changes in one local transaction: each leaves the outbox; a rejected one is
    /// recorded and its row restored; then the callback runs for each rejection.
    fn settle(&self, changes: &[Change], statuses: &[Status], report: &mut SyncReport) -> Result<()> {
        let now = SystemTime::now();
        let (recorded, pending, rejections) = self.in_place(|t| {
            let mut recorded = Vec::new();
            for (change, status) in changes.iter().zip(statuses) {
                t.dequeue(change.op_id)?;
                if let Status::Rejected { reason } = status {
                    recorded.push(t.record_rejection(change, reason, now)?);
                    if reason == REASON_CLOCK_SKEW {
                        t.set_meta(META_CLOCK_SKEWED, "1")?;
                    }
                }
            }
            let acknowledged: Vec<&Change> = changes.iter().zip(statuses).filter(|(_, status)| status.is_acknowledged()).map(|(change, _)| change).collect();
            observe_server_stamp(t, acknowledged.iter().map(|change| change.hlc))?;
            if !acknowledged.is_empty() {
                note_sent(t)?;
            }
            let rows = recorded.iter().map(|rejection: &Rejection| (rejection.change.model.clone(), rejection.change.pk.clone())).collect();
            restore_rows(t, &rows, &acknowledged)?;
            Ok((recorded, t.outbox_len()?, t.rejections()?.len()))
        })?;
        self.counted(pending, rejections);
        report.pushed += changes.len();
        self.emit(Origin::Restore, recorded.iter().map(|rejection| (rejection.change.model.clone(), rejection.change.pk.clone())).collect(), false);
        for rejection in &recorded {
            tracing::info!(op_id = %rejection.change.op_id, model = %rejection.change.model, pk = %rejection.change.pk, reason = %rejection.reason, "the server rejected a change");
            if let Some(callback) = &self.on_rejected {
                callback(rejection);
            }
        }
        report.rejected.extend(recorded);
        Ok(())
    }

    /// Pulls and applies pages of `stream` from `cursor` until the server has nothing more. A repair
    /// and a bootstrap must get reset pages: a page that is not one is refused before anything is applied.
    pub(crate) async fn pull_pages(&self, mut cursor: i64, stream: Stream, scopes: Option<&[String]>, report: &mut SyncReport) -> Result<Pulled> {
        let mut changed = false;
        let mut received = 0;
        let downloading = |received: usize, cursor: i64| {
            self.status.send_modify(|status| status.activity = Activity::Downloading { received, reset: stream != Stream::Main || cursor < 0 });
        };
        loop {
            downloading(received, cursor);
            let page = match stream {
                Stream::Repair => self.remote.pull_primary(&self.tenant, cursor, self.pull_page, scopes).await?,
                Stream::Main | Stream::Bootstrap | Stream::CatchUp => self.remote.pull(&self.tenant, cursor, self.pull_page, scopes).await?,
            };
            match stream {
                Stream::Repair if !page.reset => {
                    return Err(Error::Protocol(format!(
                        "a repair asked for a reset (since {cursor}) and the server answered without one: pull_primary must reach the primary"
                    )))
                }
                Stream::Bootstrap if !page.reset => {
                    return Err(Error::Protocol(format!("the bootstrap of {scopes:?} asked for a reset (since {cursor}) and the server answered without one")))
                }
                Stream::CatchUp if page.reset => {
                    tracing::info!(tenant = %self.tenant, since = cursor, "the scopes held cannot go on from their cursor: a reset of every instance follows");
                    self.in_place(restart_joined)?;
                    return Ok(Pulled { digest: None, changed: true });
                }
                _ => {}
            }
            self.reached_server();
            let digest = ServerDigest::of(&page)?;
            self.in_place(|t| {
                let mut clock = read_clock(t)?;
                match stream {
                    Stream::Bootstrap => apply_bootstrap_page(t, &page)?,
                    _ if page.reset => apply_reset_page(t, &page)?,
                    _ => apply_changes(t, &page, stream != Stream::CatchUp)?,
                }
                for pulled in &page.changes {
                    clock.observe(pulled.hlc);
                }
                observe_server_stamp(t, page.changes.iter().map(|pulled| pulled.hlc))?;
                write_clock(t, &clock)?;
                match stream {
                    Stream::Bootstrap => note_bootstrapped(t, page.cursor, !page.has_more),
                    Stream::CatchUp => note_caught_up(t, page.cursor, !page.has_more),
                    Stream::Main | Stream::Repair => t.set_meta(META_CURSOR, &page.cursor.to_string()),
                }
            })?;
            let joining = matches!(stream, Stream::Bootstrap | Stream::CatchUp);
            let rows = page.changes.iter().filter(|pulled| !joining || pulled.op != Op::Leave).map(|pulled| (pulled.model.clone(), pulled.pk.clone()));
            let whole = page.reset && !joining;
            self.emit(if whole { Origin::Reset } else { Origin::Pull }, rows.collect(), whole);
            received += page.changes.len();
            downloading(received, page.cursor);
            report.pulled += page.changes.len();
            changed |= page.reset || !page.changes.is_empty();
            cursor = page.cursor;
            if !page.has_more {
                if !joining {
                    report.cursor = cursor;
                }
                return Ok(Pulled { digest, changed });
            }
        }
    }
}

/// Which pages a pull asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stream {
    /// The replica's changes, from its cursor.
    Main,
    /// A reset from the primary, for a replica that differs from the server.
    Repair,
    /// The bootstrap of instances subscribed to: a reset of their rows alone, which forgets no other
    /// row; leaves are ignored.
    Bootstrap,
    /// After a bootstrap, the instances held, alone, from the main cursor; leaves are ignored. A reset
    /// gives the join up for a reset of every instance.
    CatchUp,
}

/// An error's own message, without the client's prefix: the server's message for a server error.
fn error_message(error: &Error) -> String {
    match error {
        Error::Server { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// The changes still unsent, oldest first.
pub(crate) fn unsent_changes(t: &mut dyn Transaction) -> Result<Vec<Change>> {
    Ok(t.outbox(usize::MAX)?.into_iter().map(|pending| pending.change).collect())
}

/// The row as the app sees it: `confirmed` with the unsent changes of the row merged on top.
fn with_unsent(confirmed: RowState, model: &str, pk: &str, unsent: &[Change]) -> LocalRow {
    let mut local = confirmed.clone();
    for change in unsent.iter().filter(|change| change.model == model && change.pk == pk) {
        local.apply(change);
    }
    LocalRow { confirmed, local }
}

/// Forgets what the server confirmed of a row (it left the replica's scopes; it is not a delete): the
/// app sees its unsent changes alone, and a row without any is forgotten altogether.
pub(crate) fn drop_row(t: &mut dyn Transaction, model: &str, pk: &str, unsent: &[Change]) -> Result<()> {
    if unsent.iter().any(|change| change.model == model && change.pk == pk) {
        t.put_row(model, pk, &with_unsent(RowState::default(), model, pk, unsent))
    } else {
        t.delete_row(model, pk)
    }
}

/// Makes a row's whole state as pulled (a reset row, a row moving into the replica's scopes) its
/// confirmed state, with the unsent changes on top.
fn replace_row(t: &mut dyn Transaction, pulled: &PulledChange, unsent: &[Change]) -> Result<()> {
    let confirmed = pulled.to_row_state().map_err(|problem| Error::Protocol(format!("a whole row does not decode: {problem}")))?;
    t.put_row(&pulled.model, &pulled.pk, &with_unsent(confirmed, &pulled.model, &pulled.pk, unsent))
}

/// Applies a page of changes: a leave drops the row's confirmed state (unless leaves are ignored), a
/// whole row replaces it, and any other change is merged into it.
fn apply_changes(t: &mut dyn Transaction, page: &protocol::PullResponse, leaves: bool) -> Result<()> {
    let replaces = |pulled: &PulledChange| pulled.op == Op::Leave || pulled.is_whole_row();
    let unsent = if page.changes.iter().any(replaces) { unsent_changes(t)? } else { Vec::new() };
    for pulled in &page.changes {
        if pulled.op == Op::Leave {
            if leaves {
                drop_row(t, &pulled.model, &pulled.pk, &unsent)?;
            }
        } else if pulled.is_whole_row() {
            replace_row(t, pulled, &unsent)?;
        } else {
            let change = pulled.to_change();
            let mut row = t.row(&change.model, &change.pk)?;
            row.confirmed.apply(&change);
            row.local.apply(&change);
            t.put_row(&change.model, &change.pk, &row)?;
        }
    }
    Ok(())
}

/// Applies a page of a reset: on its first page every confirmed row is forgotten (the app keeps seeing
/// its unsent changes); each row sent becomes the confirmed state, with unsent changes merged on top,
/// and a leave (a row that left the replica's scopes after it was sent) drops it again.
fn apply_reset_page(t: &mut dyn Transaction, page: &protocol::PullResponse) -> Result<()> {
    let unsent = unsent_changes(t)?;
    if t.meta(META_RESETTING)?.is_none() {
        t.clear_rows()?;
        for change in &unsent {
            let mut row = t.row(&change.model, &change.pk)?;
            row.local.apply(change);
            t.put_row(&change.model, &change.pk, &row)?;
        }
        t.set_meta(META_RESETTING, "1")?;
    }
    for pulled in &page.changes {
        match pulled.op {
            Op::Leave => drop_row(t, &pulled.model, &pulled.pk, &unsent)?,
            _ => replace_row(t, pulled, &unsent)?,
        }
    }
    if !page.has_more {
        t.delete_meta(META_RESETTING)?;
    }
    Ok(())
}

/// Applies a page of a bootstrap: each row sent replaces the replica's, whatever else it holds; leaves
/// are ignored (the row may be in another instance the replica holds: the main stream tells).
fn apply_bootstrap_page(t: &mut dyn Transaction, page: &protocol::PullResponse) -> Result<()> {
    let unsent = unsent_changes(t)?;
    for pulled in page.changes.iter().filter(|pulled| pulled.op != Op::Leave) {
        replace_row(t, pulled, &unsent)?;
    }
    Ok(())
}
