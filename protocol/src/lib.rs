//! The sync_ext wire contract, shared by the Postgres extension and its clients so that both
//! always agree on a merge.
//!
//! - [`hlc`]: hybrid logical clock stamps and their fixed-width text form;
//! - [`change`]: changes as pushed, their validation and their canonical payload hash;
//! - [`conformance`]: the shared protocol cases every implementation runs;
//! - [`digest`]: the order-independent digest of a tenant's visible rows;
//! - [`numbers`]: JSON numbers carried exactly or refused, and their canonical form;
//! - [`merge`]: the last-writer-wins rule over per-row registers;
//! - [`stored`]: the flat form in which a row's merge state is stored;
//! - [`portable`]: portable JSON forms of Postgres values (timestamps, intervals, bytes, exact numbers);
//! - [`scope`]: which scope instances a row belongs to (partial sync);
//! - [`batch`]: the outcome of a whole pushed batch;
//! - [`wire`]: push results and pull bodies, and [`msgpack`] for their MessagePack form.

#[cfg(feature = "arbitrary")]
pub mod arbitrary;
pub mod batch;
pub mod calendar;
pub mod change;
pub mod conformance;
pub mod digest;
pub mod hlc;
pub mod merge;
pub mod msgpack;
pub mod numbers;
pub mod portable;
pub mod scope;
pub mod stored;
pub mod wire;

pub use batch::{merge_all, merge_batch, BatchContext, BatchOutcome, LoggedOp, RowKey};
pub use change::{parse_changes, validate_tenant, Change, Op, ParsedBatch, WireError, WireErrorKind};
pub use hlc::{Hlc, HlcClock};
pub use merge::{Existence, FieldRegister, RowState, Stamp, Won};
pub use stored::StoredRow;
pub use wire::{ChangeResult, PullResponse, PulledChange, PushResponse, Status};
