//! Lossless mapping between Postgres values and portable JSON.
//!
//! A [`Codec`] is resolved once per type (recursively for arrays, composites and domains) and then
//! converts datums both ways. Scalars that JSON cannot carry exactly use the forms in
//! `sync_ext_protocol::portable`, shared with clients.

use std::ffi::{CStr, CString};

use pgrx::prelude::*;
use pgrx::{AnyElement, JsonB};
use serde_json::{Map, Value};
use sync_ext_protocol::portable::{self, CodecError, NumberMode};

use crate::errors::{SyncError, SyncResult};

/// How one Postgres type converts to and from portable JSON.
#[derive(Clone, Debug)]
pub enum Codec {
    Bool,
    Int2,
    Int4,
    Float4,
    Float8,
    Uuid,
    Json,
    Jsonb,
    Bytea,
    Timestamptz,
    Timestamp,
    Date,
    Time,
    Interval,
    /// bigint and numeric: exact digits, through the type's text form.
    Exact(TextIo),
    /// text, varchar and char: strings, through the type's text form (so typmods are enforced).
    Text(TextIo),
    /// Enums travel as their label.
    Enum(TextIo),
    /// A domain travels as its base type; decoding checks the domain's constraints.
    Domain { oid: pg_sys::Oid, base: Box<Codec> },
    Array(Box<ArrayCodec>),
    /// A composite type: an object keyed by attribute name. `None` fields: an anonymous record,
    /// described by each value.
    Composite { oid: pg_sys::Oid, fields: Option<Vec<Field>> },
}

/// A type converted through its text input and output functions.
#[derive(Clone, Debug)]
pub struct TextIo {
    oid: pg_sys::Oid,
}

/// An array's element type and storage layout.
#[derive(Clone, Debug)]
pub struct ArrayCodec {
    element_oid: pg_sys::Oid,
    element: Codec,
    length: i16,
    by_value: bool,
    align: std::ffi::c_char,
}

/// One attribute of a composite type.
#[derive(Clone, Debug)]
pub struct Field {
    pub name: String,
    /// Index of the attribute in the type's tuple descriptor (dropped attributes included).
    pub position: usize,
    pub typmod: i32,
    pub codec: Codec,
    /// A generated column (its value is computed, never written).
    pub generated: bool,
}

/// The SQL name of a type, e.g. `numeric` or `public.mood`.
pub fn type_name(oid: pg_sys::Oid) -> String {
    // SAFETY: format_type_be accepts any oid (unknown ones print as "???").
    unsafe { CStr::from_ptr(pg_sys::format_type_be(oid)) }.to_string_lossy().into_owned()
}

impl Codec {
    /// Resolves the codec of a type, or an error naming the type when it cannot be mapped losslessly.
    pub fn for_type(oid: pg_sys::Oid) -> SyncResult<Codec> {
        use pg_sys::BuiltinOid as B;
        let builtin = match B::from_u32(oid.to_u32()) {
            Ok(B::BOOLOID) => Some(Codec::Bool),
            Ok(B::INT2OID) => Some(Codec::Int2),
            Ok(B::INT4OID) => Some(Codec::Int4),
            Ok(B::FLOAT4OID) => Some(Codec::Float4),
            Ok(B::FLOAT8OID) => Some(Codec::Float8),
            Ok(B::UUIDOID) => Some(Codec::Uuid),
            Ok(B::JSONOID) => Some(Codec::Json),
            Ok(B::JSONBOID) => Some(Codec::Jsonb),
            Ok(B::BYTEAOID) => Some(Codec::Bytea),
            Ok(B::TIMESTAMPTZOID) => Some(Codec::Timestamptz),
            Ok(B::TIMESTAMPOID) => Some(Codec::Timestamp),
            Ok(B::DATEOID) => Some(Codec::Date),
            Ok(B::TIMEOID) => Some(Codec::Time),
            Ok(B::INTERVALOID) => Some(Codec::Interval),
            Ok(B::INT8OID | B::NUMERICOID) => Some(Codec::Exact(TextIo { oid })),
            Ok(B::TEXTOID | B::VARCHAROID | B::BPCHAROID) => Some(Codec::Text(TextIo { oid })),
            Ok(B::RECORDOID) => Some(Codec::Composite { oid, fields: None }),
            _ => None,
        };
        if let Some(codec) = builtin {
            return Ok(codec);
        }
        let unsupported = || SyncError::UnsupportedType { type_name: type_name(oid) };
        // SAFETY: catalog lookups by oid; they raise a Postgres error for a dropped type.
        unsafe {
            let element_oid = pg_sys::get_element_type(oid);
            if element_oid != pg_sys::InvalidOid {
                let element = Codec::for_type(element_oid)?;
                let (mut length, mut by_value, mut align) = (0i16, false, 0 as std::ffi::c_char);
                pg_sys::get_typlenbyvalalign(element_oid, &mut length, &mut by_value, &mut align);
                return Ok(Codec::Array(Box::new(ArrayCodec { element_oid, element, length, by_value, align })));
            }
            match pg_sys::get_typtype(oid) as u8 {
                b'e' => Ok(Codec::Enum(TextIo { oid })),
                b'd' => {
                    let mut typmod = -1;
                    let base = pg_sys::getBaseTypeAndTypmod(oid, &mut typmod);
                    Ok(Codec::Domain { oid, base: Box::new(Codec::for_type(base)?) })
                }
                b'c' => Ok(Codec::Composite { oid, fields: Some(composite_fields(oid, -1)?) }),
                _ => Err(unsupported()),
            }
        }
    }

    /// The portable JSON of a non-null datum of this codec's type.
    ///
    /// # Safety
    /// `datum` must be a valid, non-null value of the type the codec was resolved for.
    pub unsafe fn encode(&self, datum: pg_sys::Datum, mode: NumberMode) -> SyncResult<Value> {
        unsafe {
            Ok(match self {
                Codec::Bool => Value::from(datum.value() != 0),
                Codec::Int2 => Value::from(datum.value() as i16),
                Codec::Int4 => Value::from(datum.value() as i32),
                Codec::Float4 => portable::encode_real(f32::from_datum(datum, false).unwrap_or_default()),
                Codec::Float8 => portable::encode_double(f64::from_datum(datum, false).unwrap_or_default()),
                Codec::Uuid => {
                    let id = pgrx::Uuid::from_datum(datum, false).expect("non-null uuid");
                    Value::from(uuid::Uuid::from_bytes(*id.as_bytes()).to_string())
                }
                Codec::Json => json_value(pg_sys::json_out, datum)?,
                Codec::Jsonb => json_value(pg_sys::jsonb_out, datum)?,
                Codec::Bytea => portable::encode_bytes(<&[u8]>::from_datum(datum, false).expect("non-null bytea")),
                Codec::Timestamptz => Value::from(portable::format_timestamp(datum.value() as i64, true)),
                Codec::Timestamp => Value::from(portable::format_timestamp(datum.value() as i64, false)),
                Codec::Date => Value::from(portable::format_date(datum.value() as i32)),
                Codec::Time => Value::from(portable::format_time(datum.value() as i64)),
                Codec::Interval => {
                    let interval = &*datum.cast_mut_ptr::<pg_sys::Interval>();
                    Value::from(portable::format_interval(interval.month, interval.day, interval.time))
                }
                Codec::Exact(io) => portable::encode_exact_number(&io.output(datum), mode),
                Codec::Text(io) | Codec::Enum(io) => Value::from(io.output(datum)),
                Codec::Domain { base, .. } => base.encode(datum, mode)?,
                Codec::Array(array) => array.encode(datum, mode)?,
                Codec::Composite { fields, .. } => composite_to_portable(datum, fields.as_deref(), mode)?,
            })
        }
    }

    /// A datum of this codec's type from portable JSON (`Value::Null` gives `None`). `typmod` is the
    /// target's type modifier (-1 for none), enforced as a cast would (varchar length, numeric scale).
    /// Errors that Postgres raises while building the value (a numeric overflow, a domain check)
    /// propagate as Postgres errors.
    pub fn decode(&self, value: &Value, typmod: i32) -> Result<Option<pg_sys::Datum>, CodecError> {
        if value.is_null() {
            return Ok(None);
        }
        let expect = |expected: &'static str| CodecError { expected, got: value.to_string() };
        Ok(Some(match self {
            Codec::Bool => value.as_bool().ok_or_else(|| expect("true or false"))?.into_datum().expect("bool datum"),
            Codec::Int2 => {
                let integer = portable::decode_integer(value, i16::MIN.into(), i16::MAX.into())?;
                (integer as i16).into_datum().expect("int2 datum")
            }
            Codec::Int4 => {
                let integer = portable::decode_integer(value, i32::MIN.into(), i32::MAX.into())?;
                (integer as i32).into_datum().expect("int4 datum")
            }
            Codec::Float4 => portable::decode_real(value)?.into_datum().expect("float4 datum"),
            Codec::Float8 => portable::decode_double(value)?.into_datum().expect("float8 datum"),
            Codec::Uuid => {
                let text = value.as_str().ok_or_else(|| expect("a UUID string"))?;
                let id = uuid::Uuid::try_parse(text).map_err(|_| expect("a UUID string"))?;
                pgrx::Uuid::from_bytes(*id.as_bytes()).into_datum().expect("uuid datum")
            }
            Codec::Json => pgrx::Json(value.clone()).into_datum().expect("json datum"),
            Codec::Jsonb => crate::jsonb::jsonb_from_value(value),
            Codec::Bytea => portable::decode_bytes(value)?.into_datum().expect("bytea datum"),
            Codec::Timestamptz => pg_sys::Datum::from(portable::parse_timestamp(value, true)?),
            Codec::Timestamp => pg_sys::Datum::from(portable::parse_timestamp(value, false)?),
            Codec::Date => pg_sys::Datum::from(portable::parse_date(value)?),
            Codec::Time => pg_sys::Datum::from(portable::parse_time(value)?),
            Codec::Interval => {
                let (months, days, micros) = portable::parse_interval(value)?;
                pgrx::datum::Interval::new(months, days, micros)
                    .map_err(|_| expect("an interval Postgres can hold"))?
                    .into_datum()
                    .expect("interval datum")
            }
            Codec::Exact(io) => io.input(&portable::decode_exact_number(value)?, typmod),
            Codec::Text(io) | Codec::Enum(io) => {
                let text = value.as_str().ok_or_else(|| expect("a string"))?;
                io.input(text, typmod)
            }
            Codec::Domain { oid, base } => {
                let mut base_typmod = -1;
                // SAFETY: `oid` is a domain; its base type and typmod are catalog lookups.
                unsafe { pg_sys::getBaseTypeAndTypmod(*oid, &mut base_typmod) };
                let datum = base.decode(value, base_typmod)?.expect("non-null value decodes to a datum");
                // SAFETY: the datum is of the domain's base type; domain_check raises on a violation.
                unsafe { pg_sys::domain_check(datum, false, *oid, std::ptr::null_mut(), std::ptr::null_mut()) };
                datum
            }
            Codec::Array(array) => array.decode(value)?,
            Codec::Composite { oid, fields } => {
                let fields = fields.as_ref().ok_or_else(|| expect("a value of a named composite type"))?;
                composite_from_portable(*oid, fields, value)?
            }
        }))
    }
}

impl TextIo {
    fn output(&self, datum: pg_sys::Datum) -> String {
        // SAFETY: the datum is of type `oid`, and its output function returns a palloc'd C string.
        unsafe {
            let (mut function, mut is_varlena) = (pg_sys::InvalidOid, false);
            pg_sys::getTypeOutputInfo(self.oid, &mut function, &mut is_varlena);
            let text = pg_sys::OidOutputFunctionCall(function, datum);
            CStr::from_ptr(text).to_string_lossy().into_owned()
        }
    }

    fn input(&self, text: &str, typmod: i32) -> pg_sys::Datum {
        let text = CString::new(text).expect("JSON strings in jsonb hold no NUL");
        // SAFETY: calls the type's input function, which raises a Postgres error on bad input.
        unsafe {
            let (mut function, mut io_param) = (pg_sys::InvalidOid, pg_sys::InvalidOid);
            pg_sys::getTypeInputInfo(self.oid, &mut function, &mut io_param);
            pg_sys::OidInputFunctionCall(function, text.as_ptr().cast_mut(), io_param, typmod)
        }
    }
}

impl ArrayCodec {
    unsafe fn encode(&self, datum: pg_sys::Datum, mode: NumberMode) -> SyncResult<Value> {
        unsafe {
            let array = pg_sys::pg_detoast_datum(datum.cast_mut_ptr()).cast::<pg_sys::ArrayType>();
            let dims = pgrx::array::RawArray::from_ptr(std::ptr::NonNull::new(array).expect("detoasted array")).dims().to_vec();
            let (mut elements, mut nulls, mut count) = (std::ptr::null_mut(), std::ptr::null_mut(), 0);
            pg_sys::deconstruct_array(
                array,
                self.element_oid,
                self.length.into(),
                self.by_value,
                self.align,
                &mut elements,
                &mut nulls,
                &mut count,
            );
            let count = usize::try_from(count).unwrap_or(0);
            let mut flat = Vec::with_capacity(count);
            for index in 0..count {
                flat.push(if *nulls.add(index) { Value::Null } else { self.element.encode(*elements.add(index), mode)? });
            }
            Ok(nest(&mut flat.into_iter(), &dims))
        }
    }

    fn decode(&self, value: &Value) -> Result<pg_sys::Datum, CodecError> {
        let mut dims = Vec::new();
        let mut flat = Vec::new();
        flatten(value, 0, &mut dims, &mut flat).map_err(|expected| CodecError { expected, got: value.to_string() })?;
        let mut datums = Vec::with_capacity(flat.len());
        let mut nulls = Vec::with_capacity(flat.len());
        for element in flat {
            let datum = self.element.decode(element, -1)?;
            nulls.push(datum.is_none());
            datums.push(datum.unwrap_or(pg_sys::Datum::from(0)));
        }
        // SAFETY: element datums are of `element_oid`, laid out as get_typlenbyvalalign says.
        let array = unsafe {
            if datums.is_empty() {
                pg_sys::construct_empty_array(self.element_oid)
            } else {
                let mut lower_bounds = vec![1; dims.len()];
                pg_sys::construct_md_array(
                    datums.as_mut_ptr(),
                    nulls.as_mut_ptr(),
                    dims.len() as i32,
                    dims.as_mut_ptr(),
                    lower_bounds.as_mut_ptr(),
                    self.element_oid,
                    self.length.into(),
                    self.by_value,
                    self.align,
                )
            }
        };
        Ok(pg_sys::Datum::from(array))
    }
}

/// Builds nested JSON arrays of `dims` from elements in row-major order.
fn nest(elements: &mut impl Iterator<Item = Value>, dims: &[i32]) -> Value {
    match dims.split_first() {
        None => Value::Array(Vec::new()),
        Some((&length, [])) => Value::Array(elements.take(length as usize).collect()),
        Some((&length, inner)) => Value::Array((0..length).map(|_| nest(elements, inner)).collect()),
    }
}

/// Flattens nested JSON arrays into row-major elements, checking they are rectangular.
fn flatten<'v>(value: &'v Value, depth: usize, dims: &mut Vec<i32>, flat: &mut Vec<&'v Value>) -> Result<(), &'static str> {
    const EXPECTED: &str = "a JSON array, nested evenly for each dimension (at most 6)";
    let items = value.as_array().ok_or(EXPECTED)?;
    let nested = items.first().is_some_and(Value::is_array);
    match dims.get(depth) {
        Some(&length) if length as usize != items.len() => return Err(EXPECTED),
        Some(_) => {}
        None if depth >= 6 => return Err(EXPECTED),
        None => dims.push(i32::try_from(items.len()).map_err(|_| EXPECTED)?),
    }
    for item in items {
        if item.is_array() != nested {
            return Err(EXPECTED);
        }
        if nested {
            flatten(item, depth + 1, dims, flat)?;
        } else {
            if dims.len() != depth + 1 {
                return Err(EXPECTED);
            }
            flat.push(item);
        }
    }
    if items.is_empty() && depth > 0 {
        return Err(EXPECTED);
    }
    Ok(())
}

/// A json or jsonb datum as a JSON value, written by `output` (`json_out` or `jsonb_out`): refused
/// (22023) when it holds a number JSON readers cannot carry exactly, which would otherwise be rounded.
///
/// # Safety
/// `datum` must be a non-null value of the type `output` writes.
unsafe fn json_value(output: unsafe fn(pg_sys::FunctionCallInfo) -> pg_sys::Datum, datum: pg_sys::Datum) -> SyncResult<Value> {
    let text = unsafe { pgrx::fcinfo::direct_function_call::<&CStr>(output, &[Some(datum)]) }.expect("json output is a string");
    let text = text.to_string_lossy();
    sync_ext_protocol::numbers::check_json_numbers(&text, "value")?;
    Ok(serde_json::from_str(&text).expect("Postgres writes valid JSON"))
}

/// The live attributes of a composite type.
pub fn composite_fields(oid: pg_sys::Oid, typmod: i32) -> SyncResult<Vec<Field>> {
    // SAFETY: lookup_rowtype_tupdesc pins the descriptor until DecrTupleDescRefCount.
    unsafe {
        let descriptor = pg_sys::lookup_rowtype_tupdesc(oid, typmod);
        let fields = tuple_desc_fields(descriptor);
        pg_sys::DecrTupleDescRefCount(descriptor);
        fields
    }
}

/// The live (not dropped) attributes of a tuple descriptor, with their codecs.
///
/// # Safety
/// `descriptor` must be a valid tuple descriptor.
pub unsafe fn tuple_desc_fields(descriptor: pg_sys::TupleDesc) -> SyncResult<Vec<Field>> {
    let attributes = unsafe { (*descriptor).attrs.as_slice((*descriptor).natts as usize) };
    attributes
        .iter()
        .enumerate()
        .filter(|(_, attribute)| !attribute.attisdropped)
        .map(|(position, attribute)| {
            let name = unsafe { CStr::from_ptr(attribute.attname.data.as_ptr()) }.to_string_lossy().into_owned();
            let codec = Codec::for_type(attribute.atttypid).map_err(|error| match error {
                SyncError::UnsupportedType { type_name } => SyncError::UnsupportedColumn { column: name.clone(), type_name },
                other => other,
            })?;
            Ok(Field { name, position, typmod: attribute.atttypmod, codec, generated: attribute.attgenerated != 0 })
        })
        .collect()
}

unsafe fn composite_to_portable(datum: pg_sys::Datum, fields: Option<&[Field]>, mode: NumberMode) -> SyncResult<Value> {
    unsafe {
        let header = pg_sys::pg_detoast_datum(datum.cast_mut_ptr()).cast::<pg_sys::HeapTupleHeaderData>();
        let type_fields = &(*header).t_choice.t_datum;
        let descriptor = pg_sys::lookup_rowtype_tupdesc(type_fields.datum_typeid, type_fields.datum_typmod);
        let resolved;
        let fields = match fields {
            Some(fields) => fields,
            None => {
                resolved = tuple_desc_fields(descriptor);
                match &resolved {
                    Ok(fields) => fields.as_slice(),
                    Err(_) => {
                        pg_sys::DecrTupleDescRefCount(descriptor);
                        return resolved.map(|_| Value::Null);
                    }
                }
            }
        };
        let natts = (*descriptor).natts as usize;
        let mut values = vec![pg_sys::Datum::from(0); natts];
        let mut nulls = vec![false; natts];
        let mut tuple = pg_sys::HeapTupleData {
            t_len: pgrx::varlena::varsize_any(header.cast()) as u32,
            t_data: header,
            ..Default::default()
        };
        pg_sys::heap_deform_tuple(&mut tuple, descriptor, values.as_mut_ptr(), nulls.as_mut_ptr());
        pg_sys::DecrTupleDescRefCount(descriptor);
        let mut object = Map::new();
        for field in fields {
            let position = field.position;
            let value = if nulls[position] { Value::Null } else { field.codec.encode(values[position], mode)? };
            object.insert(field.name.clone(), value);
        }
        Ok(Value::Object(object))
    }
}

fn composite_from_portable(oid: pg_sys::Oid, fields: &[Field], value: &Value) -> Result<pg_sys::Datum, CodecError> {
    let object = value.as_object().ok_or_else(|| CodecError { expected: "a JSON object", got: value.to_string() })?;
    if let Some(unknown) = object.keys().find(|key| !fields.iter().any(|field| &field.name == *key)) {
        return Err(CodecError { expected: "only the composite type's attributes", got: format!("{unknown:?}") });
    }
    let mut values = Vec::with_capacity(fields.len());
    for field in fields {
        values.push((field.position, field.codec.decode(object.get(&field.name).unwrap_or(&Value::Null), field.typmod)?));
    }
    Ok(form_record(oid, values))
}

/// A record of a composite type from (attribute position, datum or `None` for null) pairs;
/// attributes not given are null.
pub fn form_record(row_type: pg_sys::Oid, values: Vec<(usize, Option<pg_sys::Datum>)>) -> pg_sys::Datum {
    // SAFETY: builds a tuple of the type's descriptor from datums of each attribute's type.
    unsafe {
        let descriptor = pg_sys::lookup_rowtype_tupdesc(row_type, -1);
        let natts = (*descriptor).natts as usize;
        let mut datums = vec![pg_sys::Datum::from(0); natts];
        let mut nulls = vec![true; natts];
        for (position, datum) in values {
            if let Some(datum) = datum {
                datums[position] = datum;
                nulls[position] = false;
            }
        }
        let tuple = pg_sys::heap_form_tuple(descriptor, datums.as_mut_ptr(), nulls.as_mut_ptr());
        let record = pg_sys::heap_copy_tuple_as_datum(tuple, descriptor);
        pg_sys::DecrTupleDescRefCount(descriptor);
        record
    }
}

/// The `sync_ext.number_mode` setting.
pub fn number_mode() -> NumberMode {
    match crate::NUMBER_MODE.get() {
        crate::NumberModeSetting::String => NumberMode::String,
        crate::NumberModeSetting::NumberWhenSafe => NumberMode::NumberWhenSafe,
    }
}

/// The portable JSON of any supported value (`sync_ext.number_mode` decides bigint and numeric).
#[pg_extern(stable, parallel_safe)]
fn sync_to_portable(value: Option<AnyElement>) -> Result<JsonB, pgrx::pg_sys::panic::ErrorReport> {
    let Some(value) = value else { return Ok(JsonB(Value::Null)) };
    let codec = Codec::for_type(value.oid())?;
    // SAFETY: the datum is a non-null value of `value.oid()`.
    Ok(JsonB(unsafe { codec.encode(value.datum(), number_mode()) }?))
}

/// A row as a portable JSON object keyed by column name.
#[pg_extern(stable, parallel_safe)]
fn sync_row_to_portable(row: Option<pgrx::composite_type!("record")>) -> Result<JsonB, pgrx::pg_sys::panic::ErrorReport> {
    let Some(row) = row else { return Ok(JsonB(Value::Null)) };
    let datum = row.into_composite_datum().expect("composite datum");
    // SAFETY: the datum is a non-null composite value.
    Ok(JsonB(unsafe { composite_to_portable(datum, None, number_mode()) }?))
}

/// The value of the witness's type that `portable` encodes, e.g. `sync_from_portable('"3.50"', NULL::numeric)`.
#[pg_extern(stable, parallel_safe)]
fn sync_from_portable(
    portable: Option<JsonB>,
    witness: Option<AnyElement>,
    fcinfo: pg_sys::FunctionCallInfo,
) -> Result<Option<AnyElement>, pgrx::pg_sys::panic::ErrorReport> {
    let (Some(portable), _) = (portable, witness) else { return Ok(None) };
    // SAFETY: reading the declared type of this call's second argument.
    let oid = unsafe { pg_sys::get_fn_expr_argtype((*fcinfo).flinfo, 1) };
    let codec = Codec::for_type(oid)?;
    let datum = codec
        .decode(&portable.0, -1)
        .map_err(|error| SyncError::InvalidPortable { type_name: type_name(oid), problem: error.to_string() })?;
    // SAFETY: the datum was built as a value of `oid`.
    Ok(datum.and_then(|datum| unsafe { AnyElement::from_polymorphic_datum(datum, false, oid) }))
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::testing::error_of;

    /// (type, expression, the exact jsonb text of its portable form)
    const CASES: &[(&str, &str, &str)] = &[
        ("uuid", "'7F1E8C3A-5B7D-4E2A-9C1F-2B3D4E5F6A7B'", r#""7f1e8c3a-5b7d-4e2a-9c1f-2b3d4e5f6a7b""#),
        ("jsonb", r#"'{"a": [1, {"b": null}], "c": "é"}'"#, r#"{"a": [1, {"b": null}], "c": "é"}"#),
        ("json", r#"'{"a":1}'"#, r#"{"a": 1}"#),
        ("numeric", "'3.50'", r#""3.50""#),
        ("numeric", "'-0.000001000'", r#""-0.000001000""#),
        ("numeric", "'NaN'", r#""NaN""#),
        ("numeric", "'Infinity'", r#""Infinity""#),
        ("numeric", "'-Infinity'", r#""-Infinity""#),
        ("numeric", "'123456789012345678901234567890.123456789012345678901234567890'", r#""123456789012345678901234567890.123456789012345678901234567890""#),
        ("bigint", "'9007199254740993'", r#""9007199254740993""#),
        ("bigint", "'-9223372036854775808'", r#""-9223372036854775808""#),
        ("smallint", "'-32768'", "-32768"),
        ("integer", "'2147483647'", "2147483647"),
        ("real", "'1.5'", "1.5"),
        ("real", "'0.1'", "0.1"),
        ("real", "'1.4e-45'", "0.000000000000000000000000000000000000000000001"),
        ("double precision", "'0.1'", "0.1"),
        ("double precision", "'1.5e300'", "1.5e300"),
        ("double precision", "'NaN'", r#""NaN""#),
        ("double precision", "'Infinity'", r#""Infinity""#),
        ("real", "'-Infinity'", r#""-Infinity""#),
        ("double precision", "'-0'", r#""-0""#),
        ("boolean", "true", "true"),
        ("text", r#"E'h\u00e9llo \u2713 "q" \t\n\x01 \\'"#, r#""héllo ✓ \"q\" \t\n\u0001 \\""#),
        ("varchar(5)", "'abc'", r#""abc""#),
        ("char(4)", "'ab'", r#""ab  ""#),
        ("timestamptz", "'2026-11-24 15:30:00.123456+05:30'", r#""2026-11-24T10:00:00.123456Z""#),
        ("timestamptz", "'2026-11-24 10:00:00+00'", r#""2026-11-24T10:00:00Z""#),
        ("timestamptz", "'infinity'", r#""infinity""#),
        ("timestamptz", "'-infinity'", r#""-infinity""#),
        ("timestamptz", "'4714-11-24 00:00:00+00 BC'", r#""-004713-11-24T00:00:00Z""#),
        ("timestamptz", "'294276-12-31 23:59:59.999999+00'", r#""+294276-12-31T23:59:59.999999Z""#),
        ("timestamp", "'2026-11-24 10:00:00.5'", r#""2026-11-24T10:00:00.500000""#),
        ("date", "'2026-11-24'", r#""2026-11-24""#),
        ("date", "'5874897-12-31'", r#""+5874897-12-31""#),
        ("date", "'0001-01-01 BC'", r#""0000-01-01""#),
        ("time", "'10:20:30.5'", r#""10:20:30.500000""#),
        ("time", "'24:00:00'", r#""24:00:00""#),
        ("interval", "'1 year 2 months 3 days 04:05:06.5'", r#""P1Y2M3DT4H5M6.5S""#),
        ("interval", "'-1 days -00:00:00.25'", r#""P-1DT-0.25S""#),
        ("interval", "'0'", r#""PT0S""#),
        ("bytea", r"'\x00ff10'", r#""AP8Q""#),
        ("bytea", "''", r#""""#),
        ("integer[]", "'{{1,NULL},{3,4}}'", "[[1, null], [3, 4]]"),
        ("text[]", "'{}'", "[]"),
        ("text[]", "'{a,NULL,\"b c\"}'", r#"["a", null, "b c"]"#),
        ("numeric[]", "'{{{1.10}},{{NaN}}}'", r#"[[["1.10"]], [["NaN"]]]"#),
        ("timestamptz[]", "'{\"2026-11-24 10:00:00+00\"}'", r#"["2026-11-24T10:00:00Z"]"#),
        ("bytea[]", r#"'{"\\x01"}'"#, r#"["AQ=="]"#),
        ("mood", "'happy'", r#""happy""#),
        ("mood[]", "'{sad,happy}'", r#"["sad", "happy"]"#),
        ("positive", "'3.5'", r#""3.5""#),
        ("pair", "'(1.50,\"2026-11-24 10:00:00+00\",\"{x,NULL}\")'", r#"{"n": "1.50", "at": "2026-11-24T10:00:00Z", "tags": ["x", null]}"#),
        ("pair[]", "ARRAY[NULL, '(2,,)']::pair[]", r#"[null, {"n": "2", "at": null, "tags": null}]"#),
        ("numeric", "NULL", "null"),
    ];

    fn create_test_types() {
        Spi::run(
            "CREATE TYPE mood AS ENUM ('sad', 'happy');
             CREATE DOMAIN positive AS numeric CHECK (VALUE > 0);
             CREATE TYPE pair AS (n numeric, dropped int, at timestamptz, tags text[]);
             ALTER TYPE pair DROP ATTRIBUTE dropped;",
        )
        .unwrap();
    }

    fn portable_text(ty: &str, expression: &str) -> String {
        Spi::get_one::<String>(&format!("SELECT sync_to_portable(({expression})::{ty})::text")).unwrap().unwrap()
    }

    /// Whether decoding the portable form gives back exactly the value (bit for bit for floats,
    /// by text for json, which has no equality).
    fn round_trips(ty: &str, expression: &str) -> bool {
        let compare = match ty {
            "real" | "double precision" => "(v IS NULL AND back IS NULL) OR send(v) = send(back)".replace("send", if ty == "real" { "float4send" } else { "float8send" }),
            "json" => "v::jsonb = back::jsonb".to_owned(),
            _ => "v IS NOT DISTINCT FROM back AND v::text IS NOT DISTINCT FROM back::text".to_owned(),
        };
        Spi::get_one::<bool>(&format!(
            "SELECT {compare} FROM (SELECT v, sync_from_portable(sync_to_portable(v), NULL::{ty}) AS back
                                      FROM (SELECT ({expression})::{ty} AS v) AS input) AS t"
        ))
        .unwrap()
        .unwrap()
    }

    #[pg_test]
    fn every_rule_gives_its_exact_json_and_round_trips() {
        create_test_types();
        Spi::run("SET LOCAL TimeZone = 'America/New_York'; SET LOCAL DateStyle = 'SQL, DMY'; SET LOCAL extra_float_digits = 0").unwrap();
        for (ty, expression, expected) in CASES {
            let expected = match *expected {
                "1.5e300" => format!("15{}", "0".repeat(299)),
                exact => exact.to_owned(),
            };
            assert_eq!(portable_text(ty, expression), expected, "{expression}::{ty}");
            assert!(round_trips(ty, expression), "{expression}::{ty} does not round-trip");
        }
    }

    #[pg_test]
    fn edges_round_trip_exactly() {
        create_test_types();
        let edges = [
            ("numeric", "('9' || repeat('0', 1000) || '.' || repeat('1', 1000))::numeric"),
            ("numeric", "'1e-16383'::numeric"),
            ("double precision", "'4.9e-324'"),
            ("double precision", "'-2.2250738585072014e-308'"),
            ("real", "'-0'"),
            ("real", "'NaN'"),
            ("timestamptz", "'1999-12-31 23:59:59.999999+00'"),
            ("timestamp", "'4714-11-24 00:00:00 BC'"),
            ("bytea", "(SELECT decode(string_agg(lpad(to_hex(b), 2, '0'), ''), 'hex') FROM generate_series(0, 255) AS b)"),
            ("text", "(SELECT string_agg(chr(c), '') FROM generate_series(1, 1000) AS c)"),
            ("integer[]", "'[0:1]={1,2}'::integer[]"),
            ("text[]", "'{{{{{{a}}}}}}'"),
            ("jsonb", r#"'{"deep": {"er": [[[{"x": [1.5e300, -0.0, "\u0001"]}]]]}}'"#),
            ("interval", "'178000000 years'"),
            ("interval", "'-2147483648 days -2562047788:00:54.775807'"),
        ];
        for (ty, expression) in edges {
            if expression.contains("[0:1]") {
                let back = Spi::get_one::<String>(&format!("SELECT sync_from_portable(sync_to_portable({expression}), NULL::{ty})::text")).unwrap();
                assert_eq!(back.as_deref(), Some("{1,2}"), "lower bounds are not carried; the values are");
                continue;
            }
            assert!(round_trips(ty, expression), "{expression}::{ty} does not round-trip");
        }
    }

    #[pg_test]
    fn number_when_safe_writes_safe_integers_as_numbers() {
        Spi::run("SET LOCAL sync_ext.number_mode = 'number_when_safe'").unwrap();
        for (expression, expected) in [
            ("42::bigint", "42"),
            ("(-9007199254740991)::bigint", "-9007199254740991"),
            ("9007199254740992::bigint", r#""9007199254740992""#),
            ("3::numeric", "3"),
            ("3.0::numeric", r#""3.0""#),
            ("'NaN'::numeric", r#""NaN""#),
        ] {
            assert_eq!(Spi::get_one::<String>(&format!("SELECT sync_to_portable({expression})::text")).unwrap().unwrap(), expected);
        }
        assert_eq!(Spi::get_one::<i64>("SELECT sync_from_portable('42', NULL::bigint)").unwrap(), Some(42));
    }

    #[pg_test]
    fn rows_become_objects_keyed_by_column() {
        Spi::run("CREATE TABLE item (id uuid, price numeric(6,2), tags text[], seen timestamptz)").unwrap();
        Spi::run("INSERT INTO item VALUES ('7f1e8c3a-5b7d-4e2a-9c1f-2b3d4e5f6a7b', 3.5, '{a}', '2026-11-24 10:00:00+00')").unwrap();
        let row = Spi::get_one::<String>("SELECT sync_row_to_portable(i)::text FROM item AS i").unwrap().unwrap();
        assert_eq!(row, r#"{"id": "7f1e8c3a-5b7d-4e2a-9c1f-2b3d4e5f6a7b", "seen": "2026-11-24T10:00:00Z", "tags": ["a"], "price": "3.50"}"#);
        let anonymous = Spi::get_one::<String>("SELECT sync_row_to_portable(ROW(1::bigint, 'x'::text))::text").unwrap().unwrap();
        assert_eq!(anonymous, r#"{"f1": "1", "f2": "x"}"#);
    }

    #[pg_test]
    fn unmappable_types_and_bad_values_are_clear_errors() {
        create_test_types();
        assert_eq!(error_of("SELECT sync_to_portable(point(1, 2))"), "0A000: type point has no portable JSON form");
        assert_eq!(error_of("SELECT sync_to_portable(ARRAY['1.2.3.4'::inet])"), "0A000: type inet has no portable JSON form");
        for (json, ty, problem) in [
            (r#""abc""#, "numeric", r#"expected a string of exact digits like "3.50" (or a JSON integer), got "abc""#),
            ("1.5", "integer", "expected a JSON integer from -2147483648 to 2147483647, got 1.5"),
            ("70000", "smallint", "expected a JSON integer from -32768 to 32767, got 70000"),
            (r#""x""#, "uuid", r#"expected a UUID string, got "x""#),
            ("[[1], [2, 3]]", "integer[]", "expected a JSON array, nested evenly for each dimension (at most 6), got [[1],[2,3]]"),
            (r#""AQ""#, "bytea", r#"expected a string of standard padded base64, got "AQ""#),
            (r#""2026-11-24T10:00:00""#, "timestamp with time zone", r#"expected an ISO 8601 timestamp with a zone like "2026-11-24T10:00:00.123456Z", or "infinity", "-infinity", got "2026-11-24T10:00:00""#),
            (r#"{"n": 1, "nope": 2}"#, "pair", r#"expected only the composite type's attributes, got "nope""#),
        ] {
            let error = error_of(&format!("SELECT sync_from_portable('{json}', NULL::{ty})"));
            assert_eq!(error, format!("22P02: invalid portable value for type {ty}: {problem}"), "{json} as {ty}");
        }
        assert!(error_of(r#"SELECT sync_from_portable('"-1"', NULL::positive)"#).starts_with("23514: "));
        assert!(error_of(r#"SELECT sync_from_portable('"angry"', NULL::mood)"#).starts_with("22P02: invalid input value for enum mood"));
        assert_eq!(Spi::get_one::<bool>("SELECT sync_from_portable(NULL, NULL::numeric) IS NULL").unwrap(), Some(true));
        assert_eq!(Spi::get_one::<bool>("SELECT sync_from_portable('null', NULL::numeric) IS NULL").unwrap(), Some(true));
    }
}
