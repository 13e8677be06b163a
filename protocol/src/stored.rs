//! The flat form in which the server (`sync_ext.snapshots`) and clients store a row's merge state.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::hlc::Hlc;
use crate::merge::{Existence, FieldRegister, RowState, Stamp};

/// A row's merge state, flattened: the visible fields, the existence register, the delete horizon,
/// and the stamps of the fields whose winner is not the existence winner (usually none).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRow {
    /// Live fields (empty for a deleted row).
    pub value: Map<String, Value>,
    /// The change holding the existence register.
    pub stamp: Stamp,
    pub deleted: bool,
    pub deleted_hlc: Option<Hlc>,
    /// `{"field": [hlc, actor, op_id]}` for each field written by another change than `stamp`.
    pub field_stamps: Map<String, Value>,
}

impl StoredRow {
    /// Flattens a row state; `None` for a row no change has reached.
    pub fn from_state(state: &RowState) -> Option<Self> {
        let existence = state.existence.as_ref()?;
        let field_stamps = state
            .fields
            .iter()
            .filter(|(_, field)| field.stamp != existence.stamp)
            .map(|(name, field)| {
                let stamp = &field.stamp;
                let encoded = Value::from(vec![stamp.hlc.to_string(), stamp.actor.clone(), stamp.op_id.to_string()]);
                (name.clone(), encoded)
            })
            .collect();
        Some(Self {
            value: state.field_values(),
            stamp: existence.stamp.clone(),
            deleted: existence.deleted,
            deleted_hlc: state.deleted_hlc,
            field_stamps,
        })
    }

    /// Rebuilds the row state; the error says which part does not decode.
    pub fn into_state(self) -> Result<RowState, String> {
        let mut fields = std::collections::BTreeMap::new();
        for (name, value) in self.value {
            let stamp = match self.field_stamps.get(&name) {
                Some(encoded) => decode_stamp(encoded).ok_or_else(|| format!("field_stamps.{name} is not [hlc, actor, op_id]"))?,
                None => self.stamp.clone(),
            };
            fields.insert(name, FieldRegister { stamp, value });
        }
        Ok(RowState {
            existence: Some(Existence { stamp: self.stamp, deleted: self.deleted }),
            deleted_hlc: self.deleted_hlc,
            fields,
        })
    }
}

fn decode_stamp(encoded: &Value) -> Option<Stamp> {
    let [hlc, actor, op_id] = encoded.as_array()?.as_slice() else { return None };
    Some(Stamp {
        hlc: hlc.as_str()?.parse().ok()?,
        actor: actor.as_str()?.to_owned(),
        op_id: Uuid::try_parse(op_id.as_str()?).ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Change, Op};
    use serde_json::json;

    #[test]
    fn a_row_survives_the_round_trip_and_stores_only_differing_stamps() {
        let hlc = |ms: &str| format!("2026-11-24T10:00:00.{ms}Z-0000").parse().unwrap();
        let change = |op, ms, id, value: Value| Change {
            op_id: Uuid::from_u128(id),
            model: "todo".into(),
            pk: "1".into(),
            op,
            hlc: hlc(ms),
            actor: "a".into(),
            value: value.as_object().cloned(),
        };
        let mut state = RowState::default();
        state.apply(&change(Op::Delete, "000", 1, Value::Null));
        state.apply(&change(Op::Insert, "001", 2, json!({"a": 1, "b": [1, 2]})));
        state.apply(&change(Op::Update, "002", 3, json!({"b": "x"})));
        let stored = StoredRow::from_state(&state).unwrap();
        assert_eq!(stored.field_stamps.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(stored.into_state().unwrap(), state);
        assert!(StoredRow::from_state(&RowState::default()).is_none());
    }
}
