//! jsonb values in and out of the engine with as few conversions as possible: a value built by a
//! query is handed back as is, and Rust values are written to jsonb straight from their JSON text
//! (pgrx's `JsonB` would first copy them into a `serde_json::Value`).

use pgrx::callconv::{BoxRet, FcInfo};
use pgrx::datum::Datum;
use pgrx::prelude::*;

use serde_json::Value;

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

/// A JSON object as an SPI argument, lent or owned, written as jsonb without JSON text.
pub struct JsonbObject<'a>(pub std::borrow::Cow<'a, serde_json::Map<String, serde_json::Value>>);

impl IntoDatum for JsonbObject<'_> {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        Some(object_datum(&self.0))
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::JSONBOID
    }
}

/// Read from an SPI result, the datum stays in SPI's memory: use it before the connection ends.
impl FromDatum for JsonbDatum {
    unsafe fn from_polymorphic_datum(datum: pg_sys::Datum, is_null: bool, _type_oid: pg_sys::Oid) -> Option<Self> {
        (!is_null).then_some(JsonbDatum(datum))
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
        // Read from the binary form; input it refuses is read again from its text, whose checks name
        // the place of the problem.
        if let Ok(value) = value_from_jsonb(self.0 .0, Checks::Input) {
            return Ok(value);
        }
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

impl JsonbDatum {
    /// The JSON value, read by walking the binary form (no JSON text in between). Numbers are read from
    /// their numeric's text as `serde_json` reads JSON text; one it cannot hold is an error.
    pub fn value(&self) -> Result<Value, String> {
        value_from_jsonb(self.0, Checks::None)
    }
}

/// What reading a jsonb also checks.
#[derive(Clone, Copy, PartialEq)]
enum Checks {
    None,
    /// Fails at a number not carried exactly ([`sync_ext_protocol::numbers::is_exact`]) or at nesting
    /// near [`sync_ext_protocol::numbers::MAX_JSON_DEPTH`] (stricter than the text check, never laxer).
    Input,
}

fn value_from_jsonb(datum: pg_sys::Datum, checks: Checks) -> Result<Value, String> {
    use pg_sys::JsonbIteratorToken::{WJB_BEGIN_ARRAY, WJB_BEGIN_OBJECT, WJB_DONE, WJB_END_ARRAY, WJB_END_OBJECT, WJB_KEY};
    /// A container being read, and the key its next value goes under (objects).
    enum Open {
        Array(Vec<Value>),
        Object(serde_json::Map<String, Value>, String),
    }
    let mut open: Vec<Open> = Vec::new();
    let mut done = None;
    // SAFETY: as in `write_msgpack`.
    unsafe {
        let jsonb = pg_sys::pg_detoast_datum(datum.cast_mut_ptr()) as *mut pg_sys::Jsonb;
        let mut iterator = pg_sys::JsonbIteratorInit(&mut (*jsonb).root);
        let mut token = std::mem::MaybeUninit::<pg_sys::JsonbValue>::zeroed().assume_init();
        loop {
            let finished = match pg_sys::JsonbIteratorNext(&mut iterator, &mut token, false) {
                WJB_DONE => break,
                WJB_BEGIN_ARRAY | WJB_BEGIN_OBJECT if checks == Checks::Input && open.len() + 2 >= sync_ext_protocol::numbers::MAX_JSON_DEPTH => {
                    return Err("nested too deep".to_owned());
                }
                WJB_BEGIN_ARRAY => {
                    open.push(Open::Array(Vec::with_capacity(token.val.array.nElems.max(0) as usize)));
                    None
                }
                WJB_BEGIN_OBJECT => {
                    open.push(Open::Object(serde_json::Map::new(), String::new()));
                    None
                }
                WJB_KEY => {
                    if let Some(Open::Object(_, key)) = open.last_mut() {
                        *key = string_of(&token).to_owned();
                    }
                    None
                }
                WJB_END_ARRAY | WJB_END_OBJECT => match open.pop() {
                    // A raw scalar is stored as a one-element array flagged as a scalar.
                    Some(Open::Array(mut elements)) if token.val.array.rawScalar && open.is_empty() && elements.len() == 1 => elements.pop(),
                    Some(Open::Array(elements)) => Some(Value::Array(elements)),
                    Some(Open::Object(object, _)) => Some(Value::Object(object)),
                    None => None,
                },
                _ => Some(scalar_value(&token, checks)?),
            };
            if let Some(value) = finished {
                match open.last_mut() {
                    Some(Open::Array(elements)) => elements.push(value),
                    Some(Open::Object(object, key)) => {
                        object.insert(std::mem::take(key), value);
                    }
                    None => done = Some(value),
                }
            }
        }
    }
    done.ok_or_else(|| "an empty jsonb".to_owned())
}

/// The text of a jsonb string.
///
/// # Safety
/// `value` is a string the jsonb iterator yielded.
unsafe fn string_of(value: &pg_sys::JsonbValue) -> &str {
    let bytes = std::slice::from_raw_parts(value.val.string.val as *const u8, value.val.string.len as usize);
    std::str::from_utf8(bytes).expect("jsonb strings are UTF-8")
}

/// The text of a jsonb number, as `numeric_out` writes it.
///
/// # Safety
/// `value` is a number the jsonb iterator yielded.
unsafe fn numeric_text(value: &pg_sys::JsonbValue) -> &'static std::ffi::CStr {
    pgrx::fcinfo::direct_function_call::<&std::ffi::CStr>(pg_sys::numeric_out, &[Some(pg_sys::Datum::from(value.val.numeric))])
        .expect("numeric_out returns text")
}

/// One scalar jsonb value as a JSON value.
///
/// # Safety
/// `value` is a scalar the jsonb iterator yielded.
unsafe fn scalar_value(value: &pg_sys::JsonbValue, checks: Checks) -> Result<Value, String> {
    Ok(match value.type_ {
        pg_sys::jbvType::jbvString => Value::String(string_of(value).to_owned()),
        pg_sys::jbvType::jbvNumeric => {
            let text = numeric_text(value).to_str().expect("numbers are ASCII");
            if checks == Checks::Input && !sync_ext_protocol::numbers::is_exact(text) {
                return Err(format!("number {text} is not carried exactly"));
            }
            Value::Number(text.parse().map_err(|error| format!("number {text}: {error}"))?)
        }
        pg_sys::jbvType::jbvBool => Value::Bool(value.val.boolean),
        _ => Value::Null,
    })
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

/// A member of an object built by [`JsonbDatum::object`], or a value written by [`jsonb_from_value`].
pub enum Member<'a> {
    /// A jsonb datum (detoasted), placed by copying its binary form.
    Jsonb(pg_sys::Datum),
    Int(i64),
    Bool(bool),
    Text(String),
    /// A JSON value, written as `jsonb_in` would store its text.
    Json(&'a Value),
}

impl JsonbDatum {
    /// A jsonb object of `members` (distinct keys), built in jsonb's binary form: a nested jsonb is copied
    /// whole where `jsonb_build_object` would walk and rebuild it (a pull page's changes into its body).
    /// Call it over an SPI connection: the object is allocated in the calling function's memory.
    pub fn object(members: Vec<(&str, Member)>) -> Self {
        // SAFETY: SPI_palloc allocates in the context that was current when SPI connected.
        JsonbDatum(assemble(|buffer| write_object(buffer, members), |size| unsafe { pg_sys::SPI_palloc(size) }))
    }
}

/// A JSON object as jsonb, in the current memory context (see [`jsonb_from_value`]).
fn object_datum(object: &serde_json::Map<String, Value>) -> pg_sys::Datum {
    let members = object.iter().map(|(key, value)| (key.as_str(), Member::Json(value))).collect();
    // SAFETY: palloc in the current memory context.
    assemble(|buffer| write_object(buffer, members), |size| unsafe { pg_sys::palloc(size) })
}

/// A JSON value as jsonb, in the current memory context: what `jsonb_in` makes of its text, without
/// writing and parsing the text.
pub fn jsonb_from_value(value: &Value) -> pg_sys::Datum {
    // SAFETY: palloc in the current memory context.
    assemble(
        |buffer| match value {
            Value::Object(_) | Value::Array(_) => write_member(buffer, Member::Json(value)),
            // A scalar is stored as a one-element array flagged as a scalar.
            scalar => write_container(buffer, pg_sys::JB_FARRAY | pg_sys::JB_FSCALAR, vec![Member::Json(scalar)], Vec::new()),
        },
        |size| unsafe { pg_sys::palloc(size) },
    )
}

/// A jsonb datum in memory from `allocate`: its varlena header, then the root container `write_root`
/// writes (its entry, which a root does not store, is dropped).
fn assemble(write_root: impl FnOnce(&mut Vec<u8>) -> u32, allocate: impl FnOnce(usize) -> *mut std::ffi::c_void) -> pg_sys::Datum {
    let mut buffer: Vec<u8> = vec![0; pg_sys::VARHDRSZ]; // the varlena header, set last
    write_root(&mut buffer);
    // SAFETY: a copy of the assembled bytes with its 4-byte varlena header set.
    unsafe {
        let datum = allocate(buffer.len()) as *mut u8;
        std::ptr::copy_nonoverlapping(buffer.as_ptr(), datum, buffer.len());
        pgrx::set_varsize_4b(datum.cast(), buffer.len() as i32);
        pg_sys::Datum::from(datum)
    }
}

/// Appends an object container; returns its entry. Keys are sorted as jsonb sorts them: by length,
/// then bytes.
fn write_object(buffer: &mut Vec<u8>, mut members: Vec<(&str, Member)>) -> u32 {
    members.sort_by(|(a, _), (b, _)| a.len().cmp(&b.len()).then_with(|| a.as_bytes().cmp(b.as_bytes())));
    let (keys, values): (Vec<&str>, Vec<Member>) = members.into_iter().unzip();
    write_container(buffer, pg_sys::JB_FOBJECT, values, keys)
}

/// Appends a container in Postgres's layout (`convertJsonbArray` / `convertJsonbObject`), 4-byte
/// aligned: a header (count and kind), an entry per key and then per value, the keys' bytes, the
/// values' bytes. Each entry holds its data's length (a number or container counting the padding that
/// aligns it), every 32nd (the first included) the end offset instead. Returns its entry.
fn write_container(buffer: &mut Vec<u8>, kind: u32, values: Vec<Member>, keys: Vec<&str>) -> u32 {
    let start = buffer.len();
    pad_to_int(buffer);
    buffer.extend_from_slice(&(values.len() as u32 | kind).to_ne_bytes());
    let entries_at = buffer.len();
    buffer.resize(entries_at + 4 * (keys.len() + values.len()), 0);
    let mut entries = Vec::with_capacity(keys.len() + values.len());
    for key in keys {
        buffer.extend_from_slice(key.as_bytes());
        entries.push(pg_sys::JENTRY_ISSTRING | key.len() as u32);
    }
    for value in values {
        entries.push(write_member(buffer, value));
    }
    let mut end = 0;
    for (index, entry) in entries.iter_mut().enumerate() {
        end += *entry & pg_sys::JENTRY_OFFLENMASK;
        if index % pg_sys::JB_OFFSET_STRIDE as usize == 0 {
            *entry = (*entry & pg_sys::JENTRY_TYPEMASK) | end | pg_sys::JENTRY_HAS_OFF;
        }
        let at = entries_at + 4 * index;
        buffer[at..at + 4].copy_from_slice(&entry.to_ne_bytes());
    }
    pg_sys::JENTRY_ISCONTAINER | (buffer.len() - start) as u32
}

/// Appends one value's data; returns its entry.
fn write_member(buffer: &mut Vec<u8>, member: Member) -> u32 {
    let start = buffer.len();
    let kind = match member {
        Member::Bool(true) | Member::Json(Value::Bool(true)) => pg_sys::JENTRY_ISBOOL_TRUE,
        Member::Bool(false) | Member::Json(Value::Bool(false)) => pg_sys::JENTRY_ISBOOL_FALSE,
        Member::Json(Value::Null) => pg_sys::JENTRY_ISNULL,
        Member::Text(text) => {
            buffer.extend_from_slice(text.as_bytes());
            pg_sys::JENTRY_ISSTRING
        }
        Member::Json(Value::String(text)) => {
            buffer.extend_from_slice(text.as_bytes());
            pg_sys::JENTRY_ISSTRING
        }
        Member::Int(number) => write_numeric(buffer, &number.to_string()),
        Member::Json(Value::Number(number)) => write_numeric(buffer, &number.to_string()),
        Member::Jsonb(datum) => {
            pad_to_int(buffer);
            // SAFETY: a detoasted jsonb: its data after the header is its root container.
            buffer.extend_from_slice(unsafe { varlena_bytes(datum, true) });
            pg_sys::JENTRY_ISCONTAINER
        }
        Member::Json(Value::Array(elements)) => return write_container(buffer, pg_sys::JB_FARRAY, elements.iter().map(Member::Json).collect(), Vec::new()),
        Member::Json(Value::Object(object)) => {
            return write_object(buffer, object.iter().map(|(key, value)| (key.as_str(), Member::Json(value))).collect());
        }
    };
    kind | (buffer.len() - start) as u32
}

/// Appends a number, 4-byte aligned, as the numeric `numeric_in` reads from its JSON text.
fn write_numeric(buffer: &mut Vec<u8>, text: &str) -> u32 {
    let text = std::ffi::CString::new(text).expect("a number's text holds no NUL");
    // SAFETY: numeric_in reads a C string (typmod -1: as written) and returns a palloc'd numeric.
    let numeric = unsafe {
        pgrx::fcinfo::direct_function_call_as_datum(
            pg_sys::numeric_in,
            &[text.as_c_str().into_datum(), pg_sys::InvalidOid.into_datum(), (-1i32).into_datum()],
        )
        .expect("a JSON number is a numeric")
    };
    pad_to_int(buffer);
    // SAFETY: as above; a numeric varlena from numeric_in has a 4-byte header.
    buffer.extend_from_slice(unsafe { varlena_bytes(numeric, false) });
    pg_sys::JENTRY_ISNUMERIC
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
        pg_sys::jbvType::jbvString => writer.str(string_of(value)),
        pg_sys::jbvType::jbvNumeric => writer.number(numeric_text(value).to_str().expect("numbers are ASCII")).expect("a jsonb number is a JSON number"),
        pg_sys::jbvType::jbvBool => writer.bool(value.val.boolean),
        _ => writer.null(),
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    use super::{JsonbDatum, Member};

    /// A pseudo-random JSON value of nesting `depth` at most, from `seed` (a linear congruential generator).
    fn value(seed: &mut u64, depth: u32) -> serde_json::Value {
        let mut next = |bound: u64| {
            *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (*seed >> 33) % bound
        };
        let numbers = ["0", "-0.0", "1", "-7", "2.50", "0.1", "1e300", "-2.5e-8", "18446744073709551615", "-9223372036854775808", "123456789.987654321"];
        let strings = ["", "a", "é", "ab\"c\\d\te", "🙂🙂", "a longer string of text, with spaces"];
        match if depth == 0 { next(4) } else { next(6) } {
            0 => serde_json::Value::Null,
            1 => serde_json::Value::Bool(next(2) == 1),
            2 => serde_json::from_str(numbers[next(numbers.len() as u64) as usize]).unwrap(),
            3 => serde_json::Value::String(strings[next(strings.len() as u64) as usize].repeat(1 + next(3) as usize)),
            4 => serde_json::Value::Array((0..next(40)).map(|_| value(seed, depth - 1)).collect()),
            _ => serde_json::Value::Object((0..next(40)).map(|n| (format!("{}{n}", "k".repeat(1 + (n as usize * 7) % 5)), value(seed, depth - 1))).collect()),
        }
    }

    #[pg_test]
    fn json_values_written_as_jsonb_are_what_jsonb_in_makes_of_their_text_and_read_back_as_its_text_reads() {
        let mut seed = 42;
        for case in 0..300 {
            let value = value(&mut seed, 3);
            let text = serde_json::to_string(&value).unwrap();
            let datum = super::jsonb_from_value(&value);
            // SAFETY: a jsonb datum in the current memory context, alive for the statement.
            let written = unsafe { pgrx::datum::DatumWithOid::new(datum, pg_sys::JSONBOID) };
            let same = Spi::get_two_with_args::<bool, bool>(
                "SELECT $1::text = $2::jsonb::text AND $1 = $2::jsonb, pg_column_size($1) = pg_column_size($2::jsonb)",
                &[written, text.as_str().into()],
            )
            .unwrap();
            assert_eq!(same, (Some(true), Some(true)), "case {case}: {text}");
            // Read back by walking it: what serde_json reads from jsonb's own text.
            let out = Spi::get_one_with_args::<String>("SELECT $1::text", &[unsafe { pgrx::datum::DatumWithOid::new(datum, pg_sys::JSONBOID) }]).unwrap().unwrap();
            assert_eq!(JsonbDatum(datum).value(), Ok(serde_json::from_str::<serde_json::Value>(&out).unwrap()), "case {case} read back: {out}");
            // As a push's input: taken exactly when the text's checks pass, refused (and read again from the
            // text) when they fail.
            let taken = super::value_from_jsonb(datum, super::Checks::Input).ok();
            let text_passes = sync_ext_protocol::numbers::check_json_numbers(&out, "changes").is_ok();
            assert_eq!(taken, text_passes.then(|| serde_json::from_str(&out).unwrap()), "case {case} as input: {out}");
        }
    }

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
