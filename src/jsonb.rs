//! jsonb values in and out of the engine with as few conversions as possible: a value built by a
//! query is handed back as is, and Rust values are written to jsonb straight from their JSON text
//! (pgrx's `JsonB` would first copy them into a `serde_json::Value`).

use pgrx::callconv::{BoxRet, FcInfo};
use pgrx::datum::Datum;
use pgrx::prelude::*;

use crate::errors::SyncError;

/// A jsonb datum in the memory context of the calling function.
pub struct JsonbDatum(pg_sys::Datum);

impl JsonbDatum {
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

/// Appends a jsonb datum to a MessagePack writer by walking its binary form: no JSON text, no
/// `serde_json::Value` in between (see [`sync_ext_protocol::msgpack::Writer`]).
pub fn write_msgpack(writer: &mut sync_ext_protocol::msgpack::Writer, datum: pg_sys::Datum) {
    use pg_sys::JsonbIteratorToken::{WJB_BEGIN_ARRAY, WJB_BEGIN_OBJECT, WJB_DONE, WJB_ELEM, WJB_KEY, WJB_VALUE};
    // SAFETY: `datum` is a jsonb (detoasted here); the iterator reads it and the values it yields point
    // into it or into memory palloc'd in the current context, which outlives this call.
    unsafe {
        let jsonb = pg_sys::pg_detoast_datum(datum.cast_mut_ptr()) as *mut pg_sys::Jsonb;
        let mut iterator = pg_sys::JsonbIteratorInit(&mut (*jsonb).root);
        let mut value = std::mem::MaybeUninit::<pg_sys::JsonbValue>::zeroed().assume_init();
        loop {
            match pg_sys::JsonbIteratorNext(&mut iterator, &mut value, false) {
                WJB_DONE => break,
                WJB_BEGIN_ARRAY if !value.val.array.rawScalar => writer.array(value.val.array.nElems as u32),
                WJB_BEGIN_OBJECT => writer.map(value.val.object.nPairs as u32),
                WJB_KEY | WJB_VALUE | WJB_ELEM => write_scalar(writer, &value),
                _ => {} // the end of a container, or the wrapper of a raw scalar
            }
        }
    }
}

/// A member of an object built by [`JsonbDatum::object`].
pub enum Member {
    /// A jsonb datum (detoasted), placed by copying its binary form.
    Jsonb(pg_sys::Datum),
    Int(i64),
    Bool(bool),
    Text(String),
}

impl JsonbDatum {
    /// A jsonb object of `members` (distinct keys), assembled in jsonb's binary form, where
    /// `jsonb_build_object` would walk and rebuild every nested value: a pull page's changes are copied
    /// into its body whole. The layout is Postgres's (`convertJsonbObject`): keys sorted by length, then
    /// bytes; the keys' entries, then the values'; each entry holds its length (the first an end
    /// offset); numbers and containers start on 4-byte boundaries, their padding counted in their length.
    /// Call it over an SPI connection: the object is allocated in the calling function's memory.
    pub fn object(mut members: Vec<(&str, Member)>) -> Self {
        members.sort_by(|(a, _), (b, _)| a.len().cmp(&b.len()).then_with(|| a.as_bytes().cmp(b.as_bytes())));
        let count = members.len();
        let mut buffer: Vec<u8> = vec![0; 4]; // the varlena header, set last
        buffer.extend_from_slice(&(count as u32 | pg_sys::JB_FOBJECT).to_ne_bytes());
        let entries_at = buffer.len();
        buffer.resize(entries_at + 8 * count, 0);
        let mut entries = Vec::with_capacity(2 * count);
        for (key, _) in &members {
            buffer.extend_from_slice(key.as_bytes());
            entries.push(pg_sys::JENTRY_ISSTRING | key.len() as u32);
        }
        for (_, member) in &members {
            let start = buffer.len();
            let kind = match member {
                Member::Bool(true) => pg_sys::JENTRY_ISBOOL_TRUE,
                Member::Bool(false) => pg_sys::JENTRY_ISBOOL_FALSE,
                Member::Text(text) => {
                    buffer.extend_from_slice(text.as_bytes());
                    pg_sys::JENTRY_ISSTRING
                }
                Member::Int(number) => {
                    // SAFETY: int8_numeric returns a palloc'd numeric varlena with a 4-byte header.
                    let numeric = unsafe {
                        pgrx::fcinfo::direct_function_call_as_datum(pg_sys::int8_numeric, &[number.into_datum()]).expect("a numeric")
                    };
                    pad_to_int(&mut buffer);
                    // SAFETY: as above.
                    buffer.extend_from_slice(unsafe { varlena_bytes(numeric, false) });
                    pg_sys::JENTRY_ISNUMERIC
                }
                Member::Jsonb(datum) => {
                    pad_to_int(&mut buffer);
                    // SAFETY: a detoasted jsonb: its data after the header is its root container.
                    buffer.extend_from_slice(unsafe { varlena_bytes(*datum, true) });
                    pg_sys::JENTRY_ISCONTAINER
                }
            };
            entries.push(kind | (buffer.len() - start) as u32);
        }
        // Every 32nd entry (the first included) holds the end offset of its data instead of its length.
        let mut end = 0;
        for (index, entry) in entries.iter_mut().enumerate() {
            end += *entry & pg_sys::JENTRY_OFFLENMASK;
            if index % pg_sys::JB_OFFSET_STRIDE as usize == 0 {
                *entry = (*entry & pg_sys::JENTRY_TYPEMASK) | end | pg_sys::JENTRY_HAS_OFF;
            }
        }
        for (index, entry) in entries.iter().enumerate() {
            buffer[entries_at + 4 * index..entries_at + 4 * index + 4].copy_from_slice(&entry.to_ne_bytes());
        }
        // SAFETY: a copy of the assembled bytes with its 4-byte varlena header set, in the memory of the
        // calling function (SPI_palloc: the context that was current when SPI connected).
        unsafe {
            let datum = pg_sys::SPI_palloc(buffer.len()) as *mut u8;
            std::ptr::copy_nonoverlapping(buffer.as_ptr(), datum, buffer.len());
            pgrx::set_varsize_4b(datum.cast(), buffer.len() as i32);
            JsonbDatum(pg_sys::Datum::from(datum))
        }
    }
}

/// Pads a jsonb buffer with zero bytes to a 4-byte boundary.
fn pad_to_int(buffer: &mut Vec<u8>) {
    buffer.resize(buffer.len().next_multiple_of(4), 0);
}

/// The bytes of a varlena with a 4-byte header: all of them, or (`data_only`) those after the header.
///
/// # Safety
/// `datum` points to a detoasted varlena with a 4-byte header that outlives the returned slice.
unsafe fn varlena_bytes<'a>(datum: pg_sys::Datum, data_only: bool) -> &'a [u8] {
    let pointer = datum.cast_mut_ptr::<pg_sys::varlena>();
    let size = pgrx::varsize_any(pointer);
    let skip = if data_only { pg_sys::VARHDRSZ } else { 0 };
    std::slice::from_raw_parts((pointer as *const u8).add(skip), size - skip)
}

/// Writes one scalar jsonb value.
///
/// # Safety
/// `value` is a scalar the jsonb iterator yielded.
unsafe fn write_scalar(writer: &mut sync_ext_protocol::msgpack::Writer, value: &pg_sys::JsonbValue) {
    match value.type_ {
        pg_sys::jbvType::jbvString => {
            let text = std::slice::from_raw_parts(value.val.string.val as *const u8, value.val.string.len as usize);
            writer.str(std::str::from_utf8(text).expect("jsonb strings are UTF-8"));
        }
        pg_sys::jbvType::jbvNumeric => {
            let text = pgrx::fcinfo::direct_function_call::<&std::ffi::CStr>(pg_sys::numeric_out, &[Some(pg_sys::Datum::from(value.val.numeric))])
                .expect("numeric_out returns text");
            writer.number(text.to_str().expect("numbers are ASCII")).expect("a jsonb number is a JSON number");
        }
        pg_sys::jbvType::jbvBool => writer.bool(value.val.boolean),
        _ => writer.null(),
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    use super::{JsonbDatum, Member};

    #[pg_test]
    fn objects_assembled_in_binary_are_those_jsonb_build_object_makes() {
        // A nested array long enough for offsets every 32 entries, with numbers, strings, nulls and objects.
        let nested = "(SELECT jsonb_agg(jsonb_build_object('n', n, 'half', n / 2.0, 'text', repeat('é', n % 7), 'none', NULL,
                                                       'list', jsonb_build_array(n, true, 'x')))
                         FROM generate_series(1, 70) AS n)";
        let cases = [(0, false, false, None), (-12, true, true, None), (9_007_199_254_740_993, false, true, Some("00ff00ff00ff00ff")), (7, false, false, Some("0123456789abcdef"))];
        Spi::connect(|client| {
            let changes = client.select(&format!("SELECT {nested}"), Some(1), &[]).unwrap().first().get_datum_by_ordinal(1).unwrap().unwrap();
            for (cursor, has_more, reset, digest) in cases {
                let mut members = vec![("changes", Member::Jsonb(changes)), ("cursor", Member::Int(cursor)), ("has_more", Member::Bool(has_more))];
                let mut expected = format!("jsonb_build_object('changes', {nested}, 'cursor', {cursor}::bigint, 'has_more', {has_more}");
                if reset {
                    members.push(("reset", Member::Bool(true)));
                    expected.push_str(", 'reset', true");
                }
                if let Some(digest) = digest {
                    members.push(("digest", Member::Text(digest.to_owned())));
                    expected.push_str(&format!(", 'digest', '{digest}'"));
                }
                expected.push(')');
                let built = JsonbDatum::object(members);
                // SAFETY: a jsonb datum, alive until the end of the test function.
                let argument = unsafe { pgrx::datum::DatumWithOid::new(built.0, pg_sys::JSONBOID) };
                let row = client.select(&format!("SELECT $1::text, ({expected})::text, $1 = ({expected})"), Some(1), &[argument]).unwrap().first();
                assert_eq!(row.get::<String>(1).unwrap(), row.get::<String>(2).unwrap());
                assert_eq!(row.get::<bool>(3).unwrap(), Some(true), "jsonb's = agrees");
            }
        });
    }
}
