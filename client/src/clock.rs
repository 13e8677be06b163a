//! The client's clock: an HLC kept in the store, stamped from the device's wall clock corrected by an
//! offset measured against the server after a `clock_skew` rejection.

use std::sync::atomic::Ordering;

use sync_ext_protocol::{Hlc, HlcClock};

use crate::error::{Error, Result};
use crate::store::Transaction;
use crate::{Remote, SyncClient};

pub(crate) const META_CLOCK: &str = "hlc";
/// Milliseconds added to the device's wall clock to stamp changes (set after a `clock_skew` rejection).
pub(crate) const META_CLOCK_OFFSET: &str = "clock_offset";
/// Set when a change was rejected `clock_skew` and the clock is not re-based yet.
pub(crate) const META_CLOCK_SKEWED: &str = "clock_skewed";
/// The greatest stamp the server is known to hold (pulled, or acknowledged to this client).
pub(crate) const META_SERVER_HLC: &str = "server_hlc";

fn read_hlc(t: &mut dyn Transaction, key: &str) -> Result<Option<Hlc>> {
    t.meta(key)?.map(|text| text.parse::<Hlc>().map_err(|error| Error::store(error.to_string()))).transpose()
}

pub(crate) fn read_clock(t: &mut dyn Transaction) -> Result<HlcClock> {
    Ok(HlcClock::resume(read_hlc(t, META_CLOCK)?))
}

pub(crate) fn write_clock(t: &mut dyn Transaction, clock: &HlcClock) -> Result<()> {
    match clock.last() {
        Some(last) => t.set_meta(META_CLOCK, &last.to_string()),
        None => Ok(()),
    }
}

/// Moves the greatest stamp the server is known to hold past `seen`.
pub(crate) fn observe_server_stamp(t: &mut dyn Transaction, seen: impl IntoIterator<Item = Hlc>) -> Result<()> {
    let known = read_hlc(t, META_SERVER_HLC)?;
    match seen.into_iter().max().filter(|seen| known.is_none_or(|known| *seen > known)) {
        Some(greater) => t.set_meta(META_SERVER_HLC, &greater.to_string()),
        None => Ok(()),
    }
}

pub(crate) fn read_offset(t: &mut dyn Transaction) -> Result<i64> {
    Ok(t.meta(META_CLOCK_OFFSET)?.and_then(|text| text.parse().ok()).unwrap_or(0))
}

impl<R: Remote> SyncClient<R> {
    /// The time to stamp a change with: the device's wall clock, corrected by the measured offset.
    pub(crate) fn now(&self) -> i64 {
        (self.wall_clock)() + self.clock_offset.load(Ordering::Relaxed)
    }


    /// Measures the device's clock against the server's ([`Remote::server_time`], or else the greatest
    /// stamp the server is known to hold) and keeps the difference as the offset of future stamps.
    /// With `rebase` (after a `clock_skew` rejection) the HLC, which the wrong wall clock carried
    /// ahead, restarts from the greatest stamp the server holds.
    pub(crate) async fn align_clock(&self, rebase: bool) -> Result<()> {
        let server_now = self.remote.server_time().await?;
        let device_now = (self.wall_clock)();
        let offset = self.in_place(|t| {
            let server_stamp = read_hlc(t, META_SERVER_HLC)?;
            let offset = match server_now.or(server_stamp.filter(|_| rebase).map(|stamp| stamp.millis())) {
                Some(server) => server - device_now,
                None => read_offset(t)?,
            };
            t.set_meta(META_CLOCK_OFFSET, &offset.to_string())?;
            if rebase {
                match server_stamp {
                    Some(stamp) => t.set_meta(META_CLOCK, &stamp.to_string())?,
                    None => t.delete_meta(META_CLOCK)?,
                }
                t.delete_meta(META_CLOCK_SKEWED)?;
            }
            Ok(offset)
        })?;
        let previous = self.clock_offset.swap(offset, Ordering::Relaxed);
        if rebase || previous != offset {
            tracing::warn!(tenant = %self.tenant, offset_ms = offset, rebase, "the device clock differs from the server's: stamping changes with the corrected time");
        }
        Ok(())
    }
}
