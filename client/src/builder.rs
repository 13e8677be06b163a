//! Building a [`SyncClient`]: tenant, actor, local store, remote and the optional settings.

use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sync_ext_protocol::change::validate_name;
use sync_ext_protocol::hlc::wall_clock_millis;
use sync_ext_protocol::validate_tenant;
use tokio::sync::{broadcast, watch};

use crate::client::{RejectionCallback, WallClock, META_TENANT};
use crate::clock::read_offset;
use crate::error::{Error, Result};
use crate::outbox::Rejection;
use crate::scopes::{open_with, validated};
use crate::status::SyncStatus;
use crate::store::LocalStore;
use crate::sync::DEFAULT_SYNC_TIMEOUT;
use crate::{PgRemote, Remote, SyncClient};

/// Builds a [`SyncClient`]; tenant, actor, local store and remote are required.
pub struct SyncClientBuilder<R> {
    tenant: Option<String>,
    actor: Option<String>,
    store: Option<LocalStore>,
    remote: Option<R>,
    push_batch: usize,
    pull_page: i32,
    sync_timeout: Duration,
    on_rejected: Option<RejectionCallback>,
    wall_clock: WallClock,
    scopes: Option<Vec<String>>,
}

impl SyncClient<PgRemote> {
    /// Starts building a client.
    pub fn builder() -> SyncClientBuilder<PgRemote> {
        SyncClientBuilder::new()
    }
}

impl<R: Remote> SyncClientBuilder<R> {
    /// A builder with the defaults: 500 changes per push, 1000 per pull page, a sync timeout of
    /// [`DEFAULT_SYNC_TIMEOUT`], the system clock.
    pub fn new() -> Self {
        SyncClientBuilder {
            tenant: None,
            actor: None,
            store: None,
            remote: None,
            push_batch: 500,
            pull_page: 1000,
            sync_timeout: DEFAULT_SYNC_TIMEOUT,
            on_rejected: None,
            wall_clock: Arc::new(wall_clock_millis),
            scopes: None,
        }
    }

    /// The tenant this replica belongs to.
    pub fn tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = Some(tenant.into());
        self
    }

    /// This device's name, recorded on every change it makes (and used to break HLC ties).
    pub fn actor(mut self, actor: impl Into<String>) -> Self {
        self.actor = Some(actor.into());
        self
    }

    /// Where rows, outbox, clock and cursor live.
    pub fn local(mut self, store: LocalStore) -> Self {
        self.store = Some(store);
        self
    }

    /// The server to sync with; any [`Remote`].
    pub fn remote<T: Remote>(self, remote: T) -> SyncClientBuilder<T> {
        SyncClientBuilder {
            tenant: self.tenant,
            actor: self.actor,
            store: self.store,
            remote: Some(remote),
            push_batch: self.push_batch,
            pull_page: self.pull_page,
            sync_timeout: self.sync_timeout,
            on_rejected: self.on_rejected,
            wall_clock: self.wall_clock,
            scopes: self.scopes,
        }
    }

    /// How many changes one push carries (at most the server's `max_push_changes` setting).
    pub fn push_batch(mut self, changes: usize) -> Self {
        self.push_batch = changes.max(1);
        self
    }

    /// How many changes one pull page asks for.
    pub fn pull_page(mut self, changes: i32) -> Self {
        self.pull_page = changes.max(1);
        self
    }

    /// How long one [`SyncClient::sync`] may take before it gives up with [`Error::Timeout`]
    /// ([`DEFAULT_SYNC_TIMEOUT`] by default). What it did until then is kept: a reset goes on from
    /// its last page on the next sync.
    pub fn sync_timeout(mut self, timeout: Duration) -> Self {
        self.sync_timeout = timeout;
        self
    }

    /// Called once for every change the server rejects, right after the local transaction that
    /// removed it from the outbox, restored its row and recorded it. The record stays in
    /// [`SyncClient::rejections`] until the app drains it, so a rejection whose callback a crash
    /// prevented is still there after a restart.
    pub fn on_rejected(mut self, callback: impl Fn(&Rejection) + Send + Sync + 'static) -> Self {
        self.on_rejected = Some(Box::new(callback));
        self
    }

    /// Partial sync: the scope instances this replica holds (`<scope>:<value>`, e.g. `project:42`; see
    /// `sync_define_scope` on the server). Its pulls bring the rows of these instances and of the
    /// tenant-wide models (those with no scope defined); none at all holds the tenant-wide models
    /// only. Without this call the replica holds the whole tenant.
    ///
    /// The set is kept in the store with the cursor. A store opened with another set than it holds
    /// moves to it as [`SyncClient::subscribe`] and [`SyncClient::unsubscribe`] of the difference would
    /// (the new instances are bootstrapped and the rows no instance holds any more are dropped, on the
    /// next sync), so an app can pass the instances its user belongs to at every start. A store with
    /// scopes opened without them pulls the log again from its start, to get the whole tenant.
    pub fn scopes(mut self, instances: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.scopes = Some(instances.into_iter().map(Into::into).collect());
        self
    }

    /// The device's wall clock, in milliseconds since the Unix epoch (the system clock by default).
    pub fn wall_clock(mut self, clock: impl Fn() -> i64 + Send + Sync + 'static) -> Self {
        self.wall_clock = Arc::new(clock);
        self
    }

    /// Builds the client. A store first used with another tenant is refused ([`Error::Config`]); a
    /// malformed scope instance too ([`Error::InvalidChange`]).
    pub fn build(self) -> Result<SyncClient<R>> {
        let tenant = self.tenant.ok_or(Error::Builder("tenant"))?;
        let actor = self.actor.ok_or(Error::Builder("actor"))?;
        validate_tenant(&tenant)?;
        validate_name("actor", &actor)?;
        let scopes = self.scopes.map(validated).transpose()?;
        let store = self.store.ok_or(Error::Builder("local"))?;
        let remote = self.remote.ok_or(Error::Builder("remote"))?;
        let (offset, pending, rejections) = store.transaction(|t| {
            match t.meta(META_TENANT)? {
                Some(owner) if owner != tenant => {
                    return Err(Error::Config { message: format!("this local store holds tenant {owner}, not {tenant}: use one store per tenant"), source: None })
                }
                Some(_) => {}
                None => t.set_meta(META_TENANT, &tenant)?,
            }
            open_with(t, scopes)?;
            Ok((read_offset(t)?, t.outbox_len()?, t.rejections()?.len()))
        })?;
        let (status, _) = watch::channel(SyncStatus { pending, rejections, ..SyncStatus::default() });
        Ok(SyncClient {
            tenant,
            actor,
            store,
            remote,
            push_batch: self.push_batch,
            pull_page: self.pull_page,
            sync_timeout: self.sync_timeout,
            on_rejected: self.on_rejected,
            wall_clock: self.wall_clock,
            clock_offset: AtomicI64::new(offset),
            syncing: tokio::sync::Mutex::new(()),
            writing: Mutex::new(()),
            limits: Mutex::new(None),
            verified: Mutex::new(None),
            status,
            events: broadcast::channel(256).0,
        })
    }
}

impl<R: Remote> Default for SyncClientBuilder<R> {
    fn default() -> Self {
        Self::new()
    }
}
