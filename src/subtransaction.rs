//! Running a step in a subtransaction, so one failing change can be refused without failing the batch.

use pgrx::pg_sys;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::PgTryBuilder;

/// What Postgres said when a step failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepError {
    pub sqlstate: String,
    pub message: String,
}

/// Whether an error is a problem of the data one step wrote (a value, a constraint, a privilege, a
/// refusal raised by a trigger), which refuses that change alone. Anything else (a cancel or timeout,
/// a deadlock or serialization failure, running out of memory, a shutdown, an internal error) is an
/// error of the whole call.
fn is_data_problem(sqlstate: &str) -> bool {
    matches!(sqlstate.get(..2), Some("22" | "23")) || matches!(sqlstate, "42501" | "44000" | "54000" | "P0001")
}

/// Runs `step` in a subtransaction: its effects stay when it returns, and are undone when it raises
/// a Postgres error about the data it wrote, which is returned instead (as a plpgsql EXCEPTION block
/// does). Every other error, and a Rust panic (a bug), propagates: it aborts the statement.
pub fn in_subtransaction<T>(step: impl FnOnce() -> T) -> Result<T, StepError> {
    // SAFETY: the standard internal-subtransaction protocol; memory context and resource owner are
    // restored on both paths, as plpgsql's exception handling does.
    unsafe {
        let memory = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(memory);
        let restore = move || {
            pg_sys::MemoryContextSwitchTo(memory);
            pg_sys::CurrentResourceOwner = owner;
        };
        let step = std::panic::AssertUnwindSafe(step);
        PgTryBuilder::new(move || {
            let value = step();
            pg_sys::ReleaseCurrentSubTransaction();
            restore();
            Ok(value)
        })
        .catch_others(|caught| {
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
            restore();
            match caught {
                CaughtError::PostgresError(ref report) | CaughtError::ErrorReport(ref report)
                    if is_data_problem(&crate::models::sqlstate_text(report.sql_error_code() as i32)) =>
                {
                    Err(StepError {
                        sqlstate: crate::models::sqlstate_text(report.sql_error_code() as i32),
                        message: report.message().to_owned(),
                    })
                }
                other => other.rethrow(),
            }
        })
        .execute()
    }
}
