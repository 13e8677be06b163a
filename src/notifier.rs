//! Wake-ups after commit without a NOTIFY in every push.
//!
//! A transaction that ran NOTIFY takes a cluster-wide lock when it commits and holds it through its
//! commit record's flush, so notifying pushes cannot share a WAL flush: they commit one at a time, across
//! all tenants. Instead, a push that applied something adds its tenant to `sync_ext.wakeups` (an unlogged
//! table) and, once it has committed, sets the latch of the database's *notifier*: a background worker
//! that deletes the pending wake-ups and sends one `NOTIFY sync_ext, '<tenant>'` per tenant, in one
//! asynchronously committed transaction. Listeners learn of a commit about a millisecond later, and
//! pushes never notify.
//!
//! The notifier is started on demand by the first push that finds none (that push still notifies
//! itself, as do pushes while no worker can be started, e.g. `max_worker_processes` is reached) and
//! exits after [`IDLE_EXIT`] without wake-ups, so an idle database holds no extra connection.
//!
//! Two advisory locks (in this database, keys [`LOCK_CLASS`]) make the hand-over safe:
//! - the notifier holds [`NOTIFIER_LOCK`] exclusively for its life, which tells pushes one is running;
//! - a push that leaves its wake-up to the notifier holds [`HANDOVER_LOCK`] shared until it ends; a
//!   notifier about to exit takes it exclusively (so waits for those pushes), sweeps a last time and
//!   only then releases [`NOTIFIER_LOCK`]. A push that cannot take the shared lock notifies itself.
//!
//! So no committed wake-up is left behind by an exiting notifier. One left by a notifier that was
//! terminated is sent by the next one, which the next push starts.
//!
//! On a distributed install (see [`crate::citus`]) every node has its own notifier, which sends each
//! wake-up on its node at once and to the other nodes at most every [`FORWARD_INTERVAL`] (gathered, as
//! each forward opens a connection per node), and pushes never notify themselves: a push that finds no
//! notifier (or one exiting) leaves its wake-up for the next sweep, which may wait for the next push.

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::prelude::*;

use crate::errors::SyncResult;
use crate::identity;

/// The first key of the notifier's advisory locks ("sync").
const LOCK_CLASS: i32 = 0x7379_6e63;
/// Held exclusively by the running notifier.
const NOTIFIER_LOCK: i32 = 1;
/// Held shared by pushes whose wake-up the notifier sends; taken exclusively by a notifier that exits.
const HANDOVER_LOCK: i32 = 2;

/// How long the notifier waits for a wake-up before it exits.
pub const IDLE_EXIT: Duration = Duration::from_secs(3);
/// How often the notifier sweeps even without being woken (wake-ups of prepared transactions, which
/// commit elsewhere).
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// How often a backend that knows of no notifier looks one up.
const LOOKUP_INTERVAL: Duration = Duration::from_millis(100);
/// How often a backend that found none tries to start one.
const START_INTERVAL: Duration = Duration::from_secs(1);

/// The name the notifier shows in `pg_stat_activity.backend_type`.
pub const WORKER_TYPE: &str = "sync_ext notifier";

/// How the push being stored tells listeners.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Route {
    /// It notifies in its own transaction.
    Notify,
    /// It leaves a wake-up for the notifier (process id) and wakes it after commit.
    Notifier(i32),
    /// It leaves a wake-up for the next notifier's sweep (on a distributed install, where a push never
    /// notifies itself).
    Left,
}

impl Route {
    /// Whether the push sends its NOTIFY itself.
    pub fn notifies_itself(self) -> bool {
        self == Route::Notify
    }
}

thread_local! {
    /// The notifier this backend last found, and when it last looked for or started one.
    static KNOWN: Cell<Option<i32>> = const { Cell::new(None) };
    static LAST_LOOKUP: Cell<Option<Instant>> = const { Cell::new(None) };
    static LAST_START: Cell<Option<Instant>> = const { Cell::new(None) };
    /// The notifier to wake when the current transaction commits.
    static WAKE_AT_COMMIT: Cell<Option<i32>> = const { Cell::new(None) };
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
    /// Whether this backend has logged that no worker slot was free.
    static REPORTED_NO_SLOT: Cell<bool> = const { Cell::new(false) };
}

/// Decides how the push being stored tells listeners, and arranges the notifier's wake-up at commit
/// when it is the notifier's job.
pub fn route() -> SyncResult<Route> {
    // Where Citus may prepare the transaction, the push cannot notify: it leaves its wake-up and asks for a
    // notifier if none runs.
    let fallback = if crate::citus::distributed() { Route::Left } else { Route::Notify };
    if !try_lock_shared_for_transaction(HANDOVER_LOCK) {
        return Ok(fallback); // a notifier is exiting
    }
    if !notifier_lock_is_held() {
        KNOWN.set(None); // none runs, or one released its lock and is about to leave
    }
    let pid = match KNOWN.get().filter(|&pid| is_notifier_process(pid)) {
        Some(pid) => Some(pid),
        None => {
            KNOWN.set(None);
            find_or_start()?
        }
    };
    let Some(pid) = pid else {
        return Ok(fallback);
    };
    wake_at_commit(pid);
    Ok(Route::Notifier(pid))
}

/// Looks up the running notifier (at most every [`LOOKUP_INTERVAL`]); when there is none, starts one
/// (at most every [`START_INTERVAL`]), whose first sweep happens after this push commits or not at all.
fn find_or_start() -> SyncResult<Option<i32>> {
    if LAST_LOOKUP.get().is_some_and(|at| at.elapsed() < LOOKUP_INTERVAL) {
        return Ok(None);
    }
    LAST_LOOKUP.set(Some(Instant::now()));
    let holder = Spi::get_one_with_args::<i32>(
        "SELECT (SELECT pid FROM pg_catalog.pg_locks
                  WHERE locktype = 'advisory' AND database = $1 AND classid = $2::pg_catalog.oid AND objid = $3::pg_catalog.oid
                    AND objsubid = 2 AND mode = 'ExclusiveLock' AND granted)",
        // SAFETY: a plain global of the backend.
        &[unsafe { pg_sys::MyDatabaseId }.into(), i64::from(LOCK_CLASS).into(), i64::from(NOTIFIER_LOCK).into()],
    )?;
    if let Some(pid) = holder.filter(|&pid| is_notifier_process(pid)) {
        KNOWN.set(Some(pid));
        return Ok(Some(pid));
    }
    if LAST_START.get().is_none_or(|at| at.elapsed() >= START_INTERVAL) {
        LAST_START.set(Some(Instant::now()));
        start(identity::sync_tables_owner()?);
    }
    Ok(None)
}

/// Asks the postmaster for a notifier for this database, working as `owner` (the engine's identity,
/// see [`identity`]); logs when it cannot.
fn start(owner: pg_sys::Oid) {
    // SAFETY: a plain global of the backend.
    let database = unsafe { pg_sys::MyDatabaseId };
    let started = BackgroundWorkerBuilder::new(WORKER_TYPE)
        .set_type(WORKER_TYPE)
        .set_library("sync_ext")
        .set_function("sync_ext_notifier_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_argument(Some(pg_sys::Datum::from(database.to_u32())))
        .set_extra(&owner.to_u32().to_string())
        .load_dynamic();
    if started.is_err() && !REPORTED_NO_SLOT.replace(true) {
        log!("sync_ext: no background worker slot for the notifier (max_worker_processes); pushes notify themselves");
    }
}

/// Whether `pid` is a background worker of this database (the notifier, once found holding its lock).
fn is_notifier_process(pid: i32) -> bool {
    // SAFETY: a lookup in the proc array under its lock; the fields read are set when the process starts.
    unsafe {
        let proc = pg_sys::BackendPidGetProc(pid);
        !proc.is_null() && (*proc).isBackgroundWorker && (*proc).databaseId == pg_sys::MyDatabaseId
    }
}

/// Sets the latch of `pid` if it still runs.
fn set_latch_of(pid: i32) {
    // SAFETY: as above; setting another process's latch is what latches are for.
    unsafe {
        let proc = pg_sys::BackendPidGetProc(pid);
        if !proc.is_null() {
            pg_sys::SetLatch(&mut (*proc).procLatch);
        }
    }
}

/// Arranges for the notifier `pid` to be woken when the current transaction commits.
fn wake_at_commit(pid: i32) {
    if !CALLBACK_REGISTERED.replace(true) {
        // SAFETY: registers a callback for the backend's life; it only reads and clears a thread-local
        // and sets a latch, which is allowed after commit.
        unsafe { pg_sys::RegisterXactCallback(Some(at_transaction_end), std::ptr::null_mut()) };
    }
    WAKE_AT_COMMIT.set(Some(pid));
}

#[pg_guard]
unsafe extern "C-unwind" fn at_transaction_end(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    match event {
        pg_sys::XactEvent::XACT_EVENT_COMMIT => {
            if let Some(pid) = WAKE_AT_COMMIT.take() {
                set_latch_of(pid);
            }
        }
        pg_sys::XactEvent::XACT_EVENT_ABORT | pg_sys::XactEvent::XACT_EVENT_PREPARE => {
            WAKE_AT_COMMIT.set(None);
        }
        _ => {}
    }
}

/// The advisory lock tag of `key` in this database (as `pg_advisory_lock(LOCK_CLASS, key)` names it).
fn lock_tag(key: i32) -> pg_sys::LOCKTAG {
    pg_sys::LOCKTAG {
        // SAFETY: a plain global of the backend.
        locktag_field1: unsafe { pg_sys::MyDatabaseId }.to_u32(),
        locktag_field2: LOCK_CLASS as u32,
        locktag_field3: key as u32,
        locktag_field4: 2,
        locktag_type: pg_sys::LockTagType::LOCKTAG_ADVISORY as u8,
        locktag_lockmethodid: pg_sys::USER_LOCKMETHOD as u8,
    }
}

/// `pg_try_advisory_xact_lock_shared(LOCK_CLASS, key)`, without a statement.
fn try_lock_shared_for_transaction(key: i32) -> bool {
    let tag = lock_tag(key);
    // SAFETY: a transaction-scoped lock request that does not wait; released at transaction end.
    let result = unsafe { pg_sys::LockAcquire(&tag, pg_sys::ShareLock as pg_sys::LOCKMODE, false, true) };
    result != pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL
}

/// Whether some process holds [`NOTIFIER_LOCK`] (tried shared, and let go at once when it was free).
fn notifier_lock_is_held() -> bool {
    let tag = lock_tag(NOTIFIER_LOCK);
    // SAFETY: a lock request that does not wait, released at once if granted.
    unsafe {
        let result = pg_sys::LockAcquire(&tag, pg_sys::ShareLock as pg_sys::LOCKMODE, false, true);
        if result == pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL {
            return true;
        }
        pg_sys::LockRelease(&tag, pg_sys::ShareLock as pg_sys::LOCKMODE, false);
        false
    }
}

/// Sends the pending wake-ups: one NOTIFY per tenant. Returns how many tenants were notified.
const SWEEP: &str = "
WITH woken AS (DELETE FROM sync_ext.wakeups RETURNING tenant_id)
SELECT count(pg_catalog.pg_notify('sync_ext', tenant_id))
  FROM (SELECT DISTINCT tenant_id FROM woken) AS tenants";

/// [`SWEEP`] on a distributed install, first half: the pending wake-ups' tenants, notified here.
const SWEEP_NAMES: &str = "
WITH woken AS (DELETE FROM sync_ext.wakeups RETURNING tenant_id),
     tenants AS (SELECT DISTINCT tenant_id FROM woken)
SELECT array_agg(tenant_id) AS notified, count(pg_catalog.pg_notify('sync_ext', tenant_id)) AS woken FROM tenants";

/// The second half: the same NOTIFYs on every other node of the cluster (each on a connection of its own,
/// as Citus opens for `master_run_on_worker`), so listeners hear of a push wherever they listen.
const FORWARD: &str = "
SELECT count(*) FROM (
    SELECT pg_catalog.master_run_on_worker(array_agg(n.nodename), array_agg(n.nodeport),
               array_agg(pg_catalog.format('SELECT pg_catalog.count(pg_catalog.pg_notify(%L, t)) FROM pg_catalog.unnest(%L::text[]) AS t',
                                           'sync_ext', $1::text[])),
               true)
      FROM pg_catalog.pg_dist_node AS n
     WHERE n.isactive AND n.noderole = 'primary'
       AND n.groupid <> (SELECT groupid FROM pg_catalog.pg_dist_local_group)
    HAVING count(*) > 0) AS sent";

/// How often the notifier of a distributed install forwards wake-ups to the other nodes at most: each
/// forward opens a connection to every node, so wake-ups are gathered for this long first.
const FORWARD_INTERVAL: Duration = Duration::from_millis(100);

thread_local! {
    /// The tenants woken here that the other nodes have not been told of yet, and when they last were.
    static TO_FORWARD: RefCell<(BTreeSet<String>, Option<Instant>)> = const { RefCell::new((BTreeSet::new(), None)) };
}

/// One sweep in its own transaction; returns how many tenants it woke. On a distributed install it also
/// forwards what is gathered once [`FORWARD_INTERVAL`] has passed (or at once with `flush`).
fn sweep(flush: bool) -> i64 {
    BackgroundWorker::transaction(|| {
        if !crate::citus::distributed() {
            return Spi::get_one::<i64>(SWEEP).ok().flatten().unwrap_or(0);
        }
        let (notified, woken) = Spi::get_two::<Vec<String>, i64>(SWEEP_NAMES).unwrap_or((None, None));
        let due = TO_FORWARD.with_borrow_mut(|(pending, last)| {
            pending.extend(notified.unwrap_or_default());
            let due = !pending.is_empty() && (flush || last.is_none_or(|at| at.elapsed() >= FORWARD_INTERVAL));
            due.then(|| {
                *last = Some(Instant::now());
                std::mem::take(pending).into_iter().collect::<Vec<_>>()
            })
        });
        if let Some(tenants) = due {
            Spi::run_with_args(FORWARD, &[tenants.into()]).ok();
        }
        woken.unwrap_or(0)
    })
}

/// How long the notifier may sleep: until wake-ups gathered for the other nodes are due, at most
/// [`SWEEP_INTERVAL`].
fn next_sweep_in() -> Duration {
    TO_FORWARD.with_borrow(|(pending, last)| match last {
        Some(at) if !pending.is_empty() => FORWARD_INTERVAL.saturating_sub(at.elapsed()).min(SWEEP_INTERVAL),
        None if !pending.is_empty() => Duration::ZERO,
        _ => SWEEP_INTERVAL,
    })
}

/// The notifier's main function (see the module documentation).
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn sync_ext_notifier_main(argument: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = pg_sys::Oid::from(argument.value() as u32);
    let owner = BackgroundWorker::get_extra().parse::<u32>().map(pg_sys::Oid::from).ok();
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(database), owner);
    let claimed = BackgroundWorker::transaction(|| {
        // Session settings: nothing the database's or role's defaults say may interrupt the hand-over,
        // and a notification needs no flush.
        Spi::run(
            "SET search_path = pg_catalog, pg_temp; SET statement_timeout = 0; SET lock_timeout = 0;
             SET idle_in_transaction_session_timeout = 0; SET synchronous_commit = off",
        )
        .and_then(|()| Spi::get_one_with_args::<bool>("SELECT pg_try_advisory_lock($1, $2)", &[LOCK_CLASS.into(), NOTIFIER_LOCK.into()]))
        .ok()
        .flatten()
            == Some(true)
    });
    if !claimed {
        return; // another notifier runs in this database
    }
    let mut last_wakeup = Instant::now();
    loop {
        if sweep(false) > 0 {
            last_wakeup = Instant::now();
        }
        if !BackgroundWorker::wait_latch(Some(next_sweep_in())) {
            return; // terminated: the next notifier sends what is left
        }
        if last_wakeup.elapsed() >= IDLE_EXIT {
            break;
        }
    }
    // Exit: wait for the pushes that count on this notifier, send their wake-ups, then let go.
    BackgroundWorker::transaction(|| {
        Spi::run_with_args("SELECT pg_advisory_lock($1, $2)", &[LOCK_CLASS.into(), HANDOVER_LOCK.into()]).ok();
    });
    sweep(true);
    BackgroundWorker::transaction(|| {
        Spi::run_with_args("SELECT pg_advisory_unlock($1, $2)", &[LOCK_CLASS.into(), NOTIFIER_LOCK.into()]).ok();
    });
}
