//! Keeping a client in sync in the background: woken by `NOTIFY sync_ext` for its tenant, with a
//! timer as a fallback, retrying transient failures with backoff and stopping its retries at a
//! permanent one.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::remote::{connect, pg_error, DEFAULT_CONNECT_TIMEOUT};
use crate::status::{LiveState, SyncStatus, Wakeups};
use crate::{Remote, SyncClient};

/// How the background loop runs. The default: no LISTEN, a sync every 30 s, retries backing off to 30 s.
#[derive(Clone, Debug)]
pub struct LiveOptions {
    /// A connection string to LISTEN on, straight to the database (not through a transaction-mode
    /// pooler, which cannot hold a LISTEN). Without it the loop syncs on the timer only, and the status
    /// says wake-ups are unavailable.
    pub listen_url: Option<String>,
    /// Sync at least this often, notified or not (30 s by default).
    pub interval: Duration,
    /// The longest wait between retries while syncs fail (the wait doubles from 100 ms up to it; 30 s
    /// by default).
    pub max_backoff: Duration,
}

impl Default for LiveOptions {
    fn default() -> Self {
        LiveOptions { listen_url: None, interval: Duration::from_secs(30), max_backoff: Duration::from_secs(30) }
    }
}

/// A running background loop. [`LiveHandle::stop`] ends it promptly whatever it is doing (a sync
/// in progress is abandoned; what it committed locally is kept); dropping the handle ends it too.
pub struct LiveHandle {
    stop: watch::Sender<bool>,
    now: Arc<Notify>,
    task: JoinHandle<()>,
}

impl LiveHandle {
    /// Stops the loop and waits for it to finish.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Syncs now: after a local write the app wants sent at once, or to retry after a permanent
    /// error once its cause is fixed.
    pub fn sync_now(&self) {
        self.now.notify_one();
    }
}

impl<R: Remote + 'static> SyncClient<R> {
    /// Starts syncing in the background on the current tokio runtime. It reports through
    /// [`SyncClient::status`] (its [`LiveState`], wake-ups, errors) and [`SyncClient::changes`].
    pub fn live(self: Arc<Self>, options: LiveOptions) -> LiveHandle {
        let (stop, stopped) = watch::channel(false);
        let now = Arc::new(Notify::new());
        let task = tokio::spawn(run(self, options, stopped, now.clone()));
        LiveHandle { stop, now, task }
    }
}

fn set_wakeups(status: &watch::Sender<SyncStatus>, wakeups: Wakeups) {
    status.send_modify(|status| {
        if let LiveState::Running { wakeups: current, .. } = &mut status.live {
            *current = wakeups;
        }
    });
}

fn set_halted(status: &watch::Sender<SyncStatus>, halt: bool) {
    status.send_modify(|status| {
        if let LiveState::Running { halted, .. } = &mut status.live {
            *halted = halt;
        }
    });
}

/// The loop. `stopped` changes, or errs when the handle is dropped: either ends it at once.
async fn run<R: Remote + 'static>(client: Arc<SyncClient<R>>, options: LiveOptions, mut stopped: watch::Receiver<bool>, now: Arc<Notify>) {
    let reason = if options.listen_url.is_some() { "connecting" } else { "no LISTEN connection is configured (LiveOptions::listen_url)" };
    client.status.send_modify(|status| status.live = LiveState::Running { wakeups: Wakeups::Unavailable { reason: reason.into() }, halted: false });
    let wake = Arc::new(Notify::new());
    let listener = options.listen_url.clone().map(|url| tokio::spawn(listen(client.clone(), url, wake.clone(), options.max_backoff, stopped.clone())));
    let mut backoff: Option<Duration> = None;
    loop {
        let outcome = tokio::select! {
            _ = stopped.changed() => break,
            outcome = client.sync() => outcome,
        };
        let wait = match outcome {
            Ok(report) => {
                backoff = None;
                tracing::debug!(pushed = report.pushed, pulled = report.pulled, repaired = report.repaired, "synced");
                Some(options.interval)
            }
            Err(error) if error.is_transient() => {
                let next = backoff.map_or(Duration::from_millis(100), |wait| (wait * 2).min(options.max_backoff));
                tracing::warn!(%error, retry_in = ?next, "sync failed");
                backoff = Some(next);
                backoff
            }
            Err(error) => {
                tracing::error!(%error, "sync failed with a permanent error: the live loop stops retrying until sync_now or a wake-up");
                backoff = None;
                set_halted(&client.status, true);
                None
            }
        };
        tokio::select! {
            _ = stopped.changed() => break,
            _ = now.notified() => {}
            _ = wake.notified(), if backoff.is_none() => {}
            _ = tokio::time::sleep(wait.unwrap_or_default()), if wait.is_some() => {}
        }
        set_halted(&client.status, false);
    }
    if let Some(listener) = listener {
        listener.abort();
        let _ = listener.await;
    }
    client.status.send_modify(|status| status.live = LiveState::Off);
}

/// Listens for the tenant's notifications and wakes the loop, reconnecting with backoff.
async fn listen<R: Remote>(client: Arc<SyncClient<R>>, url: String, wake: Arc<Notify>, max_backoff: Duration, mut stopped: watch::Receiver<bool>) {
    let config: tokio_postgres::Config = match url.parse() {
        Ok(config) => config,
        Err(error) => {
            let error = Error::Config { message: "listen_url".into(), source: Some(Box::new(error)) };
            tracing::error!(%error, "no live wake-ups");
            return set_wakeups(&client.status, Wakeups::Unavailable { reason: error.to_string() });
        }
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        let opened = tokio::select! {
            _ = stopped.changed() => return,
            opened = open_listener(&config) => opened,
        };
        match opened {
            Ok((_connection, mut notifications)) => {
                set_wakeups(&client.status, Wakeups::Listening);
                backoff = Duration::from_millis(100);
                wake.notify_one();
                loop {
                    tokio::select! {
                        notification = notifications.recv() => match notification {
                            Some(payload) if payload == client.tenant => wake.notify_one(),
                            Some(_) => {}
                            None => break,
                        },
                        _ = stopped.changed() => return,
                    }
                }
                set_wakeups(&client.status, Wakeups::Unavailable { reason: "the LISTEN connection closed; reconnecting".into() });
            }
            Err(error) => {
                tracing::warn!(%error, "LISTEN connection failed");
                set_wakeups(&client.status, Wakeups::Unavailable { reason: format!("the LISTEN connection failed: {error}") });
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stopped.changed() => return,
        }
        backoff = (backoff * 2).min(max_backoff);
    }
}

/// Connects, runs `LISTEN sync_ext`, and returns the client (keep it: dropping it closes the
/// connection) and the channel of notification payloads, which closes with the connection.
async fn open_listener(config: &tokio_postgres::Config) -> Result<(tokio_postgres::Client, mpsc::UnboundedReceiver<String>)> {
    let (client, notifications) = connect(config, DEFAULT_CONNECT_TIMEOUT).await?;
    tokio::time::timeout(DEFAULT_CONNECT_TIMEOUT, client.batch_execute("LISTEN sync_ext"))
        .await
        .map_err(|_| Error::Timeout { what: "LISTEN", after: DEFAULT_CONNECT_TIMEOUT })?
        .map_err(pg_error)?;
    Ok((client, notifications))
}
