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

/// Decodes a wire structure.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, rmp_serde::decode::Error> {
    T::deserialize(&mut rmp_serde::Deserializer::new(bytes).with_human_readable())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::wire::PushResponse;

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
