//! jsonb values in and out of the engine with as few conversions as possible: a value built by a
//! query is handed back as is, and Rust values are written to jsonb straight from their JSON text
//! (pgrx's `JsonB` would first copy them into a `serde_json::Value`).

use pgrx::callconv::{BoxRet, FcInfo};
use pgrx::datum::Datum;
use pgrx::prelude::*;
use pgrx::spi::SpiTupleTable;

use crate::errors::SyncError;

/// A jsonb datum in the memory context of the calling function.
pub struct JsonbDatum(pg_sys::Datum);

impl JsonbDatum {
    /// Takes the first column of the first row of an SPI result (which must be a non-null jsonb)
    /// and copies it out of SPI's memory, so it outlives the SPI connection.
    pub fn take_first(table: SpiTupleTable<'_>) -> Result<Self, pgrx::spi::Error> {
        let datum = table.first().get_datum_by_ordinal(1)?.ok_or(pgrx::spi::Error::InvalidPosition)?;
        // SAFETY: jsonb is a varlena (by reference, length -1); SPI_datumTransfer copies it into the
        // context that was current at SPI_connect, the calling function's.
        Ok(Self(unsafe { pg_sys::SPI_datumTransfer(datum, false, -1) }))
    }

    /// Writes a value as jsonb, through its JSON text.
    pub fn from_serialize(value: &impl serde::Serialize) -> Self {
        Self(jsonb_from_text(serde_json::to_string(value).expect("values serialize to JSON")))
    }
}

/// Parses JSON text (as serde_json writes it, so free of NUL bytes) into a jsonb datum.
fn jsonb_from_text(text: String) -> pg_sys::Datum {
    let text = std::ffi::CString::new(text).expect("JSON text holds no NUL byte");
    // SAFETY: jsonb_in reads a C string and returns a palloc'd jsonb in the current memory context.
    unsafe { pgrx::fcinfo::direct_function_call_as_datum(pg_sys::jsonb_in, &[text.as_c_str().into_datum()]) }.expect("jsonb_in returns a value")
}

/// A JSON object lent to an SPI argument, written as jsonb without being copied first.
pub struct JsonbObject<'a>(pub &'a serde_json::Map<String, serde_json::Value>);

impl IntoDatum for JsonbObject<'_> {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        Some(jsonb_from_text(serde_json::to_string(self.0).expect("objects serialize to JSON")))
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::JSONBOID
    }
}

impl IntoDatum for JsonbDatum {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        Some(self.0)
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::JSONBOID
    }
}

// SAFETY: the datum is a jsonb allocated in the caller's memory context.
unsafe impl BoxRet for JsonbDatum {
    unsafe fn box_into<'fcx>(self, fcinfo: &mut FcInfo<'fcx>) -> Datum<'fcx> {
        unsafe { fcinfo.return_raw_datum(self.0) }
    }
}

pgrx::impl_sql_translatable!(JsonbDatum, "jsonb");

/// A varlena argument (a push's body) taken as its datum, so that its size can be checked before any
/// work is spent on reading it.
pub struct Body(pg_sys::Datum);

impl Body {
    /// Fails with 54000 when the body is over `max` bytes (its size in memory, before any parsing).
    pub fn check_size(&self, argument: &'static str, max: i32) -> Result<(), SyncError> {
        // SAFETY: the datum is a non-null varlena argument; this reads its header (or its TOAST pointer).
        let size = unsafe { pg_sys::toast_raw_datum_size(self.0) };
        if size > usize::try_from(max).unwrap_or(0) {
            return Err(SyncError::BodyTooLarge { argument, size, max });
        }
        Ok(())
    }
}

/// Declares a newtype of [`Body`] as a function argument of SQL type `$sql`.
macro_rules! body_argument {
    ($name:ident, $sql:literal) => {
        #[doc = concat!("A ", $sql, " argument taken as a [`Body`].")]
        pub struct $name(pub Body);

        impl FromDatum for $name {
            unsafe fn from_polymorphic_datum(datum: pg_sys::Datum, is_null: bool, _: pg_sys::Oid) -> Option<Self> {
                (!is_null).then(|| $name(Body(datum)))
            }
        }

        // SAFETY: unboxed through FromDatum, as pgrx does for its own argument types.
        unsafe impl<'fcx> pgrx::callconv::ArgAbi<'fcx> for $name {
            unsafe fn unbox_arg_unchecked(arg: pgrx::callconv::Arg<'_, 'fcx>) -> Self {
                unsafe { arg.unbox_arg_using_from_datum().expect(concat!("a non-null ", $sql, " argument")) }
            }
        }

        pgrx::impl_sql_translatable!($name, $sql);
    };
}

body_argument!(JsonbBody, "jsonb");
body_argument!(ByteaBody, "bytea");

impl JsonbBody {
    /// Parses the JSON; input that cannot be carried exactly (nesting deeper than `MAX_JSON_DEPTH` levels, a number
    /// no double or 64-bit integer holds: see [`sync_ext_protocol::numbers`]) is an error naming `argument`.
    pub fn parse(&self, argument: &'static str) -> Result<serde_json::Value, SyncError> {
        // SAFETY: the datum is a jsonb (the function is declared with a jsonb argument); jsonb_out
        // returns a palloc'd C string.
        let text = unsafe { pgrx::fcinfo::direct_function_call::<&std::ffi::CStr>(pg_sys::jsonb_out, &[Some(self.0 .0)]) };
        let text = text.map(|text| text.to_string_lossy()).unwrap_or_default();
        sync_ext_protocol::numbers::check_json_numbers(&text, argument)?;
        serde_json::from_str(&text).map_err(|error| SyncError::InvalidArgument { argument, problem: format!("cannot be read: {error}") })
    }
}

impl ByteaBody {
    /// The bytes, detoasted.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the datum is a non-null bytea; the slice lives in the function's memory context.
        unsafe { <&[u8]>::from_datum(self.0 .0, false) }.unwrap_or_default()
    }
}
