//! Bounded fuzzing of the push decoders (run with every test run): any JSON value and any bytes give
//! changes or an error naming where, never a panic.

use proptest::prelude::*;
use serde_json::{json, Value};
use sync_ext_protocol::change::Limits;
use sync_ext_protocol::{msgpack, parse_changes};

const LIMITS: Limits = Limits { max_changes: 50, max_value_bytes: 4096 };

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
        prop_oneof![Just("insert"), Just("update"), Just("delete"), Just("2026-01-01T00:00:00.000Z-0000"), Just("00000000-0000-4000-8000-000000000001")].prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::from),
            proptest::collection::btree_map(
                prop_oneof![Just("op_id".to_owned()), Just("model".to_owned()), Just("pk".to_owned()), Just("op".to_owned()),
                            Just("hlc".to_owned()), Just("actor".to_owned()), Just("value".to_owned()), ".{0,6}".prop_map(String::from)],
                inner,
                0..8,
            )
            .prop_map(|fields| Value::Object(fields.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn any_json_parses_or_names_the_field_at_fault(body in any_json()) {
        if let Err(error) = parse_changes(&body, &LIMITS) {
            prop_assert!(error.location.starts_with("changes"), "{error}");
        }
    }

    #[test]
    fn any_bytes_decode_as_messagepack_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(body) = msgpack::decode::<Value>(&bytes) {
            let _ = parse_changes(&body, &LIMITS);
        }
    }

    #[test]
    fn a_valid_change_with_one_field_replaced_parses_or_names_that_field(field in prop_oneof![Just("op_id"), Just("model"), Just("pk"), Just("op"), Just("hlc"), Just("actor"), Just("value")], replacement in any_json()) {
        let mut change = json!({"op_id": "00000000-0000-4000-8000-000000000001", "model": "todo", "pk": "1", "op": "update",
                                "hlc": "2026-01-01T00:00:00.000Z-0000", "actor": "a", "value": {"x": 1}});
        change[field] = replacement;
        if let Err(error) = parse_changes(&json!([change]), &LIMITS) {
            // A new op can make the (unchanged) value the field at fault: a delete carries none.
            let blamed = [format!("changes[0].{field}"), "changes[0].value".to_owned()];
            prop_assert!(blamed[..if field == "op" { 2 } else { 1 }].contains(&error.location), "{error}");
        }
    }
}
