//! A jsonb value built by a query and handed back to the caller as is, without re-parsing it.

use pgrx::callconv::{BoxRet, FcInfo};
use pgrx::datum::Datum;
use pgrx::prelude::*;
use pgrx::spi::SpiTupleTable;

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
