//! MessagePack encoding of the wire structures: maps with named fields, and values in their
//! human-readable form (op_ids and hlcs as strings), so a MessagePack body holds exactly what the
//! JSON body holds.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Encodes a wire structure.
pub fn encode(value: &impl Serialize) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    let mut bytes = Vec::new();
    value.serialize(&mut rmp_serde::Serializer::new(&mut bytes).with_struct_map().with_human_readable())?;
    Ok(bytes)
}

/// Writes a JSON document as MessagePack token by token, for callers that walk a document held in
/// another form (the server's jsonb) instead of building a `serde_json::Value` first. The bytes decode
/// to what [`encode`] of the same document gives (map entries may come in another order).
#[derive(Default)]
pub struct Writer {
    bytes: Vec<u8>,
}

impl Writer {
    /// A writer with room for `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        Writer { bytes: Vec::with_capacity(capacity) }
    }

    pub fn null(&mut self) {
        rmp::encode::write_nil(&mut self.bytes).expect("writing to a Vec cannot fail");
    }

    pub fn bool(&mut self, value: bool) {
        rmp::encode::write_bool(&mut self.bytes, value).expect("writing to a Vec cannot fail");
    }

    pub fn str(&mut self, value: &str) {
        rmp::encode::write_str(&mut self.bytes, value).expect("writing to a Vec cannot fail");
    }

    /// A JSON number given as its text: an unsigned or signed integer when it is one that fits 64
    /// bits, else a float, as `serde_json` reads it.
    pub fn number(&mut self, text: &str) -> Result<(), serde_json::Error> {
        let number: serde_json::Number = text.parse()?;
        let written = if let Some(unsigned) = number.as_u64() {
            rmp::encode::write_uint(&mut self.bytes, unsigned).map(drop)
        } else if let Some(signed) = number.as_i64() {
            rmp::encode::write_sint(&mut self.bytes, signed).map(drop)
        } else {
            rmp::encode::write_f64(&mut self.bytes, number.as_f64().expect("a JSON number that is no integer is a float"))
        };
        written.expect("writing to a Vec cannot fail");
        Ok(())
    }

    /// A whole value, as [`encode`] writes it.
    pub fn value(&mut self, value: &impl Serialize) {
        self.bytes.extend(encode(value).expect("JSON values encode as MessagePack"));
    }

    /// The start of an array of `len` elements.
    pub fn array(&mut self, len: u32) {
        rmp::encode::write_array_len(&mut self.bytes, len).expect("writing to a Vec cannot fail");
    }

    /// The start of a map of `len` entries (each a key, then its value).
    pub fn map(&mut self, len: u32) {
        rmp::encode::write_map_len(&mut self.bytes, len).expect("writing to a Vec cannot fail");
    }

    /// The bytes written.
    pub fn finish(self) -> Vec<u8> {
        self.bytes
    }
}

/// Decodes a wire structure.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, rmp_serde::decode::Error> {
    T::deserialize(&mut rmp_serde::Deserializer::new(bytes).with_human_readable())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::wire::PushResponse;

    #[test]
    fn the_token_writer_writes_what_encode_writes() {
        let document = json!({"changes": [{"n": 1, "neg": -7, "big": 18446744073709551615u64, "f": 2.5, "ok": true,
                                            "none": null, "s": "é\"x"}], "cursor": 3});
        let mut writer = super::Writer::default();
        writer.map(2);
        writer.str("changes");
        writer.array(1);
        writer.map(7);
        for (key, number) in [("n", "1"), ("neg", "-7"), ("big", "18446744073709551615"), ("f", "2.5")] {
            writer.str(key);
            writer.number(number).unwrap();
        }
        writer.str("ok");
        writer.bool(true);
        writer.str("none");
        writer.null();
        writer.str("s");
        writer.str("é\"x");
        writer.str("cursor");
        writer.number("3").unwrap();
        let walked = writer.finish();
        let decoded: serde_json::Value = super::decode(&walked).unwrap();
        assert_eq!(decoded, document);
        assert_eq!(walked.len(), super::encode(&document).unwrap().len(), "the same forms, so the same size");
    }

    #[test]
    fn op_ids_travel_as_strings_like_in_json() {
        let response: PushResponse = serde_json::from_value(json!({"cursor": 3, "results": [
            {"op_id": "7f1e8c3a-5b7d-4e2a-9c1f-2b3d4e5f6a7b", "status": "applied", "seq": 3}]}))
        .unwrap();
        let bytes = super::encode(&response).unwrap();
        let generic: serde_json::Value = super::decode(&bytes).unwrap();
        assert_eq!(generic["results"][0]["op_id"], "7f1e8c3a-5b7d-4e2a-9c1f-2b3d4e5f6a7b");
        assert_eq!(super::decode::<PushResponse>(&bytes).unwrap(), response);
    }
}
