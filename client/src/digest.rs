//! The replica's self-check: the digest of its confirmed rows against the server's, and the repair by
//! a reset when they differ.

use sync_ext_protocol::digest::{row_state_digest, to_wire};

use crate::error::{Error, Result};
use crate::store::Transaction;
use crate::sync::SyncReport;
use crate::{Remote, SyncClient};

/// The digest of the confirmed rows of a store: the server's rows as this replica holds them, without
/// its unsent changes (see [`protocol::digest`]). Reads every row: O(rows).
pub(crate) fn confirmed_digest(t: &mut dyn Transaction) -> Result<u64> {
    let mut digest = 0u64;
    t.for_each_confirmed(&mut |model, pk, confirmed| {
        digest = digest.wrapping_add(row_state_digest(model, pk, confirmed));
        Ok(())
    })?;
    Ok(digest)
}

/// A digest as the server sends it (16 hex digits), as a number.
pub(crate) fn parse_digest(wire: &str) -> Result<u64> {
    match u64::from_str_radix(wire, 16) {
        Ok(digest) if wire.len() == 16 && wire.bytes().all(|byte| byte.is_ascii_hexdigit()) => Ok(digest),
        _ => Err(Error::Protocol(format!("pull response: the digest {wire:?} is not 16 hex digits"))),
    }
}

/// What the pages of one pull ended with.
pub(crate) struct Pulled {
    /// The digest the last page carried, if any.
    pub(crate) digest: Option<String>,
    /// Whether some page could have changed the confirmed rows (it held changes, or was a reset).
    pub(crate) changed: bool,
}

impl<R: Remote> SyncClient<R> {
    pub(crate) fn verified(&self) -> Option<u64> {
        *self.verified.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn set_verified(&self, digest: Option<u64>) {
        *self.verified.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = digest;
    }

    /// Checks the confirmed rows against the digest the pull ended with, and repairs them once with a
    /// reset when they differ (see [`SyncClient::sync`]).
    pub(crate) async fn check_digest(&self, pulled: Pulled, report: &mut SyncReport) -> Result<()> {
        let Some(server) = pulled.digest else { return Ok(()) };
        let expected = parse_digest(&server)?;
        if !pulled.changed && self.verified() == Some(expected) {
            return Ok(());
        }
        let local = self.in_place(confirmed_digest)?;
        if local == expected {
            self.set_verified(Some(local));
            return Ok(());
        }
        tracing::warn!(
            tenant = %self.tenant,
            server = %server,
            local = %to_wire(local),
            "the local replica differs from the server's rows (digest mismatch): repairing it with a reset"
        );
        self.set_verified(None);
        let repair = self.pull_pages(i64::MAX, true, report).await?;
        report.repaired = true;
        let Some(server) = repair.digest else {
            tracing::warn!(tenant = %self.tenant, "the server sent no digest with the repair: the repaired replica is not checked");
            return Ok(());
        };
        let expected = parse_digest(&server)?;
        let local = self.in_place(confirmed_digest)?;
        if local != expected {
            return Err(Error::DigestMismatch { server, local: to_wire(local) });
        }
        self.set_verified(Some(local));
        Ok(())
    }
}
