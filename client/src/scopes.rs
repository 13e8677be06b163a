//! Partial sync: the scope instances a replica holds, subscribing to more and unsubscribing (dropping
//! the rows no remaining instance holds). Each step is kept in the store with the rows it changed, so
//! that a crash resumes it.
//!
//! Subscribing to instances N while holding L, with the main cursor at c, goes in two stages, leaves
//! ignored in both (the main stream tells them again):
//! 1. the bootstrap: a reset of N alone (its rows replace the replica's, nothing is forgotten), ending
//!    at some seq e;
//! 2. the catch-up: L alone from c, until nothing more follows. A row that moved from N to L after c is
//!    not in the bootstrap (it left N) and, pulled with L and N together, its move would be an ordinary
//!    change of a row the replica never held; pulled with L alone, it is a move-in: the whole row.
//!
//! Then one cursor, min(c, e), goes on over L and N: re-reading from there drops the rows that left both
//! and merges the rest again, which changes nothing.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sync_ext_protocol::scope::{validate_instance, Instances, Scopes};

use crate::error::{Error, Result};
use crate::status::Origin;
use crate::store::Transaction;
use crate::sync::{drop_row, read_cursor, unsent_changes, Stream, SyncReport, META_CURSOR, META_RESETTING};
use crate::{Remote, SyncClient};

/// The instances the main stream pulls (absent: the whole tenant).
const META_SCOPES: &str = "scopes";
/// Instances subscribed to whose join has not finished, with its stage and cursor.
const META_JOINING: &str = "joining";
/// Set while the rows outside the scopes are still to be dropped.
const META_PRUNE: &str = "prune";
/// Set when the server acknowledged changes of a replica with scopes: after the next pull, the rows
/// that hold only such changes and were not pulled back are outside the scopes.
const META_SENT: &str = "sent";

/// Instances being subscribed to, and how far their stages got.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Joining {
    instances: Instances,
    /// The cursor of the stage: the bootstrap's (0 before its first page, negative while it is paged
    /// in), then the catch-up's (from the main cursor on).
    cursor: i64,
    /// Where the bootstrap ended, once it did: the catch-up of the instances held runs.
    bootstrapped: Option<i64>,
}

/// A replica's scopes, as its store keeps them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ScopeState {
    /// What the main stream pulls; `None` for the whole tenant.
    held: Option<Instances>,
    /// Instances subscribed to and not joined to the main stream yet.
    joining: Option<Joining>,
    /// The rows outside the scopes are still to be dropped (after an unsubscribe).
    prune: bool,
}

fn decode<T: DeserializeOwned>(key: &str, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|error| Error::store(format!("the stored {key} do not decode: {error}")))
}

fn whole_tenant() -> Error {
    Error::Config { message: "this replica holds the whole tenant: build it with SyncClientBuilder::scopes to hold some instances only".into(), source: None }
}

/// Checks instances the app names (`<scope>:<value>`).
pub(crate) fn validated(instances: impl IntoIterator<Item = impl Into<String>>) -> Result<Instances> {
    instances
        .into_iter()
        .enumerate()
        .map(|(index, instance)| {
            let instance = instance.into();
            validate_instance(&format!("scopes[{index}]"), &instance)?;
            Ok(instance)
        })
        .collect()
}

/// Whether the main stream has pulled anything (a cursor, or a reset under way).
fn pulled_anything(t: &mut dyn Transaction) -> Result<bool> {
    Ok(read_cursor(t)? != 0 || t.meta(META_RESETTING)?.is_some())
}

impl ScopeState {
    fn read(t: &mut dyn Transaction) -> Result<Self> {
        let held = t.meta(META_SCOPES)?.map(|text| decode("scopes", &text)).transpose()?;
        let joining = t.meta(META_JOINING)?.map(|text| decode("subscriptions", &text)).transpose()?;
        Ok(ScopeState { held, joining, prune: t.meta(META_PRUNE)?.is_some() })
    }

    fn write(&self, t: &mut dyn Transaction) -> Result<()> {
        match &self.held {
            Some(held) => t.set_meta(META_SCOPES, &serde_json::to_string(held).expect("instances serialize"))?,
            None => t.delete_meta(META_SCOPES)?,
        }
        match &self.joining {
            Some(joining) => t.set_meta(META_JOINING, &serde_json::to_string(joining).expect("instances serialize"))?,
            None => t.delete_meta(META_JOINING)?,
        }
        match self.prune {
            true => t.set_meta(META_PRUNE, "1"),
            false => t.delete_meta(META_PRUNE),
        }
    }

    /// Every instance held or joining; `None` for the whole tenant.
    fn target(&self) -> Option<Instances> {
        let mut all = self.held.clone()?;
        all.extend(self.joining.iter().flat_map(|joining| joining.instances.iter().cloned()));
        Some(all)
    }

    /// Adds instances: those not held yet join the main stream (see the module's doc), and a join under
    /// way starts again with them. Before the main stream pulled anything, or while it is paged in by
    /// a reset, the main stream restarts from 0: a reset of every instance.
    fn subscribe(&mut self, t: &mut dyn Transaction, instances: Instances) -> Result<()> {
        let target = self.target().ok_or_else(whole_tenant)?;
        let new: Instances = instances.difference(&target).cloned().collect();
        if new.is_empty() {
            return Ok(());
        }
        if read_cursor(t)? <= 0 {
            self.held = Some(target.into_iter().chain(new).collect());
            self.joining = None;
            t.set_meta(META_CURSOR, "0")?;
            return t.delete_meta(META_RESETTING);
        }
        let mut instances = self.joining.take().map(|joining| joining.instances).unwrap_or_default();
        instances.extend(new);
        self.joining = Some(Joining { instances, ..Joining::default() });
        Ok(())
    }

    /// Removes instances: the main stream stops pulling them, a join under way forgets them, and
    /// the rows no remaining instance holds are to be dropped.
    fn unsubscribe(&mut self, t: &mut dyn Transaction, instances: &Instances) -> Result<()> {
        let before = self.target().ok_or_else(whole_tenant)?;
        if before.is_disjoint(instances) {
            return Ok(());
        }
        if let Some(held) = &mut self.held {
            held.retain(|instance| !instances.contains(instance));
        }
        if let Some(joining) = &mut self.joining {
            joining.instances.retain(|instance| !instances.contains(instance));
        }
        self.joining = self.joining.take().filter(|joining| !joining.instances.is_empty());
        self.prune |= pulled_anything(t)?;
        Ok(())
    }

    /// Moves to the scopes a store is opened with. Between two sets of instances, the difference is
    /// subscribed to and unsubscribed from; from the whole tenant to instances, the rows outside them are
    /// dropped; from instances to the whole tenant, the log is pulled again from its start over the rows
    /// held (merges are idempotent), so that the rows of every instance arrive.
    fn open_with(&mut self, t: &mut dyn Transaction, wanted: Option<Instances>) -> Result<()> {
        match (self.target(), wanted) {
            (None, None) => {}
            (None, Some(wanted)) => {
                self.held = Some(wanted);
                self.prune = pulled_anything(t)?;
            }
            (Some(_), None) => {
                *self = ScopeState::default();
                t.set_meta(META_CURSOR, "0")?;
                t.delete_meta(META_RESETTING)?;
            }
            (Some(current), Some(wanted)) => {
                // Both are no-ops when nothing differs.
                self.unsubscribe(t, &current.difference(&wanted).cloned().collect())?;
                self.subscribe(t, wanted.difference(&current).cloned().collect())?;
            }
        }
        Ok(())
    }
}

/// Opens a store with the scopes a builder gave (`None`: the whole tenant); see
/// [`crate::SyncClientBuilder::scopes`].
pub(crate) fn open_with(t: &mut dyn Transaction, wanted: Option<Instances>) -> Result<()> {
    let mut state = ScopeState::read(t)?;
    state.open_with(t, wanted)?;
    state.write(t)
}

/// The instances the main stream pulls, as the `scopes` argument of a pull (`None`: the whole tenant).
pub(crate) fn pulled_scopes(t: &mut dyn Transaction) -> Result<Option<Vec<String>>> {
    Ok(ScopeState::read(t)?.held.map(|held| held.into_iter().collect()))
}

/// Every instance the replica holds or is joining; `None` for the whole tenant.
pub(crate) fn target(t: &mut dyn Transaction) -> Result<Option<Instances>> {
    Ok(ScopeState::read(t)?.target())
}

/// Notes, for a replica with scopes, that the server acknowledged changes (see [`META_SENT`]).
pub(crate) fn note_sent(t: &mut dyn Transaction) -> Result<()> {
    match ScopeState::read(t)?.held {
        Some(_) => t.set_meta(META_SENT, "1"),
        None => Ok(()),
    }
}

/// Forgets the progress of every scope change, keeping the instances (for a clear: the next pull
/// is a reset of them all).
pub(crate) fn restart(t: &mut dyn Transaction, scopes: Option<Instances>) -> Result<()> {
    ScopeState { held: scopes, ..ScopeState::default() }.write(t)
}

/// Notes a bootstrap page applied: its cursor, or, after the last page, where the bootstrap ended (the
/// catch-up begins from the main cursor).
pub(crate) fn note_bootstrapped(t: &mut dyn Transaction, cursor: i64, done: bool) -> Result<()> {
    let mut state = ScopeState::read(t)?;
    let joining = state.joining.take().ok_or_else(|| Error::store("a bootstrap page came with no subscription under way"))?;
    state.joining = Some(match done {
        true => Joining { cursor: read_cursor(t)?, bootstrapped: Some(cursor), ..joining },
        false => Joining { cursor, ..joining },
    });
    state.write(t)
}

/// Notes a catch-up page applied: its cursor, or, after the last page, the instances join the main
/// stream, which goes on from the lesser of its cursor and the bootstrap's end.
pub(crate) fn note_caught_up(t: &mut dyn Transaction, cursor: i64, done: bool) -> Result<()> {
    let mut state = ScopeState::read(t)?;
    let joining = state.joining.take().ok_or_else(|| Error::store("a catch-up page came with no subscription under way"))?;
    match (done, joining.bootstrapped) {
        (true, Some(end)) => {
            state.held.get_or_insert_with(Instances::new).extend(joining.instances);
            let main = read_cursor(t)?;
            t.set_meta(META_CURSOR, &main.min(end).to_string())?;
        }
        _ => state.joining = Some(Joining { cursor, ..joining }),
    }
    state.write(t)
}

/// Gives up a join whose catch-up the server answered with a reset (the main cursor is below the
/// compaction horizon, or a scope was redefined): the main stream restarts from 0, a reset of every
/// instance.
pub(crate) fn restart_joined(t: &mut dyn Transaction) -> Result<()> {
    let state = ScopeState::read(t)?;
    ScopeState { held: state.target(), joining: None, prune: state.prune }.write(t)?;
    t.set_meta(META_CURSOR, "0")?;
    t.delete_meta(META_RESETTING)
}

impl<R: Remote> SyncClient<R> {
    /// The scope instances this replica holds or is subscribing to; `None` when it holds the whole
    /// tenant (built without [`crate::SyncClientBuilder::scopes`]).
    pub fn scopes(&self) -> Result<Option<Instances>> {
        self.store.transaction(target)
    }

    /// Subscribes to more scope instances (`<scope>:<value>`, e.g. `project:42`), then syncs, and
    /// returns that sync's report.
    ///
    /// The new instances are bootstrapped alone (a reset of their rows that forgets no other row), the
    /// instances held catch up alone, then one cursor goes on over every instance (the module's doc
    /// says why). The subscription is recorded at once, in the store: if the server cannot be reached,
    /// the error is returned and the next sync (or the live loop) bootstraps them, and a bootstrap cut
    /// off goes on from its last page. Instances already held change nothing. Waits for a sync under
    /// way. [`Error::Config`] for a replica that holds the whole tenant; [`Error::InvalidChange`] for
    /// a malformed instance.
    pub async fn subscribe(&self, instances: impl IntoIterator<Item = impl Into<String>>) -> Result<SyncReport> {
        let instances = validated(instances)?;
        let _syncing = self.syncing.lock().await;
        self.in_place(|t| {
            let mut state = ScopeState::read(t)?;
            state.subscribe(t, instances)?;
            state.write(t)
        })?;
        self.sync_locked().await
    }

    /// Unsubscribes from scope instances: pulls stop bringing their rows at once, and the rows that no
    /// remaining instance holds are dropped (their confirmed state; the outbox is untouched, so a row
    /// with unsent changes shows only them until they are sent). Rows of tenant-wide models stay.
    /// Which instances a row is in follows the server's scope definitions
    /// ([`Remote::scope_definitions`]): if they cannot be fetched, the error is returned and the next
    /// sync drops the rows. A change event with origin [`Origin::OutOfScope`] lists them. Waits for a
    /// sync under way. [`Error::Config`] for a replica that holds the whole tenant;
    /// [`Error::InvalidChange`] for a malformed instance.
    pub async fn unsubscribe(&self, instances: impl IntoIterator<Item = impl Into<String>>) -> Result<()> {
        let instances = validated(instances)?;
        let _syncing = self.syncing.lock().await;
        self.in_place(|t| {
            let mut state = ScopeState::read(t)?;
            state.unsubscribe(t, &instances)?;
            state.write(t)
        })?;
        self.prune().await
    }

    /// Drops, once after an unsubscribe, the confirmed visible rows of scoped models that none of the
    /// replica's instances holds.
    pub(crate) async fn prune(&self) -> Result<()> {
        if !self.in_place(|t| Ok(ScopeState::read(t)?.prune))? {
            return Ok(());
        }
        let scopes = Scopes::new(self.remote.scope_definitions().await?);
        self.reached_server();
        let dropped = self.in_place(|t| {
            let mut state = ScopeState::read(t)?;
            let mut outside = Vec::new();
            if let Some(kept) = state.target() {
                t.for_each_confirmed(&mut |model, pk, confirmed| {
                    let visible = confirmed.visible().filter(|_| scopes.is_scoped(model));
                    if visible.is_some_and(|value| scopes.instances(model, &value).is_disjoint(&kept)) {
                        outside.push((model.to_owned(), pk.to_owned()));
                    }
                    Ok(())
                })?;
            }
            let unsent = unsent_changes(t)?;
            for (model, pk) in &outside {
                drop_row(t, model, pk, &unsent)?;
            }
            state.prune = false;
            state.write(t)?;
            Ok(outside)
        })?;
        self.emit(Origin::OutOfScope, dropped, false);
        Ok(())
    }

    /// Forgets the rows that hold only changes already sent, after a pull of the replica's scopes that
    /// went past them did not bring them back: rows written outside its instances, or that left them
    /// while the app's changes to them waited.
    pub(crate) fn forget_sent_outside(&self) -> Result<()> {
        let forgotten = self.in_place(|t| {
            if t.meta(META_SENT)?.is_none() {
                return Ok(Vec::new());
            }
            t.delete_meta(META_SENT)?;
            let unsent = unsent_changes(t)?;
            let outside: Vec<(String, String)> =
                t.unconfirmed()?.into_iter().filter(|(model, pk)| !unsent.iter().any(|change| change.model == *model && change.pk == *pk)).collect();
            for (model, pk) in &outside {
                t.delete_row(model, pk)?;
            }
            Ok(outside)
        })?;
        self.emit(Origin::OutOfScope, forgotten, false);
        Ok(())
    }

    /// Joins the instances subscribed to the main stream, from the stage it got to (see the module's
    /// doc); whether there were any.
    pub(crate) async fn join(&self, report: &mut SyncReport) -> Result<bool> {
        let Some(mut joining) = self.in_place(|t| Ok(ScopeState::read(t)?.joining))? else { return Ok(false) };
        if joining.bootstrapped.is_none() {
            let instances: Vec<String> = joining.instances.iter().cloned().collect();
            self.pull_pages(joining.cursor, Stream::Bootstrap, Some(&instances), report).await?;
            joining = self.in_place(|t| ScopeState::read(t)?.joining.ok_or_else(|| Error::store("the subscription under way was lost")))?;
        }
        let held = self.in_place(pulled_scopes)?.unwrap_or_default();
        self.pull_pages(joining.cursor, Stream::CatchUp, Some(&held), report).await?;
        Ok(true)
    }
}
