//! The replica's self-check: the digest of its confirmed rows (of each of its instances, for a replica
//! with scopes) against the server's, and the repair by a reset when they differ.

use std::collections::BTreeMap;

use sync_ext_protocol::digest::{row_state_digest, to_wire};
use sync_ext_protocol::scope::{Instances, Scopes, TENANT_WIDE};
use sync_ext_protocol::PullResponse;

use crate::error::{Error, Result};
use crate::store::Transaction;
use crate::sync::{Stream, SyncReport};
use crate::{Remote, SyncClient};

/// The digest of the confirmed rows of a store: the server's rows as this replica holds them, without
/// its unsent changes (see [`crate::protocol::digest`]). Reads every row: O(rows).
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

/// The digest of the confirmed visible rows in each of `instances` (a row counts in every instance it
/// is in; `""` holds the rows of tenant-wide models, which are every row when no scope is defined).
/// Reads every row: O(rows).
pub(crate) fn instance_digests<'a>(t: &mut dyn Transaction, scopes: &Scopes, instances: impl Iterator<Item = &'a String>) -> Result<BTreeMap<String, u64>> {
    let mut digests: BTreeMap<String, u64> = instances.map(|instance| (instance.clone(), 0)).collect();
    t.for_each_confirmed(&mut |model, pk, confirmed| {
        let Some(value) = confirmed.visible() else { return Ok(()) };
        let of = if scopes.is_empty() { Instances::from([TENANT_WIDE.to_owned()]) } else { scopes.instances(model, &value) };
        for instance in of {
            if let Some(digest) = digests.get_mut(&instance) {
                *digest = digest.wrapping_add(row_state_digest(model, pk, confirmed));
            }
        }
        Ok(())
    })?;
    Ok(digests)
}

/// A digest the server sent on the last page of a pull.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ServerDigest {
    /// Of the tenant's visible rows (a pull of the whole tenant).
    Tenant(u64),
    /// Of the visible rows of each instance of a scoped pull (`""`: the tenant-wide rows).
    Instances(BTreeMap<String, u64>),
}

impl ServerDigest {
    /// The digest a page carries, if any.
    pub(crate) fn of(page: &PullResponse) -> Result<Option<Self>> {
        if let Some(digests) = &page.digests {
            let parsed = digests.iter().map(|(instance, wire)| Ok((instance.clone(), parse_digest(wire)?))).collect::<Result<_>>()?;
            return Ok(Some(ServerDigest::Instances(parsed)));
        }
        Ok(page.digest.as_deref().map(parse_digest).transpose()?.map(ServerDigest::Tenant))
    }
}

/// Where the confirmed rows differ from the server's digest.
struct Mismatch {
    /// The instance whose rows differ (`None`: the whole tenant's).
    instance: Option<String>,
    server: u64,
    local: u64,
}

/// What the pages of one pull ended with.
pub(crate) struct Pulled {
    /// The digest the last page carried, if any.
    pub(crate) digest: Option<ServerDigest>,
    /// Whether some page could have changed the confirmed rows (it held changes, or was a reset).
    pub(crate) changed: bool,
}

impl<R: Remote> SyncClient<R> {
    pub(crate) fn verified(&self) -> Option<ServerDigest> {
        self.verified.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    pub(crate) fn set_verified(&self, digest: Option<ServerDigest>) {
        *self.verified.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = digest;
    }

    /// The first place where the confirmed rows differ from `server`. The digests of instances need the
    /// scope definitions: fetched into `scopes` on first use.
    async fn mismatch(&self, server: &ServerDigest, scopes: &mut Option<Scopes>) -> Result<Option<Mismatch>> {
        match server {
            ServerDigest::Tenant(server) => {
                let local = self.in_place(confirmed_digest)?;
                Ok((local != *server).then_some(Mismatch { instance: None, server: *server, local }))
            }
            ServerDigest::Instances(server) => {
                if scopes.is_none() {
                    *scopes = Some(Scopes::new(self.remote.scope_definitions().await?));
                }
                let definitions = scopes.as_ref().expect("the definitions were just fetched");
                let local = self.in_place(|t| instance_digests(t, definitions, server.keys()))?;
                Ok(server.iter().find(|(instance, digest)| local.get(*instance) != Some(digest)).map(|(instance, digest)| Mismatch {
                    instance: Some(instance.clone()),
                    server: *digest,
                    local: local.get(instance).copied().unwrap_or_default(),
                }))
            }
        }
    }

    /// Checks the confirmed rows against the digest the pull ended with, and repairs them once with a
    /// reset (of the same `scopes`) when they differ (see [`SyncClient::sync`]).
    pub(crate) async fn check_digest(&self, pulled: Pulled, scopes: Option<&[String]>, report: &mut SyncReport) -> Result<()> {
        let Some(server) = pulled.digest else { return Ok(()) };
        if !pulled.changed && self.verified().as_ref() == Some(&server) {
            return Ok(());
        }
        let mut definitions = None;
        let Some(mismatch) = self.mismatch(&server, &mut definitions).await? else {
            self.set_verified(Some(server));
            return Ok(());
        };
        tracing::warn!(
            tenant = %self.tenant,
            instance = ?mismatch.instance,
            server = %to_wire(mismatch.server),
            local = %to_wire(mismatch.local),
            "the local replica differs from the server's rows (digest mismatch): repairing it with a reset"
        );
        self.set_verified(None);
        let repair = self.pull_pages(i64::MAX, Stream::Repair, scopes, report).await?;
        report.repaired = true;
        let Some(server) = repair.digest else {
            tracing::warn!(tenant = %self.tenant, "the server sent no digest with the repair: the repaired replica is not checked");
            return Ok(());
        };
        if let Some(Mismatch { instance, server, local }) = self.mismatch(&server, &mut definitions).await? {
            return Err(Error::DigestMismatch { server: to_wire(server), local: to_wire(local), instance });
        }
        self.set_verified(Some(server));
        Ok(())
    }
}
