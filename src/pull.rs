//! `sync_pull`: a tenant's changes after a cursor, in seq order, or a reset served from the snapshots.
//!
//! A cursor below the tenant's compaction horizon (history there is incomplete) or above its last seq
//! (e.g. after a restore) gets `"reset": true` and pages of the current rows, ordered by the seq of the
//! change that last altered each row (unique per tenant, so paging is exact even while pushes go on).
//! Each reset row carries its full merge registers (`field_stamps`, `deleted_hlc`) so the client merges
//! later changes exactly as the server does. Mid-reset the cursor is negative (`-S`: rows through seq S
//! sent); the last page ends at the tenant's last seq, from which ordinary pulls continue.
//!
//! A scoped pull (`scopes` lists instances, see [`sync_ext_protocol::scope`]) reads the scope index
//! instead: the changes of the listed instances and of tenant-wide models, a row entering them as its
//! whole state (move-in), a row leaving them as `"op": "leave"`, and `since = 0` as a reset of their
//! current rows. Its cursor is the last seq examined, and its last page has a digest per instance.
//!
//! On a hot standby a cursor above the last seq means the standby has not replayed that far yet (the
//! client pulled from the primary or a faster standby before), so it gets an empty page and its own
//! cursor back, and tries again later; restores are detected where pushes go, on the primary.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::{SpiClient, SpiResult, SpiTupleTable};
use pgrx::JsonB;
use sync_ext_protocol::validate_tenant;

use std::collections::BTreeSet;

use sync_ext_protocol::scope::{validate_instance, TENANT_WIDE};

use crate::auth::{authorize_reach, require_reach};
use crate::identity::as_engine;
use crate::errors::{SyncError, SyncResult};
use crate::jsonb::{JsonbDatum, Member};
use sync_ext_protocol::msgpack::Writer;

/// The page of a pull, read in one statement (so the mode, the horizon and the rows come from one
/// snapshot): the changes as one jsonb array, and the cursor, `has_more`, `reset` and the digest (on the
/// page that ends at the tenant's last seq) for the body around them, which [`Page`] writes without
/// walking the changes again. It reads at most one row more than the page may hold, to tell whether more follow, and
/// keeps the rows that fit both limits: at most `$3` changes and at most `$4` bytes (of jsonb; the
/// first change always, however large it is).
static PULL_PAGE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| format!("
WITH t AS (
    SELECT coalesce(max(last_seq), 0) AS last_seq, coalesce(max(horizon), 0) AS horizon, coalesce(max(digest), 0) AS digest
      FROM sync_ext.tenants WHERE tenant_id = $1),
mode AS (
    SELECT ($2 < 0 OR $2 < t.horizon OR ($2 > t.last_seq AND NOT pg_is_in_recovery())) AS reset,
           CASE WHEN $2 < 0 THEN -$2 ELSE 0 END AS snapshot_after,
           t.last_seq, t.digest
      FROM t),
fetched AS (
    SELECT seq, change, row_number() OVER w AS n, sum(pg_column_size(change)) OVER w AS bytes
      FROM (SELECT * FROM (
                SELECT o.seq, jsonb_build_object('seq', o.seq, 'op_id', o.op_id, 'model', o.model, 'pk', o.pk, 'op', o.op,
                                                 'hlc', o.hlc, 'actor', o.actor, 'value', o.payload) AS change
                  FROM sync_ext.op_log AS o
                 WHERE NOT (SELECT reset FROM mode) AND o.tenant_id = $1 AND o.seq > $2
                 ORDER BY o.seq
                 LIMIT $3 + 1) AS log_rows
            UNION ALL
            SELECT * FROM (
                SELECT s.seq, {whole_row} AS change
                  FROM sync_ext.snapshots AS s
                 WHERE (SELECT reset FROM mode) AND s.tenant_id COLLATE \"C\" = $1 AND s.seq > (SELECT snapshot_after FROM mode)
                 ORDER BY s.seq
                 LIMIT $3 + 1) AS snapshot_rows) AS fetched_rows
    WINDOW w AS (ORDER BY seq)),
page AS (
    SELECT count(*) AS fetched,
           count(*) FILTER (WHERE kept) AS kept,
           coalesce(jsonb_agg(change ORDER BY seq) FILTER (WHERE kept), '[]') AS changes,
           max(seq) FILTER (WHERE kept) AS last_kept
      FROM (SELECT seq, change, n <= $3 AND (n = 1 OR bytes <= $4) AS kept FROM fetched) AS marked),
answer AS (
    SELECT page.changes, page.fetched > page.kept AS has_more, mode.reset, mode.last_seq, mode.digest,
           CASE WHEN NOT mode.reset THEN coalesce(page.last_kept, $2)
                WHEN page.fetched > page.kept THEN -page.last_kept
                ELSE mode.last_seq END AS cursor
      FROM mode, page)
SELECT changes, cursor, has_more, reset,
       CASE WHEN NOT has_more AND cursor = last_seq THEN lpad(to_hex(digest), 16, '0') END AS digest
  FROM answer", whole_row = whole_row("s.seq")));

/// A row's whole state as a pulled change at `seq` (reset rows, move-ins): its visible fields and its
/// merge registers, from the snapshot `s`.
fn whole_row(seq: &str) -> String {
    format!(
        "jsonb_build_object('seq', {seq}, 'op_id', s.op_id, 'model', s.model, 'pk', s.id,
                           'op', CASE WHEN s.deleted THEN 'delete' ELSE 'insert' END, 'hlc', s.hlc, 'actor', s.actor,
                           'value', CASE WHEN s.deleted THEN NULL ELSE s.value END,
                           'field_stamps', s.field_stamps, 'deleted_hlc', s.deleted_hlc)"
    )
}

/// How a scoped pull continues from its cursor, decided from the tenant row: `quiet` (it is the tenant's
/// last seq, so nothing can follow), `reset` (it cannot be continued from the log, as in [`PULL_PAGE`],
/// or it is below the scope horizon), or neither (it continues from the scope index).
const SCOPED_MODE: &str = "
t AS (
    SELECT coalesce(max(last_seq), 0) AS last_seq, coalesce(max(horizon), 0) AS horizon, coalesce(max(scope_horizon), 0) AS scope_horizon
      FROM sync_ext.tenants WHERE tenant_id = $1),
mode AS (
    SELECT ($2 <= 0 OR $2 < t.horizon OR $2 < t.scope_horizon OR ($2 > t.last_seq AND NOT pg_is_in_recovery())) AS reset,
           ($2 > 0 AND $2 = t.last_seq AND $2 >= t.horizon AND $2 >= t.scope_horizon) AS quiet, t.last_seq
      FROM t)";

/// The first statement of a scoped pull: its mode (`reset`, and `quiet` last) and, when it is quiet, the
/// whole page (no change, the cursor kept, the digests), so that an idle device costs one small statement.
static PULL_SCOPED_MODE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| format!("
WITH {SCOPED_MODE}
SELECT '[]'::jsonb, $2, false, mode.reset, CASE WHEN mode.quiet THEN {INSTANCE_DIGESTS} END, mode.quiet
  FROM mode"));

/// The first `$3 + 1` scope index entries after `after` over the listed instances (`$5`), in seq order,
/// each with whether its row was in a listed instance before and after it, and where its log row was
/// written (the entries of a row in two listed instances are one).
fn examined(after: &str) -> String {
    format!("
examined AS (
    SELECT l.seq, bool_or(l.before) AS was_in, bool_or(l.after) AS is_in, max(l.log_tid) AS log_tid
      FROM unnest($5::text[]) AS i(instance)
     CROSS JOIN LATERAL (
           SELECT seq, before, after, log_tid FROM sync_ext.scope_log
            WHERE tenant_id = $1 AND instance = i.instance AND seq > {after}
            ORDER BY seq
            LIMIT $3 + 1) AS l
     GROUP BY l.seq
     ORDER BY l.seq
     LIMIT $3 + 1)")
}

/// [`examined`] when `$5` lists one instance and the tenant-wide one, whose entries never share a seq (a
/// row of a scoped model is never tenant-wide): the two index ranges merged in seq order, without grouping.
fn examined_one(after: &str) -> String {
    let range = |position: u8| {
        format!(
            "(SELECT seq, before AS was_in, after AS is_in, log_tid FROM sync_ext.scope_log
               WHERE tenant_id = $1 AND instance = ($5::text[])[{position}] AND seq > {after}
               ORDER BY seq
               LIMIT $3 + 1)"
        )
    };
    format!("
examined AS (
    SELECT * FROM ({} UNION ALL {}) AS entries
     ORDER BY seq
     LIMIT $3 + 1)", range(1), range(2))
}

/// Ends the `changes` of a scoped statement: in the order `examined` gives, which the joins keep, and
/// whole (`OFFSET 0`), so that each change is built once and the page's window reads it without sorting.
const IN_SEQ_ORDER: &str = "ORDER BY e.seq OFFSET 0";

/// The page of a scoped statement's `changes` (`seq`; `change`, null for an entry that gives nothing;
/// `found`, false for an entry whose log row was not where its index entry says), after the CTEs of
/// [`SCOPED_MODE`]: the entries that fit the limits, kept as [`PULL_PAGE`] keeps them, the cursor (`more`
/// while entries are left, `done` when none is) and, last, whether every entry's log row was found.
fn scoped_page(reset: &str, more: &str, done: &str) -> String {
    format!("
fetched AS (
    SELECT seq, change, found, row_number() OVER w AS n, sum(coalesce(pg_column_size(change), 0)) OVER w AS bytes
      FROM changes
    WINDOW w AS (ORDER BY seq)),
page AS (
    SELECT count(*) AS fetched,
           count(*) FILTER (WHERE kept) AS kept,
           coalesce(jsonb_agg(change ORDER BY seq) FILTER (WHERE kept AND change IS NOT NULL), '[]') AS changes,
           max(seq) FILTER (WHERE kept) AS last_kept,
           coalesce(bool_and(found), true) AS found
      FROM (SELECT seq, change, found, n <= $3 AND (n = 1 OR bytes <= $4) AS kept FROM fetched) AS marked),
answer AS (
    SELECT page.changes, page.fetched > page.kept AS has_more, {reset} AS reset, mode.last_seq, page.found,
           CASE WHEN page.fetched > page.kept THEN {more} ELSE {done} END AS cursor
      FROM mode, page)
SELECT changes, cursor, has_more, reset,
       CASE WHEN NOT has_more AND cursor = last_seq THEN {INSTANCE_DIGESTS} END AS digests, found
  FROM answer")
}

/// How a scoped log page finds the log row of each index entry.
#[derive(Clone, Copy)]
enum LogLookup {
    /// Where the index entry says it was written, checked to be the entry's (`found` is false where it
    /// is not).
    Noted,
    /// By the log's key.
    Keyed,
}

impl LogLookup {
    fn join(self) -> &'static str {
        match self {
            LogLookup::Noted => "LEFT JOIN sync_ext.op_log AS o ON o.ctid = e.log_tid AND o.tenant_id = $1 AND o.seq = e.seq",
            LogLookup::Keyed => "JOIN sync_ext.op_log AS o ON o.tenant_id = $1 AND o.seq = e.seq",
        }
    }
}

/// A scoped page continued from the log, in one statement, which decides the mode again in its own
/// snapshot (after a compaction since [`PULL_SCOPED_MODE`] it answers `reset` and no change). Each entry
/// examined is the logged change, the row's whole state (it moved in: only then is its snapshot read) or
/// a `leave` (it moved out). The cursor is the last entry kept, or when none is left the tenant's last seq.
fn pull_scoped_log(examined: fn(&str) -> String, lookup: LogLookup) -> String {
    format!(
        "
WITH {SCOPED_MODE},{examined},
changes AS (
    SELECT e.seq,
           CASE WHEN e.was_in AND e.is_in
                THEN jsonb_build_object('seq', o.seq, 'op_id', o.op_id, 'model', o.model, 'pk', o.pk, 'op', o.op,
                                        'hlc', o.hlc, 'actor', o.actor, 'value', o.payload)
                WHEN e.is_in
                THEN coalesce((SELECT {moved_in} FROM sync_ext.snapshots AS s
                                WHERE s.tenant_id = $1 AND s.model = o.model AND s.id = o.pk), {LEAVE})
                ELSE {LEAVE} END AS change,
           o.seq IS NOT NULL AS found
      FROM examined AS e
      {join}
     WHERE NOT (SELECT reset FROM mode)
     {IN_SEQ_ORDER}),{page}",
        examined = examined("$2"),
        join = lookup.join(),
        moved_in = whole_row("e.seq"),
        page = scoped_page("mode.reset", "page.last_kept", "greatest(mode.last_seq, $2)"),
    )
}

/// A logged change `o` as the `leave` of its row.
const LEAVE: &str = "jsonb_build_object('seq', o.seq, 'op_id', o.op_id, 'model', o.model, 'pk', o.pk, 'op', 'leave',
                                 'hlc', o.hlc, 'actor', o.actor, 'value', NULL)";

/// A scoped reset page, in one statement: the index entries after `-$2` (mid-reset) or after 0. An entry
/// that is its row's current seq gives the row, or a `leave` if the row's last change took it out; past
/// the first page, an entry that took its row out gives its `leave` even when later changes followed
/// (the row may be one an earlier page sent). The cursor is `-S` while entries are left (rows through
/// seq S sent), then the tenant's last seq.
fn pull_scoped_reset(examined: fn(&str) -> String) -> String {
    format!(
        "
WITH {SCOPED_MODE},{examined},
changes AS (
    SELECT e.seq,
           CASE WHEN s.seq IS NOT NULL AND e.is_in THEN {current}
                WHEN s.seq IS NOT NULL
                THEN jsonb_build_object('seq', s.seq, 'op_id', s.op_id, 'model', s.model, 'pk', s.id, 'op', 'leave',
                                        'hlc', s.hlc, 'actor', s.actor, 'value', NULL)
                WHEN $2 < 0 AND e.was_in AND NOT e.is_in
                THEN (SELECT {LEAVE} FROM sync_ext.op_log AS o WHERE o.tenant_id = $1 AND o.seq = e.seq) END AS change,
           true AS found
      FROM examined AS e
      LEFT JOIN sync_ext.snapshots AS s ON s.tenant_id COLLATE \"C\" = $1 AND s.seq = e.seq
     {IN_SEQ_ORDER}),{page}",
        examined = examined("CASE WHEN $2 < 0 THEN -$2 ELSE 0 END"),
        current = whole_row("s.seq"),
        page = scoped_page("true", "-page.last_kept", "mode.last_seq"),
    )
}

/// The page statements of scoped pulls that examine the index one way.
struct ScopedPages {
    log_noted: String,
    log_keyed: String,
    reset: String,
}

impl ScopedPages {
    fn new(examined: fn(&str) -> String) -> Self {
        ScopedPages {
            log_noted: pull_scoped_log(examined, LogLookup::Noted),
            log_keyed: pull_scoped_log(examined, LogLookup::Keyed),
            reset: pull_scoped_reset(examined),
        }
    }

    /// For the listed instances (`listed`, the tenant-wide one last).
    fn listing(listed: &[String]) -> &'static ScopedPages {
        static ANY: std::sync::LazyLock<ScopedPages> = std::sync::LazyLock::new(|| ScopedPages::new(examined));
        static ONE: std::sync::LazyLock<ScopedPages> = std::sync::LazyLock::new(|| ScopedPages::new(examined_one));
        if listed.len() == 2 { &ONE } else { &ANY }
    }

    /// The row of a scoped page from `since`: the mode statement's when the pull is quiet, else the log
    /// statement's, or the reset statement's when the cursor needs a reset. The mode statement is skipped
    /// where its answer is known: a cursor of 0 or less is a reset, and one below a cursor this backend
    /// already gave for the tenant cannot be quiet (the log statement decides the rest itself).
    fn page_row<'conn>(&self, client: &SpiClient<'conn>, tenant: &str, since: i64, args: &[DatumWithOid<'_>]) -> SpiResult<SpiTupleTable<'conn>> {
        let row = if since <= 0 {
            crate::plans::select(client, &self.reset, Some(1), args)?.first()
        } else if GIVEN.with_borrow(|given| given.get(tenant).is_some_and(|&given| since < given)) {
            self.continued(client, args)?
        } else {
            let mode = crate::plans::select(client, &PULL_SCOPED_MODE, Some(1), args)?.first();
            match (mode.get::<bool>(6)?, mode.get::<bool>(4)?) {
                (Some(true), _) => mode,
                (_, Some(true)) => crate::plans::select(client, &self.reset, Some(1), args)?.first(),
                _ => self.continued(client, args)?,
            }
        };
        if let Some(cursor) = row.get::<i64>(2)?.filter(|&cursor| cursor > since.max(0)) {
            GIVEN.with_borrow_mut(|given| {
                if given.len() >= GIVEN_TENANTS && !given.contains_key(tenant) {
                    given.clear();
                }
                let kept = given.entry(tenant.to_owned()).or_default();
                *kept = (*kept).max(cursor);
            });
        }
        Ok(row)
    }

    /// The log statement's row, which reads each entry's log row where the index says it was written,
    /// or by its key if one was not there (on a distributed install, always by its key); the
    /// reset statement's if the log statement finds that the cursor needs a reset.
    fn continued<'conn>(&self, client: &SpiClient<'conn>, args: &[DatumWithOid<'_>]) -> SpiResult<SpiTupleTable<'conn>> {
        let keyed = |client: &SpiClient<'conn>| crate::plans::select(client, &self.log_keyed, Some(1), args).map(|rows| rows.first());
        let mut page = if crate::citus::distributed() { keyed(client)? } else { crate::plans::select(client, &self.log_noted, Some(1), args)?.first() };
        if page.get::<bool>(6)? == Some(false) {
            page = keyed(client)?;
        }
        if page.get::<bool>(4)? == Some(true) {
            return Ok(crate::plans::select(client, &self.reset, Some(1), args)?.first());
        }
        Ok(page)
    }
}

thread_local! {
    /// Per tenant, the greatest cursor a scoped pull of this backend gave (the tenant's last seq was
    /// at least that), for [`ScopedPages::page_row`]: only a hint of which statement to run first.
    static GIVEN: std::cell::RefCell<std::collections::HashMap<String, i64>> = Default::default();
}

/// The most tenants [`GIVEN`] holds; past that it starts over.
const GIVEN_TENANTS: usize = 10_000;

/// The digests of the listed instances (`$5`), as `{"<instance>": "<16 hex digits>"}`.
const INSTANCE_DIGESTS: &str = "
       (SELECT jsonb_object_agg(i.instance, lpad(to_hex(coalesce(d.digest, 0)), 16, '0'))
          FROM unnest($5::text[]) AS i(instance)
          LEFT JOIN sync_ext.scope_digests AS d ON d.tenant_id = $1 AND d.instance = i.instance)";

/// The most instances one scoped pull may list.
pub const MAX_PULL_SCOPES: usize = 1000;

/// Returns `{"changes":[...],"cursor":N,"has_more":bool}` (plus `"reset":true` when the cursor cannot be
/// continued from the log, and on the page that ends at the tenant's last seq the `"digest"` of its
/// visible rows): at most `max_changes` changes after `since`. The body is built by one query
/// and returned without re-parsing.
///
/// With `scopes`, the page holds only tenant-wide models and the rows of the listed instances (see the
/// module docs); `NULL` is the whole tenant.
#[pg_extern(stable, parallel_safe, name = "sync_pull")]
fn sync_pull_scoped(
    tenant: &str,
    since: i64,
    max_changes: default!(i32, 1000),
    scopes: default!(Option<Vec<String>>, "NULL"),
) -> Result<JsonbDatum, ErrorReport> {
    Ok(pull_page(tenant, since, max_changes, scopes, |page| JsonbDatum::object(page.members()))?)
}

/// `sync_pull` with the body encoded as MessagePack (named fields).
#[pg_extern(stable, parallel_safe, name = "sync_pull_msgpack")]
fn sync_pull_msgpack_scoped(
    tenant: &str,
    since: i64,
    max_changes: default!(i32, 1000),
    scopes: default!(Option<Vec<String>>, "NULL"),
) -> Result<Vec<u8>, ErrorReport> {
    pull_msgpack(tenant, since, max_changes, scopes)
}

/// The entry points of `sync_pull` and `sync_pull_msgpack` before 0.6.0 (three arguments), which their
/// SQL objects call until `ALTER EXTENSION sync_ext UPDATE` replaces them: they answer as the current
/// functions do, which is to say they ask for the update.
#[pg_extern(sql = false)]
fn sync_pull(tenant: &str, since: i64, max_changes: i32) -> Result<JsonbDatum, ErrorReport> {
    sync_pull_scoped(tenant, since, max_changes, None)
}

/// See [`sync_pull`].
#[pg_extern(sql = false)]
fn sync_pull_msgpack(tenant: &str, since: i64, max_changes: i32) -> Result<Vec<u8>, ErrorReport> {
    pull_msgpack(tenant, since, max_changes, None)
}

fn pull_msgpack(tenant: &str, since: i64, max_changes: i32, scopes: Option<Vec<String>>) -> Result<Vec<u8>, ErrorReport> {
    Ok(pull_page(tenant, since, max_changes, scopes, |page| {
        let mut writer = Writer::default();
        let members = page.members();
        writer.map(members.len() as u32);
        for (key, member) in members {
            writer.str(key);
            match member {
                Member::Bool(value) => writer.bool(value),
                Member::Int(value) => writer.number(&value.to_string()).expect("an integer is a JSON number"),
                Member::Text(text) => writer.str(&text),
                Member::Jsonb(datum) => crate::jsonb::write_msgpack(&mut writer, datum),
                Member::Json(value) => writer.value(value),
            }
        }
        writer.finish()
    })?)
}

/// A pull page as [`PULL_PAGE`] reads it; `changes` is a detoasted jsonb array in SPI's memory.
struct Page {
    changes: pg_sys::Datum,
    cursor: i64,
    has_more: bool,
    reset: bool,
    digest: Option<String>,
    /// Scoped pulls: the digest of each listed instance.
    digests: Option<serde_json::Value>,
}

impl Page {
    /// The members of the body.
    fn members(&self) -> Vec<(&'static str, Member<'_>)> {
        let mut members = vec![("changes", Member::Jsonb(self.changes)), ("cursor", Member::Int(self.cursor)), ("has_more", Member::Bool(self.has_more))];
        if self.reset {
            members.push(("reset", Member::Bool(true)));
        }
        if let Some(digest) = &self.digest {
            members.push(("digest", Member::Text(digest.clone())));
        }
        if let Some(digests) = &self.digests {
            members.push(("digests", Member::Json(digests)));
        }
        members
    }
}

fn pull_page<T>(tenant: &str, since: i64, max_changes: i32, scopes: Option<Vec<String>>, body: impl FnOnce(Page) -> T) -> SyncResult<T> {
    validate_tenant(tenant)?;
    if max_changes < 1 {
        return Err(SyncError::InvalidArgument { argument: "max_changes", problem: format!("must be 1 or more, got {max_changes}") });
    }
    // The listed instances and the tenant-wide one.
    let listed = scopes.map(listed_instances).transpose()?;
    as_engine(|engine| {
        let (settings, reach) = authorize_reach(engine, tenant)?;
        require_reach(engine, tenant, &reach, listed.as_ref().map(|listed| &listed[..listed.len() - 1]))?;
        let limit = max_changes.min(settings.max_pull_changes);
        crate::citus::placement(tenant, crate::citus::Access::Read)?.run(|| Spi::connect(|client| {
            // While no scope is defined every model is tenant-wide: a scoped pull is the tenant's.
            let indexed = listed.is_some() && !crate::scopes::definitions(client)?.is_empty();
            let mut args = vec![tenant.into(), since.into(), limit.into(), settings.max_pull_bytes.into()];
            if indexed {
                args.push(listed.clone().into());
            }
            let row = match &listed {
                Some(listed) if indexed => ScopedPages::listing(listed).page_row(client, tenant, since, &args)?,
                _ => crate::plans::select(client, &PULL_PAGE, Some(1), &args)?.first(),
            };
            let changes = row.get_datum_by_ordinal(1)?.ok_or(pgrx::spi::Error::InvalidPosition)?;
            let mut page = Page {
                // SAFETY: a jsonb the statement built; detoasting keeps it in SPI's memory, which lives
                // until `body` has written what it returns.
                changes: pg_sys::Datum::from(unsafe { pg_sys::pg_detoast_datum(changes.cast_mut_ptr()) }),
                cursor: row.get(2)?.unwrap_or_default(),
                has_more: row.get(3)?.unwrap_or_default(),
                reset: row.get(4)?.unwrap_or_default(),
                digest: None,
                digests: None,
            };
            match &listed {
                Some(_) if indexed => page.digests = row.get::<JsonB>(5)?.map(|digests| digests.0),
                Some(listed) => page.digests = row.get::<String>(5)?.map(|digest| all_tenant_wide(listed, digest)),
                None => page.digest = row.get(5)?,
            }
            Ok(body(page))
        }))
    })
}

/// The digests of a scoped page while no scope is defined: every row is tenant-wide.
fn all_tenant_wide(listed: &[String], digest: String) -> serde_json::Value {
    let empty = || serde_json::Value::from(format!("{:016x}", 0));
    let digests = listed.iter().map(|instance| (instance.clone(), if instance == TENANT_WIDE { digest.clone().into() } else { empty() }));
    serde_json::Value::Object(digests.collect())
}

/// The instances a scoped pull lists, checked, each once, and the tenant-wide instance last.
fn listed_instances(scopes: Vec<String>) -> SyncResult<Vec<String>> {
    if scopes.len() > MAX_PULL_SCOPES {
        return Err(SyncError::InvalidArgument { argument: "scopes", problem: format!("lists {} instances, the limit is {MAX_PULL_SCOPES}", scopes.len()) });
    }
    for (index, instance) in scopes.iter().enumerate() {
        validate_instance(&format!("scopes[{index}]"), instance)?;
    }
    let mut listed: Vec<String> = scopes.into_iter().collect::<BTreeSet<_>>().into_iter().collect();
    listed.push(TENANT_WIDE.to_owned());
    Ok(listed)
}

/// Functions of the `sync_ext` schema.
#[pg_schema]
mod sync_ext {
    use pgrx::prelude::*;

    /// The digest of a tenant's visible rows computed from its snapshots: what `sync_ext.tenants.digest`
    /// keeps up to date on every write (a bigint holding the bits of the unsigned digest). The owner's.
    #[pg_extern(stable, parallel_safe)]
    fn tenant_digest(tenant: &str) -> Result<i64, pgrx::pg_sys::panic::ErrorReport> {
        Ok(super::tenant_digest(tenant)? as i64)
    }
}

fn tenant_digest(tenant: &str) -> SyncResult<u64> {
    as_engine(|_| {
        Spi::connect(|client| {
            let rows = client.select("SELECT model, id, value FROM sync_ext.snapshots WHERE tenant_id = $1 AND NOT deleted", None, &[tenant.into()])?;
            let mut digest = 0u64;
            for row in rows {
                let (model, id, value) = (row.get::<String>(1)?.unwrap_or_default(), row.get::<String>(2)?.unwrap_or_default(), row.get::<JsonB>(3)?);
                let value = value.and_then(|value| value.0.as_object().cloned()).unwrap_or_default();
                digest = digest.wrapping_add(sync_ext_protocol::digest::row_digest(&model, &id, &value));
            }
            Ok(digest)
        })
    })
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;
    use pgrx::JsonB;
    use serde_json::{json, Value};

    use crate::testing::{change, error_of, pull, push};

    fn seqs(page: &Value) -> Vec<i64> {
        page["changes"].as_array().unwrap().iter().map(|c| c["seq"].as_i64().unwrap()).collect()
    }

    #[pg_test]
    fn pages_in_seq_order_with_has_more() {
        let batch: Vec<Value> = (1..=5).map(|n| change(n, &n.to_string(), "insert", "00.000", "a", json!({"n": n}))).collect();
        push("t", Value::from(batch));
        let first = pull("t", 0, 2);
        assert_eq!((seqs(&first), first["cursor"].clone(), first["has_more"].clone()), (vec![1, 2], json!(2), json!(true)));
        let second = pull("t", 2, 2);
        assert_eq!((seqs(&second), second["has_more"].clone()), (vec![3, 4], json!(true)));
        let last = pull("t", 4, 2);
        assert_eq!((seqs(&last), last["cursor"].clone(), last["has_more"].clone()), (vec![5], json!(5), json!(false)));
        let caught_up = pull("t", 5, 2);
        assert_eq!(caught_up, json!({"changes": [], "cursor": 5, "has_more": false, "digest": digest_of_rows("t")}));
        assert!(first.get("digest").is_none() && second.get("digest").is_none(), "only the page that ends at the last seq has it");
        assert_eq!(last["digest"], digest_of_rows("t"));
        let exact = pull("t", 3, 2);
        assert_eq!((seqs(&exact), exact["has_more"].clone()), (vec![4, 5], json!(false)));
        assert_eq!(
            last["changes"][0],
            json!({"seq": 5, "op_id": "00000000-0000-4000-8000-000000000005", "model": "todo", "pk": "5", "op": "insert",
                   "hlc": "2026-01-01T00:00:00.000Z-0000", "actor": "a", "value": {"n": 5}})
        );
    }

    /// The digest of a tenant's visible rows computed from its snapshots, as pulls write it.
    fn digest_of_rows(tenant: &str) -> Value {
        json!(Spi::get_one_with_args::<String>("SELECT lpad(to_hex(sync_ext.tenant_digest($1)), 16, '0')", &[tenant.into()]).unwrap().unwrap())
    }

    #[pg_test]
    fn the_digest_kept_on_every_write_equals_the_one_computed_from_the_rows() {
        let history = [
            json!([change(1, "1", "insert", "00.000", "a", json!({"title": "milk", "n": 1.0})), change(2, "2", "insert", "00.000", "a", json!({"title": "eggs"}))]),
            json!([change(3, "1", "update", "01.000", "b", json!({"n": 2})), change(4, "2", "delete", "01.000", "b", Value::Null)]),
            json!([change(5, "2", "update", "02.000", "c", json!({"title": "eggs again"})), change(6, "1", "update", "00.500", "c", json!({"late": true}))]),
            json!([change(7, "3", "delete", "03.000", "a", Value::Null), change(3, "1", "update", "01.000", "b", json!({"n": 2}))]),
        ];
        for batch in history {
            push("t", batch);
            let kept = Spi::get_one::<bool>("SELECT digest = sync_ext.tenant_digest('t') FROM sync_ext.tenants WHERE tenant_id = 't'").unwrap();
            assert_eq!(kept, Some(true));
        }
        Spi::run("SELECT sync_compact('t', '0 seconds')").unwrap();
        let reset = pull("t", 0, 1000);
        assert_eq!((reset["reset"].clone(), reset["digest"].clone()), (json!(true), digest_of_rows("t")), "a reset's last page has it too");
        assert_ne!(reset["digest"], "0000000000000000");
    }

    /// A history of tasks moving between projects 1 and 2 (and to none), deleted, beside a tenant-wide row.
    fn push_moving_tasks() {
        Spi::run("SELECT sync_define_scope('project', 'task', 'project_id'); SELECT sync_define_scope('owner', 'task', 'owner')").unwrap();
        let task = |n: u32, pk: &str, op: &str, hlc: &str, value: Value| {
            let mut change = change(n, pk, op, hlc, "a", value);
            change["model"] = json!("task");
            change
        };
        push("t", json!([task(1, "1", "insert", "00.000", json!({"project_id": 1, "owner": "ann"})), task(2, "2", "insert", "00.000", json!({"project_id": 2})),
                         change(3, "n", "insert", "00.000", "a", json!({"tenant": "wide"})), task(4, "1", "update", "01.000", json!({"project_id": 2})),
                         task(5, "2", "update", "01.000", json!({"project_id": 1, "title": "moved"})), task(6, "3", "insert", "01.000", json!({"project_id": 1})),
                         task(7, "1", "update", "02.000", json!({"project_id": 1})), task(8, "3", "delete", "02.000", Value::Null),
                         task(9, "2", "update", "02.000", json!({"project_id": null})), change(10, "n", "update", "02.000", "a", json!({"more": 1}))]));
    }

    /// The row a scoped page statement gives for `project:1` from `since`: the page's five columns, and
    /// whether every entry's log row was found where its index entry says.
    fn scoped_page_of(statement: &str, since: i64, max_changes: i32) -> (Value, bool) {
        Spi::connect(|client| {
            let listed = vec!["project:1".to_owned(), String::new()];
            let args = ["t".into(), since.into(), max_changes.into(), (1 << 20).into(), listed.into()];
            let row = client.select(statement, Some(1), &args)?.first();
            let page = json!([row.get::<JsonB>(1)?.map(|changes| changes.0), row.get::<i64>(2)?, row.get::<bool>(3)?, row.get::<bool>(4)?,
                              row.get::<JsonB>(5)?.map(|digests| digests.0)]);
            Ok::<_, pgrx::spi::Error>((page, row.get::<bool>(6)?.unwrap()))
        })
        .unwrap()
    }

    #[pg_test]
    fn the_statements_for_one_instance_answer_as_those_for_any_from_every_cursor() {
        push_moving_tasks();
        let (one, any) = (super::ScopedPages::listing(&["project:1".into(), String::new()]), super::ScopedPages::listing(&[]));
        let mut delivered = 0;
        for since in -11..=11 {
            for max_changes in [1, 2, 1000] {
                let statements = [("log", &one.log_noted, &any.log_noted), ("keyed log", &one.log_keyed, &any.log_keyed), ("reset", &one.reset, &any.reset)];
                for (name, of_one, of_any) in statements {
                    let expected = scoped_page_of(of_any, since, max_changes);
                    assert_eq!(scoped_page_of(of_one, since, max_changes), expected, "{name} page from {since}, at most {max_changes}");
                    delivered += expected.0[0].as_array().map_or(0, Vec::len);
                }
                let (noted, keyed) = (scoped_page_of(&one.log_noted, since, max_changes), scoped_page_of(&one.log_keyed, since, max_changes));
                assert_eq!(noted, keyed, "every log row is where the index says, from {since}, at most {max_changes}");
            }
        }
        assert!(delivered > 50, "the pages held changes ({delivered})");
    }

    #[pg_test]
    fn a_log_row_not_where_its_index_entry_says_is_found_by_its_key() {
        push_moving_tasks();
        let pages = |scopes: &[&str]| -> Vec<Value> { (1..=10).flat_map(|since| [1, 1000].map(|max| crate::testing::pull_scoped("t", since, max, scopes))).collect() };
        let before = (pages(&["project:1"]), pages(&["project:1", "project:2"]));
        // What a rewrite of op_log (VACUUM FULL, a restore) or a rebuild leaves: other rows' places, or none.
        Spi::run("UPDATE sync_ext.scope_log SET log_tid = CASE WHEN seq % 2 = 0 THEN NULL ELSE '(0,1)'::tid END").unwrap();
        let one = super::ScopedPages::listing(&["project:1".into(), String::new()]);
        assert!(!scoped_page_of(&one.log_noted, 1, 1000).1, "the statement reading the noted places misses rows");
        assert_eq!((pages(&["project:1"]), pages(&["project:1", "project:2"])), before, "the pulls give the same pages");
        Spi::run("SELECT sync_compact('t', '1 day')").unwrap();
        assert!(scoped_page_of(&one.log_noted, 1, 1000).1, "compaction notes where the log rows are again");
        assert_eq!((pages(&["project:1"]), pages(&["project:1", "project:2"])), before);
    }

    #[pg_test]
    fn max_pull_changes_caps_a_page() {
        let batch: Vec<Value> = (1..=3).map(|n| change(n, &n.to_string(), "insert", "00.000", "a", json!({}))).collect();
        push("t", Value::from(batch));
        Spi::run("SELECT sync_configure('max_pull_changes', '2')").unwrap();
        let page = pull("t", 0, 1000);
        assert_eq!((seqs(&page), page["has_more"].clone()), (vec![1, 2], json!(true)));
    }

    #[pg_test]
    fn max_pull_bytes_ends_a_page_early_but_a_larger_change_still_comes_alone() {
        let sized = |n: u32, bytes: usize| change(n, &n.to_string(), "insert", "00.000", "a", json!({"blob": "x".repeat(bytes)}));
        push("t", json!([sized(1, 150), sized(2, 150), sized(3, 150), sized(4, 3000), sized(5, 150)]));
        Spi::run("SELECT sync_configure('max_pull_bytes', '1kB')").unwrap();
        let mut pages = Vec::new();
        let mut cursor = 0;
        loop {
            let page = pull("t", cursor, 1000);
            pages.push(seqs(&page));
            cursor = page["cursor"].as_i64().unwrap();
            if page["has_more"] == false {
                break;
            }
        }
        assert_eq!(pages, [vec![1, 2], vec![3], vec![4], vec![5]], "two small changes fit in 1 kB; the large one comes alone");
    }

    #[pg_test]
    fn a_tenant_never_sees_another_tenants_changes() {
        let shared_op_id = change(1, "1", "insert", "00.000", "a", json!({"owner": "acme"}));
        push("acme", json!([shared_op_id]));
        let mut other = change(1, "1", "insert", "00.000", "a", json!({"owner": "globex"}));
        other["value"]["owner"] = json!("globex");
        assert_eq!(push("globex", json!([other]))["results"][0]["status"], "applied", "op_ids are per tenant");
        let acme = pull("acme", 0, 100);
        let globex = pull("globex", 0, 100);
        assert_eq!(acme["changes"].as_array().unwrap().len(), 1);
        assert_eq!(acme["changes"][0]["value"]["owner"], "acme");
        assert_eq!(globex["changes"][0]["value"]["owner"], "globex");
        assert_eq!(pull("initech", 0, 100), json!({"changes": [], "cursor": 0, "has_more": false, "digest": "0000000000000000"}));
    }

    #[pg_test]
    fn bad_pull_arguments_are_errors_naming_the_argument() {
        assert_eq!(error_of("SELECT sync_pull('', 0)"), "22023: tenant: must not be empty");
        assert_eq!(error_of("SELECT sync_pull('t', 0, 0)"), "22023: max_changes: must be 1 or more, got 0");
    }

    #[pg_test]
    fn messagepack_pushes_and_pulls_carry_the_same_structures_as_json() {
        let varied = json!({"int": -9007199254740991i64, "zero": 0, "float": -0.1, "huge": 1e300, "small": 2.5e-8,
                            "text": "é \"quoted\" \\ tab\t 🙂", "empty": {}, "none": [], "nested": {"a": [1, [2, {"b": null}]], "t": true}});
        let changes = json!([change(1, "1", "insert", "00.000", "a", json!({"title": "milk", "n": 1.5, "tags": ["x", null]})),
                             change(2, "1", "delete", "01.000", "b", Value::Null),
                             change(3, "2", "insert", "02.000", "a", varied.clone())]);
        let packed = sync_ext_protocol::msgpack::encode(&changes).unwrap();
        let response = Spi::get_one_with_args::<Vec<u8>>("SELECT sync_push_msgpack('t', $1)", &[packed.into()]).unwrap().unwrap();
        let response: Value = sync_ext_protocol::msgpack::decode(&response).unwrap();
        assert_eq!(response["results"][1], json!({"op_id": "00000000-0000-4000-8000-000000000002", "status": "applied", "seq": 2}));
        let packed_pull = Spi::get_one::<Vec<u8>>("SELECT sync_pull_msgpack('t', 0, 10)").unwrap().unwrap();
        let from_msgpack: Value = sync_ext_protocol::msgpack::decode(&packed_pull).unwrap();
        assert_eq!(from_msgpack, pull("t", 0, 10), "the same body in either encoding");
        assert_eq!(from_msgpack["changes"][2]["value"], varied, "every kind of value, as pushed");
        let json_bytes = Spi::get_one::<i32>("SELECT octet_length(sync_pull('t', 0, 10)::text)").unwrap().unwrap();
        assert!((packed_pull.len() as i32) < json_bytes, "MessagePack is smaller: {} vs {json_bytes} bytes", packed_pull.len());
        assert!(error_of(r"SELECT sync_push_msgpack('t', '\xc1')").starts_with("22P02: changes: not valid MessagePack"));
        assert!(error_of(r"SELECT sync_push_msgpack('t', '\x91a3ff')").starts_with("22P02: changes: not valid MessagePack"), "invalid UTF-8");
    }
}
