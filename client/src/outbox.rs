//! The app's control over what it wrote: the pending changes of the outbox (list, discard) and the
//! changes the server refused (list, drain, retry).

use std::collections::BTreeSet;
use std::time::SystemTime;

use sync_ext_protocol::Change;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::status::Origin;
use crate::client::META_TENANT;
use crate::scopes::{restart, target};
use crate::sync::restore_rows;
use crate::{Remote, SyncClient};

/// The reason given to a change that the server refused as a whole call (SQLSTATE 22xxx invalid
/// input, 54000 too large) when sent alone: `refused: <SQLSTATE>: <the server's message>`.
pub const REASON_REFUSED: &str = "refused";

/// A change waiting in the outbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingChange {
    pub change: Change,
    /// How many pushes carrying it failed (the server was not reached, or the call failed as a whole).
    pub attempts: u32,
    /// The error of the last failed push that carried it.
    pub last_error: Option<String>,
}

/// A change the server refused. It left the outbox and its row went back to the server's version
/// (plus the changes still unsent) in the local transaction that recorded it; the record stays until
/// the app drains it ([`SyncClient::take_rejections`], [`SyncClient::dismiss_rejection`]) or retries
/// the change ([`SyncClient::retry_rejection`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The record's id in the local store (never reused).
    pub id: i64,
    /// The change as it was sent.
    pub change: Change,
    /// The server's reason (`clock_skew`, `permission_denied: ...`, see the README), or
    /// [`REASON_REFUSED`] for a change the server refused as a whole call.
    pub reason: String,
    /// When the client recorded it.
    pub rejected_at: SystemTime,
}

impl Rejection {
    /// The reason's code, without its message: `value_too_large` for
    /// `value_too_large: changes[3].value is over 1048576 bytes (max_value_bytes)`.
    pub fn code(&self) -> &str {
        self.reason.split(':').next().unwrap_or_default()
    }
}

impl<R: Remote> SyncClient<R> {
    /// The changes waiting to be pushed, oldest first.
    pub fn outbox(&self) -> Result<Vec<PendingChange>> {
        self.store.transaction(|t| t.outbox(usize::MAX))
    }

    /// Takes an unsent change out of the outbox, and puts its row back to the server's version plus
    /// the other unsent changes: the change is never sent. [`Error::NotFound`] when no pending change
    /// has this op_id (it was sent meanwhile, or discarded already).
    pub fn discard(&self, op_id: Uuid) -> Result<Change> {
        self.write(|t, _| {
            let Some(pending) = t.outbox(usize::MAX)?.into_iter().find(|pending| pending.change.op_id == op_id) else {
                return Err(Error::NotFound(format!("pending change {op_id}")));
            };
            t.dequeue(op_id)?;
            let row = (pending.change.model.clone(), pending.change.pk.clone());
            restore_rows(t, &BTreeSet::from([row.clone()]), &[])?;
            Ok((pending.change, vec![row]))
        })
    }

    /// The rejections recorded and not drained yet, oldest first.
    pub fn rejections(&self) -> Result<Vec<Rejection>> {
        self.store.transaction(|t| t.rejections())
    }

    /// Drains the recorded rejections: returns them, oldest first, and forgets them, in one local
    /// transaction, so each is returned once.
    pub fn take_rejections(&self) -> Result<Vec<Rejection>> {
        self.write(|t, _| {
            let rejections = t.rejections()?;
            for rejection in &rejections {
                t.remove_rejection(rejection.id)?;
            }
            Ok((rejections, Vec::new()))
        })
    }

    /// Forgets one recorded rejection (the app has dealt with it) and returns it.
    pub fn dismiss_rejection(&self, id: i64) -> Result<Rejection> {
        self.write(|t, _| Ok((take_rejection(t, id)?, Vec::new())))
    }

    /// Makes a rejected change again, as a new change (a new op_id, a fresh stamp) in the outbox, and
    /// forgets the rejection, in one local transaction. For a change refused for a reason that has
    /// gone away: a clock that was wrong (`clock_skew`, the client corrects its clock), a permission
    /// granted since.
    pub fn retry_rejection(&self, id: i64) -> Result<Change> {
        self.write(|t, clock| {
            let Change { model, pk, op, value, .. } = take_rejection(t, id)?.change;
            let change = self.record(t, clock, &model, &pk, op, value)?;
            Ok((change, vec![(model, pk)]))
        })
    }

    /// Forgets everything local, for a logout: rows, outbox (unsent changes are lost), rejections,
    /// clock and cursor. The store stays bound to this client's tenant and keeps its scopes; the next
    /// sync pulls their rows again.
    pub fn clear(&self) -> Result<()> {
        self.write(|t, clock| {
            let scopes = target(t)?;
            t.clear_all()?;
            t.set_meta(META_TENANT, &self.tenant)?;
            restart(t, scopes)?;
            *clock = Default::default();
            Ok(((), Vec::new()))
        })?;
        self.clock_offset.store(0, std::sync::atomic::Ordering::Relaxed);
        self.set_verified(None);
        self.emit(Origin::Clear, Vec::new(), true);
        Ok(())
    }
}

fn take_rejection(t: &mut dyn crate::Transaction, id: i64) -> Result<Rejection> {
    t.remove_rejection(id)?.ok_or_else(|| Error::NotFound(format!("rejection {id}")))
}
