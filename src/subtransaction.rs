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

/// Runs `step` in a subtransaction: its effects stay when it returns, and are undone when it raises
/// a Postgres error, which is returned instead (as a plpgsql EXCEPTION block does). A Rust panic
/// (a bug) is not caught: it aborts the statement.
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
                CaughtError::PostgresError(report) | CaughtError::ErrorReport(report) => Err(StepError {
                    sqlstate: crate::models::sqlstate_text(report.sql_error_code() as i32),
                    message: report.message().to_owned(),
                }),
                panic @ CaughtError::RustPanic { .. } => panic.rethrow(),
            }
        })
        .execute()
    }
}
