//! Keeping a client in sync in the background: woken by `NOTIFY sync_ext` for its tenant, with a
//! timer as a fallback, retrying with backoff while the server is unreachable.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::{Remote, SyncClient};

/// How the background loop runs.
#[derive(Clone, Debug)]
pub struct LiveOptions {
    /// A connection string to LISTEN on; without it the loop syncs on the timer only.
    pub listen_url: Option<String>,
    /// Sync at least this often, notified or not.
    pub interval: Duration,
    /// The longest wait between retries while syncs fail (the wait doubles from 100 ms up to it).
    pub max_backoff: Duration,
}

impl Default for LiveOptions {
    fn default() -> Self {
        LiveOptions { listen_url: None, interval: Duration::from_secs(30), max_backoff: Duration::from_secs(30) }
    }
}

/// A running background loop; [`LiveHandle::stop`] ends it after the sync in progress, if any.
pub struct LiveHandle {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl LiveHandle {
    /// Stops the loop and waits for it to finish.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

impl<R: Remote + 'static> SyncClient<R> {
    /// Starts syncing in the background on the current tokio runtime.
    pub fn live(self: Arc<Self>, options: LiveOptions) -> LiveHandle {
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(run(self, options, stopped));
        LiveHandle { stop, task }
    }
}

async fn run<R: Remote + 'static>(client: Arc<SyncClient<R>>, options: LiveOptions, mut stopped: watch::Receiver<bool>) {
    let wake = Arc::new(Notify::new());
    let listener = options.listen_url.clone().map(|url| tokio::spawn(listen(url, client.tenant().to_owned(), wake.clone(), options.max_backoff, stopped.clone())));
    let mut backoff: Option<Duration> = None;
    while !*stopped.borrow() {
        match client.sync().await {
            Ok(report) => {
                backoff = None;
                tracing::debug!(pushed = report.pushed, pulled = report.pulled, repaired = report.repaired, "synced");
            }
            Err(error) => {
                let next = backoff.map_or(Duration::from_millis(100), |wait| (wait * 2).min(options.max_backoff));
                tracing::warn!(%error, retry_in = ?next, "sync failed");
                backoff = Some(next);
            }
        }
        tokio::select! {
            _ = wake.notified(), if backoff.is_none() => {}
            _ = tokio::time::sleep(backoff.unwrap_or(options.interval)) => {}
            _ = stopped.changed() => {}
        }
    }
    if let Some(listener) = listener {
        let _ = listener.await;
    }
}

/// Listens for the tenant's notifications and wakes the loop, reconnecting with backoff.
async fn listen(url: String, tenant: String, wake: Arc<Notify>, max_backoff: Duration, mut stopped: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(100);
    while !*stopped.borrow() {
        match open_listener(&url).await {
            Ok((_client, mut notifications)) => {
                backoff = Duration::from_millis(100);
                wake.notify_one();
                loop {
                    tokio::select! {
                        notification = notifications.recv() => match notification {
                            Some(payload) if payload == tenant => wake.notify_one(),
                            Some(_) => {}
                            None => break,
                        },
                        _ = stopped.changed() => return,
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "LISTEN connection failed"),
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
async fn open_listener(url: &str) -> Result<(tokio_postgres::Client, mpsc::UnboundedReceiver<String>)> {
    let (client, notifications) = crate::remote::connect(url).await?;
    client.batch_execute("LISTEN sync_ext").await.map_err(|error| Error::Remote(error.to_string()))?;
    Ok((client, notifications))
}
